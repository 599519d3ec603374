"""A trained task as an MLflow Model: a pyfunc that classifies base64-encoded image files, logged on the task's
``train@<task>`` run and registered as ``dtl-<task>`` (a new version per run).

Input: a table with one column ``image``, each value the bytes of a PNG or JPEG file, base64-encoded. Output: one
row per image with ``label`` (the top-1 class index), ``name`` (its class name) and ``score`` (its softmax
probability); an unreadable image gets label -1, an empty name and score 0 (the other rows are unaffected). The
model holds only the trained weights file (kilobytes for DTL, carrying its settings); the frozen backbone comes
from the installed toolkit (the shipped embedded weights, a timm hub name or the local file the settings name), so
serve it from the toolkit's environment:

    mlflow models serve -m models:/dtl-<task>/latest --env-manager local --host 127.0.0.1 --port 5001
"""
from __future__ import annotations

import base64
import io
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

with warnings.catch_warnings():  # importing it warns about its own type hints (MLflow 3.17)
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc
import pandas as pd  # loaded by mlflow.pyfunc already; TaskModel.predict's type hint names it

MODEL_PATH = "model"  # the run's artifact folder of the MLflow Model
WEIGHTS = "weights"  # the artifact key of the trained weights file


def registered_name(task: str) -> str:
    return f"dtl-{task}"


def encode_image(path_or_bytes: str | Path | bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode("ascii")


class TaskModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: ``dtl.load_trained`` on the weights artifact, then batched top-1 predictions."""

    batch_size = 64

    def load_context(self, context) -> None:
        from dtl.trained import load_trained

        self.model = load_trained(context.artifacts[WEIGHTS], device="cpu")
        self.transform = self.model.trained.transform()

    # A DataFrame hint: MLflow infers no schema from it (the model's signature comes from log_task_model) and,
    # unlike no hint at all, does not warn at class definition.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch
        from PIL import Image

        info = self.model.trained
        values = list(model_input["image"])
        labels, scores = [-1] * len(values), [0.0] * len(values)
        readable, tensors = [], []
        for i, value in enumerate(values):
            try:
                raw = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
                with Image.open(io.BytesIO(raw)) as image:
                    tensors.append(self.transform(image.convert("RGB")))
                readable.append(i)
            except Exception:  # a bad row must not fail the whole request
                continue
        for start in range(0, len(tensors), self.batch_size):
            with torch.no_grad():
                logits = self.model(torch.stack(tensors[start:start + self.batch_size]))
            best = logits.float().softmax(-1).max(-1)
            for j, (score, label) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                row = readable[start + j]
                labels[row], scores[row] = label, score
        names = [info.class_names[label] if label >= 0 else "" for label in labels]
        return pd.DataFrame({"label": labels, "name": names, "score": scores})


def log_task_model(run, weights: str | Path, task: str, example_image: str | Path | None = None,
                   tags: dict[str, str] | None = None) -> int | None:
    """Save the pyfunc of ``weights`` (a trained weights file with its settings), log it as ``run``'s artifact
    folder ``model`` and register it as ``dtl-<task>`` (the new version gets ``tags``); returns its number, or
    None while the store is unreachable (the version is then registered when the delayed records are sent)."""
    from mlflow.models import infer_signature

    from .outbox import is_transient

    examples = pd.DataFrame({"image": [encode_image(example_image)]}) if example_image else None
    signature = None
    # MLflow's hints (type-hinted predict, integer columns) do not apply: the schema comes from a real example.
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = TaskModel()
        if examples is not None:
            model.load_context(SimpleNamespace(artifacts={WEIGHTS: str(weights)}))
            signature = infer_signature(examples, model.predict(None, examples))
        target = Path(folder) / MODEL_PATH
        mlflow.pyfunc.save_model(str(target), python_model=TaskModel(), artifacts={WEIGHTS: str(weights)},
                                 signature=signature, input_example=examples,
                                 pip_requirements=[], metadata={"task": task})
        run_id = run.outbox.known(run.run_id)
        if run_id is not None and not run.outbox.unreachable:
            try:
                return register_model(run.client, run_id, target, task, tags)
            except Exception as err:
                if not is_transient(err):
                    raise
                run.outbox.note_outage(err)
        run.outbox.put({"op": "model", "run": run.run_id, "path": str(run.outbox.keep_copy(target)), "task": task,
                        "tags": tags})
    return None


def register_model(client, run_id: str, folder: Path, task: str, tags: dict[str, str] | None) -> int:
    """Log a saved pyfunc folder as the run's ``model`` artifacts and register it as a new version."""
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


def tag_tested_version(registered: dict, test_accuracy: float, sweep_winner: bool, uri: str | None = None) -> None:
    """After the evaluate stage: the version's test accuracy, and ``sweep_winner: tested`` for a sweep's winner
    that ``dvc repro`` has now retrained and tested (through the outbox: an unreachable store delays them). A
    version registered late, from delayed records, has no number here and is left untagged."""
    from . import tracking_uri
    from .outbox import outbox_for

    if registered.get("version") is None:
        return
    tags = {"test_accuracy": f"{test_accuracy:.6f}", **({"sweep_winner": "tested"} if sweep_winner else {})}
    outbox_for(uri or tracking_uri()).put({"op": "version_tags", "name": registered["name"],
                                           "version": str(registered["version"]), "tags": tags})
