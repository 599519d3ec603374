"""What every pipeline stage shares: where its files live, atomic folder swaps, and failing with a clear message.

Layout under ``outputs/`` (gitignored; each path is a DVC output of exactly one stage):

- ``prepare/manifest.json`` + ``prepare/<task>.json``: what ``prepare`` found (counts, classes, group, a
  fingerprint of the list files); ``train@<task>`` depends on its task's record only, so adding a task to
  ``data.tasks`` re-runs ``prepare`` and the new task, not the others.
- ``train/<task>/``: ``seed<S>.safetensors`` (trainable weights only), ``config.json`` (the exact resolved
  settings), ``summary.json`` (per-seed results, MLflow run id).
- ``history/<task>.tsv``: per-epoch training curves (``dvc plots``).
- ``evaluate/<task>.json``: the task's metrics (numbers only: ``dvc metrics``); ``evaluate/<task>.details.json``:
  what they describe (group, method, per-seed scores, MLflow run id).
- ``report.md``, ``report.json``, ``report.png``, ``report_tasks.json``: the report stage.

DVC deletes a stage's outputs before running it unless they are ``persist: true``; the stages declare them
persistent and write them by atomic rename, so a failing stage leaves the previous results in place.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .params import DEFAULT_BEST, DEFAULT_PARAMS


class StageError(RuntimeError):
    """An expected failure of a stage (missing input, bad data): reported as one clear message."""


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

    def history(self, task: str) -> Path:
        return self.root / "history" / f"{task}.tsv"

    def metrics(self, task: str) -> Path:
        return self.root / "evaluate" / f"{task}.json"

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

    @property
    def report_tasks(self) -> Path:
        return self.root / "report_tasks.json"


def stage_arguments(description: str, *, task: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if task:
        parser.add_argument("task", help="task folder name (one of data.tasks)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--best", type=Path, default=DEFAULT_BEST,
                        help="sweep winners merged over the params (default: sweeps/best.yaml)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: shown as one line instead of a traceback."""
    from dtl.config import ConfigError
    from dtl.models import CheckpointError

    errors: list[type[BaseException]] = [StageError, ConfigError, CheckpointError, FloatingPointError,
                                         FileExistsError]
    try:
        from dtl.data import DataError

        errors.append(DataError)
    except ImportError:  # pragma: no cover - dtl.data always defines it
        pass
    return tuple(errors)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(name: str, main: Callable[[], Any]) -> None:
    """Run a stage's main; on an expected error print ``<stage> failed: <why>`` and exit 1 (no traceback).

    SIGTERM (a killed ``dvc repro``, a job scheduler) is handled like Ctrl-C, so temporary folders are removed
    and the MLflow run is ended as KILLED instead of staying RUNNING forever.
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except expected_errors() as err:
        print(f"\n{name} failed: {err}\n(earlier outputs of this stage were left as they were)", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"\n{name} interrupted (earlier outputs of this stage were left as they were)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise StageError(f"{path} is missing ({what}); run `dvc repro` so the earlier stages write it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path} is not valid JSON ({err}); re-run the stage that writes it") from None


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path`` (old one removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def relative_to_cwd(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
