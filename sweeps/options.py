"""A sweep's options: one dataclass whose fields are the command's options, checked before anything starts.

Each field carries its command-line flag and help text, so ``python sweeps/run.py --help`` and a program that
builds :class:`SweepOptions` itself see the same defaults. This module imports neither Ray nor Optuna: the
command answers ``--help`` and argument errors at once.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from dtl.io import REPO_ROOT

from .selection import ALPHA
from .state import SweepError

DEFAULT_STORAGE = REPO_ROOT / "sweep_results"
DEFAULT_EXPERIMENT = "dtl-sweeps"
SCHEDULERS = ("asha", "fifo")


def option(default: Any, help: str, **argument: Any) -> Any:
    """A field of :class:`SweepOptions` and how the command line sets it (``flag``, then argparse's own
    ``add_argument`` keywords: ``type``, ``nargs``, ``metavar``, ``choices``, ``action``)."""
    return field(default=default, metadata={"help": help, **argument})


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


@dataclass
class SweepOptions:
    """Everything a sweep is asked to do; ``--help`` lists the fields in this order."""

    space: str = option("dtl_plus", "search space: a name in sweeps/spaces/ ({spaces}) or the path of a space .yaml "
                                    "file (default: %(default)s)")
    tasks: list[str] | None = option(None, "tasks to sweep, all at once (default: data.tasks of the pipeline's "
                                           "params.yaml)", nargs="+", metavar="TASK")
    num_samples: int | None = option(None, "trials per task, the current configuration included (default: the "
                                           "space file's num_samples)", type=int)
    max_concurrent: int | None = option(None, "trials running at once over all tasks (default: as many as the "
                                              "cluster's CPUs/GPUs hold)", type=int)
    gpus_per_trial: float | None = option(
        None, "GPUs reserved per trial, at most 1; fractions pack several trials on one GPU (0.25: four), each "
              "capped at that share of the GPU's memory. Default: 1 when the cluster has GPUs, else 0 (CPU "
              "training; a trial with no GPU sees none)", type=non_negative_float)
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial (its torch thread count, at least 1, and at most "
                                        "one fewer data loader workers than that; default: %(default)s)",
                                   type=non_negative_float)
    address: str | None = option(None, "join an existing Ray cluster (e.g. 10.0.0.1:6379 or 'auto', as `ray start "
                                       "--head` prints); default: start a private local Ray instance")
    scheduler: str | None = option(None, "asha: stop weak trials early at rungs of epochs (time attribute: epoch); "
                                         "fifo: run every trial to the end (default: asha; a study is always fifo)",
                                   choices=SCHEDULERS)
    objectives: list[str] | None = option(
        None, "comma-separated objectives, the sweep's score first (val_accuracy; val_miou for segmentation): "
              "val_accuracy,saved_bytes searches accuracy and memory together (Optuna multi-objective TPE, every "
              "trial to the end) and reports each task's Pareto set; also train_time, trainable_params (default: "
              "the score alone)", metavar="NAMES")
    memory_budget: float | None = option(
        None, "the winner must keep at most this many bytes for backward per batch (the trials' recorded "
              "saved_bytes_per_batch); the incumbent rule applies within the budget", type=non_negative_float,
        metavar="BYTES")
    seeds: list[int] | None = option(None, "a study's training seeds, each point runs once per seed and task "
                                           "(default: the study file's seeds)", type=int, nargs="+", metavar="SEED")
    seed: int = option(0, "seed of the TPE samplers: same seed, same first trials (default: %(default)s)", type=int)
    max_failures: int = option(3, "restarts of a trial whose worker or node died, each from the trial's last "
                                  "checkpoint (a trial that fails on its own, e.g. a NaN loss, is not retried; "
                                  "default: %(default)s)", type=int)
    checkpoint_every: float = option(60.0, "a trial checkpoints at each of ASHA's rungs and, between them, at least "
                                           "this often (0: after every epoch; each checkpoint is a report to the "
                                           "driver; default: %(default)s)", type=float, metavar="SECONDS")
    alpha: float = option(ALPHA, "level of the paired test a challenger must pass to replace the current "
                                 "configuration, Bonferroni-corrected over the challengers (default: %(default)s)",
                          type=float)
    storage_path: str = option(str(DEFAULT_STORAGE), "folder for Ray Tune's experiment state and results "
                                                     "(<storage>/<name>/); use a shared filesystem path on a "
                                                     "multi-node cluster (default: %(default)s)")
    resume: bool = option(False, "continue an interrupted sweep (--name, or the latest sweep of --space): finished "
                                 "trials and tasks are not re-run", action="store_true")
    name: str | None = option(None, "sweep name (default: <space>-<date>-<time>; with --resume: the latest sweep "
                                    "of --space under --storage-path)")
    params_path: str | None = option(None, "the pipeline's params file giving the base data/model/training settings "
                                           "(default: params.yaml at the repository root)", flag="--params")
    best_path: str | None = option(None, "file the best configuration per task is merged into (default: "
                                         "sweeps/best.yaml, which the DVC pipeline reads)")
    experiment: str = option(DEFAULT_EXPERIMENT, "MLflow experiment (store: $MLFLOW_TRACKING_URI, else "
                                                 "sqlite:///mlflow.db at the repository root, as the pipeline; "
                                                 "default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser, spaces: str) -> None:
    """One ``--flag`` per field of :class:`SweepOptions`, its default the field's."""
    for spec in fields(SweepOptions):
        argument = dict(spec.metadata)
        flag = argument.pop("flag", "--" + spec.name.replace("_", "-"))
        argument["help"] = argument["help"].replace("{spaces}", spaces)
        default = spec.default if spec.default is not MISSING else None
        if argument.get("action") != "store_true":
            argument["default"] = default
        parser.add_argument(flag, dest=spec.name, **argument)


def check_options(options: SweepOptions) -> None:
    """The checks every strategy shares (a strategy adds its own: ``Strategy.check``)."""
    if options.memory_budget is not None and not options.memory_budget > 0:
        raise SweepError(f"--memory-budget: expected bytes > 0, got {options.memory_budget}")
    if options.num_samples is not None and options.num_samples < 1:
        raise SweepError(f"--num-samples: expected an integer >= 1, got {options.num_samples}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise SweepError(f"--max-concurrent: expected an integer >= 1, got {options.max_concurrent}")
    if options.scheduler is not None and options.scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler: expected one of {', '.join(SCHEDULERS)}, got {options.scheduler!r}")
    if options.cpus_per_trial <= 0 or (options.gpus_per_trial is not None and options.gpus_per_trial < 0):
        raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if options.gpus_per_trial is not None and options.gpus_per_trial > 1:
        raise SweepError(f"--gpus-per-trial {options.gpus_per_trial:g}: a trial trains on one GPU, so at most 1 (a "
                         "fraction such as 0.25 packs several trials on one GPU)")
    if options.max_failures < 0:
        raise SweepError(f"--max-failures: expected an integer >= 0, got {options.max_failures}")
    if not options.checkpoint_every >= 0:
        raise SweepError(f"--checkpoint-every: expected seconds >= 0, got {options.checkpoint_every}")
    if not 0 < options.alpha < 1:
        raise SweepError(f"--alpha: expected a level in (0, 1) such as 0.05, got {options.alpha}")
