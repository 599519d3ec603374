"""The Ray Tune trainable of one sweep trial, and the MLflow child run that records it.

A trial = the sweep's base configuration (``dtl.config.load_config``: the same data, model and training
settings as the DVC pipeline, so by default the same schedule the winner will be retrained with) + the space's
explicit shortened schedule, if it has one + the sampled parameters, trained by the pipeline's own entry point
``dtl.experiment.run_task`` under the base protocol's selection protocol (VTAB-1K: train on train800, score val200
at ASHA's rungs and at the end; few-shot and domain generalisation: train on one k-shot list, score
``val_meta.list``; segmentation: train on the training images less a held-out tenth, score that tenth): the test
split, the target domains and the validation images of segmentation are never used for selection. One Tuner runs the
trials of every task: the trial's config names its task (:func:`split_trial_config`).

Every epoch is logged to the trial's MLflow child run as it happens; the epochs that score val200 (every
``eval_every`` epochs, so at each of ASHA's rungs, and the last) are reported to Tune (``epoch`` = epochs completed,
ASHA's time attribute; ``val_accuracy``, the objective, or ``val_miou`` for segmentation). The last report adds
each val image's score (``val_per_image``, for the paired comparison with the incumbent: ``sweeps.selection``) and
the trial's cost: trainable parameters, training time, CPU time, bytes kept for backward per batch, peak memory.
The trainable writes its own child run (linked to its task's parent run by ``mlflow.parentRunId``) and ends it
FINISHED, or FAILED with the error (bad config, NaN loss -> ``FloatingPointError``, out of memory). A trial that
ASHA stops, or that dies with the driver, cannot end its own run: the driver's status callback and its
reconciliation close those. On ``--resume`` a restarted trial reopens its existing child run, so MLflow keeps one
child per trial.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

import tracking
from dtl.benchmark import cpu_peak_estimate
from dtl.config import ExperimentConfig, TaskConfig
from dtl.engine import TrainingState
from dtl.experiment import evaluate_model, run_task
from dtl.io import write_json
from dtl.protocols import get_protocol
from dtl.trained import RECORD_FILE, record
from tracking.outbox import OUTBOX_ENV, is_transient

from .keys import (
    CHECKPOINT_FILE,
    COST_METRICS,
    INCUMBENT_KEY,
    PER_IMAGE,
    RUN_FILE,
    RUN_KEY,
    SEED_KEY,
    TAG_KIND,
    TAG_SWEEP,
    TAG_TASK,
    TAG_TRIAL,
    TASK_KEY,
    TIME_ATTR,
    TRIAL_ERROR,
)
from .selection import encode_scores
from .space import for_method


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
    checkpoint_every: float = 60.0  # seconds between checkpoints besides the epochs that score val200 (0: every epoch)
    outbox: str = ""  # the sweep's MLflow outbox folder (tracking.outbox); "" = the default one
    tags: Mapping[str, str] = field(default_factory=dict)
    # A study trial follows the base's own protocol (VTAB-1K final: train800val200 -> test) and scores every
    # split it reports; a sweep trial follows the selection protocol (val200), never the test split.
    study: bool = False
    metric: str = "val_accuracy"  # what the trial's reports are ranked on (sweeps.keys.score_metric)


def split_trial_config(config: Mapping[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """(task, is the incumbent, the sampled override entry) of a trial's config. A study's grid value that is a
    mapping (``dwconv: {method: dtl_plus, kernel_size: 3}``) contributes its keys."""
    params: dict[str, Any] = {}
    for key, value in config.items():
        if key not in (TASK_KEY, INCUMBENT_KEY, SEED_KEY):
            params.update(value if isinstance(value, Mapping) else {key: value})
    return config[TASK_KEY], bool(config.get(INCUMBENT_KEY, False)), params


def trial_overrides(setup: TrialSetup, params: Mapping[str, Any]) -> dict[str, Any]:
    """The task's override entry for a trial: pipeline overrides < shortened schedule < sampled parameters."""
    base = dict(setup.base_config.get("overrides", {}).get(setup.task) or {})
    if setup.study:
        base_method = base.get("method", setup.base_config["model"]["method"])
        base = for_method(base, base_method, params.get("method", base_method))
        return {**base, **plain(params)}  # the pipeline's own evaluation epochs (few-shot: keep-best)
    return {**base, **setup.training, **plain(params), "eval_every": setup.eval_every}


