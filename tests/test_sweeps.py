"""Sweeps: search spaces as data, the Optuna define-by-run function, and `python sweeps/run.py` end to end
(Ray Tune + OptunaSearch + ASHA, MLflow parent/child runs, sweeps/best.yaml), on a tiny synthetic task.

Every sweep here writes to temporary paths only (--params, --best-path, --storage-path, MLFLOW_TRACKING_URI,
RAY_TMPDIR) and runs in its own process group, which the test kills afterwards: no Ray process of anyone else is
touched (no global `ray stop`).

Fast: everything except the tests marked slow (resume after SIGKILL, Ctrl-C, SIGTERM and a resume compared with
an uninterrupted sweep, --address on a `ray start` cluster), which take one to three minutes each on 2 cores. The
incumbent rule, the per-task routers and the schedule each trial trains with are also tested without Ray.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sweeps.space import SpaceError
from sweeps.space_file import available_spaces, load_space

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "sweeps" / "run.py"
TASK = "digits"
EPOCHS = 2

# A tiny but real setting: the micro ViT at 16 px (16 tokens), random init, 2 epochs of train800.
TINY_PARAMS = {
    "data": {"source": "synthetic", "root": None, "tasks": [TASK], "image_size": 16, "num_test": 50},
    "model": {"backbone": "vit_micro_patch4_32", "checkpoint": False, "method": "dtl_plus"},
    "training": {"epochs": EPOCHS, "warmup_epochs": 0, "cooldown_epochs": 0, "lr": 0.003, "progress": False},
    "evaluation": {"protocol": "final", "seeds": [42]},
    "overrides": {TASK: {}},
}
# lr 1e6 makes the loss NaN at once: the engine raises FloatingPointError and the trial must be FAILED.
# With the TPE seed 0 the three trials draw lr 1e6 once and 0.003 twice.
FAILING_SPACE = {
    "method": "dtl_plus",
    "num_samples": 3,
    "scheduler": {"grace_period": 1, "reduction_factor": 2},
    "params": {
        "method": {"type": "categorical", "choices": ["dtl_plus", "dtl"]},
        "kernel_size": {"type": "int", "low": 3, "high": 4, "when": {"method": "dtl_plus"}},  # 16 px: a 4 x 4 grid
        "rank": {"type": "int", "low": 1, "high": 16, "log": True},
        "lr": {"type": "categorical", "choices": [1.0e6, 0.003]},
    },
}
PLAIN_SPACE = {
    "method": "dtl",
    "num_samples": 4,
    "params": {"rank": {"type": "int", "low": 1, "high": 16, "log": True},
               "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ spaces


def test_shipped_spaces_load_with_the_design_ranges():
    assert {"dtl", "dtl_plus", "lora", "adaptformer"} <= set(available_spaces())
    for name in ("dtl", "dtl_plus", "lora", "adaptformer"):
        space = load_space(name)
        params = {p.name: p for p in space.resolve(12).params}
        assert (params["rank"].low, params["rank"].high) == (1, 16)
        assert (params["lr"].low, params["lr"].high, params["lr"].log) == (1e-4, 1e-2, True)
        # trials train with the pipeline's schedule; ASHA's rungs are shares of it
        assert space.training == {} and space.grace_period == "25%" and space.reduction_factor == 3
        assert space.grace_epochs(20) == 5 and space.grace_epochs(110) == 28
        # equal search budgets, so methods compare fairly
        assert space.num_samples == load_space("dtl_plus").num_samples
    dtl_plus = {p.name: p for p in load_space("dtl_plus").resolve(12).params}
    assert dtl_plus["start_block"].low == 0 and dtl_plus["start_block"].high == 11  # M in 0..N-1
    assert set(dtl_plus["method"].choices) == {"dtl_plus", "dtl"}  # DWConv on / off
    assert (dtl_plus["kernel_size"].low, dtl_plus["kernel_size"].high) == (3, 5)
    assert dtl_plus["kernel_size"].when == {"method": ("dtl_plus",)}
    assert {p.name: p for p in load_space("dtl").resolve(24).params}["start_block"].high == 23  # Swin-B: 24


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update(scheduler_x=1), "unknown top-level key(s) scheduler_x"),
    (lambda s: s.update(method="dtl_pluss"), "method: expected one of"),
    (lambda s: s["params"]["lr"].update(low="small"), "params.lr.low: expected a number, got 'small'"),
    (lambda s: s["params"]["lr"].update(low=0.0), "params.lr.low: a log-scaled range needs low > 0"),
    (lambda s: s["params"]["rank"].update(high="all_blocks"), "params.rank.high: expected an integer or one of"),
    (lambda s: s["params"]["rank"].update(low=20), "params.rank: low (20) must not exceed high (16)"),
    (lambda s: s["params"].update(lrr={"type": "float", "low": 0.1, "high": 1.0}), "params.lrr: not an override key"),
    (lambda s: s["params"]["lr"].update(type="uniform"), "params.lr.type: expected one of int, float, categorical"),
    (lambda s: s["params"]["kernel_size"].pop("when"), "params.kernel_size: method(s) dtl do not take kernel_size"),
    (lambda s: s["params"]["kernel_size"].update(when={"method": "lora"}),
     "params.kernel_size.when.method: value(s) ['lora'] are not among its choices"),
    (lambda s: s["params"]["kernel_size"].update(when={"rank": 2}),
     "params.kernel_size.when.rank: must name a categorical parameter listed earlier"),
    (lambda s: s.update(training={"epochs": 0}), "training.epochs: expected an integer >= 1"),
    (lambda s: s.update(training={"eval_every": 3}), "training.eval_every: not a training setting a sweep may fix"),
    (lambda s: s["scheduler"].update(grace_period="quarter"), "scheduler.grace_period: expected a number of epochs"),
    (lambda s: s["scheduler"].update(grace_period="150%"), "scheduler.grace_period: expected a number of epochs"),
    (lambda s: s.update(params={}), "params: expected a non-empty mapping"),
    (lambda s: s.update(num_samples=0), "num_samples: expected an integer >= 1"),
])
def test_malformed_space_is_a_clear_error_naming_the_file_and_key(tmp_path, edit, expected):
    raw = yaml.safe_load((REPO / "sweeps/spaces/dtl_plus.yaml").read_text())
    edit(raw)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_space_file_that_is_not_yaml_or_missing(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("params: {rank: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(broken)
    with pytest.raises(SpaceError, match="unknown search space 'dtl_pls': expected one of .*dtl_plus"):
        load_space("dtl_pls")


def suggestions(space, seed: int, count: int = 12) -> list[dict]:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=space.define_by_run(), metric="val_accuracy", mode="max",
                            sampler=optuna.samplers.TPESampler(seed=seed))
    return [searcher.suggest(f"trial{i}") for i in range(count)]


def test_define_by_run_samples_kernel_only_with_the_dwconv_and_repeats_for_a_seed():
    space = load_space("dtl_plus").resolve(12)
    first, again, other = suggestions(space, 3), suggestions(space, 3), suggestions(space, 4)
    assert first == again  # same seed -> identical configurations
    assert first != other
    assert {c["method"] for c in first} == {"dtl_plus", "dtl"}
    for config in first:
        assert ("kernel_size" in config) == (config["method"] == "dtl_plus")  # conditional on DWConv on
        assert 3 <= config.get("kernel_size", 3) <= 5 and 1 <= config["rank"] <= 16
        assert 0 <= config["start_block"] <= 11 and 1e-4 <= config["lr"] <= 1e-2
        assert config["drop_path"] in (0.0, 0.1, 0.2) and 0 <= config["weight_decay"] <= 0.1
    # a space that does not search the method hands it over as a constant
    for config in suggestions(load_space("lora").resolve(12), 0, 3):
        assert config["method"] == "lora" and set(config) == {"method", "rank", "lr", "weight_decay", "drop_path"}


def test_space_define_by_run_pickles_for_resume():
    import pickle

    function = load_space("dtl_plus").resolve(12).define_by_run()
    assert pickle.loads(pickle.dumps(function)) == function  # OptunaSearch pickles it into the experiment state


def test_the_current_configuration_is_the_first_point_when_it_lies_in_the_space():
    from dtl.config import ExperimentConfig
    from dtl.models import EMBEDDED_BACKBONE, create_backbone, family_for
    from sweeps.planning import current_settings

    params = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": "/abs/data"}}
    space = load_space("dtl_plus").resolve(12)
    # a ViT, whose paper settings are rank 2, M 6, kernel 3
    paper = family_for(create_backbone(EMBEDDED_BACKBONE))
    base = ExperimentConfig.from_dict({**params, "overrides": {TASK: {"lr": 0.002, "kernel_size": 5}}})
    point, why_not = space.start_point(current_settings(base.for_task(TASK), space, paper))
    # null rank/start block take the paper's values; overrides win; only the space's parameters are kept
    assert why_not == "" and point == {"method": "dtl_plus", "kernel_size": 5, "rank": 2, "start_block": 6,
                                       "lr": 0.002, "weight_decay": 0.05, "drop_path": 0.0}
    # DWConv off: the conditional kernel size is not part of the point
    plain = ExperimentConfig.from_dict({**params, "overrides": {TASK: {"method": "dtl", "rank": 4}}})
    point, _ = space.start_point(current_settings(plain.for_task(TASK), space, paper))
    assert point["method"] == "dtl" and point["rank"] == 4 and "kernel_size" not in point
    # a space with its own method starts from the current lr etc. with that method's default rank
    lora = load_space("lora").resolve(12)
    point, _ = lora.start_point(current_settings(base.for_task(TASK), lora, paper))
    assert point == {"rank": 8, "lr": 0.002, "weight_decay": 0.05, "drop_path": 0.0}
    # outside the ranges: no start point, and the reason names the parameter
    wild = ExperimentConfig.from_dict({**params, "overrides": {TASK: {"lr": 0.5}}})
    point, why_not = space.start_point(current_settings(wild.for_task(TASK), space, paper))
    assert point is None and "lr (0.5)" in why_not and "0.0001..0.01" in why_not
    other = ExperimentConfig.from_dict({**params, "model": {**params["model"], "method": "linear"}})
    point, why_not = space.start_point(current_settings(other.for_task(TASK), space, paper))
    assert point is None and "method ('linear')" in why_not


def test_trial_config_layers_pipeline_budget_and_sampled_values():
    from dtl.config import ExperimentConfig
    from sweeps.trainable import TrialSetup, trial_config

    base = ExperimentConfig.from_dict({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": "/abs/data"},
                                       "overrides": {TASK: {"lr": 0.5, "beta": 50.0, "epochs": 9}}})
    setup = TrialSetup(task=TASK, base_config=base.to_dict(), training={"epochs": 3, "cooldown_epochs": 0},
                       seed=42, eval_every=1, threads=1, tracking_uri="sqlite:///x.db", experiment_id="1", parent_run_id="p",
                       sweep_name="s", space_name="dtl_plus")
    config = trial_config(setup, {"method": "dtl", "lr": 0.002, "rank": 4}).for_task(TASK)
    assert config.training.lr == 0.002 and config.model.rank == 4 and config.model.method == "dtl"  # sampled win
    assert config.training.epochs == 3  # the sweep's budget beats the pipeline's override
    assert config.model.beta == 50.0  # unsearched pipeline overrides stay
    assert config.evaluation.protocol == "val" and config.training.eval_every == 1  # val200 every epoch
    assert config.data.root == "/abs/data"


def test_resources_are_checked_against_the_nodes(monkeypatch):
    import ray

    from sweeps.cluster import check_resources, default_concurrency
    from sweeps.state import SweepError

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert check_resources(0.5, 0) == {"CPU": 2.0, "GPU": 0.0}
    with pytest.raises(SweepError, match="no Ray node can hold a trial of --cpus-per-trial 4"):
        check_resources(4, 0)
    with pytest.raises(SweepError, match="--gpus-per-trial 0.25"):
        check_resources(1, 0.25)
    assert default_concurrency({"CPU": 2.0, "GPU": 0.0}, 0.5, 0, 10) == 4
    assert default_concurrency({"CPU": 16.0, "GPU": 1.0}, 2, 0.25, 10) == 4  # four trials packed on one GPU


def test_help_documents_every_flag(capsys):
    from sweeps import run

    with pytest.raises(SystemExit) as exit_:
        run.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--space", "--tasks", "--num-samples", "--max-concurrent", "--gpus-per-trial", "--cpus-per-trial",
                 "--address", "--scheduler", "--seed", "--storage-path", "--resume", "--name", "--params",
                 "--best-path", "--experiment"):
        assert flag in text


# ------------------------------------------------------------------------------- the schedule of a trial


def test_a_space_without_training_uses_the_pipelines_schedule(tmp_path):
    from dtl.config import ExperimentConfig
    from sweeps.planning import plan_task

    params = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": "/abs/data", "image_size": None},
              "training": {**TINY_PARAMS["training"], "epochs": 20, "warmup_epochs": 2},
              "overrides": {TASK: {"epochs": 16}}}
    base = ExperimentConfig.from_dict(params)
    plan = plan_task(base, TASK, load_space("dtl_plus"))
    assert plan.epochs == plan.final_epochs == 16 and not plan.shortened  # the task's own resolved schedule
    assert plan.grace_epochs == 4 and plan.start["start_block"] == 6  # 25% of 16; the incumbent is a point

    short = write_yaml(tmp_path / "short.yaml", {**PLAIN_SPACE, "training": {"epochs": 4, "warmup_epochs": 1},
                                                 "scheduler": {"grace_period": 2}})
    plan = plan_task(base, TASK, load_space(short))
    assert plan.epochs == 4 and plan.final_epochs == 16 and plan.shortened


def test_the_shipped_spaces_work_unchanged_with_the_paper_schedule():
    from dtl.config import load_config
    from sweeps.planning import plan_task

    config = load_config(REPO / "params" / "vit_b16_vtab1k.yaml")
    plan = plan_task(config, "dsprites_ori", load_space("dtl_plus"))
    assert (plan.epochs, plan.grace_epochs, config.training.warmup_epochs) == (110, 28, 10)
    assert plan.start == {"method": "dtl_plus", "kernel_size": 5, "rank": 2, "start_block": 6, "lr": 0.0008,
                          "weight_decay": 0.05, "drop_path": 0.2}  # the authors' settings are the incumbent


# ------------------------------------------------------------------------------------- the incumbent rule


def correctness(hits: int, total: int = 200, offset: int = 0):
    import numpy as np

    correct = np.zeros(total, dtype=bool)
    correct[offset:offset + hits] = True
    return correct


def test_the_incumbent_is_kept_on_a_tie_and_on_a_one_image_win_and_replaced_on_a_clear_win():
    from sweeps.selection import Candidate, choose_winner, decode_scores, encode_scores

    incumbent = Candidate("inc", 0.5, correctness(100))
    tie = Candidate("tie", 0.5, correctness(100, offset=50))  # as many images won as lost
    one = Candidate("one", 0.505, correctness(101))  # one more image right
    clear = Candidate("clear", 0.65, correctness(130))  # 30 more, none lost
    for challengers in ([tie], [one], [tie, one]):
        decision = choose_winner(incumbent, challengers)
        assert decision.winner == "inc" and not decision.replaced and "kept" in decision.reason
    assert choose_winner(incumbent, [one]).comparisons[0].p_value == 0.5  # 1 of 1 disagreements: a coin flip
    decision = choose_winner(incumbent, [tie, one, clear])
    assert decision.winner == "clear" and decision.replaced and decision.margin == pytest.approx(0.15)
    assert decision.level == pytest.approx(0.05 / 3)  # Bonferroni over the three challengers
    comparison = next(c for c in decision.comparisons if c.trial_id == "clear")
    assert (comparison.wins, comparison.losses) == (30, 0) and comparison.p_value == pytest.approx(0.5 ** 30)
    # a win that would pass alone fails once many challengers were tried: 8 vs 1 disagreements, p = 0.0195
    close_hits = correctness(108)
    close_hits[0] = False  # wins images 100..107, loses image 0
    close = Candidate("close", 0.535, close_hits)
    assert choose_winner(incumbent, [close]).replaced
    assert not choose_winner(incumbent, [close] + [Candidate(f"t{i}", 0.5, correctness(100)) for i in range(3)]).replaced
    # without an incumbent the best val accuracy wins, and the decision says nothing was compared
    decision = choose_winner(None, [tie, clear])
    assert decision.winner == "clear" and "no incumbent" in decision.reason
    # per-image results survive their trip through Tune and MLflow
    bits = correctness(37, total=203, offset=5)
    assert (decode_scores(encode_scores(bits)) == bits).all() and len(encode_scores(bits)) < 60


def test_kept_incumbents_leave_best_yaml_alone_and_winners_replace_entries(tmp_path):
    from sweeps.results import TaskOutcome, TrialRow, decide
    from sweeps.search_strategy import write_winners
    from sweeps.selection import encode_scores
    from sweeps.state import SweepState

    def outcome(task: str, challenger_hits: int) -> TaskOutcome:
        rows = [TrialRow(task, "inc", "done", 2, 0.5, {"lr": 0.003}, incumbent=True,
                         per_image=encode_scores(correctness(100))),
                TrialRow(task, "new", "done", 2, challenger_hits / 200, {"lr": 0.01, "rank": 8},
                         per_image=encode_scores(correctness(challenger_hits))),
                TrialRow(task, "short", "stopped early", 1, 0.9, {"lr": 0.1})]  # never the winner
        result = TaskOutcome(task, 2, 2, rows, finished=True)
        result.decision = decide(rows)
        return result

    best = tmp_path / "best.yaml"
    best.write_text("digits: {}\npatterns: {lr: 0.001}\n")
    state = SweepState(path=tmp_path / "sweep.json", name="s", space="dtl_plus", space_file="", tasks={},
                       num_samples=3, scheduler="asha", seed=0, alpha=0.05, params_path=str(tmp_path / "none.yaml"),
                       best_path=str(best), experiment="e", experiment_id="1", tracking_uri="sqlite:///x")
    kept, replaced = outcome("digits", 101), outcome("patterns", 140)
    assert kept.best.trial_id == "inc" and replaced.best.trial_id == "new"
    write_winners(state, [kept, replaced])
    entries = yaml.safe_load(best.read_text())
    assert entries == {"digits": {}, "patterns": {"lr": 0.01, "rank": 8}}
    assert TaskOutcome.from_dict(replaced.to_dict()).best.trial_id == "new"  # what --resume reads back


# ----------------------------------------------------------------------------- one Tuner for every task


class FakeSearcher:
    """Stands in for OptunaSearch: numbered suggestions, remembers what it was told."""

    def __init__(self, name: str):
        self.name, self.count, self.completed = name, 0, []

    def suggest(self, trial_id):
        self.count += 1
        return {"lr": self.count}

    def on_trial_result(self, trial_id, result):
        pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, error))


def test_one_searcher_per_task_behind_one_tune_searcher():
    from ray.tune.search import Searcher

    from sweeps.search import TaskSearch

    searchers = {"a": FakeSearcher("a"), "b": FakeSearcher("b")}
    search = TaskSearch(searchers, {"a": 2, "b": 3}, {"a": True, "b": False}, metric="val_accuracy", mode="max")
    configs = [search.suggest(f"t{i}") for i in range(5)]
    assert [c["task"] for c in configs] == ["a", "b", "a", "b", "b"]  # the task with the fewest trials next
    assert [c["incumbent"] for c in configs] == [True, False, False, False, False]  # b has no start point
    assert [c["lr"] for c in configs] == [1, 1, 2, 2, 3] and search.suggest("t5") == Searcher.FINISHED
    search.on_trial_complete("t1", {"val_accuracy": 0.5})
    search.on_trial_complete("t2", None, error=True)
    assert searchers["b"].completed == [("t1", False)] and searchers["a"].completed == [("t2", True)]


def test_asha_compares_trials_within_a_task_and_never_stops_the_incumbent():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sweeps.search import TaskASHA

    def asha():
        return ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max", max_t=8, grace_period=2)

    scheduler = TaskASHA({"a": asha(), "b": asha()}, {"a": 8, "b": 8}, "epoch")
    trials = {name: SimpleNamespace(trial_id=name, config={"task": task, "incumbent": incumbent})
              for name, task, incumbent in (("good", "a", False), ("incumbent", "a", True), ("weak", "a", False),
                                            ("other", "b", False))}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def at_rung(name: str, accuracy: float) -> str:
        return scheduler.on_trial_result(None, trials[name], {"epoch": 2, "val_accuracy": accuracy})

    assert at_rung("good", 0.9) == TrialScheduler.CONTINUE
    assert at_rung("incumbent", 0.1) == TrialScheduler.CONTINUE  # would be stopped: below the rung's median
    assert scheduler.protected_stops == {"incumbent": 1}
    assert at_rung("weak", 0.2) == TrialScheduler.STOP  # an ordinary trial is stopped
    assert at_rung("other", 0.01) == TrialScheduler.CONTINUE  # task b's rung holds only its own trials


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from dtl.config import ExperimentConfig

    root = tmp_path_factory.mktemp("sweep_data") / "synthetic"
    config = ExperimentConfig.from_dict({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": str(root)}})
    config.protocol.ensure_data()
    return root


class Sweep:
    """`python sweeps/run.py` on temporary files, in its own process group (so its Ray can be cleaned up)."""

    def __init__(self, tmp_path: Path, data_root: Path, space: dict):
        self.tmp = tmp_path
        self.params = write_yaml(tmp_path / "params.yaml",
                                 {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": str(data_root)}})
        self.best = tmp_path / "best.yaml"
        self.best.write_text("# shipped entries\ndigits: {}\npatterns: {lr: 0.001}\n")
        self.space = write_yaml(tmp_path / "space.yaml", space)
        self.storage = tmp_path / "results"
        self.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        # Ray's socket paths must stay short: a dedicated temp dir per sweep, outside pytest's long paths.
        self.ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "RAY_TMPDIR": self.ray_tmp,
                    "DTL_CACHE_DIR": str(tmp_path / "prefix_cache"), "PYTHONPATH": str(REPO)}
        self.processes: list[subprocess.Popen] = []

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, str(RUN), "--space", str(self.space), "--params", str(self.params),
                "--best-path", str(self.best), "--storage-path", str(self.storage), "--name", "tiny", *extra]

    def start(self, *extra: str, log: str = "sweep.log") -> subprocess.Popen:
        with open(self.tmp / log, "w") as output:  # the process writes to its own copy of the file descriptor
            process = subprocess.Popen(self.command(*extra), env=self.env, cwd=self.tmp, start_new_session=True,
                                       stdout=output, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def run(self, *extra: str, timeout: float = 400, log: str = "sweep.log") -> tuple[int, str]:
        process = self.start(*extra, log=log)
        try:
            process.wait(timeout=timeout)
        finally:
            self.kill_group(process)
        return process.returncode, (self.tmp / log).read_text()

    @staticmethod
    def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill what this sweep started (its driver and the Ray processes that share its session)."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for process in self.processes:
            self.kill_group(process)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self) -> tuple[list, list]:
        """(parent runs, child runs) of this sweep."""
        client = self.client()
        experiment = client.get_experiment_by_name("dtl-sweeps")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'tiny'")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        return parents, children

    def val_steps(self, run) -> list[int]:
        return sorted(m.step for m in self.client().get_metric_history(run.info.run_id, "val_accuracy"))


@pytest.fixture
def sweep_factory(tmp_path, tiny_data):
    made: list[Sweep] = []

    def make(space: dict) -> Sweep:
        made.append(Sweep(tmp_path, tiny_data, space))
        return made[-1]

    yield make
    for sweep in made:
        sweep.close()


def test_tiny_sweep_records_parent_children_best_and_a_failed_trial(sweep_factory):
    sweep = sweep_factory(FAILING_SPACE)
    sweep.env["CUDA_VISIBLE_DEVICES"] = "0"  # as on a GPU node: Ray leaves it to trials that asked for no GPU
    code, out = sweep.run("--seed", "0")
    assert code == 0, out

    parents, children = sweep.runs()
    assert len(parents) == 1 and parents[0].data.tags["task"] == TASK and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert all(c.data.tags["gpu_share"] == "0" and c.data.tags["cuda_visible_devices"] == "" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1, [(c.info.status, c.data.params.get("trial.lr")) for c in children]
    assert float(failed[0].data.params["trial.lr"]) == 1e6 and "FloatingPointError" in failed[0].data.tags["error"]
    good = [c for c in children if c is not failed[0]]
    assert all(c.info.status == "FINISHED" for c in good)  # the sweep went on past the failure
    for child in good:
        steps = sweep.val_steps(child)  # per-epoch val accuracy, logged as the trial ran
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= EPOCHS
        assert 0 <= child.data.metrics["val_accuracy"] <= 1
        assert child.data.params["evaluation.protocol"] == "val"  # selection never sees the test split

    best = [c for c in children if c.data.tags.get("best") == "true"]
    assert len(best) == 1 and best[0].info.status == "FINISHED"
    # the first trial was the current configuration (params.yaml with the paper defaults filled in)
    assert "first trial = the current configuration (method=dtl_plus kernel_size=3 rank=2 lr=0.003)" in out
    incumbent = [c for c in children if c.data.tags["incumbent"] == "true"]
    assert len(incumbent) == 1 and len(sweep.val_steps(incumbent[0])) == EPOCHS  # never stopped early
    assert incumbent[0].data.params["trial.rank"] == "2" and incumbent[0].data.params["trial.kernel_size"] == "3"
    assert incumbent[0].data.params["trial.lr"] == "0.003"
    # the incumbent rule: a challenger wins only if it beats the incumbent on the same val images beyond chance
    parent = parents[0]
    replaced = parent.data.tags["replaced_incumbent"] == "true"
    assert (best[0].info.run_id == incumbent[0].info.run_id) != replaced
    assert "p =" in parent.data.tags["decision"] or "no challenger" in parent.data.tags["decision"]
    assert parent.data.metrics["best_val_accuracy"] == best[0].data.metrics["val_accuracy"]
    assert parent.data.metrics["incumbent_val_accuracy"] == incumbent[0].data.metrics["val_accuracy"]
    assert parent.data.tags["best_run_id"] == best[0].info.run_id
    assert parent.data.metrics["trials_failed"] == 1
    assert (sweep.storage / "tiny" / f"cost_{TASK}.png").stat().st_size > 1000  # accuracy vs cost, per task
    assert any(a.path == f"cost_{TASK}.png" for a in sweep.client().list_artifacts(parent.info.run_id))
    for child in good:  # cost next to accuracy
        if len(sweep.val_steps(child)) == EPOCHS:
            assert child.data.metrics["trainable_params"] > 0 and child.data.metrics["train_time_s"] > 0
            assert child.data.metrics["saved_bytes_per_batch"] > 0 and ":" in child.data.tags["val_per_image"]

    # best.yaml: a kept incumbent leaves the task's entry alone; other entries and a header are kept
    text = sweep.best.read_text()
    entries = yaml.safe_load(text)
    assert entries["patterns"] == {"lr": 0.001}
    if replaced:
        winner = {k[len("trial."):]: v for k, v in best[0].data.params.items() if k.startswith("trial.")}
        assert text.startswith("#") and "sweeps/run.py" in text and set(entries[TASK]) == set(winner)
    else:
        assert entries[TASK] == {} and "incumbent was beaten" in out

    results = json.loads((sweep.storage / "tiny" / "results.json").read_text())
    assert len(results["tasks"][TASK]["rows"]) == 3
    assert results["best"][TASK]["val_score"] == parent.data.metrics["best_val_accuracy"]
    assert "failed" in out and "Incumbent rule" in out and re.search(r"trials \d/3 done, 0 running", out)

    # a second run of a finished sweep re-runs nothing
    code, again = sweep.run("--resume", log="again.log")
    assert code == 0 and "finished earlier: nothing to run" in again, again
    assert len(sweep.runs()[1]) == 3


def test_cli_errors_come_before_any_work(sweep_factory, monkeypatch, capsys):
    from sweeps import run

    sweep = sweep_factory(PLAIN_SPACE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.tracking_uri)
    assert run.main(sweep.command("--tasks", "not_a_task")[2:]) == 2
    err = capsys.readouterr().err
    assert "not_a_task" in err and "Traceback" not in err
    assert not (sweep.storage / "tiny").exists()

    (sweep.storage / "tiny").mkdir(parents=True)  # a sweep of that name exists: never silently overwritten
    assert run.main(sweep.command()[2:]) == 2
    assert "exists already: pass --resume" in capsys.readouterr().err
    assert run.main(sweep.command("--resume", "--name", "nothing")[2:]) == 2
    assert "no sweep named 'nothing'" in capsys.readouterr().err
    assert run.main(["--space", "dtl_pls"]) == 2
    assert "unknown search space 'dtl_pls'" in capsys.readouterr().err

    # an ASHA rung inside the warm-up would rank untrained models: refused, FIFO accepted
    warming = write_yaml(sweep.tmp / "warming.yaml", {**PLAIN_SPACE, "training": {"epochs": 4, "warmup_epochs": 2},
                                                      "scheduler": {"grace_period": 2}})
    command = [*sweep.command("--name", "warming")[2:], "--space", str(warming)]
    assert run.main(command) == 2
    err = capsys.readouterr().err
    assert "grace_period (2: epoch 2 of 4) must exceed the trials' warmup_epochs (2)" in err
    assert "Traceback" not in err
    from dtl.config import load_config
    from sweeps.planning import plan_task

    assert plan_task(load_config(sweep.params), TASK, load_space(warming), "fifo").epochs == 4


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def finished_children(sweep: Sweep) -> list:
    try:
        return [c for c in sweep.runs()[1] if c.info.status == "FINISHED"]
    except Exception:  # the store or experiment may not exist yet
        return []


@pytest.mark.slow
def test_resume_after_killing_the_driver_does_not_rerun_finished_trials(sweep_factory):
    sweep = sweep_factory(PLAIN_SPACE)
    process = sweep.start("--max-concurrent", "1", "--scheduler", "fifo")
    wait_for(lambda: len(finished_children(sweep)) >= 1 or process.poll() is not None, 300, "a finished trial")
    assert process.poll() is None, (sweep.tmp / "sweep.log").read_text()
    os.kill(process.pid, signal.SIGKILL)  # the driver dies mid-sweep, without any clean-up
    process.wait(timeout=30)
    sweep.kill_group(process)  # and its local Ray instance with it
    before = {c.data.tags["trial_id"]: (c.info.run_id, sweep.val_steps(c)) for c in finished_children(sweep)}
    assert before and len(sweep.runs()[1]) < 4

    code, out = sweep.run("--resume", log="resume.log")
    assert code == 0, out
    parents, children = sweep.runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # A trial started within the last ~1 s before the kill is unknown to Tune's saved state: its run is closed
    # as KILLED and tagged, and Tune runs a new trial in its place.
    lost = [c for c in children if "lost_trial" in c.data.tags]
    assert all(c.info.status == "KILLED" for c in lost)
    children = [c for c in children if c not in lost]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)  # one child per trial
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    for trial_id, (run_id, steps) in before.items():
        assert by_trial[trial_id].info.run_id == run_id
        assert sweep.val_steps(by_trial[trial_id]) == steps == list(range(EPOCHS))  # not trained again
        # a trial whose run had FINISHED but whose last report Tune never saw is reported, not retrained
        assert "not retrained" in by_trial[trial_id].data.tags.get("resumed", "not retrained")
    state = json.loads((sweep.storage / "tiny" / "sweep.json").read_text())
    outcome = state["tasks"][TASK]["outcome"]
    assert state["finished"] and outcome["finished"] and len(outcome["rows"]) == 4 and outcome["decision"]["winner"]


@pytest.mark.slow
def test_ctrl_c_closes_every_run_with_a_status_and_says_how_to_resume(sweep_factory):
    sweep = sweep_factory(PLAIN_SPACE)
    process = sweep.start("--max-concurrent", "1", "--scheduler", "fifo")
    wait_for(lambda: len(finished_children(sweep)) >= 1 or process.poll() is not None, 300, "a finished trial")
    time.sleep(3)  # the next trial is under way
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    process.wait(timeout=120)
    out = (sweep.tmp / "sweep.log").read_text()
    assert process.returncode == 130, out
    assert "--resume --name tiny" in out
    parents, children = sweep.runs()
    assert parents[0].info.status == "KILLED"
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children), [c.info.status for c in children]
    assert len(children) < 4


def sweep_decisions(sweep: Sweep) -> tuple[list, dict, dict]:
    """(every trial's status, params and val accuracy; the winner's params and whether it replaced the
    incumbent; best.yaml) of a finished sweep, without its trial ids (which differ from run to run)."""
    outcome = json.loads((sweep.storage / "tiny" / "sweep.json").read_text())["tasks"][TASK]["outcome"]
    rows = {row["trial_id"]: row for row in outcome["rows"]}
    trials = sorted((row["status"], json.dumps(row["params"], sort_keys=True), row["val_score"])
                    for row in rows.values())
    winner = outcome["decision"]["winner"]
    return trials, {"params": rows[winner]["params"], "replaced": outcome["decision"]["replaced"]}, \
        yaml.safe_load(sweep.best.read_text())


@pytest.mark.slow
def test_sigterm_prints_one_line_and_resume_makes_the_uninterrupted_decisions(sweep_factory, tmp_path, tiny_data):
    sweep = sweep_factory(PLAIN_SPACE)
    process = sweep.start("--max-concurrent", "1", "--scheduler", "fifo")
    wait_for(lambda: len(finished_children(sweep)) >= 1 or process.poll() is not None, 300, "a finished trial")
    time.sleep(3)  # the next trial is under way
    process.send_signal(signal.SIGTERM)  # to the driver alone, as `kill` and `timeout` send it
    process.wait(timeout=120)
    sweep.kill_group(process)
    out = (sweep.tmp / "sweep.log").read_text()
    assert process.returncode == 143, out
    stops = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 1, out
    assert re.search(r"sweep tiny, [1-3] of 4 trials finished and kept; resume with: python sweeps/run.py "
                     r"--space \S+ --resume --name tiny --storage-path \S+$", stops[0]), stops[0]
    assert "SIGTERM received" not in out and "PC: @" not in out  # no native crash report
    assert [r for r in sweep.runs()[0] if r.info.status == "KILLED"]

    code, again = sweep.run("--resume", log="resume.log")
    assert code == 0, again
    (tmp_path / "reference").mkdir()
    reference = Sweep(tmp_path / "reference", tiny_data, PLAIN_SPACE)
    try:
        code, out = reference.run("--max-concurrent", "1", "--scheduler", "fifo")
    finally:
        reference.close()
    assert code == 0, out
    assert sweep_decisions(sweep) == sweep_decisions(reference)


def free_port() -> int:
    # An ephemeral port (32768+) never collides with Ray's worker port range (10002-19999).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_address_joins_a_ray_start_cluster(sweep_factory):
    sweep = sweep_factory({**PLAIN_SPACE, "num_samples": 2})
    port = free_port()
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--temp-dir", head_tmp,
                             "--disable-usage-stats"], start_new_session=True,
                            env={**sweep.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},  # a loopback-only node
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head_out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, head_out
        code, out = sweep.run("--address", f"127.0.0.1:{port}")
        assert code == 0, out
        parents, children = sweep.runs()
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        # the trials ran in the joined cluster's session, not in a private instance
        assert list(Path(head_tmp).glob("session_*/artifacts/*/trials/working_dirs/*"))
        assert not list(Path(sweep.ray_tmp).glob("ray/session_*"))
    finally:
        # `ray stop` would stop every Ray on the machine: stop only this head's process group.
        Sweep.kill_group(head, signal.SIGTERM)
        time.sleep(3)
        Sweep.kill_group(head, signal.SIGKILL)


def fill_disk(folder: Path, leave_bytes: int) -> Path:
    """A file that takes all but ``leave_bytes`` of the free space of ``folder``'s file system."""
    import shutil

    filler = folder / "filler"
    size = shutil.disk_usage(folder).free - leave_bytes
    with open(filler, "wb") as f:
        for _ in range(size // 2**16):
            f.write(bytes(2**16))
    return filler


@pytest.mark.slow
def test_a_storage_folder_that_fills_up_stops_the_sweep_in_one_line_and_resume_finishes_it(sweep_factory, small_disk):
    mount = small_disk("8m")
    sweep = sweep_factory(PLAIN_SPACE)
    sweep.storage = mount
    filler = fill_disk(mount, 2 * 2**20)  # too little to start in: refused before anything is written
    code, out = sweep.run("--max-concurrent", "1", "--scheduler", "fifo")
    assert code == 2, out
    assert re.search(rf"^error: --storage-path {mount}: [12]\.\d MiB free, a sweep needs at least 4 MiB",
                     out, re.M), out
    assert [p.name for p in mount.iterdir()] == ["filler"]
    filler.unlink()

    process = sweep.start("--max-concurrent", "1", "--scheduler", "fifo")
    wait_for(lambda: len(finished_children(sweep)) >= 1 or process.poll() is not None, 300, "a finished trial")
    filler = fill_disk(mount, 2**19)  # another writer leaves half a MiB: less than the next saves need
    process.wait(timeout=180)
    out = (sweep.tmp / "sweep.log").read_text()
    assert process.returncode == 75, out
    stops = [line for line in out.splitlines() if line.startswith("stopped because")]
    assert len(stops) == 1 and "Traceback" not in out, out
    assert re.match(rf"stopped because {mount}/tiny is nearly full \(0\.\d MiB free; the next checkpoints and "
                    r"Tune's experiment state need about \d+\.\d MiB\): sweep tiny, [1-3] of 4 trials finished "
                    r"and kept; free space there, then resume with: python sweeps/run.py --space \S+ --resume "
                    rf"--name tiny --storage-path {mount}$", stops[0]), stops[0]
    # nothing truncated for the resumed sweep to read
    for path in [mount / "tiny" / "sweep.json", *mount.glob("tiny/trials/experiment_state-*.json")]:
        json.loads(path.read_text())
    for path in mount.glob("tiny/trials/*/result.json"):  # one JSON object per line
        [json.loads(line) for line in path.read_text().splitlines()]
    assert not [p for p in mount.rglob("*") if p.name.endswith(".tmp")]

    filler.unlink()
    code, again = sweep.run("--resume", log="resume.log")
    assert code == 0, again
    state = json.loads((mount / "tiny" / "sweep.json").read_text())
    rows = state["tasks"][TASK]["outcome"]["rows"]
    assert state["finished"] and len(rows) == 4, state
    assert {row["status"] for row in rows} <= {"done", "stopped early"}, rows
    assert TASK in yaml.safe_load(sweep.best.read_text())


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update(method=["dtl"]), "method: expected one of"),
    (lambda s: s.update(num_samples="ten"), "num_samples: expected an integer >= 1"),
    (lambda s: s.update(description=3), "description: expected text"),
    (lambda s: s.update(training=[1]), "training: expected a mapping"),
    (lambda s: s.update(training={"lr": "fast"}), "training.lr: expected a number > 0"),
    (lambda s: s.update(scheduler=[2]), "scheduler: expected a mapping"),
    (lambda s: s["scheduler"].update(reduction_factor="3"), "scheduler.reduction_factor: expected an integer >= 2"),
    (lambda s: s.update(params=[1]), "params: expected a non-empty mapping"),
    (lambda s: s["params"].update(rank=[1, 16]), "params.rank: expected a mapping"),
    (lambda s: s["params"]["rank"].update(type=3), "params.rank.type: expected one of int, float, categorical"),
    (lambda s: s["params"]["rank"].update(log="yes"), "params.rank.log: expected true or false"),
    (lambda s: s["params"]["rank"].update(low=[1]), "params.rank.low: expected an integer"),
    (lambda s: s["params"]["method"].update(choices="dtl"), "params.method.choices: expected a non-empty list"),
    (lambda s: s["params"]["method"].update(choices=[{"a": 1}]), "params.method.choices: expected plain values"),
    (lambda s: s["params"]["kernel_size"].update(when=["dtl_plus"]), "params.kernel_size.when: expected a mapping"),
])
def test_every_space_field_rejects_a_wrong_type_in_one_line(tmp_path, edit, expected):
    raw = yaml.safe_load((REPO / "sweeps/spaces/dtl_plus.yaml").read_text())
    edit(raw)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_space_written_1e_4_reads_numbers(tmp_path):
    raw = (REPO / "sweeps/spaces/dtl_plus.yaml").read_text().replace("low: 1.0e-4", "low: 1e-4")
    path = tmp_path / "space.yaml"
    path.write_text(raw)
    lr = next(p for p in load_space(path).params if p.name == "lr")
    assert lr.low == 1e-4 and isinstance(lr.low, float)


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["params"]["start_block"].update(high=40),
     "params.start_block.high: 40 cannot be trained with vit_micro_patch4_32: start_block must be in 0..11"),
    (lambda s: s["params"]["weight_decay"].update(low=-1.0),
     "params.weight_decay.low: -1.0 cannot be trained with vit_micro_patch4_32: expected a number >= 0"),
    (lambda s: s["params"]["kernel_size"].update(high=16), "params.kernel_size.high: 16 cannot be trained"),
])
def test_a_space_is_checked_against_the_backbone_before_any_trial(tmp_path, edit, expected):
    from dtl.config import ExperimentConfig
    from sweeps.planning import plan_task
    from sweeps.state import SweepError

    raw = yaml.safe_load((REPO / "sweeps/spaces/dtl_plus.yaml").read_text())
    edit(raw)
    space = load_space(write_yaml(tmp_path / "bad.yaml", raw))
    base = ExperimentConfig.from_dict({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": "/abs/data",
                                                                "image_size": None}})
    with pytest.raises(SweepError, match=re.escape(expected)):
        plan_task(base, TASK, space)


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
                                               ("127.0.0.1", True), ("10.0.0.1:6379", False), ("auto", False),
                                               ("ray://127.0.0.1:10001", False)])
