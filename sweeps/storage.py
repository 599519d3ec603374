"""Free space in the sweep's storage folder: checked before anything is written, and watched while Tune runs.

Tune writes its experiment state and the trials' checkpoints in place, so a disk that fills up under it can leave
a truncated ``experiment_state-*.json`` that neither the sweep's results nor ``--resume`` can read. The watch
stops the sweep the way Ctrl-C does (running trials end, Tune saves its state) while there is still room for
that, and the driver then prints one line with the space needed and the ``--resume`` command.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from .state import SweepError

MIB = 2**20
# Tune's state for ~50 trials is about 1 MiB and it is rewritten in full; with the first checkpoints and the
# sweep's own files, 4 MiB is the least a sweep can start in.
MIN_FREE_BYTES = 4 * MIB
SLACK_BYTES = 1 * MIB  # beyond what the next save needs: Tune's per-trial logs and the sweep's results


class StorageFullError(SweepError):
    """The storage folder has less free space than the sweep needs (the message says how much)."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(storage: Path, needed: int = MIN_FREE_BYTES) -> None:
    """Raise :class:`StorageFullError` when ``storage`` cannot hold a sweep's first writes."""
    free = free_bytes(storage)
    if free < needed:
        raise StorageFullError(f"--storage-path {storage}: {free / MIB:.1f} MiB free, a sweep needs at least "
                               f"{needed / MIB:.0f} MiB there (Tune's experiment state and the trials' checkpoints)")


def folder_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed meanwhile (an older checkpoint)
                pass
    return total


@dataclass
class StorageShortage:
    """What stopped a sweep: the folder, its free bytes and the bytes the next saves needed."""

    folder: Path
    free: int
    needed: int

    def describe(self) -> str:
        return (f"{self.folder} is nearly full ({self.free / MIB:.1f} MiB free; the next checkpoints and Tune's "
                f"experiment state need about {self.needed / MIB:.1f} MiB)")


# Tuner.restore brings back its own (unpickled) copy of the callback, so the driver reads what stopped the sweep
# here rather than from the object it made.
SHORTAGES: list[StorageShortage] = []


class StorageWatch(Callback):
    """Stop the sweep gracefully when the next round of saves might not fit in the storage folder.

    The space a save needs is learnt as the sweep runs: twice the largest checkpoint seen per running trial (the
    new one is written before the old one goes) plus twice Tune's experiment state (rewritten in full), plus
    :data:`SLACK_BYTES`.
    """

    def __init__(self, experiment_dir: Path, interval_s: float = 2.0):
        self.folder = Path(experiment_dir)
        self.interval_s = interval_s
        self.last_check = -float("inf")
        self.largest_checkpoint = 0
        self.shortage: StorageShortage | None = None

    def needed(self, running: int) -> int:
        state = sum(p.stat().st_size for p in self.folder.glob("*/experiment_state-*.json"))
        return 2 * self.largest_checkpoint * max(running, 1) + 2 * state + SLACK_BYTES

    def on_checkpoint(self, iteration: int, trials, trial, checkpoint, **info) -> None:
        self.largest_checkpoint = max(self.largest_checkpoint, folder_bytes(checkpoint.path))
        self.check(trials, force=True)

    def on_step_end(self, iteration: int, trials, **info) -> None:
        self.check(trials)

    def check(self, trials, force: bool = False) -> None:
        if self.shortage is not None or (not force and time.monotonic() - self.last_check < self.interval_s):
            return
        self.last_check = time.monotonic()
        running = sum(1 for t in trials if t.status == "RUNNING")
        needed, free = self.needed(running), free_bytes(self.folder)
        if free >= needed:
            return
        self.shortage = StorageShortage(self.folder, free, needed)
        SHORTAGES.append(self.shortage)
        stop = signal.getsignal(signal.SIGUSR1)  # Tune's own graceful stop, registered while fit() runs
        if callable(stop):
            stop(signal.SIGUSR1, None)
        else:
            raise KeyboardInterrupt
