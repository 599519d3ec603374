"""A trained task as an MLflow Model, logged on the task's ``train@<task>`` run and registered as ``dtl-<task>`` (a
new version per run).

The model is logged as code: ``tracking/task_model.py`` (its input, output and error answers are described
there) is the file MLflow runs to load it, and the trained weights file (carrying its settings) and the task's
settings and class names are its artifacts. No Python object is pickled. The frozen backbone comes from the
installed toolkit (the shipped embedded weights, a timm hub name or the local file the settings name), so serve
it from the toolkit's environment:

    mlflow models serve -m models:/dtl-<task>/latest --env-manager local --host 127.0.0.1 --port 5001

Versions registered before the model was logged as code hold a pickled ``tracking.pyfunc.TaskModel``; that name
still resolves (to the class in ``task_model.py``), so they keep loading.
"""
from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from dtl.predict import is_segmentation
from dtl.trained import load_trained

from . import tracking_uri
from .model_registry import MODEL_PATH, MODEL_RECORD, VERSION_TAGS_RECORD, register_model_version, registered_name
from .outbox import is_transient, outbox_for
from .task_model import EXPECTED_INPUT, INPUT, SETTINGS, WEIGHTS, TaskModel

MODEL_CODE = Path(__file__).with_name("task_model.py")

__all__ = ["TaskModel", "encode_image", "log_task_model", "registered_name", "register_model_version",
           "tag_tested_version"]


def encode_image(path_or_bytes: str | Path | bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode("ascii")


def signature(segmentation: bool = False):
    """Input: the ``image`` column. Output: label, name, score (a segmentation model: mask and fractions), and the
    error of a row that was not an image (each may be null: a predicted row has no error, an unreadable one no
    prediction)."""
    predicted = ([ColSpec("string", "mask", required=False), ColSpec("string", "fractions", required=False)]
                 if segmentation else [ColSpec("long", "label", required=False),
                                       ColSpec("string", "name", required=False),
                                       ColSpec("double", "score", required=False)])
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT)]),
                          outputs=Schema([*predicted, ColSpec("string", "error", required=False)]), params=None)


def log_task_model(run, weights: str | Path, task: str, example_image: str | Path | None = None,
                   tags: dict[str, str] | None = None) -> int | None:
    """Save the model of ``weights`` (a trained weights file with its settings), log it as ``run``'s artifact
    folder ``model`` and register it as ``dtl-<task>`` (the new version gets ``tags``); returns its number, or
    None while the store is unreachable (the version is then registered when the delayed records are sent)."""
    examples = pd.DataFrame({INPUT: [encode_image(example_image)]}) if example_image else None
    with tempfile.TemporaryDirectory() as folder:
        model = load_trained(weights, device="cpu")
        info = model.trained
        settings = Path(folder) / "settings.json"
        settings.write_text(json.dumps({"task": task, "num_classes": info.num_classes, "seed": info.seed,
                                        "image_size": info.image_size, "class_names": list(info.class_names),
                                        "input": EXPECTED_INPUT, "config": info.config.to_dict()}, indent=2))
        target = Path(folder) / MODEL_PATH
        mlflow.pyfunc.save_model(str(target), python_model=str(MODEL_CODE),
                                 artifacts={WEIGHTS: str(weights), SETTINGS: str(settings)},
                                 signature=signature(is_segmentation(model)), input_example=examples,
                                 pip_requirements=[],
                                 metadata={"task": task})
        run_id = run.outbox.known(run.run_id)
        if run_id is not None and not run.outbox.unreachable:
            try:
                return register_model_version(run.client, run_id, target, task, tags)
            except Exception as err:
                if not is_transient(err):
                    raise
                run.outbox.note_outage(err)
        run.outbox.put({"op": MODEL_RECORD, "run": run.run_id, "path": str(run.outbox.keep_copy(target)), "task": task,
                        "tags": tags})
    return None


def tag_tested_version(registered: dict, scores: dict[str, float], sweep_winner: bool,
                       uri: str | None = None) -> None:
    """After the evaluate stage: the version's test scores (``test_accuracy``; for segmentation ``test_miou`` too),
    and ``sweep_winner: tested`` for a sweep's winner that ``dvc repro`` has now retrained and tested (through the
    outbox: an unreachable store delays them). A version registered late, from delayed records, has no number here
    and is left untagged."""
    if registered.get("version") is None:
        return
    tags = {**{key: f"{value:.6f}" for key, value in scores.items()},
            **({"sweep_winner": "tested"} if sweep_winner else {})}
    outbox_for(uri or tracking_uri()).put({"op": VERSION_TAGS_RECORD, "name": registered["name"],
                                           "version": str(registered["version"]), "tags": tags})
