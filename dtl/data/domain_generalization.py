"""Domain generalisation: train on ImageNet 16-shot, test on ImageNet and four shifted versions of it.

Layout (the few-shot naming of :mod:`dtl.data.few_shot`, one folder per domain under a root, labels in the
source's class indices)::

    <root>/<source>/annotations/train_meta.list.num_shot_<k>.seed_<s>   # the source's k-shot training lists
    <root>/<source>/annotations/val_meta.list     # held-out source images: what sweeps select on (optional)
    <root>/<source>/annotations/test_meta.list    # the source's test images (ImageNet: its 50,000 val images)
    <root>/<target>/annotations/test_meta.list    # one folder per target domain

The targets and their sizes are those of the protocol most PETL papers follow. ImageNet-A and ImageNet-R hold
200 of the 1000 classes; the accuracy of a target that holds a subset of the classes is reported two ways
(``dtl.experiment.evaluate_saved``, through ``dtl.engine.evaluate(..., classes=...)``):

- ``accuracy``: the 1000-way argmax, what DTL and NOAH report;
- ``accuracy_masked``: the argmax over the classes the target holds only (:func:`masked_predictions`; the
  convention of most other papers), taken from the labels present in the target's list, so no class table has to
  be shipped.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .few_shot import CLASS_COUNTS, check_lists, data_set_classes, run_lists
from .lists import DataError, Problem, raise_problems

SOURCE = "imagenet"
# target -> images in its test list
DG_TARGETS: dict[str, int] = {
    "imagenet": 50_000, "imagenet-v2": 10_000, "imagenet-sketch": 50_889, "imagenet-a": 7_500, "imagenet-r": 30_000,
}
CLASS_COUNTS.update(dict.fromkeys(DG_TARGETS, 1000))  # every domain keeps ImageNet's 1000 classes


def masked_predictions(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """The argmax over ``classes`` only (the other logits set to -inf), as indices of the full label space."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(sorted(set(classes)), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf")).argmax(dim=-1)


def check_domain_root(root: str | os.PathLike[str], source: str, targets: Iterable[str], shots: Iterable[int],
                      seeds: Iterable[int], *, num_classes: int | None = None, verify_images: bool = False,
                      verified: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """Validate the source's training, validation and test lists and every target's test list (labels checked
    against the source's classes); return ``{"source": {...counts...}, "targets": {target: {"test": n,
    "classes_seen": {"test": m}}}}``. Every problem of every list is collected into ONE
    :class:`~dtl.data.lists.DataError`, each naming its file and line."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"domain-generalisation root {root} does not exist or is not a folder")
    problems: list[Problem] = []
    images: dict[Path, str] = {}
    classes = data_set_classes(root, source, problems, num_classes)
    manifest: dict[str, dict] = {"source": {}, "targets": {}}
    if classes is not None:
        manifest["source"] = check_lists(root, source, run_lists(shots, seeds), classes, problems, images,
                                         optional=("val",))
        for target in targets:
            if not (root / target).is_dir():
                problems.append((root / target, f"{root / target}: target domain folder does not exist"))
                continue
            manifest["targets"][target] = check_lists(root, target, [("test", None, None)], classes, problems,
                                                      images)
    raise_problems(root, problems, images, verify_images, verified, progress)
    return manifest
