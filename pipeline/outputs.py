"""Where the pipeline's files live.

Under ``outputs/`` (gitignored; DVC caches them, so switching experiments restores them without retraining):

- ``prepare/manifest.json`` + ``prepare/<task>.json``: what ``prepare`` found (counts, classes, group, a
  fingerprint of the list files); ``train@<task>`` depends on its task's record only, so adding a task to
  ``data.tasks`` re-runs ``prepare`` and the new task, not the others.
- ``train/<task>/``: ``seed<S>.safetensors`` (trainable weights only), ``config.json`` (the exact resolved
  settings), ``summary.json`` (per-seed results, MLflow run id), ``history.tsv``.
- ``evaluate/<task>.json``: every number of the task's evaluation (means, stds, losses, costs);
  ``evaluate/<task>.details.json``: what they describe (group, method, per-seed scores, MLflow run ids).
- ``report.md``, ``report.json``, ``report.png``: the report stage.

Next to ``outputs/``, tracked by git so that every DVC experiment commit carries them (``cache: false``):

- ``metrics/<task>.json`` (``dvc metrics``: test accuracy, trainable parameters, peak memory, images/s) and
  ``metrics/summary.json`` (the group means);
- ``plots/curves/<task>.tsv`` (per-epoch training curves) and ``plots/tasks.json`` (one row per task), the
  ``dvc plots`` data, which ``dvc plots diff`` compares between experiments.

DVC deletes a stage's outputs before running it unless they are ``persist: true``; the stages declare them
persistent and write them by atomic rename, so a failing stage leaves the previous results in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputPaths:
    root: Path = Path("outputs")

    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    @property
    def manifest(self) -> Path:
        return self.prepare_dir / "manifest.json"

    def task_record(self, task: str) -> Path:
        return self.prepare_dir / f"{task}.json"

    def train_dir(self, task: str) -> Path:
        return self.root / "train" / task

    def metrics(self, task: str) -> Path:
        return self.root / "evaluate" / f"{task}.json"

    # git-tracked, next to outputs/
    def task_metrics(self, task: str) -> Path:
        return self.root.parent / "metrics" / f"{task}.json"

    @property
    def summary_metrics(self) -> Path:
        return self.root.parent / "metrics" / "summary.json"

    def curve(self, task: str) -> Path:
        return self.root.parent / "plots" / "curves" / f"{task}.tsv"

    @property
    def tasks_plot(self) -> Path:
        return self.root.parent / "plots" / "tasks.json"

    def details(self, task: str) -> Path:
        return self.root / "evaluate" / f"{task}.details.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"
