"""MLflow records shared by the DVC stages and the sweeps: one tracking store, runs tagged alike.

The store is ``MLFLOW_TRACKING_URI`` when set (e.g. a shared server), else the SQLite file ``mlflow.db`` at
the repository root, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run from the root shows
pipeline runs and sweep trials side by side. MLflow is imported lazily: ``dtl`` never needs it.

Pitfalls handled here: the SQLite schema must be created once by a single
process before workers write (creating it concurrently corrupts its migration), so drivers call
:func:`init_tracking` first; parent and child runs in different processes are linked with
``parent_run_id``; every run is ended with an explicit status.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO_ROOT / "mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"


def init_tracking(experiment: str) -> str:
    """Point MLflow at the store, create its schema and the experiment if needed; return the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    # MLflow's default artifact root is ./mlruns under the *current* directory; keep artifacts next to a
    # SQLite store instead, so a test's temporary store does not write into the repository.
    return mlflow.create_experiment(experiment, artifact_location=default_artifact_location(experiment))


def default_artifact_location(experiment: str) -> str | None:
    """``<folder of the SQLite file>/mlruns/<experiment>`` for a local SQLite store; None (the server's choice,
    e.g. its --default-artifact-root) otherwise."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.parent / "mlruns" / folder).resolve().as_uri()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"rank": 2}} -> {"model.rank": 2}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def _ended_with_status(run) -> Iterator[Any]:
    """End the active run FINISHED, FAILED on an exception, or KILLED on Ctrl-C."""
    import mlflow

    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


@contextmanager
def tracked_run(experiment_id: str, run_name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
                parent_run_id: str | None = None) -> Iterator[Any]:
    """A run that always ends with a status: FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    commit = git_commit()
    all_tags = {**({"git_commit": commit} if commit else {}), **{k: str(v) for k, v in tags.items()}}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags,
                           parent_run_id=parent_run_id)
    with _ended_with_status(run):
        if params:
            mlflow.log_params({k: "null" if v is None else v for k, v in flatten(params).items()})
        yield run


def epoch_logger(run_id: str):
    """An engine callback that logs each epoch's metrics to ``run_id`` (step = epoch)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())

    def log(epoch: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k.replace("/", "_"), float(v), now, epoch)
                                          for k, v in metrics.items() if k != "epoch"])

    return log


@contextmanager
def child_run(experiment_id: str, parent_run_id: str, run_name: str, tags: dict[str, Any],
              params: dict[str, Any] | None = None) -> Iterator[str]:
    """A child run (e.g. one seed) created with the client while the parent is the active fluent run
    (``mlflow.start_run`` would refuse a second active run). Yields its run id; ends FINISHED/FAILED/KILLED."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri())
    commit = git_commit()
    all_tags = {**({"git_commit": commit} if commit else {}), **{k: str(v) for k, v in tags.items()},
                MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: run_name}
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    try:
        if params:
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, str("null" if v is None else v))
                                             for k, v in flatten(params).items()])
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    else:
        client.set_terminated(run_id, "FINISHED")


def run_exists(run_id: str | None) -> bool:
    """Whether ``run_id`` is in the current store (it is not after the store was switched or deleted)."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        return False
    return True


@contextmanager
def resumed_run(run_id: str, tags: dict[str, Any] | None = None) -> Iterator[Any]:
    """Re-open a finished run (e.g. the train stage's run, for the evaluate stage) and end it with a status."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    run = mlflow.start_run(run_id=run_id)
    with _ended_with_status(run):
        if tags:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})
        yield run


def log_numbers(metrics: dict[str, Any], run_id: str | None = None, step: int = 0) -> None:
    """Log the finite numbers of ``metrics`` (others skipped: None, NaN, strings) to ``run_id`` or the active run."""
    import math

    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    numbers = [Metric(k.replace("/", "_"), float(v), now, step) for k, v in flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return
    run_id = run_id or mlflow.active_run().info.run_id
    MlflowClient(tracking_uri()).log_batch(run_id, metrics=numbers)
