"""Domain generalisation: train on ImageNet 16-shot, test on ImageNet and four shifted versions of it.

The targets and their sizes are those of the protocol most PETL papers follow. ImageNet-A and ImageNet-R hold
200 of the 1000 classes; their accuracy is reported two ways (:func:`target_accuracies`):

- ``accuracy``: the 1000-way argmax, what DTL and NOAH report;
- ``accuracy_masked``: the argmax over the classes the target holds only (the convention of most other papers),
  taken from the labels present in the target's list, so no class table has to be shipped.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

SOURCE = "imagenet"
# target -> images in its test list
DG_TARGETS: dict[str, int] = {
    "imagenet": 50_000, "imagenet-v2": 10_000, "imagenet-sketch": 50_889, "imagenet-a": 7_500, "imagenet-r": 30_000,
}
SUBSET_TARGETS: tuple[str, ...] = ("imagenet-a", "imagenet-r")  # 200 of the 1000 classes


def masked_predictions(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """The argmax over ``classes`` only (the other logits set to -inf), as indices of the full label space."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(sorted(set(classes)), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf")).argmax(dim=-1)


def target_accuracies(target: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": ...}``, plus ``accuracy_masked`` for the 200-class targets (ImageNet-A and -R)."""
    result = {"accuracy": (logits.argmax(dim=-1) == labels).float().mean().item()}
    if target in SUBSET_TARGETS:
        present = labels.unique().tolist()
        result["accuracy_masked"] = (masked_predictions(logits, present) == labels).float().mean().item()
    return result
