"""What a run optimises and how its predictions are scored: image classification or semantic segmentation.

The engine asks its :class:`Objective` for the loss, for running scores (kept on the device, read once per
epoch or evaluation) and for the evaluation forward pass; nothing else in it depends on what a label is.

* :class:`Classification`: a label per image. Cross-entropy (with ``label_smoothing``); ``accuracy`` (the share of
  images classified correctly), ``loss``, and where a test set holds some of the classes, ``accuracy_masked``.
  Each image's score is whether it was classified correctly.
* :class:`Segmentation`: a label map per image (``IGNORE_INDEX`` = 255 marks pixels that count nowhere). The model's
  logits are resized bilinearly to the labels' size. Cross-entropy averaged over the labelled pixels;
  ``accuracy`` (the share of labelled pixels labelled correctly), ``miou`` (intersection and union of every class
  summed over the whole split, their ratio averaged over the classes that occur in the labels or the
  predictions, as mmsegmentation's mIoU), ``loss``, and ``class_iou`` per class (None for a class that occurs
  nowhere). Each image's score is its own mean IoU, over the classes its labels or its prediction hold. Images
  larger than the training crop are predicted by a sliding window of that size (a stride of 2/3 of it), the
  logits of overlapping windows averaged.

``primary`` names the score that chooses: the best epoch (``keep_best``) and a sweep's winner.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .data.domain_generalization import masked_predictions
from .protocols.base import SCORES

IGNORE_INDEX = 255


class Tally:
    """Running sums of one evaluation, on the device; :meth:`result` reads them once."""

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        """The scores (floats; ``class_iou`` a list), plus ``per_image`` when asked for."""
        raise NotImplementedError


class Objective:
    name: str = ""
    primary: str = ""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(correctly labelled items, labelled items) of a training batch, as device tensors or ints: the
        training accuracy of the progress line."""
        raise NotImplementedError

    def tally(self, device: torch.device, per_image: bool = False, classes=None) -> Tally:
        raise NotImplementedError

    def predict(self, model: nn.Module, inputs) -> torch.Tensor:
        """The logits evaluation scores (the model's own output unless the objective says otherwise)."""
        return model(inputs)


def sum_dtype(device: torch.device) -> torch.dtype:
    """Running sums of losses in float64 (as Python floats summed them before), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


# --- classification ---------------------------------------------------------------------------------------------
class Classification(Objective):
    name = "classification"
    primary = SCORES[name]

    def __init__(self, label_smoothing: float = 0.0):
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(self, logits, targets):
        return self.criterion(logits.float(), targets)

    def hits(self, logits, targets):
        return (logits.argmax(dim=1) == targets).sum(), targets.numel()

    def tally(self, device, per_image=False, classes=None):
        return _ClassificationTally(device, per_image, classes)


class _ClassificationTally(Tally):
    def __init__(self, device: torch.device, per_image: bool, classes):
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, correct over ``classes``
        self.loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
        self.total, self.per_image, self.classes, self.hits = 0, per_image, classes, []

    def add(self, logits, targets):
        self.loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").to(self.loss_sum.dtype)
        hit = logits.argmax(dim=1) == targets
        self.counts[0] += hit.sum()
        if self.classes is not None:
            self.counts[1] += (masked_predictions(logits, self.classes) == targets).sum()
        self.total += targets.numel()
        if self.per_image:
            self.hits.append(hit)

    def result(self):
        if self.total == 0:
            raise ValueError("evaluation split is empty")
        correct, masked_correct = self.counts.tolist()
        metrics = {"accuracy": correct / self.total, "loss": self.loss_sum.item() / self.total}
        if self.classes is not None:
            metrics["accuracy_masked"] = masked_correct / self.total
        if self.per_image:
            metrics["per_image"] = torch.cat(self.hits).cpu()
        return metrics


# --- segmentation -----------------------------------------------------------------------------------------------
def resized_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at a label map's ``(H, W)`` (bilinear; fp32, as the loss and the argmax read them)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def confusion(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` counts of (label, prediction) over the labelled pixels (``IGNORE_INDEX`` and labels >= K
    skipped)."""
    valid = targets < num_classes
    index = targets[valid].long() * num_classes + predictions[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(matrix: torch.Tensor) -> list[float | None]:
    """Intersection over union per class from a confusion matrix (None where the class occurs nowhere)."""
    matrix = matrix.double()
    intersection = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - intersection
    return [None if u == 0 else float(i / u) for i, u in zip(intersection.tolist(), union.tolist())]


def mean_iou(class_iou: list[float | None]) -> float:
    present = [value for value in class_iou if value is not None]
    return sum(present) / len(present) if present else math.nan


class Segmentation(Objective):
    name = "segmentation"
    primary = SCORES[name]

    def __init__(self, num_classes: int, crop_size: int | None = None, label_smoothing: float = 0.0):
        self.num_classes, self.crop_size, self.label_smoothing = num_classes, crop_size, label_smoothing

    def loss(self, logits, targets):
        logits = resized_logits(logits, targets.shape[-2:])
        total = F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX, reduction="sum",
                                label_smoothing=self.label_smoothing)
        # Summed, then divided by the labelled pixels (at least one): a crop with none labelled adds nothing.
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def hits(self, logits, targets):
        with torch.no_grad():
            predictions = resized_logits(logits.detach(), targets.shape[-2:]).argmax(dim=1)
            valid = targets != IGNORE_INDEX
            return (predictions.eq(targets) & valid).sum(), valid.sum()

    def tally(self, device, per_image=False, classes=None):
        return _SegmentationTally(self.num_classes, device, per_image)

    def predict(self, model, inputs):
        if not isinstance(inputs, torch.Tensor) or self.crop_size is None:
            return model(inputs)
        return sliding_window(model, inputs, self.crop_size)


