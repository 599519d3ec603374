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

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import Dataset

from .lists import DataError, Problem, check_list, parse_list, raise_problems, summarise

# The five data sets of the paper's few-shot experiment and their class counts ("standford-cars" is the
# release's own spelling of the folder).
FEW_SHOT_DATASETS: dict[str, int] = {
    "fgvc-aircraft": 100, "food101": 101, "oxford-flowers102": 102, "oxford-pets": 37, "standford-cars": 196,
}
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
SEEDS: tuple[int, ...] = (0, 1, 2)
FEW_SHOT_SPLITS: tuple[str, ...] = ("train", "val", "test")
# Data sets whose class count is known without a meta.json; dtl.data.domain_generalization adds its domains.
CLASS_COUNTS: dict[str, int] = dict(FEW_SHOT_DATASETS)


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


def few_shot_num_classes(dataset: str, num_classes: int | None = None, folder: Path | None = None) -> int:
    """The class count: ``num_classes`` if given, else the folder's ``meta.json`` ``{"num_classes": K}``, else the
    paper's table (the five few-shot data sets; 1000 for ImageNet and its shifted versions)."""
    if num_classes is not None:
        return num_classes
    meta = folder / "meta.json" if folder is not None else None
    if meta is not None and meta.is_file():
        try:
            return int(json.loads(meta.read_text())["num_classes"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta}: expected {{\"num_classes\": <integer>}} ({type(err).__name__}: {err})") from None
    if dataset in CLASS_COUNTS:
        return CLASS_COUNTS[dataset]
    raise DataError(f"cannot tell how many classes data set {dataset!r} has: it is not one of "
                    f"{', '.join(CLASS_COUNTS)} and {folder or dataset}/meta.json is missing; "
                    "set data.num_classes")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def few_shot_transform(img_size: int, training: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The few-shot recipe's transforms (timm's ``create_transform``): for training a random resized crop, a
    horizontal flip and RandAugment ``rand-m9-mstd0.5-inc1``; for evaluation a resize then a centre crop."""
    if training:
        transform = create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                     interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
        for step in transform.transforms:
            for op in step.ops if isinstance(step, RandAugment) else ():
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
        return transform
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std)


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, keeping what older Pillow versions did at the top magnitude: keeping 0 bits gives a
    black image (Pillow now raises instead, and ``mstd0.5`` reaches that magnitude now and then)."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _in_folder(image: Path, list_path: Path, folder: Path) -> Path:
    """``parse_list`` resolves a line's path next to its list; few-shot lines are relative to the data set's
    folder (one level up, beside ``annotations/``)."""
    return image if image.is_absolute() and not image.is_relative_to(list_path.parent) else \
        folder / image.relative_to(list_path.parent)


class FewShotDataset(Dataset):
    """One list of one few-shot data set: ``(transformed image, int label)`` pairs, every line kept (repeats too)."""

    def __init__(self, root: str | os.PathLike[str], dataset: str, split: str, shots: int | None = None,
                 seed: int | None = None, img_size: int = 224, num_classes: int | None = None,
                 transform=None, augment: bool | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        folder = Path(root) / dataset
        if not folder.is_dir():
            raise DataError(f"data set folder {folder} does not exist (expected {folder}/annotations/*.list...)")
        self.dataset, self.split, self.shots, self.seed = dataset, split, shots, seed
        self.num_classes = few_shot_num_classes(dataset, num_classes, folder)
        self.list_file = list_file(root, dataset, split, shots, seed)
        if not self.list_file.is_file():
            raise DataError(f"list file {self.list_file} does not exist (expected lines 'relative/path label')")
        samples, self._line_numbers, problems = parse_list(self.list_file, self.num_classes)
        self.samples = [(_in_folder(path, self.list_file, folder), label) for path, label in samples]
        if problems:
            raise DataError(summarise(problems, f"{self.list_file}: {len(problems)} malformed line(s)"))
        if not self.samples:
            raise DataError(f"{self.list_file} lists no images")
        # the recipe augments the training lists only; ``augment`` overrides that
        self.augment = split == "train" if augment is None else augment
        self.img_size = img_size
        self.transform = transform if transform is not None else few_shot_transform(img_size, self.augment,
                                                                                       mean, std)

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


def run_lists(shots: Iterable[int], seeds: Iterable[int]) -> list[tuple[str, int | None, int | None]]:
    """``(split, shots, seed)`` of every list the runs of ``shots`` x ``seeds`` read: theirs, val and test."""
    return [("train", k, s) for k in shots for s in seeds] + [("val", None, None), ("test", None, None)]


def check_lists(root: Path, dataset: str, wanted: Iterable[tuple[str, int | None, int | None]], classes: int,
                problems: list[Problem], images: dict[Path, str], optional: Iterable[str] = ()) -> dict:
    """Check the lists ``wanted`` (``(split, shots, seed)``) of one data set folder into ``problems``; returns
    ``{"train": {"<shots>": {"<seed>": lines}}, "<split>": lines, "classes_seen": {"<split>": n},
    "repeated_lines": {list: n}}``. A missing list
    of a split in ``optional`` is no problem (its count is None)."""
    folder = root / dataset
    entry: dict = {"num_classes": classes, "train": {}, "repeated_lines": {}}
    for split, k, s in wanted:
        path = list_file(root, dataset, split, k, s)
        if split in optional and not path.exists():
            entry[split] = None
            continue
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
            entry.setdefault("classes_seen", {})[split] = len({label for _, label in samples})
    return entry


def data_set_classes(root: Path, dataset: str, problems: list[Problem], num_classes: int | None = None) -> int | None:
    """The class count of a data set folder, or None with the reason added to ``problems``."""
    folder = root / dataset
    if not folder.is_dir():
        problems.append((folder, f"{folder}: data set folder does not exist"))
        return None
    try:
        return few_shot_num_classes(dataset, num_classes, folder)
    except DataError as err:
        problems.append((folder, str(err)))
        return None


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
    shots, seeds = list(shots), list(seeds)  # iterated once per data set
    for dataset in datasets:
        classes = data_set_classes(root, dataset, problems, (num_classes or {}).get(dataset))
        if classes is None:
            continue
        manifest[dataset] = check_lists(root, dataset, run_lists(shots, seeds), classes, problems, images)
    raise_problems(root, problems, images, verify_images, verified, progress)
    return manifest
