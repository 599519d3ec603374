"""The MLflow recorder when the store goes away: writes never wait, nothing is lost, one command replays.

An outage is simulated by making the client's calls fail as an unreachable server makes them fail (MLflow's
``INTERNAL_ERROR`` for a refused connection); the store itself is a temporary SQLite file.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OUTAGE = """
import os, sys, time
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

def refused(*args, **kwargs):
    raise MlflowException("API request failed with exception Connection refused")

def outage():
    saved = {name: getattr(MlflowClient, name) for name in OUTAGE_CALLS}
    for name in OUTAGE_CALLS:
        setattr(MlflowClient, name, refused)
    return saved

OUTAGE_CALLS = ("create_run", "log_batch", "log_param", "update_run", "set_terminated", "log_inputs", "search_runs",
                "get_experiment_by_name", "log_artifact", "log_artifacts", "get_run", "create_experiment")
"""


def store(tmp_path: Path, monkeypatch) -> tuple[str, str]:
    import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DTL_TRACKING_OUTBOX", str(tmp_path / "outbox"))
    return uri, tracking.init_tracking("outage-test", uri)


def test_writes_during_an_outage_do_not_wait_and_land_when_the_store_answers(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    import tracking

    uri, experiment_id = store(tmp_path, monkeypatch)
    namespace: dict = {}
    exec(OUTAGE, namespace)
    saved = namespace["outage"]()
    try:
        started = time.perf_counter()
        parent = tracking.Run.create(experiment_id, "parent", {"kind": "test"}, {"a": 1}, uri=uri)
        child = tracking.Run.create(experiment_id, "child", {"kind": "test"}, {"b": 2}, parent=parent, uri=uri)
        for epoch in range(20):
            child.log_metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
        child.set_tags({"note": "written while down"})
        (tmp_path / "plot.txt").write_text("a plot")
        child.log_artifacts(tmp_path / "plot.txt", "plots")
        child.finish()
        parent.finish()
        assert time.perf_counter() - started < 2.0  # the writes never waited for the store
        assert parent.run_id.startswith("pending-") and child.run_id.startswith("pending-")
        assert list((tmp_path / "outbox").glob("*.jsonl"))  # kept on disk meanwhile
    finally:
        for name, method in saved.items():
            setattr(MlflowClient, name, method)
    box = child.outbox
    assert box.flush(60)
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and "delayed records sent" in err
    runs = {r.info.run_name: r for r in MlflowClient(uri).search_runs([experiment_id])}
    assert set(runs) == {"parent", "child"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert runs["child"].data.params == {"b": "2"} and runs["child"].data.tags["note"] == "written while down"
    history = MlflowClient(uri).get_metric_history(runs["child"].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(20))
    assert [a.path for a in MlflowClient(uri).list_artifacts(runs["child"].info.run_id, "plots")] == ["plots/plot.txt"]
    assert not list((tmp_path / "outbox").glob("*.jsonl")) and not list((tmp_path / "outbox" / "files").glob("*"))


def test_a_process_killed_during_an_outage_leaves_a_journal_that_one_command_replays(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri, experiment_id = store(tmp_path, monkeypatch)
    script = OUTAGE + f"""
import tracking
outage()
parent = tracking.Run.create({experiment_id!r}, "parent", params={{"a": 1}})
child = tracking.Run.create({experiment_id!r}, "child", parent=parent)
child.log_metrics({{"val/accuracy": 0.5}}, step=3)
child.finish("FINISHED")
parent.finish("FINISHED")
os._exit(9)  # killed: no exit handler sends anything
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    assert "is unreachable" in done.stderr
    assert MlflowClient(uri).search_runs([experiment_id]) == []  # nothing reached the store
    replay = subprocess.run([sys.executable, "-m", "tracking.outbox", "replay", str(tmp_path / "outbox")], env=env,
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert replay.returncode == 0 and "every delayed record is sent" in replay.stdout, replay.stderr[-2000:]
    runs = {r.info.run_name: r for r in MlflowClient(uri).search_runs([experiment_id])}
    assert set(runs) == {"parent", "child"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert runs["child"].data.metrics == {"val_accuracy": 0.5} and runs["parent"].data.params == {"a": "1"}
    again = subprocess.run([sys.executable, "-m", "tracking.outbox", "replay", str(tmp_path / "outbox")], env=env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and len(MlflowClient(uri).search_runs([experiment_id])) == 2  # sent once


def test_replay_names_a_missing_folder_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tracking.outbox", "replay", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stderr.strip() == f"{tmp_path / 'nope'}: no such outbox folder"
