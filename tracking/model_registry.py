"""Trained tasks in MLflow's model registry: ``dtl-<task>``, a new version per registered run.

A version is registered at once while the store answers; otherwise ``tracking.pyfunc`` journals it in the outbox
as a :data:`MODEL_RECORD`, and the version's later tags as a :data:`VERSION_TAGS_RECORD`. The tracking package
registers the senders below for those record kinds (``tracking.outbox_hooks``), so whichever process sends the
journal registers the version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_PATH = "model"  # the run's artifact folder of the MLflow Model
# The outbox record kinds of the registry (journals already on disk name them so).
MODEL_RECORD = "model"  # a saved model folder to log on its run and register as a new version
VERSION_TAGS_RECORD = "version_tags"  # tags for a registered version


def registered_name(task: str) -> str:
    return f"dtl-{task}"


def register_model_version(client, run_id: str, folder: Path, task: str, tags: dict[str, str] | None) -> int:
    """Log a saved pyfunc folder as the run's ``model`` artifacts and register it as a new version."""
    # MLflow is an extra (pipeline, sweeps) that `import tracking`, which imports this module, does not load.
    from mlflow.exceptions import MlflowException

    client.log_artifacts(run_id, str(folder), MODEL_PATH)
    name = registered_name(task)
    try:
        client.create_registered_model(name, description=f"DTL toolkit: the trained {task} model")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # else an earlier run registered it
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"task": task, **(tags or {})})
    return int(version.version)


def send_model_record(client, run_id: str | None, record: dict[str, Any]) -> None:
    register_model_version(client, run_id, Path(record["path"]), record["task"], record.get("tags"))


def send_version_tags(client, run_id: str | None, record: dict[str, Any]) -> None:
    for key, value in record["tags"].items():
        client.set_model_version_tag(record["name"], record["version"], key, value)
