"""Hyperparameter sweeps of DTL / DTL+ (and baselines) with Ray Tune + Optuna, recorded in MLflow.

    python sweeps/run.py --space dtl_plus                  # the embedded default: a few minutes on 2 CPU cores
    python sweeps/run.py --space dtl_plus --resume         # continue the latest dtl_plus sweep after a stop
    python sweeps/run.py --space dtl_plus --address 10.0.0.1:6379 --gpus-per-trial 0.25   # on a Ray cluster
    dvc repro                                              # retrain the winners (sweeps/best.yaml) and test them

The objective is val200 accuracy after training on train800 with the pipeline's own schedule (VTAB's rule: the
test split is never used for selection; few-shot and domain generalisation: val_meta.list after training on one
k-shot list; segmentation: mIoU on a held-out tenth of the training images after training on the rest); a winner
replaces the current configuration only when it beats it on the same val images beyond chance. See
docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the reported wall time includes Python's imports

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python sweeps/run.py` puts sweeps/, not the repository root, on sys.path
    sys.path.insert(0, str(REPO_ROOT))


def positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's options (long: one ``add_argument`` per option, each with its help text, in the order
    ``--help`` lists them)."""
    from sweeps.driver import DEFAULT_EXPERIMENT, DEFAULT_STORAGE, SCHEDULERS
    from sweeps.space import available_spaces

    parser = argparse.ArgumentParser(
        prog="python sweeps/run.py",
        description="Search hyperparameters per task with Ray Tune (one OptunaSearch TPE and one ASHA per task, "
                    "the trials of all tasks in one Tuner), training each trial with the pipeline's own entry "
                    "point and schedule on train800 and scoring val200 at ASHA's rungs and at the end (few-shot and "
                    "domain generalisation: the largest k-shot list of the first seed, scoring val_meta.list; "
                    "segmentation: the training images less a held-out tenth, scoring mIoU on that tenth). The "
                    "first trial of each task is its current configuration; a challenger replaces it only when it "
                    "wins on the same val images beyond chance (an exact McNemar test; for segmentation a sign "
                    "test on the images' own mean IoU). Every trial is an MLflow child run of a parent "
                    "run per sweep and task; the winners are written to sweeps/best.yaml, which `dvc repro` "
                    "retrains under the pipeline's protocol and tests.",
        epilog="examples:\n"
               "  python sweeps/run.py --space dtl_plus            # embedded default, then: dvc repro\n"
               "  python sweeps/run.py --space study_start_block --tasks dsprites_ori patterns   # an ablation\n"
               "  python sweeps/run.py --space dtl_plus --resume   # continue the latest dtl_plus sweep\n"
               "  python sweeps/run.py --space lora --best-path sweeps/best_lora.yaml   # baseline, same budget\n"
               "  python sweeps/run.py --space dtl_plus --address 10.0.0.1:6379 --gpus-per-trial 0.25\n"
               "see docs/sweeps.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--space", default="dtl_plus",
                        help=f"search space: a name in sweeps/spaces/ ({', '.join(available_spaces())}) or the path "
                             "of a space .yaml file (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", default=None,
                        help="tasks to sweep, all at once (default: data.tasks of the pipeline's params.yaml)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials per task, the current configuration included (default: the space file's "
                             "num_samples)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials running at once over all tasks (default: as many as the cluster's CPUs/GPUs "
                             "hold)")
    parser.add_argument("--gpus-per-trial", type=positive_float, default=None,
                        help="GPUs reserved per trial, at most 1; fractions pack several trials on one GPU (0.25: "
                             "four), each capped at that share of the GPU's memory. Default: 1 when the cluster has "
                             "GPUs, else 0 (CPU training; a trial with no GPU sees none)")
    parser.add_argument("--cpus-per-trial", type=positive_float, default=1.0,
                        help="CPUs reserved per trial (its torch thread count, at least 1, and at most one fewer data "
                             "loader workers than that; default: %(default)s)")
    parser.add_argument("--address", default=None,
                        help="join an existing Ray cluster (e.g. 10.0.0.1:6379 or 'auto', as `ray start --head` "
                             "prints); default: start a private local Ray instance")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="asha: stop weak trials early at rungs of epochs (time attribute: epoch); "
                             "fifo: run every trial to the end (default: asha; a study is always fifo)")
    parser.add_argument("--objectives", default=None, metavar="NAMES",
                        help="comma-separated objectives, the sweep's score first (val_accuracy; val_miou for "
                             "segmentation): val_accuracy,saved_bytes searches accuracy and memory together (Optuna "
                             "multi-objective TPE, every trial to the end) and reports each task's Pareto set; also "
                             "train_time, trainable_params (default: the score alone)")
    parser.add_argument("--memory-budget", type=positive_float, default=None, metavar="BYTES",
                        help="the winner must keep at most this many bytes for backward per batch (the trials' "
                             "recorded saved_bytes_per_batch); the incumbent rule applies within the budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="a study's training seeds, each point runs once per seed and task (default: the "
                             "study file's seeds)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the TPE samplers: same seed, same first trials (default: %(default)s)")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="restarts of a trial whose worker or node died, each from the trial's last checkpoint "
                             "(a trial that fails on its own, e.g. a NaN loss, is not retried; default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                        help="a trial checkpoints at each of ASHA's rungs and, between them, at least this often "
                             "(0: after every epoch; each checkpoint is a report to the driver; "
                             "default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="level of the paired test a challenger must pass to replace the current "
                             "configuration, Bonferroni-corrected over the challengers (default: %(default)s)")
    parser.add_argument("--storage-path", default=str(DEFAULT_STORAGE),
                        help="folder for Ray Tune's experiment state and results (<storage>/<name>/); "
                             "use a shared filesystem path on a multi-node cluster (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (--name, or the latest sweep of --space): finished "
                             "trials and tasks are not re-run")
    parser.add_argument("--name", default=None,
                        help="sweep name (default: <space>-<date>-<time>; with --resume: the latest sweep of "
                             "--space under --storage-path)")
    parser.add_argument("--params", dest="params_path", default=None,
                        help="the pipeline's params file giving the base data/model/training settings "
                             "(default: params.yaml at the repository root)")
    parser.add_argument("--best-path", default=None,
                        help="file the best configuration per task is merged into (default: sweeps/best.yaml, "
                             "which the DVC pipeline reads)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="MLflow experiment (store: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the "
                             "repository root, as the pipeline; default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dtl.config import ConfigError
    from sweeps.driver import SweepOptions, run_sweep
    from sweeps.space import SpaceError
    from sweeps.state import SweepError

    try:
        from sweeps.pareto import parse_objectives

        if args.objectives is not None:
            args.objectives = parse_objectives(args.objectives)
        options = SweepOptions(**vars(args))
        return run_sweep(options, started=STARTED)
    except (SweepError, SpaceError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        import errno

        if err.errno != errno.ENOSPC:
            raise
        from sweeps.driver import EXIT_STORAGE_FULL

        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on device{where}; finished trials are kept: free space there and run the "
              "same command with --resume", file=sys.stderr)
        return EXIT_STORAGE_FULL


if __name__ == "__main__":
    sys.exit(main())
