"""The code of a trained task's MLflow Model (``tracking.pyfunc`` logs this file as the model, "models from code"):
MLflow runs it to load a registered version, so no pickled Python object is stored and a version keeps loading
when the toolkit's classes move.

Input: a table with one column ``image``, each value the bytes of a PNG or JPEG file, base64-encoded. Output: one
row per image with ``label`` (the top-1 class index), ``name`` (its class name), ``score`` (its softmax
probability) and ``error``: null for a predicted row; for a row whose bytes are not an image, the reason, with
``label``, ``name`` and ``score`` null (the other rows of the request are still predicted). A segmentation model
answers each row with ``mask`` (a PNG label map of the image's size, base64-encoded: a class index per pixel, with
a palette), ``fractions`` (a JSON object: class name -> share of the pixels) and ``error``. A request without the
``image`` column, or with a value that is not base64, is refused as a whole (MLflow's 400 answer, the message
naming the expected input). The model holds the trained weights file (kilobytes for DTL, carrying its settings)
and the task's settings and class names as artifacts; the frozen backbone comes from the installed toolkit.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

with warnings.catch_warnings():  # importing it warns about its own type hints (MLflow 3.17)
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc
import pandas as pd  # loaded by mlflow.pyfunc already; TaskModel.predict's type hint names it
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

from dtl.predict import class_fractions, is_segmentation, mask_image, segment
from dtl.trained import load_trained

WEIGHTS = "weights"  # the artifact key of the trained weights file
SETTINGS = "settings"  # the artifact key of the task's settings and class names (JSON, for people and tools)
INPUT = "image"
EXPECTED_INPUT = ("a table with one column 'image' holding base64-encoded PNG or JPEG files, e.g. "
                  '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}')


class TaskModel(mlflow.pyfunc.PythonModel):
    """``dtl.load_trained`` on the weights artifact, then batched top-1 predictions."""

    batch_size = 64

    def load_context(self, context) -> None:
        self.model = load_trained(context.artifacts[WEIGHTS], device="cpu")
        self.transform = self.model.trained.transform()

    # A DataFrame hint: MLflow infers no schema from it (the model's signature comes from tracking.pyfunc) and,
    # unlike no hint at all, does not warn at class definition.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = decode_rows(model_input)
        if is_segmentation(self.model):
            return self.segment(rows)
        tensors, errors = [], [None] * len(rows)
        readable = []
        for i, raw in enumerate(rows):
            try:
                tensors.append(self.transform(open_image(raw)))
                readable.append(i)
            except ValueError as err:  # one bad image must not fail the request
                errors[i] = str(err)
        labels, scores = [None] * len(rows), [None] * len(rows)
        for start in range(0, len(tensors), self.batch_size):
            with torch.no_grad():
                logits = self.model(torch.stack(tensors[start:start + self.batch_size]))
            best = logits.float().softmax(-1).max(-1)
            for j, (score, label) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                labels[readable[start + j]], scores[readable[start + j]] = label, score
        names = [self.model.trained.class_names[label] if label is not None else None for label in labels]
        # Nullable dtypes: a missing value is JSON's null in the served answer (object columns would give NaN).
        return pd.DataFrame({"label": pd.array(labels, dtype="Int64"), "name": pd.array(names, dtype="string"),
                             "score": pd.array(scores, dtype="Float64"), "error": pd.array(errors, dtype="string")})

    def segment(self, rows: list[bytes]) -> pd.DataFrame:
        masks, fractions, errors = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        for i, raw in enumerate(rows):
            try:
                labels = segment(self.model, open_image(raw))
            except ValueError as err:  # one bad image must not fail the request
                errors[i] = str(err)
                continue
            buffer = io.BytesIO()
            mask_image(labels).save(buffer, format="PNG")
            masks[i] = base64.b64encode(buffer.getvalue()).decode("ascii")
            fractions[i] = json.dumps(class_fractions(labels, self.model.trained.class_names))
        return pd.DataFrame({"mask": pd.array(masks, dtype="string"), "fractions": pd.array(fractions, dtype="string"),
                             "error": pd.array(errors, dtype="string")})


def decode_rows(model_input: pd.DataFrame) -> list[bytes]:
    """The image bytes of each row; a request that does not hold them is refused as a whole (HTTP 400)."""
    if INPUT not in getattr(model_input, "columns", ()):
        raise MlflowException(f"the input has no column {INPUT!r}: expected {EXPECTED_INPUT}",
                              error_code=INVALID_PARAMETER_VALUE)
    rows = []
    for index, value in enumerate(model_input[INPUT]):
        if isinstance(value, bytes):
            rows.append(value)
            continue
        try:
            rows.append(base64.b64decode(value, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise MlflowException(f"row {index} of column {INPUT!r} is not base64: expected {EXPECTED_INPUT}",
                                  error_code=INVALID_PARAMETER_VALUE) from None
    return rows


def open_image(raw: bytes):
    """The RGB image in ``raw``; ValueError with the reason when it is none."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image: cannot identify image file") from None
    except (OSError, SyntaxError) as err:  # a truncated or corrupt file
        raise ValueError(f"unreadable image: {err}") from None


set_model(TaskModel())