def trial_config(setup: TrialSetup, params: Mapping[str, Any], seed: int | None = None):
    """The validated :class:`~dtl.config.ExperimentConfig` a trial trains: the selection protocol of the base's
    (VTAB-1K: ``val``, train800 -> val200; few-shot: the largest shot count's list of the first seed -> val_meta.list;
    domain generalisation: the source's list -> its val_meta.list), no progress bar. A study trial keeps the base's
    own protocol and trains with ``seed``."""
    raw = copy.deepcopy(setup.base_config)
    raw["overrides"] = {setup.task: trial_overrides(setup, params)}
    evaluation = raw.get("evaluation", {})
    if not setup.study:
        selection = get_protocol(evaluation.get("protocol", "final")).selection
        raw["evaluation"] = {**evaluation, "protocol": selection}
    training = raw.get("training", {})
    # Loader workers beyond the CPUs Ray reserved for the trial would compete with the other trials' CPUs.
    workers = min(int(training.get("num_workers", 0)), setup.threads - 1)
    raw["training"] = {**training, "progress": False, "seed": setup.seed if seed is None else seed,
                       "num_workers": max(0, workers)}
    return ExperimentConfig.from_dict(raw, where=f"sweep trial of {setup.task}")


def train_trial(config: dict[str, Any], setups: Mapping[str, TrialSetup]) -> None:
    """Ray Tune function trainable: train one configuration, record every epoch in the child run, report (and
    checkpoint) the epochs that score val200 and one every ``setup.checkpoint_every`` seconds in between. A
    trial restarted after its node died continues from its last checkpoint."""
    task, incumbent, params = split_trial_config(config)
    setup = setups[task]
    seed = int(config.get(SEED_KEY, setup.seed))
    placement = prepare_worker(setup)
    resume_from, known = read_checkpoint(tune.get_checkpoint())
    context = tune.get_context()
    existing = find_child_run(setup, context.get_trial_id())  # its MLflow run, if an attempt opened one
    if report_recorded_result(setup, existing):  # it finished before the sweep stopped: not trained again
        return
    with tempfile.TemporaryDirectory(prefix="dtl_trial_", ignore_cleanup_errors=True) as folder:
        try:
            with child_run(setup, existing, context.get_trial_id(), context.get_trial_name(), incumbent,
                           resume_from, known) as (run, restarts):
                # a bad configuration raises here: recorded FAILED
                resolved = trial_config(setup, params, seed).for_task(task)
                write_trial_files(Path(folder), resolved, seed, run.run_id, restarts)
                record_trial(run, resolved, params)
                run.set_tags(placement)
                note_device(run, resolved.training.device)
                report = CheckpointReporter(Path(folder), run.run_id, setup.checkpoint_every)
                task_run = run_task(resolved, seed=seed, hooks=[run.log_epoch, report], resume_from=resume_from)
                final = final_metrics(task_run, setup, run)
        except Exception as err:  # the child run is closed FAILED with the traceback; Tune must not retry it
            tune.report({TRIAL_ERROR: f"{type(err).__name__}: {err}"[:1000]})
            return
    # Reported last, once MLflow holds everything: Tune may end this process as soon as it sees the result.
    tune.report(final)


def prepare_worker(setup: TrialSetup) -> dict[str, str]:
    """This process's GPUs, threads and MLflow store, before anything touches CUDA; returns the tags that say
    which GPUs the trial sees and what share of one it has.

    - A trial Ray gave no GPU sees none: Ray (since 2.60) leaves ``CUDA_VISIBLE_DEVICES`` as it was for a task
      that asks for no GPU, so on a GPU node such a trial would train on GPU 0 beside the trials that own it.
    - A trial with a fraction of a GPU (``--gpus-per-trial 0.25``) may allocate that fraction of its memory and
      no more (``torch.cuda.set_per_process_memory_fraction``): Ray only counts the shares, so without the cap
      one trial could take the memory of the others on its GPU.
    - Workers of a `ray start` cluster do not inherit the driver's environment: every MLflow call here must use
      the sweep's store, never a default file."""
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    tags = {"gpu_share": f"{share:g}"}
    if share == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)
        tags["gpu_memory_fraction"] = f"{share:g}"
    torch.set_num_threads(max(1, setup.threads))
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    if setup.outbox:
        os.environ[OUTBOX_ENV] = setup.outbox
    return {**tags, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}


