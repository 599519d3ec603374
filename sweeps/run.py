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
import errno
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the reported wall time includes Python's imports

# `python sweeps/run.py` puts sweeps/, not the repository root, on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtl.config import ConfigError  # noqa: E402 (after the path above)
from sweeps.cluster import quiet_environment  # noqa: E402
from sweeps.options import SweepOptions, add_arguments  # noqa: E402
from sweeps.space import SpaceError  # noqa: E402
from sweeps.space_file import available_spaces, load_space  # noqa: E402
from sweeps.state import EXIT_INTERRUPTED, EXIT_STORAGE_FULL, SweepError  # noqa: E402

DESCRIPTION = ("Search hyperparameters per task with Ray Tune (one OptunaSearch TPE and one ASHA per task, "
            "the trials of all tasks in one Tuner), training each trial with the pipeline's own entry "
            "point and schedule on train800 and scoring val200 at ASHA's rungs and at the end (few-shot and "
            "domain generalisation: the largest k-shot list of the first seed, scoring val_meta.list; "
            "segmentation: the training images less a held-out tenth, scoring mIoU on that tenth). The "
            "first trial of each task is its current configuration; a challenger replaces it only when it "
            "wins on the same val images beyond chance (an exact McNemar test; for segmentation a sign "
            "test on the images' own mean IoU). Every trial is an MLflow child run of a parent "
            "run per sweep and task; the winners are written to sweeps/best.yaml, which `dvc repro` "
            "retrains under the pipeline's protocol and tests.")
EXAMPLES = ("examples:\n"
            "  python sweeps/run.py --space dtl_plus            # embedded default, then: dvc repro\n"
            "  python sweeps/run.py --space study_start_block --tasks dsprites_ori patterns   # an ablation\n"
            "  python sweeps/run.py --space dtl_plus --resume   # continue the latest dtl_plus sweep\n"
            "  python sweeps/run.py --space lora --best-path sweeps/best_lora.yaml   # baseline, same budget\n"
            "  python sweeps/run.py --space dtl_plus --address 10.0.0.1:6379 --gpus-per-trial 0.25\n"
            "see docs/sweeps.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's options: one per field of :class:`sweeps.options.SweepOptions`, in its order."""
    parser = argparse.ArgumentParser(
        prog="python sweeps/run.py",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, ", ".join(available_spaces()))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment(args.address)
    try:
        # Ray reads some of its settings when imported: what imports it comes after quiet_environment.
        from sweeps.lifecycle import run_sweep
        from sweeps.pareto import parse_objectives
        from sweeps.search_strategy import SearchStrategy
        from sweeps.study_strategy import StudyStrategy

        if args.objectives is not None:
            args.objectives = parse_objectives(args.objectives)
        options = SweepOptions(**vars(args))
        space = load_space(options.space)
        strategy = StudyStrategy(space) if space.is_study else SearchStrategy(space)  # grids: a study
        return run_sweep(options, strategy, started=STARTED)
    except (SweepError, SpaceError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on device{where}; finished trials are kept: free space there and run the "
              "same command with --resume", file=sys.stderr)
        return EXIT_STORAGE_FULL


if __name__ == "__main__":
    sys.exit(main())
