"""The sweep's MLflow records: one parent run per task, the status of every trial's child run, the decision.

Trials write their own child runs (``sweeps/trainable.py``); the driver owns the rest:

* a parent run per task (``<sweep>/<task>``): the space, the base configuration, then the winner's values
  (``best.<key>``), the incumbent rule's outcome (tags ``decision``, ``replaced_incumbent``; metrics
  ``best_val_accuracy``, ``incumbent_val_accuracy``, ``margin``, ``p_value``), trial counts and the
  accuracy-vs-cost plot (``cost.png``);
* the status of child runs that their trial could not close itself: trials that ASHA stopped (the process ends
  while the trial waits in ``tune.report``) and trials whose worker died (:func:`status_callback`, then
  :func:`reconcile_runs` after ``fit()``).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .trainable import METRIC, TAG_KIND, TAG_SWEEP, TAG_TASK, TAG_TRIAL, TASK_KEY, TIME_ATTR


def open_parent_run(experiment_id: str, tracking_uri: str, sweep_name: str, task: str, space, base_config,
                    epochs: int, known_run_id: str | None) -> str:
    """The task's parent run: created once (with the search space and the base configuration), reopened on
    --resume."""
    import tracking

    if known_run_id:
        return tracking.Run.reopen(known_run_id, tracking_uri).run_id
    values = {"space": space.name, "space_file": str(space.path), "epochs": epochs,
              "grace_period": space.grace_period, "reduction_factor": space.reduction_factor,
              **{f"sweep.training.{k}": v for k, v in space.training.items()},
              **{f"search.{p.name}": p.describe().split(": ", 1)[1] for p in space.params},
              **{f"base.{k}": v for k, v in tracking.flatten(base_config.for_task(task).to_dict()).items()
                 if not k.startswith("overrides")}}
    # The task first: the runs table cuts long names, and the sweep's name (with its date) is also a tag.
    run = tracking.Run.create(experiment_id, f"{task} · {sweep_name}", {TAG_KIND: "sweep", TAG_SWEEP: sweep_name,
                                                                      TAG_TASK: task, "space": space.name},
                              values, uri=tracking_uri)
    return run.run_id


def child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """trial id -> the trial's child run."""
    from tracking import TAG_PARENT

    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                              max_results=10000)
    return {run.data.tags.get(TAG_TRIAL): run for run in runs}


def error_summary(trial) -> str | None:
    """The last line of a failed trial's traceback that names an error."""
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return None
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    causes = [line for line in lines if ("Error" in line or "error" in line) and not line.startswith("File ")]
    return (causes[-1] if causes else lines[-1])[:300] if lines else None


class ChildRunCloser:
    """Closes the child runs that their trial could not close itself (ASHA stops, dead workers); trials that end
    normally or raise close their own run first, and are left alone. Plain data, so it pickles with the Tuner."""

    def __init__(self, tracking_uri: str, experiment_id: str, parents: Mapping[str, str], epochs: Mapping[str, int]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parents = dict(parents)  # task -> parent run id
        self.epochs = dict(epochs)  # task -> epochs of a trial trained to the end

    def close(self, trial, status: str) -> None:
        import tracking

        task = (trial.config or {}).get(TASK_KEY)
        try:
            found = tracking.Run.find(self.experiment_id, self.tracking_uri, parent=self.parents[task],
                                      **{TAG_TRIAL: trial.trial_id})
            if found is None or found.info.status != "RUNNING":
                return
            run = tracking.Run(found.info.run_id, self.tracking_uri)
            epoch = int((trial.last_result or {}).get(TIME_ATTR, 0) or 0)
            if status == "FINISHED" and epoch < self.epochs[task]:
                run.set_tags({"stopped_early": f"epoch {epoch} of {self.epochs[task]} (ASHA)"})
            run.finish(status, error=(error_summary(trial) or "the trial's worker died") if status == "FAILED" else None)
        except Exception as err:  # never let bookkeeping stop the sweep; the driver reconciles at the end
            print(f"warning: could not close the MLflow run of trial {trial.trial_id}: {err}", file=sys.stderr)


def status_callback(closer: ChildRunCloser):
    """A Tune callback that closes child runs as their trials end (see :class:`ChildRunCloser`)."""
    from ray.tune import Callback

    class _Callback(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            closer.close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            closer.close(trial, "FAILED")

    return _Callback()


def reconcile_runs(client, closer: ChildRunCloser, task: str, trials: Sequence[Any]) -> dict:
    """After ``fit()``: give every child run of ``task`` the status of its trial (KILLED for trials cut off by a
    stop); returns trial id -> run."""
    import tracking

    parent = closer.parents[task]
    client = client or tracking.client(closer.tracking_uri)
    runs = child_runs(client, closer.experiment_id, parent)
    known = {trial.trial_id for trial in trials}
    for trial_id, run in runs.items():
        if trial_id not in known and run.info.status == "RUNNING":
            # Started after the last experiment snapshot of a driver that was then killed: Tune does not know
            # this trial and sampled a new one in its place.
            client.set_tag(run.info.run_id, "lost_trial", "started just before the driver was killed; Tune "
                                                          "re-ran it as a new trial")
            client.set_terminated(run.info.run_id, "KILLED")
    for trial in trials:
        run = runs.get(trial.trial_id)
        if run is None or run.info.status != "RUNNING":
            continue
        if trial.status == "TERMINATED":
            closer.close(trial, "FINISHED")
        elif trial.status == "ERROR":
            closer.close(trial, "FAILED")
        else:
            client.set_tag(run.info.run_id, "interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    return child_runs(client, closer.experiment_id, parent)


def record_decision(parent, outcome, plot: Path | None) -> None:
    """The winner and the incumbent rule's outcome on the task's parent run (a ``tracking.Run``), ``best=true`` on
    the winner's run."""
    import tracking

    decision, best = outcome.decision, outcome.best
    if best.run_id:
        tracking.Run(best.run_id, parent.uri).set_tags({"best": "true"})
        parent.set_tags({"best_run_id": best.run_id})
    parent.set_tags({"best_trial_id": best.trial_id, "decision": decision.reason,
                     "replaced_incumbent": str(decision.replaced).lower()})
    parent.log_params({**{f"best.{k}": v for k, v in best.params.items()}, "alpha": decision.alpha,
                       "alpha_corrected": decision.level})
    incumbent = next((r for r in outcome.rows if r.trial_id == decision.incumbent), None)
    chosen = next((c for c in decision.comparisons if c.trial_id == best.trial_id), None)
    parent.log_metrics({
        f"best_{METRIC}": best.val_accuracy,
        f"incumbent_{METRIC}": incumbent.val_accuracy if incumbent else None,
        "margin": decision.margin,
        "p_value": chosen.p_value if chosen else None,
        "images_won": chosen.wins if chosen else None,
        "images_lost": chosen.losses if chosen else None,
    })
    if plot is not None:
        parent.log_artifacts(plot)