def test_private_instances_and_loopback_addresses_keep_ray_on_loopback(monkeypatch, address, loopback):
    from sweeps.cluster import RAY_CLUSTER_SWITCH, is_loopback, quiet_environment

    assert is_loopback(address) == loopback
    monkeypatch.delenv(RAY_CLUSTER_SWITCH, raising=False)
    quiet_environment(address)
    assert (os.environ.get(RAY_CLUSTER_SWITCH) == "0") == loopback


def test_a_storage_folder_with_too_little_room_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from sweeps.state import SweepError
    from sweeps.storage import MIN_FREE_BYTES, check_free_space, free_bytes

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 0, MIN_FREE_BYTES - 2**20))
    missing = tmp_path / "not" / "yet"
    assert free_bytes(missing) == MIN_FREE_BYTES - 2**20  # measured on the nearest folder that exists
    with pytest.raises(SweepError) as err:
        check_free_space(missing)
    assert str(err.value) == (f"--storage-path {missing}: 3.0 MiB free, a sweep needs at least 4 MiB there "
                              "(Tune's experiment state and the trials' checkpoints)")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 0, MIN_FREE_BYTES))
    check_free_space(missing)  # enough: no error


def test_the_storage_watch_stops_tune_once_the_next_saves_would_not_fit(tmp_path, monkeypatch):
    from sweeps import storage

    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "experiment_state-x.json").write_bytes(bytes(1000))
    checkpoint = tmp_path / "trials" / "t1" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.pt").write_bytes(bytes(5000))
    stops = []
    monkeypatch.setattr(signal, "getsignal", lambda sig: (lambda *a: stops.append(sig)))
    monkeypatch.setattr(storage, "SHORTAGES", [])
    trials = [SimpleNamespace(status="RUNNING"), SimpleNamespace(status="RUNNING"), SimpleNamespace(status="PENDING")]
    watch = storage.StorageWatch(tmp_path, interval_s=0)
    needed = 2 * 5000 * 2 + 2 * 1000 + storage.SLACK_BYTES
    monkeypatch.setattr(storage, "free_bytes", lambda path: needed)
    watch.on_checkpoint(0, trials, trials[0], SimpleNamespace(path=str(checkpoint)))
    assert watch.largest_checkpoint == 5000 and not stops  # exactly enough room
    monkeypatch.setattr(storage, "free_bytes", lambda path: needed - 1)
    watch.on_step_end(1, trials)
    watch.on_step_end(2, trials)
    assert stops == [signal.SIGUSR1]  # Tune's graceful stop, asked once
    assert storage.SHORTAGES == [watch.shortage]
    assert watch.shortage.describe() == (f"{tmp_path} is nearly full (1.0 MiB free; the next checkpoints and "
                                         "Tune's experiment state need about 1.0 MiB)")
