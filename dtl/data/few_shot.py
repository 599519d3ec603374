"""Few-shot fine-grained classification folders (the NOAH release layout) as PyTorch datasets.

Layout, one folder per data set under a root::

    <root>/<dataset>/annotations/train_meta.list.num_shot_<k>.seed_<s>   # k shots per class, sampling seed s
    <root>/<dataset>/annotations/val_meta.list
    <root>/<dataset>/annotations/test_meta.list
    <root>/<dataset>/<image paths as the lists give them>

Each list line is ``relative/path label``, the path relative to ``<root>/<dataset>/`` and split off at the LAST
whitespace (some file names contain spaces), exactly as the VTAB-1K lists are read (``dtl.data.vtab``): a
missing list, a line without a label, a label out of range or an image that does not exist is a
:class:`~dtl.data.vtab.DataError` naming the file and line.

Repeated lines are kept: the official loader reads a list line by line, so an image listed twice is seen twice per
epoch. The release's ``oxford-pets`` 1-shot lists hold every image twice (74 lines for 37 classes); we train on
them as they are, and :func:`check_few_shot_root` reports how many lines repeat, per list, so nothing is hidden.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image
from torch.utils.data import Dataset

from .vtab import DataError, Problem, _parse_list, _summarise, check_list, unreadable_images

# The five data sets of the paper's few-shot experiment and their class counts ("standford-cars" is the
# release's own spelling of the folder).
FEW_SHOT_DATASETS: dict[str, int] = {
    "fgvc-aircraft": 100, "food101": 101, "oxford-flowers102": 102, "oxford-pets": 37, "standford-cars": 196,
}
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
SEEDS: tuple[int, ...] = (0, 1, 2)
FEW_SHOT_SPLITS: tuple[str, ...] = ("train", "val", "test")


def list_file(root: str | os.PathLike[str], dataset: str, split: str, shots: int | None = None,
              seed: int | None = None) -> Path:
    """The list file of ``split``: ``train`` needs ``shots`` and ``seed``; ``val`` and ``test`` take neither."""
    annotations = Path(root) / dataset / "annotations"
    if split == "train":
        if shots is None or seed is None:
            raise DataError(f"{dataset}: the train split needs shots and seed (e.g. shots=16, seed=0)")
        return annotations / f"train_meta.list.num_shot_{shots}.seed_{seed}"
    if split in ("val", "test"):
        return annotations / f"{split}_meta.list"
    raise DataError(f"unknown few-shot split {split!r}; expected one of {', '.join(FEW_SHOT_SPLITS)}")


def few_shot_num_classes(dataset: str, num_classes: int | None = None) -> int:
    if num_classes is not None:
        return num_classes
    if dataset in FEW_SHOT_DATASETS:
        return FEW_SHOT_DATASETS[dataset]
    raise DataError(f"cannot tell how many classes data set {dataset!r} has: it is not one of "
                    f"{', '.join(FEW_SHOT_DATASETS)}; pass num_classes")


def few_shot_transform(img_size: int, training: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The few-shot recipe's transforms (timm's ``create_transform``): for training a random resized crop, a
    horizontal flip and RandAugment ``rand-m9-mstd0.5-inc1``; for evaluation a resize then a centre crop."""
    from timm.data import create_transform

    if training:
        return create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std)


def _in_folder(image: Path, list_path: Path, folder: Path) -> Path:
    """``_parse_list`` resolves a line's path next to its list; few-shot lines are relative to the data set's
    folder (one level up, beside ``annotations/``)."""
    return image if image.is_absolute() and not image.is_relative_to(list_path.parent) else \
        folder / image.relative_to(list_path.parent)


class FewShotDataset(Dataset):
    """One list of one few-shot data set: ``(transformed image, int label)`` pairs, every line kept (repeats too)."""

    def __init__(self, root: str | os.PathLike[str], dataset: str, split: str, shots: int | None = None,
                 seed: int | None = None, img_size: int = 224, num_classes: int | None = None,
                 transform=None) -> None:
        folder = Path(root) / dataset
        if not folder.is_dir():
            raise DataError(f"data set folder {folder} does not exist (expected {folder}/annotations/*.list...)")
        self.dataset, self.split, self.shots, self.seed = dataset, split, shots, seed
        self.num_classes = few_shot_num_classes(dataset, num_classes)
        self.list_file = list_file(root, dataset, split, shots, seed)
        if not self.list_file.is_file():
            raise DataError(f"list file {self.list_file} does not exist (expected lines 'relative/path label')")
        samples, self._line_numbers, problems = _parse_list(self.list_file, self.num_classes)
        self.samples = [(_in_folder(path, self.list_file, folder), label) for path, label in samples]
        if problems:
            raise DataError(_summarise(problems, f"{self.list_file}: {len(problems)} malformed line(s)"))
        if not self.samples:
            raise DataError(f"{self.list_file} lists no images")
        self.transform = transform if transform is not None else few_shot_transform(img_size, split == "train")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{self.list_file}:{self._line_numbers[index]}: cannot read image {path} "
                            f"({type(err).__name__}: {err})") from err

    def __repr__(self) -> str:
        where = f", shots={self.shots}, seed={self.seed}" if self.split == "train" else ""
        return f"FewShotDataset({self.dataset!r}, {self.split!r}{where}, n={len(self)}, classes={self.num_classes})"


def check_few_shot_root(root: str | os.PathLike[str], datasets: Iterable[str], shots: Iterable[int] = SHOTS,
                        seeds: Iterable[int] = SEEDS, *, num_classes: dict[str, int] | None = None,
                        verify_images: bool = False, verified: str | os.PathLike[str] | None = None,
                        progress: bool = False) -> dict[str, dict]:
    """Validate every list a few-shot run reads and return, per data set, the line counts
    (``{"train": {"<shots>": {"<seed>": n}}, "val": n, "test": n, "repeated_lines": {list: n}}``). Every problem
    of every list is collected into ONE :class:`DataError`, each naming its file and line."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"few-shot root {root} does not exist or is not a folder")
    problems: list[Problem] = []
    images: dict[Path, str] = {}
    manifest: dict[str, dict] = {}
    for dataset in datasets:
        folder = root / dataset
        try:
            classes = few_shot_num_classes(dataset, (num_classes or {}).get(dataset))
        except DataError as err:
            problems.append((folder, str(err)))
            continue
        if not folder.is_dir():
            problems.append((folder, f"{folder}: data set folder does not exist"))
            continue
        entry: dict = {"num_classes": classes, "train": {}, "repeated_lines": {}}
        wanted = [("train", k, s) for k in shots for s in seeds] + [("val", None, None), ("test", None, None)]
        for split, k, s in wanted:
            path = list_file(root, dataset, split, k, s)
            samples = check_list(path, classes, problems, images,
                                 locate=lambda image, path=path: _in_folder(image, path, folder))
            if samples is None:
                continue
            repeats = sum(n - 1 for n in Counter(samples).values() if n > 1)
            if repeats:
                entry["repeated_lines"][path.name] = repeats
            if split == "train":
                entry["train"].setdefault(str(k), {})[str(s)] = len(samples)
            else:
                entry[split] = len(samples)
        manifest[dataset] = entry
    if verify_images:
        problems += unreadable_images(images, verified, progress)
    if problems:
        raise DataError(_summarise(problems, f"{root}: {len(problems)} problem(s) found"))
    return manifest
