"""One Tuner for every task: a per-task Optuna searcher and a per-task ASHA scheduler behind Tune's interfaces.

A sweep runs the trials of all its tasks in ONE ``ray.tune.Tuner``, so every free slot (a CPU, a GPU or a
fraction of one) takes the next trial of any task and the cluster never idles while one task's last trials finish.
Two thin routers make that possible with Ray Tune's own pieces:

* :class:`TaskSearch` (a ``ray.tune.search.Searcher``) holds one ``OptunaSearch`` (TPE) per task. Each new trial
  goes to the task with the fewest trials so far (ties: the order of the tasks), and every result goes back to
  the searcher of its own task: the TPE models never see another task's results.
* :class:`TaskASHA` (a ``FIFOScheduler``) holds one ``ASHAScheduler`` per task, so rungs compare trials of the
  same task only (accuracies of different tasks are not comparable), and it never stops a task's incumbent (the
  configuration the task trains with now, its first trial), so there is always a full-length score to compare
  the challengers with.

Each trial's config carries its task and whether it is the incumbent (``TASK_KEY``, ``INCUMBENT_KEY``, see
``sweeps.trainable.split_trial_config``) next to the sampled values; both routers pickle with the Tuner's state,
so ``--resume`` continues them.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .keys import INCUMBENT_KEY, TASK_KEY, TRIAL_ERROR


class TaskSearch(Searcher):
    """Route suggestions and results between one searcher per task (see the module docstring)."""

    def __init__(self, searchers: Mapping[str, Searcher], num_samples: Mapping[str, int],
                 has_incumbent: Mapping[str, bool], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self._searchers = dict(searchers)
        self._num_samples = dict(num_samples)
        self._has_incumbent = dict(has_incumbent)
        self._suggested = dict.fromkeys(self._searchers, 0)
        self._task_of: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        open_tasks = [t for t in self._searchers if self._suggested[t] < self._num_samples[t]]
        if not open_tasks:
            return Searcher.FINISHED
        task = min(open_tasks, key=lambda t: self._suggested[t])
        config = self._searchers[task].suggest(trial_id)
        if config in (None, Searcher.FINISHED):
            if config == Searcher.FINISHED:
                self._num_samples[task] = self._suggested[task]
            return None  # asked again at the next step
        # OptunaSearch serves its points_to_evaluate first: the current configuration is the task's first trial
        incumbent = self._suggested[task] == 0 and self._has_incumbent[task]
        self._suggested[task] += 1
        self._task_of[trial_id] = task
        return {TASK_KEY: task, INCUMBENT_KEY: incumbent, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:  # epochs that did not score val200 report training figures only
            self._searchers[self._task_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        failed = error or bool(result and TRIAL_ERROR in result)  # a trial that failed on its own reports why
        self._searchers[self._task_of[trial_id]].on_trial_complete(trial_id, result=result, error=failed)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class TaskASHA(FIFOScheduler):
    """One ASHA per task (rungs within a task), never stopping a task's incumbent (see the module docstring)."""

    def __init__(self, schedulers: Mapping[str, ASHAScheduler], max_epochs: Mapping[str, int], time_attr: str):
        super().__init__()
        self._schedulers = dict(schedulers)
        self._max_epochs = dict(max_epochs)
        self._time_attr = time_attr
        self.protected_stops: dict[str, int] = {}  # incumbent trial id -> rung decisions to stop it, overruled

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return True  # every task's ASHA got its metric and mode when it was made

    def _of(self, trial) -> ASHAScheduler:
        return self._schedulers[trial.config[TASK_KEY]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        below_max = result.get(self._time_attr, 0) < self._max_epochs[trial.config[TASK_KEY]]
        if action == TrialScheduler.STOP and trial.config.get(INCUMBENT_KEY) and below_max:
            # Its result still counts in the rung (ASHA recorded it); only the stop is overruled.
            self.protected_stops[trial.trial_id] = self.protected_stops.get(trial.trial_id, 0) + 1
            return TrialScheduler.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{task}: {scheduler.debug_string()}" for task, scheduler in self._schedulers.items())
