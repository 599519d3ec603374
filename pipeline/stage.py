"""What every pipeline stage's process shares: its command line, failing with one clear message, stopping
cleanly on SIGTERM (and when the ``dvc repro`` that started it dies), and one stage at a time per output.

Where a stage's files live is ``pipeline.outputs``; writing them atomically is ``dtl.io`` (``atomic_dir``,
``write_json``).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import psutil

from dtl.config import ConfigError
from dtl.data import DataError
from dtl.engine import SetupError
from dtl.models import CheckpointError

from .params import DEFAULT_BEST, DEFAULT_PARAMS


class StageError(RuntimeError):
    """An expected failure of a stage (missing input, bad data): reported as one clear message."""


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
    """Errors that mean bad input or settings, not a bug: shown as one line instead of a traceback."""
    return (StageError, ConfigError, CheckpointError, DataError, SetupError, FloatingPointError, FileExistsError)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pipeline_process():
    """The ``dvc`` process that started this stage (the nearest ancestor running ``dvc``), or None when the stage
    was started by hand."""
    try:
        process = psutil.Process().parent()
        while process is not None:
            if any(Path(arg).name == "dvc" for arg in process.cmdline()[:3]):
                return process
            process = process.parent()
    except psutil.Error:
        pass
    return None


def watch_pipeline(interval_s: float = 1.0) -> None:
    """Stop this stage (as SIGTERM does: temporary files removed, MLflow run KILLED) when the ``dvc repro`` that
    started it is gone: a SIGTERM to DVC alone ends DVC but not its stage, which would otherwise run on beside
    the next ``dvc repro`` and write its outputs after DVC stopped tracking them."""
    parent = pipeline_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_running() and parent.status() != "zombie":  # is_running() also catches a reused pid
            time.sleep(interval_s)
        print(f"\nthe dvc process {parent.pid} that started this stage is gone: stopping", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-dvc", daemon=True).start()


@contextmanager
def exclusive(path: Path, stage: str) -> Iterator[None]:
    """Hold ``<path's folder>/.<name>.lock`` while the stage writes ``path``: a second stage for the same output
    refuses to start while the first is alive. Under the lock, what a killed run left next to ``path`` (its
    temporary folders) is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise StageError(f"{stage} is already running ({owner}) and writes {path}; wait for it to finish or "
                             "stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed with SIGKILL
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_stage(name: str, main: Callable[[], Any], output: Path | None = None) -> None:
    """Run a stage's main; on an expected error print ``<stage> failed: <why>`` and exit 1 (no traceback).

    SIGTERM (a killed ``dvc repro``, a job scheduler) is handled like Ctrl-C, so temporary folders are removed
    and the MLflow run is ended as KILLED instead of staying RUNNING forever; so is the disappearance of the
    ``dvc`` process that started the stage (:func:`watch_pipeline`). With ``output``, the stage holds a lock on
    it (:func:`exclusive`).
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        watch_pipeline()
        with exclusive(output, name) if output is not None else nullcontext():
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