def read_checkpoint(checkpoint) -> tuple[Any, dict | None]:
    """The training state a restarted trial continues from, and the run its checkpoint names (None, None: a
    first attempt)."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        state = TrainingState.load(Path(folder) / CHECKPOINT_FILE)
        run_file = Path(folder) / RUN_FILE
        return state, json.loads(run_file.read_text()) if run_file.exists() else None


def write_trial_files(folder: Path, resolved: TaskConfig, seed: int, run_id: str, restarts: int) -> None:
    """Beside every checkpoint's training state: what ``dtl.load_trained`` needs to rebuild the trial's model,
    and the trial's MLflow run (a restarted trial reopens it)."""
    write_json(folder / RECORD_FILE, record(resolved, resolved.task, resolved.protocol.num_classes(resolved.task),
                                            seed, resolved.data.image_size))
    write_json(folder / RUN_FILE, {"run_id": run_id, "restarts": restarts})


class CheckpointReporter:
    """The trial's epoch-end hook: report the epochs that score val (ASHA's rungs) to Tune with a checkpoint,
    and checkpoint at least every ``every`` seconds in between. Each report costs the trial a round trip to the
    driver and a copy of the checkpoint to the sweep's storage (~0.5 s on 2 cores), so other epochs are not
    reported. The last epoch is reported after the run is closed (``train_trial``)."""

    def __init__(self, folder: Path, run_id: str, every: float):
        self.folder, self.run_id, self.every = folder, run_id, every
        self.checkpointed = time.monotonic()

    def __call__(self, end) -> None:
        if end.last:
            return
        scored = any(key.startswith("val/") for key in end.metrics)
        if not scored and time.monotonic() - self.checkpointed < self.every:
            return
        end.state().save(self.folder / CHECKPOINT_FILE)
        self.checkpointed = time.monotonic()
        tune.report({**tune_metrics(end.epoch, end.metrics), RUN_KEY: self.run_id},
                    checkpoint=tune.Checkpoint.from_directory(str(self.folder)))


def final_metrics(task_run, setup: TrialSetup, run) -> dict[str, Any]:
    """What the trial reports last: the final metrics of the weights kept (few-shot: the best val epoch), its
    costs, and each val image's score (a study: the protocol's other reported splits instead); recorded in the
    child run too."""
    summary = task_run.summary()
    result = task_run.result
    final = {**tune_metrics(len(result.history) - 1, {**result.history[-1], **result.metrics}),
             **{k: float(summary[k]) for k in COST_METRICS if isinstance(summary.get(k), (int, float))}}
    if setup.study:
        final.update(study_scores(task_run))
        summary = {**summary, **final}
    else:
        final[PER_IMAGE] = encode_scores(result.per_image["val"].tolist())
    final[RUN_KEY] = run.run_id
    record_result(run, summary, final.get(PER_IMAGE))
    return final


def study_scores(task_run) -> dict[str, float]:
    """What a study reports besides the run's own metrics: the protocol's reported splits the run did not score
    (few-shot: the test list of the weights kept; domain generalisation: every target) and, off a GPU (whose peak
    the run measured), an estimated peak: weights, gradients, AdamW state, kept activations, one batch."""
    result = task_run.result
    score = task_run.config.protocol.score
    missing = {name: split for name, split in task_run.reported_splits().items()
               if f"{name}/{score}" not in result.metrics}
    scores = evaluate_model(task_run.config, task_run.task, task_run.model, task_run.num_classes,
                            seed=task_run.config.training.seed, shots=task_run.shots, splits=missing) if missing else {}
    scores = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}  # not per-class lists
    if result.gpu_peak_allocated_bytes is None:
        image = task_run.image_size
        batch_bytes = task_run.config.training.batch_size * 3 * image * image * 4
        scores["cpu_peak_estimate_bytes"] = float(
            cpu_peak_estimate(task_run.model, result.saved_bytes_per_batch, batch_bytes))
    return scores


def report_recorded_result(setup: TrialSetup, run) -> bool:
    """On --resume: a trial whose MLflow run (``run``, or None) FINISHED before the sweep stopped (only its last
    report to Tune was lost) is not trained again; its recorded final metrics are reported instead."""
    if run is None or run.info.status != "FINISHED" or setup.metric not in run.data.metrics:
        return False
    try:
        history = tracking.client(setup.tracking_uri).get_metric_history(run.info.run_id, setup.metric)
    except Exception as err:  # the store went away meanwhile: train it again, which gives the same result
        if not is_transient(err):
            raise
        return False
    tracking.Run(run.info.run_id, setup.tracking_uri).set_tags({"resumed": "reported from the recorded run, "
                                                                           "not retrained"})
    per_image = run.data.tags.get(PER_IMAGE) or run.data.tags.get("val_correct")  # the tag's name until 2026-12
    recorded = {PER_IMAGE: per_image} if per_image else {}
    tune.report({TIME_ATTR: len(history), **run.data.metrics, **recorded})
    return True


