"""The Ray Tune trainable of one sweep trial, and the MLflow child run that records it.

A trial = the sweep's base configuration (``pipeline.params.load_params()``: the same data, model and training
settings as the DVC pipeline, so by default the same schedule the winner will be retrained with) + the space's
explicit shortened schedule, if it has one + the sampled parameters, trained by the pipeline's own entry point
``dtl.experiment.run_task`` under the ``val`` protocol (train on train800, score val200 after every epoch: the
test split is never used for selection). One Tuner runs the trials of every task: the trial's config names its
task (``sweeps.search.split_trial_config``).

Every epoch is logged to the trial's MLflow child run as it happens; the epochs that score val200 (every
``eval_every`` epochs, so at each of ASHA's rungs, and the last) are reported to Tune (``epoch`` = epochs completed,
ASHA's time attribute; ``val_accuracy``, the objective). The last report adds which val images the
model got right (``val_correct``, for the paired comparison with the incumbent: ``sweeps.selection``) and the
trial's cost: trainable parameters, training time, CPU time, bytes kept for backward per batch, peak memory.
The trainable writes its own child run (linked to its task's parent run by ``mlflow.parentRunId``) and ends it
FINISHED, or FAILED with the error (bad config, NaN loss -> ``FloatingPointError``, out of memory). A trial that
ASHA stops, or that dies with the driver, cannot end its own run: the driver's status callback and its
reconciliation close those. On ``--resume`` a restarted trial reopens its existing child run, so MLflow keeps one
child per trial.
"""
from __future__ import annotations

import copy
import math
import os
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

METRIC = "val_accuracy"  # the objective: val200 accuracy after training on train800
TIME_ATTR = "epoch"  # epochs completed; ASHA's time attribute
CORRECT = "val_correct"  # which val images the final model got right (sweeps.selection.encode_correct)
# A trial that fails on its own (a bad configuration, a NaN loss, out of memory) reports this key and ends; Tune
# would retry a raised error like a lost node, and retrying cannot fix those.
TRIAL_ERROR = "trial_error"
STATE_FILE = "training_state.pt"  # the trial's checkpoint: dtl.engine.TrainingState (kilobytes, no backbone)
# Cost figures of a finished trial (dtl.engine.TrainResult.summary), next to its accuracy.
COST_METRICS = ("trainable_params", "train_time_s", "cpu_time_s", "saved_bytes_per_batch", "peak_memory_bytes",
                "images_per_s")

# Keys of a trial's config next to the sampled values: its task, and whether it is the task's incumbent.
TASK_KEY = "task"
INCUMBENT_KEY = "incumbent"

TAG_KIND = "kind"
TAG_SWEEP = "sweep"
TAG_TASK = "task"
TAG_TRIAL = "trial_id"
TAG_PARENT = "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sampled parameters; plain data so it pickles to any node.

    Paths inside ``base_config`` are absolute: a trial's working directory is a throwaway folder."""

    task: str
    base_config: dict[str, Any]  # ExperimentConfig.to_dict(), overrides[task] = params.yaml + best.yaml entries
    training: Mapping[str, Any]  # the space's explicit shortened schedule; {}: the pipeline's own
    seed: int  # training seed (evaluation.seeds[0] of the base configuration)
    eval_every: int  # score val200 every this many epochs (ASHA's rungs are multiples of it) and at the end
    threads: int  # torch threads = the CPUs Ray reserved for the trial
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    space_name: str
    tags: Mapping[str, str] = field(default_factory=dict)


