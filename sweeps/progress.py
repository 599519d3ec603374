"""Live progress of a sweep on the console, quiet enough for a log file.

One status line for the whole sweep: trials done / running / stopped early / failed out of the total, the best
val score (accuracy; mIoU for segmentation) so far per task, the elapsed time and an estimate of the time left
(from the epochs still to train and the epochs per second so far). On a terminal the line is redrawn in place every few seconds; in a log (no
terminal) it is printed once a minute. Each trial that ends adds one line saying how (``done``, ``stopped early
at epoch 5``, ``failed: <error>``).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

from ray.tune import Callback

from .keys import INCUMBENT_KEY, TASK_KEY, TIME_ATTR, TRIAL_ERROR
from .records import error_summary


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressView(Callback):
    """A Tune callback that prints the sweep's progress (see the module docstring)."""

    def __init__(self, plans: Mapping[str, tuple[int, int]], stream: IO[str] | None = None,
                 interval_s: float | None = None, *, metric: str, metric_label: str = "best val"):
        self.plans = dict(plans)  # task -> (trials, epochs of a trial trained to the end)
        self.metric, self.metric_label = metric, metric_label
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (2.0 if self.live else 60.0)
        self.started = time.monotonic()
        self.last_print = -float("inf")
        self.epochs_at_start: int | None = None  # epochs already trained when this run started (--resume)
        self.ended: set[str] = set()
        self.line = ""

    # --- Tune hooks -------------------------------------------------------------------------------------------
    def on_step_end(self, iteration: int, trials: Sequence, **info) -> None:
        if time.monotonic() - self.last_print >= self.interval_s:
            self.show(trials)

    def on_trial_complete(self, iteration: int, trials: Sequence, trial, **info) -> None:
        self._ended(trials, trial, None)

    def on_trial_error(self, iteration: int, trials: Sequence, trial, **info) -> None:
        self._ended(trials, trial, "failed")

    def on_experiment_end(self, trials: Sequence, **info) -> None:
        self.show(trials)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    # --- output -------------------------------------------------------------------------------------------------
    def _ended(self, trials: Sequence, trial, how: str | None) -> None:
        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        config = trial.config or {}
        task = config.get(TASK_KEY, "?")
        result = trial.last_result or {}
        epoch = int(result.get(TIME_ATTR, 0) or 0)
        accuracy = result.get(self.metric)
        if TRIAL_ERROR in result:
            how = f"failed: {result[TRIAL_ERROR]}"
        elif how is None:
            how = "done" if epoch >= self.plans.get(task, (0, 0))[1] else f"stopped early at epoch {epoch}"
        else:
            how = f"failed: {error_summary(trial) or 'see ' + str(trial.path)}"
        role = " (incumbent)" if config.get(INCUMBENT_KEY) else ""
        score = f", {self.metric_label.split()[-1]} {accuracy:.3f}" if isinstance(accuracy, float) and not how.startswith("failed") else ""
        self._write(f"[{format_duration(time.monotonic() - self.started)}] {task} {trial.trial_id}{role}: {how}"
                    f"{score}", event=True)
        if self.live:
            self.show(trials)

    def status(self, trials: Sequence) -> str:
        counts = dict.fromkeys(("done", "running", "stopped", "failed"), 0)
        best: dict[str, float] = {}
        trained = remaining = 0
        ended_epochs: list[int] = []
        created = dict.fromkeys(self.plans, 0)
        for trial in trials:
            config = trial.config or {}
            task = config.get(TASK_KEY)
            if task not in self.plans:
                continue
            created[task] += 1
            epochs = self.plans[task][1]
            result = trial.last_result or {}
            epoch = int(result.get(TIME_ATTR, 0) or 0)
            trained += epoch
            accuracy = result.get(self.metric)
            if isinstance(accuracy, float):
                best[task] = max(best.get(task, 0.0), accuracy)
            if trial.status == "ERROR" or TRIAL_ERROR in result:
                counts["failed"] += 1
            elif trial.status == "TERMINATED":
                counts["done" if epoch >= epochs else "stopped"] += 1
                ended_epochs.append(epoch)
            else:
                counts["running"] += trial.status == "RUNNING"
                remaining += epochs - epoch
        total = sum(n for n, _ in self.plans.values())
        if ended_epochs:
            per_trial = sum(ended_epochs) / len(ended_epochs)
        else:
            per_trial = max(e for _, e in self.plans.values())
        remaining += sum(max(0, n - created[t]) for t, (n, _) in self.plans.items()) * per_trial
        if self.epochs_at_start is None:
            self.epochs_at_start = trained
        elapsed = time.monotonic() - self.started
        rate = (trained - self.epochs_at_start) / elapsed if elapsed > 0 else 0.0
        left = f"~{format_duration(remaining / rate)} left" if rate > 0 and remaining else "estimating time left"
        scores = " ".join(f"{task} {best[task]:.3f}" for task in self.plans if task in best) or "-"
        return (f"[{format_duration(elapsed)}] trials {counts['done']}/{total} done, {counts['running']} running, "
                f"{counts['stopped']} stopped early, {counts['failed']} failed; {left} | {self.metric_label}: {scores}")

    def show(self, trials: Sequence) -> None:
        self.last_print = time.monotonic()
        self.line = self.status(trials)
        self._write(self.line)

    def _write(self, text: str, event: bool = False) -> None:
        if self.live:
            # An event line goes above the status line, which is then redrawn.
            self.stream.write("\r\033[K" + text + ("\n" + self.line if event and self.line else ""))
        elif event or text:
            self.stream.write(text + "\n")
        self.stream.flush()
