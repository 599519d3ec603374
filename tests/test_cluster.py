"""Sweeps on a real multi-node Ray cluster and an MLflow tracking server, both started here on loopback.

``sweeps.local_cluster.LocalCluster`` starts Ray's own ``Cluster`` (a head without CPUs and worker nodes, each a
raylet of its own) and ``mlflow server`` over HTTP; every test stops exactly what it started. Slow: about one and
a half minutes each on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "sweeps" / "run.py"
TASKS = ["digits", "patterns"]


def params(data_root: Path, epochs: int, image_size: int) -> dict:
    return {
        "data": {"source": "synthetic", "root": str(data_root), "tasks": TASKS, "image_size": image_size,
                 "num_test": 50},
        "model": {"backbone": "vit_micro_patch4_32", "checkpoint": False, "method": "dtl_plus",
                  "drop_path_scope": "suffix"},
        "training": {"epochs": epochs, "warmup_epochs": 0, "cooldown_epochs": 0, "lr": 0.003, "progress": False},
        "evaluation": {"protocol": "final", "seeds": [42]},
        "overrides": {task: {} for task in TASKS},
    }


SPACE = {
    "method": "dtl_plus",
    "num_samples": 3,
    "scheduler": {"grace_period": "25%", "reduction_factor": 3},
    "params": {"rank": {"type": "int", "low": 1, "high": 8, "log": True},
               "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
}


def sweep_command(tmp_path: Path, data_root: Path, *, epochs: int, image_size: int, space: dict, address: str,
                  extra: tuple[str, ...] = ()) -> list[str]:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(data_root, epochs, image_size)))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "best.yaml").write_text("".join(f"{task}: {{}}\n" for task in TASKS))
    return [sys.executable, str(RUN), "--space", str(tmp_path / "space.yaml"), "--params",
            str(tmp_path / "params.yaml"), "--best-path", str(tmp_path / "best.yaml"), "--storage-path",
            str(tmp_path / "results"), "--name", "cluster", "--address", address, *extra]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from dtl.config import ExperimentConfig

    root = tmp_path_factory.mktemp("cluster_data") / "synthetic"
    ExperimentConfig.from_dict(params(root, 1, 32)).protocol.ensure_data()
    return root


def children(client, name: str = "cluster") -> list:
    experiment = client.get_experiment_by_name("dtl-sweeps")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{name}'")
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def start(command: list[str], tmp_path: Path, tracking_uri: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO),
           "DTL_CACHE_DIR": str(tmp_path / "prefix_cache"), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rd", dir="/tmp")}
    with open(tmp_path / "sweep.log", "w") as output:  # the process writes to its own copy of the descriptor
        return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(process: subprocess.Popen, tmp_path: Path, timeout: float) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    return (tmp_path / "sweep.log").read_text()


@pytest.mark.slow
def test_a_sweep_of_two_tasks_survives_a_lost_worker_node(tmp_path, data_root):
    from mlflow.tracking import MlflowClient

    from sweeps.local_cluster import LocalCluster

    with LocalCluster(workers=3, cpus_per_worker=1) as cluster:
        client = MlflowClient(cluster.tracking_uri)
        command = sweep_command(tmp_path, data_root, epochs=8, image_size=32, space=SPACE, address=cluster.address,
                                extra=("--checkpoint-every", "0"))  # a checkpoint after every epoch
        process = start(command, tmp_path, cluster.tracking_uri)

        def busy() -> bool:  # three trials running, each with two epochs recorded (so one checkpoint at least)
            running = [r for r in children(client) if r.info.status == "RUNNING"]
            return len(running) == 3 and all(len(client.get_metric_history(r.info.run_id, "train_loss")) >= 2
                                             for r in running)

        deadline = time.monotonic() + 300
        while not busy():
            assert process.poll() is None, (tmp_path / "sweep.log").read_text()
            assert time.monotonic() < deadline, "no trial reported within 300 s"
            time.sleep(1)
        cluster.remove_worker()  # a spot instance is gone: its trial process dies mid-training
        out = finish(process, tmp_path, timeout=600)
        assert process.returncode == 0, out

        results = json.loads((tmp_path / "results" / "cluster" / "results.json").read_text())
        rows = [row for task in results["tasks"].values() for row in task["rows"]]
        assert len(rows) == 6 and all(r["status"] in ("done", "stopped early") for r in rows), rows
        restarted = [r for r in rows if r["restarts"]]
        assert restarted and "restarted from a checkpoint after their worker died" in out
        runs = children(client)
        assert len(runs) == 6 and {r.data.tags["trial_id"] for r in runs} == {r["trial_id"] for r in rows}
        assert not [r for r in runs if r.info.status == "RUNNING"]
        for row in restarted:  # one MLflow run per trial, its curve continued from the checkpoint
            run = next(r for r in runs if r.data.tags["trial_id"] == row["trial_id"])
            assert run.data.tags["restarts"] == "1" and int(run.data.tags["restarted_from_epoch"]) >= 1
            steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
            assert steps == set(range(row["epochs"])), steps
        for task in TASKS:  # every task has a winner: a challenger in best.yaml, or the incumbent kept as it is
            decision = results["tasks"][task]["decision"]
            assert decision["winner"]
            entry = yaml.safe_load((tmp_path / "best.yaml").read_text())[task]
            assert bool(entry) == decision["replaced"]


@pytest.mark.slow
def test_fractional_gpus_pack_eight_trials_on_two_logical_gpus(tmp_path, data_root):
    from mlflow.tracking import MlflowClient

    from sweeps.local_cluster import LocalCluster

    with LocalCluster(workers=2, cpus_per_worker=4, gpus_per_worker=1) as cluster:
        client = MlflowClient(cluster.tracking_uri)
        space = {**SPACE, "num_samples": 4, "scheduler": {"grace_period": 4}}
        command = sweep_command(tmp_path, data_root, epochs=4, image_size=32, space=space, address=cluster.address,
                                extra=("--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5"))
        process = start(command, tmp_path, cluster.tracking_uri)
        most = 0
        while process.poll() is None:
            most = max(most, sum(r.info.status == "RUNNING" for r in children(client)))
            time.sleep(0.5)
        out = finish(process, tmp_path, timeout=10)
        assert process.returncode == 0, out
        assert "up to 8 at a time over all tasks (0.5 CPU, 0.25 GPU per trial)" in out
        assert most == 8  # 2 logical GPUs / 0.25 per trial
        runs = children(client)
        assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
        assert all("no CUDA device is visible here: training on the CPU" in r.data.tags["device_note"] for r in runs)


@pytest.mark.slow
def test_the_local_cluster_its_tracking_server_and_a_joined_driver_stay_on_loopback():
    import ipaddress

    import psutil

    from sweeps.local_cluster import LocalCluster

    # (no `import ray` before the cluster starts: Ray reads its authentication mode at import)
    with LocalCluster(workers=2, cpus_per_worker=1) as cluster:
        assert ipaddress.ip_address(cluster.address.rsplit(":", 1)[0]).is_loopback
        nodes = cluster.cluster.list_all_nodes()
        assert len(nodes) == 3 and all(ipaddress.ip_address(n.node_ip_address).is_loopback for n in nodes)
        driver = ("import sys; from sweeps.cluster import quiet_environment, start_ray; "
                  f"quiet_environment({cluster.address!r}); import ray; start_ray({cluster.address!r}); "
                  "print(ray.util.get_node_ip_address(), *[n['NodeManagerAddress'] for n in ray.nodes()])")
        joined = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert joined.returncode == 0, joined.stderr[-2000:]
        addresses = joined.stdout.split()
        assert len(addresses) == 4 and all(ipaddress.ip_address(a).is_loopback for a in addresses), joined.stdout
        started = psutil.Process().children(recursive=True) + [psutil.Process(cluster.server.pid)]
        listening = set()
        for process in started:
            try:
                listening |= {(process.name(), c.laddr.ip) for c in process.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                continue
        assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
        elsewhere = {(name, ip) for name, ip in listening
                     if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback}
        assert not elsewhere, elsewhere


@pytest.mark.slow
def test_a_sweep_survives_its_tracking_server_down_for_ten_minutes(tmp_path, data_root):
    from mlflow.tracking import MlflowClient

    from sweeps.local_cluster import LocalCluster

    outage_s = float(os.environ.get("DTL_TEST_OUTAGE_S", 600))
    with LocalCluster(workers=3, cpus_per_worker=1) as cluster:
        client = MlflowClient(cluster.tracking_uri)
        command = sweep_command(tmp_path, data_root, epochs=8, image_size=32, space=SPACE, address=cluster.address)
        process = start(command, tmp_path, cluster.tracking_uri)
        deadline = time.monotonic() + 300
        while sum(r.info.status == "RUNNING" for r in children(client)) < 3:  # every trial training
            assert process.poll() is None, (tmp_path / "sweep.log").read_text()
            assert time.monotonic() < deadline, "no three trials ran within 300 s"
            time.sleep(1)
        cluster.stop_tracking()
        down = time.monotonic()
        while time.monotonic() - down < outage_s and process.poll() is None:
            time.sleep(2)
        ended_during_outage = process.poll() is not None
        cluster.start_tracking()
        out = finish(process, tmp_path, timeout=1200)
        assert process.returncode == 0, out
        assert not ended_during_outage, out  # the driver waits for the server to take the delayed records
        assert "is unreachable" in out and "records are delayed" in out
        results = json.loads((tmp_path / "results" / "cluster" / "results.json").read_text())
        rows = [row for task in results["tasks"].values() for row in task["rows"]]
        assert len(rows) == 6 and all(r["status"] in ("done", "stopped early") for r in rows), rows
        runs = children(MlflowClient(cluster.tracking_uri))
        assert len(runs) == 6 and {r.data.tags["trial_id"] for r in runs} == {r["trial_id"] for r in rows}
        assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags["trial_id"], r.info.status) for r in runs]
        for row in rows:  # complete: every epoch the trial trained is in its curve
            run = next(r for r in runs if r.data.tags["trial_id"] == row["trial_id"])
            steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
            assert steps == set(range(row["epochs"])), (row, steps)
        assert not list((tmp_path / "results" / "cluster" / "mlflow-outbox").glob("*.jsonl"))
        print(out[-3000:])