def tune_metrics(epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    values = {TIME_ATTR: epoch + 1}
    for key, value in metrics.items():
        if key != "epoch":
            values[key.replace("/", "_")] = float(value)
    return values


def find_child_run(setup: TrialSetup, trial_id: str):
    """The MLflow run of ``trial_id`` under its task's parent run, or None."""
    return tracking.Run.find(setup.experiment_id, setup.tracking_uri, parent=setup.parent_run_id,
                             **{TAG_TRIAL: trial_id})


def note_device(run, device: str) -> None:
    """Ray may reserve a (fractional) GPU that this process cannot see, e.g. logical GPUs of a test cluster: say
    so once, and train on the CPU instead of failing."""
    if device == "auto" and ray.get_gpu_ids() and not torch.cuda.is_available():
        note = (f"Ray reserved GPU {ray.get_gpu_ids()} for this trial but no CUDA device is visible here: "
                "training on the CPU")
        print(note, file=sys.stderr, flush=True)
        run.set_tags({"device_note": note})


def record_trial(run, resolved: TaskConfig, params: Mapping[str, Any]) -> None:
    """The trial's sampled values (``trial.<key>``), the full configuration it trains (``model.rank``...) and its
    data (its training and validation lists as dataset inputs)."""
    values = {k: v for k, v in resolved.to_dict().items() if k != "overrides"}
    run.log_params({**values, **{f"trial.{k}": v for k, v in plain(params).items()}})
    protocol = resolved.protocol
    shots, seed = protocol.run_shots(None), resolved.training.seed
    run.log_dataset(*protocol.split_input(resolved.task, protocol.train, shots, seed), "train")
    for split in protocol.scored_splits(resolved.task).values():
        run.log_dataset(*protocol.split_input(resolved.task, split), "validation")


def record_result(run, summary: Mapping[str, Any], per_image: str | None) -> None:
    """The trial's final metrics and cost figures, how it ran, and each val image's score."""
    run.log_metrics({k: v for k, v in summary.items() if "/" not in k and k != "seed"})
    run.set_tags({key: summary[key] for key in ("device", "precision", "prefix_cache")
                  if isinstance(summary.get(key), str)})
    if per_image is not None:
        run.set_tags({PER_IMAGE: per_image})


@contextmanager
def child_run(setup: TrialSetup, existing, trial_id: str, trial_name: str, incumbent: bool, resume_from=None,
              known: Mapping[str, Any] | None = None):
    """Open (or, for a restarted trial, reopen) the trial's child run and close it with its outcome. A trial
    restarted from a checkpoint (``resume_from``) keeps its run (``existing``, found in the store, else
    ``known``, the run its checkpoint names), and its curve goes on from there. Tune stops a trial by raising
    SystemExit in ``tune.report`` (an ASHA stop, or the whole sweep stopping): only the driver knows which, so
    it sets that status. Yields the run and how often the trial was restarted."""
    restarts, reopen, tags = 0, None, {}
    if existing is not None or known:
        reopen = existing.info.run_id if existing is not None else known["run_id"]
        restarts = 1 + int(existing.data.tags.get("restarts", "0") if existing is not None else known["restarts"])
    else:
        tags = {TAG_KIND: "sweep-trial", TAG_SWEEP: setup.sweep_name, "space": setup.space_name, TAG_TASK: setup.task,
                TAG_TRIAL: trial_id, "trial_name": trial_name,
                "incumbent": str(incumbent).lower(),  # the task's current configuration, never stopped early
                **setup.tags}
    with tracking.tracked_run(setup.experiment_id, f"{setup.task}-{trial_id}", tags, parent=setup.parent_run_id,
                              reopen=reopen, uri=setup.tracking_uri, leave_open=(SystemExit,)) as run:
        if reopen:  # restarted after its worker died: from its last checkpoint, or from scratch if it had none yet
            run.set_tags({"resumed": "true", "restarts": restarts,
                          "restarted_from_epoch": resume_from.epochs_done if resume_from is not None else 0})
        yield run, restarts


def plain(values: Any) -> Any:
    """numpy scalars (as Optuna/Ray hand them over) -> Python numbers, in mappings too, so YAML and JSON stay
    plain."""
    if isinstance(values, Mapping):
        return {str(key): plain(value) for key, value in values.items()}
    return values.item() if hasattr(values, "item") and not isinstance(values, (str, bytes)) else values
