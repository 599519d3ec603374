"""The sweep's MLflow records: one parent run per task, the status of every trial's child run, the decision.

Trials write their own child runs (``sweeps/trainable.py``); the driver owns the rest:

* a parent run per task (``<sweep>/<task>``): the space, the base configuration, then the winner's values
  (``best.<key>``), the incumbent rule's outcome (tags ``decision``, ``replaced_incumbent``; metrics
  ``best_<metric>`` and ``incumbent_<metric>`` such as ``best_val_accuracy``, ``margin``, ``p_value``), trial
  counts and the score-vs-cost plot (``cost.png``);
* the status of child runs that their trial could not close itself: trials that ASHA stopped (the process ends
  while the trial waits in ``tune.report``) and trials whose worker died (:func:`status_callback`, then
  :func:`reconcile_runs` after ``fit()``).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

import tracking
from tracking import TAG_PARENT
from tracking.outbox import OUTBOX_ENV, flush_all, is_transient, outbox_for, replay

from .keys import RUN_KEY, TAG_KIND, TAG_SWEEP, TAG_TASK, TAG_TRIAL, TASK_KEY, TIME_ATTR, TRIAL_ERROR

OUTBOX_DIR = "mlflow-outbox"  # the sweep's MLflow journals while the store is unreachable (tracking.outbox)
# How long a sweep that has ended waits for an unreachable store to take its delayed records before it leaves
# them in its outbox folder for `python -m tracking.outbox replay`.
TRACKING_WAIT_S = float(os.environ.get("DTL_TRACKING_WAIT_S", 900))


def use_sweep_outbox(experiment_dir: Path) -> str:
    """Route this process's MLflow records (and the trials', through their setup) via the sweep's own outbox."""
    os.environ[OUTBOX_ENV] = str(experiment_dir / OUTBOX_DIR)
    return os.environ[OUTBOX_ENV]


def deliver_records(experiment_dir: Path, wait: float = TRACKING_WAIT_S) -> None:
    """Send every delayed record of the sweep (the driver's own and the journals its trials left), waiting up
    to ``wait`` s for an unreachable store; what is still not sent stays for the replay command."""
    deadline = time.monotonic() + wait
    if flush_all(0, quiet=True) and not any((experiment_dir / OUTBOX_DIR).glob("*.jsonl")):
        return
    replay(experiment_dir / OUTBOX_DIR, wait=wait)
    flush_all(max(1.0, deadline - time.monotonic()))


def open_parent_run(experiment_id: str, tracking_uri: str, sweep_name: str, task: str, space, base_config,
                    epochs: int, known_run_id: str | None) -> str:
    """The task's parent run: created once (with the search space and the base configuration), reopened on
    --resume."""
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
    box = outbox_for(client.tracking_uri)
    parent = box.known(parent_run_id)
    if parent is None:
        return {}
    try:
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'",
                                  max_results=10000)
    except Exception as err:  # unreachable: the trials' and the driver's own records close the runs later
        if not is_transient(err):
            raise
        box.note_outage(err)
        return {}
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
        """Through the outbox: never waits for the store. A trial that trained to the end, or failed on its own,
        closed its run itself."""
        task = (trial.config or {}).get(TASK_KEY)
        result = trial.last_result or {}
        epoch = int(result.get(TIME_ATTR, 0) or 0)
        if status == "FINISHED" and (TRIAL_ERROR in result or epoch >= self.epochs[task]):
            return
        try:
            run_id = result.get(RUN_KEY)
            if run_id is None:  # it died before its first report: look for its run
                found = tracking.Run.find(self.experiment_id, self.tracking_uri, parent=self.parents[task],
                                          **{TAG_TRIAL: trial.trial_id})
                if found is None or found.info.status != "RUNNING":
                    return
                run_id = found.info.run_id
            run = tracking.Run(run_id, self.tracking_uri)
            if status == "FINISHED":
                run.set_tags({"stopped_early": f"epoch {epoch} of {self.epochs[task]} (ASHA)"})
            run.finish(status, error=(error_summary(trial) or "the trial's worker died") if status == "FAILED" else None,
                       wait=0)
        except Exception as err:  # never let bookkeeping stop the sweep; the driver reconciles at the end
            print(f"warning: could not close the MLflow run of trial {trial.trial_id}: {err}", file=sys.stderr)


def status_callback(closer: ChildRunCloser):
    """A Tune callback that closes child runs as their trials end (see :class:`ChildRunCloser`)."""
    class _Callback(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            closer.close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            closer.close(trial, "FAILED")

    return _Callback()


def reconcile_runs(client, closer: ChildRunCloser, task: str, trials: Sequence[Any]) -> dict:
    """After ``fit()``: give every child run of ``task`` the status of its trial (KILLED for trials cut off by a
    stop); returns trial id -> run."""
    parent = closer.parents[task]
    client = client or tracking.client(closer.tracking_uri)
    runs = child_runs(client, closer.experiment_id, parent)
    known = {trial.trial_id for trial in trials}
    for trial_id, run in runs.items():
        if trial_id not in known and run.info.status == "RUNNING":
            # Started after the last experiment snapshot of a driver that was then killed: Tune does not know
            # this trial and sampled a new one in its place.
            lost = tracking.Run(run.info.run_id, closer.tracking_uri)
            lost.set_tags({"lost_trial": "started just before the driver was killed; Tune re-ran it as a new trial"})
            lost.finish("KILLED", wait=0)
    for trial in trials:
        run = runs.get(trial.trial_id)
        if run is None or run.info.status != "RUNNING":
            continue
        if trial.status == "TERMINATED":
            closer.close(trial, "FINISHED")
        elif trial.status == "ERROR":
            closer.close(trial, "FAILED")
        else:
            cut = tracking.Run(run.info.run_id, closer.tracking_uri)
            cut.set_tags({"interrupted": "true"})
            cut.finish("KILLED", wait=0)
    box = outbox_for(closer.tracking_uri)
    if not box.unreachable:
        box.flush(30)  # the statuses above, before the runs are read back
    return child_runs(client, closer.experiment_id, parent)


def record_decision(parent, outcome, plot: Path | None) -> None:
    """The winner and the incumbent rule's outcome on the task's parent run (a ``tracking.Run``), ``best=true`` on
    the winner's run."""
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
        f"best_{outcome.metric}": best.val_score,
        f"incumbent_{outcome.metric}": incumbent.val_score if incumbent else None,
        "margin": decision.margin,
        "p_value": chosen.p_value if chosen else None,
        "images_won": chosen.wins if chosen else None,
        "images_lost": chosen.losses if chosen else None,
    })
    if plot is not None:
        parent.log_artifacts(plot)