def split_trial_config(config: Mapping[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """(task, is the incumbent, the sampled override entry) of a trial's config."""
    params = {k: v for k, v in config.items() if k not in (TASK_KEY, INCUMBENT_KEY)}
    return config[TASK_KEY], bool(config.get(INCUMBENT_KEY, False)), params


def trial_overrides(setup: TrialSetup, params: Mapping[str, Any]) -> dict[str, Any]:
    """The task's override entry for a trial: pipeline overrides < shortened schedule < sampled parameters."""
    base = setup.base_config.get("overrides", {}).get(setup.task) or {}
    return {**base, **setup.training, **plain(params), "eval_every": setup.eval_every}


def trial_config(setup: TrialSetup, params: Mapping[str, Any]):
    """The validated :class:`~dtl.config.ExperimentConfig` a trial trains (``val`` protocol, no progress bar)."""
    from dtl.config import ExperimentConfig

    raw = copy.deepcopy(setup.base_config)
    raw["overrides"] = {setup.task: trial_overrides(setup, params)}
    raw["evaluation"] = {**raw.get("evaluation", {}), "protocol": "val"}
    raw["training"] = {**raw.get("training", {}), "progress": False}
    return ExperimentConfig.from_dict(raw, where=f"sweep trial of {setup.task}")


def train_trial(config: dict[str, Any], setups: Mapping[str, TrialSetup]) -> None:
    """Ray Tune function trainable: train one configuration, report (and checkpoint) every epoch, record the
    child run. A trial restarted after its node died continues from its last checkpoint."""
    import tempfile
    from pathlib import Path

    import torch
    from ray import tune

    from dtl.engine import TrainingState

    from .selection import encode_correct

    task, incumbent, params = split_trial_config(config)
    setup = setups[task]
    torch.set_num_threads(max(1, setup.threads))
    # Workers of a `ray start` cluster do not inherit the driver's environment: make every MLflow call in this
    # process (pipeline.tracking's helpers included) use the sweep's store, never a default file here.
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    context = tune.get_context()
    trial_id = context.get_trial_id()
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume_from = TrainingState.load(Path(folder) / STATE_FILE)
    elif report_recorded_result(setup, trial_id):
        return
    folder = Path(tempfile.mkdtemp(prefix="dtl_trial_"))
    try:
        with child_run(setup, trial_id, context.get_trial_name(), incumbent, resume_from) as run:
            from dtl.experiment import run_task

            trial = trial_config(setup, params)  # a bad configuration raises here: the trial is recorded FAILED
            resolved = trial.for_task(task)
            run.log_params(resolved, params)
            run.note_device(resolved.training.device)
            last_epoch = resolved.training.epochs - 1
            log_epoch = run.epoch_logger()
            saved: list[int] = []

            def save_state(state: TrainingState) -> None:
                state.save(folder / STATE_FILE)
                saved.append(state.epochs_done)

            def report_epoch(epoch: int, metrics: dict) -> None:
                log_epoch(epoch, metrics)
                if epoch < last_epoch:  # the last epoch is reported after the run is closed (see below)
                    state = tune.Checkpoint.from_directory(str(folder)) if saved and saved[-1] == epoch + 1 else None
                    tune.report(tune_metrics(epoch, metrics), checkpoint=state)

            task_run = run_task(trial, task, seed=setup.seed, callbacks=[report_epoch], resume_from=resume_from,
                                save_state=save_state)
            summary = task_run.summary()
            final = {**tune_metrics(len(task_run.result.history) - 1, task_run.result.history[-1]),
                     **{k: float(summary[k]) for k in COST_METRICS if isinstance(summary.get(k), (int, float))},
                     CORRECT: encode_correct(task_run.result.correct["val"].tolist())}
            run.finish(summary=summary, tags={CORRECT: final[CORRECT]})
    except Exception as err:  # the child run is closed FAILED with the traceback; Tune must not retry it
        tune.report({TRIAL_ERROR: f"{type(err).__name__}: {err}"[:1000]})
        return
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    # Reported last, once MLflow holds everything: Tune may end this process as soon as it sees the result.
    tune.report(final)


def report_recorded_result(setup: TrialSetup, trial_id: str) -> bool:
    """On --resume: a trial whose MLflow run FINISHED before the sweep stopped (only its last report to Tune
    was lost) is not trained again; its recorded final metrics are reported instead."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    client = MlflowClient(setup.tracking_uri)
    run = find_child_run(client, setup.experiment_id, setup.parent_run_id, trial_id)
    if run is None or run.info.status != "FINISHED" or METRIC not in run.data.metrics:
        return False
    history = client.get_metric_history(run.info.run_id, METRIC)
    client.set_tag(run.info.run_id, "resumed", "reported from the recorded run, not retrained")
    recorded = {CORRECT: run.data.tags[CORRECT]} if CORRECT in run.data.tags else {}
    tune.report({TIME_ATTR: len(history), **run.data.metrics, **recorded})
    return True


def tune_metrics(epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    values = {TIME_ATTR: epoch + 1}
    for key, value in metrics.items():
        if key != "epoch":
            values[key.replace("/", "_")] = float(value)
    return values


class ChildRun:
    """One trial's MLflow run, written with the client API (the trial may share its process with others)."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.closed = False

    def log_params(self, resolved, params: Mapping[str, Any]) -> None:
        """The trial's sampled values (``trial.<key>``) and the full configuration it trained (``model.rank``...)."""
        from mlflow.entities import Param

        from pipeline.tracking import flatten

        values = {k: v for k, v in flatten(resolved.to_dict()).items() if not k.startswith("overrides")}
        values.update({f"trial.{k}": v for k, v in plain(params).items()})
        existing = self.client.get_run(self.run_id).data.params  # a resumed trial logged them already
        new = [Param(k, "null" if v is None else str(v)) for k, v in values.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def note_device(self, device: str) -> None:
        """Ray may reserve a (fractional) GPU that this process cannot see, e.g. logical GPUs of a test cluster:
        say so once, and train on the CPU instead of failing."""
        import sys

        import ray
        import torch

        if device == "auto" and ray.get_gpu_ids() and not torch.cuda.is_available():
            note = (f"Ray reserved GPU {ray.get_gpu_ids()} for this trial but no CUDA device is visible here: "
                    "training on the CPU")
            print(note, file=sys.stderr, flush=True)
            self.client.set_tag(self.run_id, "device_note", note)

    def epoch_logger(self):
        """An engine callback logging each epoch's metrics to this run (step = epoch, as the pipeline)."""
        import time

        from mlflow.entities import Metric

        def log(epoch: int, metrics: dict) -> None:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), float(v), now, epoch)
                                                        for k, v in metrics.items() if k != "epoch"])

        return log

    def finish(self, status: str = "FINISHED", summary: Mapping[str, Any] | None = None,
               error: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        if self.closed:
            return
        import time

        from mlflow.entities import Metric

        if summary:
            now = int(time.time() * 1000)
            metrics = [Metric(k.replace("/", "_"), float(v), now, 0) for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                       and "/" not in k and k != "seed"]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
            for key in ("device", "precision", "prefix_cache"):  # how the trial ran (e.g. prefix cache: disk/off)
                if isinstance(summary.get(key), str):
                    self.client.set_tag(self.run_id, key, summary[key])
        for key, value in (tags or {}).items():
            self.client.set_tag(self.run_id, key, value)
        if error:
            self.client.set_tag(self.run_id, "error", error[:5000])
        self.client.set_terminated(self.run_id, status)
        self.closed = True


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.{TAG_TRIAL} = '{trial_id}'"), max_results=5)
    return runs[0] if runs else None


@contextmanager
def child_run(setup: TrialSetup, trial_id: str, trial_name: str, incumbent: bool,
              resume_from=None) -> Iterator[ChildRun]:
    """Open (or, for a restarted trial, reopen) the trial's child run; close it with a status whatever happens.
    A trial restarted from a checkpoint (``resume_from``) keeps its run and its curve goes on from there."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import git_commit

    client = MlflowClient(setup.tracking_uri)
    existing = find_child_run(client, setup.experiment_id, setup.parent_run_id, trial_id)
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        if resume_from is not None:
            restarts = int(existing.data.tags.get("restarts", "0")) + 1
            client.set_tag(run_id, "restarts", str(restarts))
            client.set_tag(run_id, "restarted_from_epoch", str(resume_from.epochs_done))
    else:
        commit = git_commit()
        tags = {
            "mlflow.runName": f"{setup.task}-{trial_id}",
            TAG_PARENT: setup.parent_run_id,
            TAG_KIND: "sweep-trial",
            TAG_SWEEP: setup.sweep_name,
            "space": setup.space_name,
            TAG_TASK: setup.task,
            TAG_TRIAL: trial_id,
            "trial_name": trial_name,
            "incumbent": str(incumbent).lower(),  # the task's current configuration, never stopped early
            **({"git_commit": commit} if commit else {}),
            **setup.tags,
        }
        run_id = client.create_run(setup.experiment_id, tags=tags).info.run_id
    run = ChildRun(client, run_id)
    try:
        yield run
    except SystemExit:
        # Tune stops a trial by raising SystemExit in tune.report: an ASHA stop or the whole sweep stopping.
        # Only the driver knows which, so it sets the status (FINISHED + stopped_early, or KILLED).
        raise
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException as err:
        run.finish("FAILED", error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
        raise
    else:
        run.finish("FINISHED")


def plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """numpy scalars (as Optuna/Ray hand them over) -> Python numbers."""
    out = {}
    for key, value in values.items():
        out[str(key)] = value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
    return out