def sliding_window(model: nn.Module, images: torch.Tensor, crop: int, stride: int | None = None) -> torch.Tensor:
    """Logits of ``images`` at their full size, from windows of ``crop`` x ``crop`` pixels ``stride`` apart
    (default 2/3 of the crop); an image smaller than the crop is padded (bottom and right) to it. Overlapping
    windows' logits are averaged."""
    stride = stride or max(1, crop * 2 // 3)
    B, _, H, W = images.shape
    padded = F.pad(images, (0, max(0, crop - W), 0, max(0, crop - H)))
    PH, PW = padded.shape[-2:]
    rows = [min(y, PH - crop) for y in range(0, max(PH - crop, 0) + stride, stride)]
    cols = [min(x, PW - crop) for x in range(0, max(PW - crop, 0) + stride, stride)]
    total = count = None
    for y in dict.fromkeys(rows):
        for x in dict.fromkeys(cols):
            logits = resized_logits(model(padded[..., y:y + crop, x:x + crop]), (crop, crop))
            if total is None:
                total = logits.new_zeros((B, logits.shape[1], PH, PW))
                count = logits.new_zeros((1, 1, PH, PW))
            total[..., y:y + crop, x:x + crop] += logits
            count[..., y:y + crop, x:x + crop] += 1
    return (total / count)[..., :H, :W]


class _SegmentationTally(Tally):
    def __init__(self, num_classes: int, device: torch.device, per_image: bool):
        self.num_classes, self.per_image = num_classes, per_image
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
        self.pixels = torch.zeros((), dtype=torch.int64, device=device)
        self.images, self.scores = 0, []

    def add(self, logits, targets):
        K = self.num_classes
        logits = resized_logits(logits, targets.shape[-2:])
        targets = targets.long()
        self.loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                         reduction="sum").to(self.loss_sum.dtype)
        self.pixels += (targets != IGNORE_INDEX).sum()
        predictions = logits.argmax(dim=1)
        self.matrix += confusion(predictions, targets, K)
        self.images += targets.shape[0]
        if self.per_image:
            # Every image's own confusion matrix in one bincount: (image, label, prediction) -> count.
            valid = targets < K
            image = torch.arange(targets.shape[0], device=targets.device).view(-1, 1, 1).expand_as(targets)
            index = (image[valid] * K + targets[valid]) * K + predictions[valid]
            matrices = torch.bincount(index, minlength=targets.shape[0] * K * K).view(-1, K, K).double()
            intersection = matrices.diagonal(dim1=1, dim2=2)
            union = matrices.sum(1) + matrices.sum(2) - intersection
            present = union > 0
            ratio = torch.where(present, intersection / union.clamp(min=1), torch.zeros_like(union))
            self.scores.append((ratio.sum(1) / present.sum(1).clamp(min=1)).float())

    def result(self):
        if self.images == 0:
            raise ValueError("evaluation split is empty")
        class_iou = iou_per_class(self.matrix)
        matrix = self.matrix.double()
        labelled = float(matrix.sum())
        metrics = {"accuracy": float(matrix.diagonal().sum()) / labelled if labelled else math.nan,
                   "miou": mean_iou(class_iou),
                   "loss": self.loss_sum.item() / max(int(self.pixels.item()), 1),
                   "class_iou": class_iou}
        if self.per_image:
            metrics["per_image"] = torch.cat(self.scores).cpu()
        return metrics


def objective_for(name: str, *, num_classes: int, crop_size: int | None = None,
                  label_smoothing: float = 0.0) -> Objective:
    """The objective called ``name`` (a protocol's ``objective``)."""
    if name == Classification.name:
        return Classification(label_smoothing)
    if name == Segmentation.name:
        return Segmentation(num_classes, crop_size, label_smoothing)
    raise ValueError(f"unknown objective {name!r}: expected classification or segmentation")
