"""The names a sweep's parts share: what a trial reports to Tune, the files of its checkpoint, its MLflow tags.

The trial (``sweeps.trainable``) writes them; the driver, the searchers, the scheduler, the progress view, the
results and the MLflow records read them.
"""
from __future__ import annotations

from dtl.protocols.base import SCORES

# The split scores a trial reports: "<split>_<score>", e.g. val_accuracy (VTAB: val200 accuracy after training on
# train800), val_miou for segmentation; a study reports its points' test_<score>.
SCORE_METRICS = tuple(f"val_{score}" for score in SCORES.values())


def score_metric(protocol, split: str = "val") -> str:
    """The key of ``protocol``'s score on ``split``: a search ranks its trials on its base configuration's
    selection protocol's ``val`` score, a study reports its own protocol's ``test`` score."""
    return f"{split}_{protocol.score}"


def metric_label(metric: str) -> str:
    """``val_accuracy`` -> ``val accuracy``, ``test_miou`` -> ``test mIoU`` (axis labels, table headings)."""
    return metric.replace("_", " ").replace("miou", "mIoU")


TIME_ATTR = "epoch"  # epochs completed; ASHA's time attribute
PER_IMAGE = "val_per_image"  # each val image's score, final model (sweeps.selection.encode_scores)
# A trial that fails on its own (a bad configuration, a NaN loss, out of memory) reports this key and ends; Tune
# would retry a raised error like a lost node, and retrying cannot fix those.
TRIAL_ERROR = "trial_error"
CHECKPOINT_FILE = "training_state.pt"  # the trial's checkpoint: dtl.engine.TrainingState (kilobytes, no backbone)
RUN_FILE = "mlflow_run.json"  # beside it: the trial's MLflow run and restarts, known with the store unreachable
RUN_KEY = "mlflow_run_id"  # in every report: the driver closes a stopped trial's run without searching the store
# Cost figures of a finished trial (dtl.engine.TrainResult.summary), next to its accuracy.
COST_METRICS = ("trainable_params", "train_time_s", "cpu_time_s", "saved_bytes_per_batch", "gpu_peak_allocated_bytes",
                "gpu_peak_reserved_bytes", "peak_rss_bytes", "images_per_s")

# Keys of a trial's config next to the sampled values: its task, and whether it is the task's incumbent.
TASK_KEY = "task"
INCUMBENT_KEY = "incumbent"
SEED_KEY = "seed"  # a study trial's training seed (a sweep trains every trial with the base's first seed)


TAG_KIND = "kind"
TAG_SWEEP = "sweep"
TAG_TASK = "task"
TAG_TRIAL = "trial_id"
