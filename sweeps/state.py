"""``<storage>/<name>/sweep.json``: what a sweep needs to resume, written atomically after every change."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtl.io import write_json

STATE_FILE = "sweep.json"
# How a sweep's process ends besides 0 (and 2: a bad option, space or params file).
EXIT_FAILED = 1  # it ran to its end and nothing trained to the end
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports a process it interrupted
EXIT_TERMINATED = 143  # SIGTERM (kill, timeout, a batch scheduler): 128 + 15
EXIT_STORAGE_FULL = 75  # the storage folder filled up: free space, then --resume (sysexits' EX_TEMPFAIL)


class SweepError(RuntimeError):
    """A sweep cannot start or go on; the message says why and what to do."""


@dataclass
class SweepState:
    path: Path
    name: str
    space: str
    space_file: str
    tasks: dict[str, dict[str, Any]]  # task -> {parent_run_id, finished, rows, best, decision}
    num_samples: int  # trials per task
    scheduler: str
    seed: int
    alpha: float
    params_path: str
    best_path: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    started: str = ""
    wall_time_s: float = 0.0
    finished: bool = False  # every task's trials ended and the winners were written
    kind: str = "sweep"  # sweep: search and select; study: a grid of points, reported (sweeps.study)
    seeds: list[int] | None = None  # a study's training seeds
    study_run_id: str | None = None  # a study's one MLflow parent run
    objectives: list[str] | None = None  # sweeps.pareto objectives; None: the metric alone
    metric: str = "val_accuracy"  # what trials are ranked on (sweeps.keys.score_metric): val_accuracy, val_miou
    memory_budget: float | None = None  # bytes kept for backward per batch a winner may keep at most

    def save(self) -> None:
        data = asdict(self)
        data.pop("path")
        write_json(self.path, data)

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        try:
            data = json.loads(path.read_text())
            return cls(path=path, **data)
        except (OSError, ValueError, TypeError) as err:
            raise SweepError(f"{path}: cannot read the sweep state ({err}); start a new sweep with another "
                             "--name") from None


def latest_sweep(storage: Path, space: str) -> str | None:
    """The most recently updated sweep of ``space`` under ``storage`` (for ``--resume`` without ``--name``)."""
    found = []
    for path in storage.glob(f"*/{STATE_FILE}"):
        try:
            if json.loads(path.read_text()).get("space") == space:
                found.append(path)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime).parent.name if found else None


def find_saved_state(name: str | None, storage: Path, space: str) -> SweepState:
    name = name or latest_sweep(storage, space)
    if not name or not (storage / name / STATE_FILE).is_file():
        what = f"named {name!r}" if name else f"of space {space}"
        raise SweepError(f"--resume: no sweep {what} under {storage} (pass the --name and --storage-path it printed)")
    state = SweepState.load(storage / name / STATE_FILE)
    if state.space != space:
        raise SweepError(f"--resume: sweep {name} searched space {state.space}, not {space}")
    return state
