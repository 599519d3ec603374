"""Semantic segmentation folders in ADE20K's layout: checks, splits, and the dataset that reads them.

One folder per task (``ADEChallengeData2016/`` is one such folder)::

    <task>/images/training/<stem>.jpg|.png         <task>/annotations/training/<stem>.png
    <task>/images/validation/<stem>.jpg|.png       <task>/annotations/validation/<stem>.png
    <task>/meta.json                               (optional)

An annotation is an 8-bit single-channel label map (PIL mode ``L`` or ``P``; a palette image's indices are the
labels) the size of its image. ``meta.json`` may give ``num_classes``, ``reduce_zero_label`` (ADE20K's
convention: label 0 is "other" and ignored, labels 1..K become 0..K-1) and ``classes`` (the names); a folder
named ``ADEChallengeData2016`` has ADE20K's values (150 classes, ``reduce_zero_label``, the class names) unless
its meta.json says otherwise. Label 255 is ignored everywhere.

Splits: ``training`` and ``validation`` are the folders; ``train`` and ``holdout`` divide ``training`` for model
selection: ``holdout`` is :data:`HOLDOUT_SHARE` of the training images (at least one), drawn by a generator
seeded with :data:`HOLDOUT_SEED` from the sorted stems, so every run and machine carves the same images.

Training reads an image and its label map through the same geometric transforms (torchvision's ``transforms.v2``
with ``tv_tensors.Mask``, so a map is resized by nearest neighbour): a random resize to 0.5-2.0 times the scale
at which the image fits ``crop_size`` x ``4 * crop_size`` (mmsegmentation's ``Resize(scale=(2048, 512),
ratio_range=(0.5, 2.0))`` for a 512 crop), a random ``crop_size`` crop (padded with label 255 where the image is
smaller), and a horizontal flip with probability 0.5. Evaluation resizes an image so that its shorter side is
``crop_size`` (the map with it, by nearest neighbour) and scores at that scale; the model reads it through a
sliding window (``dtl.objectives``). Batches of images of different sizes are padded (label 255).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data import default_collate as _default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..objectives import IGNORE_INDEX
from .lists import DataError, Problem, raise_problems

FOLDER_SPLITS = ("training", "validation")
SPLITS = ("training", "train", "holdout", "validation")  # train + holdout = training
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HOLDOUT_SHARE = 0.1
HOLDOUT_SEED = 0
SCALE_RANGE = (0.5, 2.0)
ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
MASK_MODES = ("L", "P")


@dataclass(frozen=True)
class SegmentationMeta:
    """What a task folder's labels mean: the class count, whether raw label 0 is ignored (and the others
    shifted down by one), and the class names."""

    num_classes: int
    reduce_zero_label: bool = False
    classes: tuple[str, ...] = field(default=())

    def class_names(self) -> tuple[str, ...]:
        return self.classes if len(self.classes) == self.num_classes else tuple(map(str, range(self.num_classes)))

    def labels(self, raw: np.ndarray) -> np.ndarray:
        """A raw label map -> training labels (uint8; ``IGNORE_INDEX`` where nothing counts)."""
        if not self.reduce_zero_label:
            return raw
        labels = raw.astype(np.int16) - 1
        labels[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
        return labels.astype(np.uint8)

    @property
    def largest_raw_label(self) -> int:
        """The largest raw label a map may hold besides ``IGNORE_INDEX``."""
        return self.num_classes if self.reduce_zero_label else self.num_classes - 1


def read_meta(folder: Path, num_classes: int | None = None) -> SegmentationMeta:
    """The task folder's :class:`SegmentationMeta`: ``num_classes`` (``data.num_classes``) > ``meta.json`` >
    ADE20K's values for a folder named ``ADEChallengeData2016``; a folder with none of them is an error."""
    values: dict = {}
    if folder.name == ADE20K_FOLDER:
        values = {"num_classes": len(ADE20K_CLASSES), "reduce_zero_label": True, "classes": ADE20K_CLASSES}
    path = folder / "meta.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text())
            if not isinstance(found, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: expected a JSON object with num_classes, reduce_zero_label, classes ({err})") \
                from None
        values.update({key: found[key] for key in ("num_classes", "reduce_zero_label", "classes") if key in found})
    if num_classes is not None:
        values["num_classes"] = num_classes
    count = values.get("num_classes")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= IGNORE_INDEX:
        raise DataError(f"{path}: 'num_classes' must be an integer in 1..{IGNORE_INDEX} (label {IGNORE_INDEX} "
                        f"is ignored), got {count!r}; give it there or as data.num_classes: "
                        f"{{{folder.name}: <classes>}}")
    reduce = values.get("reduce_zero_label", False)
    if not isinstance(reduce, bool):
        raise DataError(f"{path}: 'reduce_zero_label' must be true or false, got {reduce!r}")
    classes = values.get("classes") or ()
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a list of names, got {classes!r}")
    return SegmentationMeta(count, reduce, tuple(classes))


def _stems(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    suffixes = tuple(suffixes)
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes}


def split_pairs(task_dir: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ``split`` (see the module docstring), in stem order; only stems that have
    both files (the folder check reports the others)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = "validation" if split == "validation" else "training"
    images = _stems(task_dir / "images" / folder, IMAGE_SUFFIXES)
    masks = _stems(task_dir / "annotations" / folder, (".png",))
    pairs = [(images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    if split in ("train", "holdout"):
        held = set(holdout_indices(len(pairs)))
        pairs = [pair for i, pair in enumerate(pairs) if (i in held) == (split == "holdout")]
    return pairs


def holdout_indices(count: int) -> list[int]:
    """Which of ``count`` training images (in stem order) form the holdout split."""
    if count < 2:
        return []
    size = max(1, round(HOLDOUT_SHARE * count))
    return sorted(np.random.default_rng(HOLDOUT_SEED).permutation(count)[:size].tolist())


# --- checks -------------------------------------------------------------------------------------------------------
def _check_mask(mask: Path, image: Path, largest: int) -> tuple[str | None, set[int]]:
    """One annotation against its image: (the defect in one line or None, the raw labels it holds); an image
    whose header cannot be read is a defect here, one that fails to decode later is found by decoding it."""
    try:
        with Image.open(image) as opened:
            image_size = opened.size
    except (OSError, SyntaxError, ValueError) as err:
        return f"{image}: cannot read image ({type(err).__name__}: {err})", {-1}
    try:
        with Image.open(mask) as opened:
            if opened.mode not in MASK_MODES:
                return (f"{mask}: annotation has mode {opened.mode} ({len(opened.getbands())} channels); expected "
                        "an 8-bit single-channel label map (mode L or P)"), set()
            if opened.size != image_size:
                return (f"{mask}: annotation is {opened.size[0]}x{opened.size[1]} but its image {image.name} is "
                        f"{image_size[0]}x{image_size[1]}"), set()
            values = np.unique(np.asarray(opened))
    except (OSError, SyntaxError, ValueError) as err:
        return f"{mask}: cannot read annotation ({type(err).__name__}: {err})", set()
    bad = [int(v) for v in values if largest < v != IGNORE_INDEX]
    if bad:
        return (f"{mask}: label(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} at or above "
                f"num_classes (allowed: 0..{largest} and {IGNORE_INDEX})"), set()
    return None, {int(v) for v in values}


def check_task_folder(task_dir: Path, problems: list[Problem], images: dict[Path, str],
                      num_classes: int | None = None) -> dict | None:
    """Check one task folder, appending each defect (one line naming its file); returns its record."""
    if not task_dir.is_dir():
        problems.append((task_dir, f"{task_dir}: task folder does not exist"))
        return None
    try:
        meta = read_meta(task_dir, num_classes)
    except DataError as err:
        problems.append((task_dir, str(err)))
        return None
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for split in FOLDER_SPLITS:
        image_dir, mask_dir = task_dir / "images" / split, task_dir / "annotations" / split
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                problems.append((folder, f"{folder}: folder does not exist"))
        found_images, found_masks = _stems(image_dir, IMAGE_SUFFIXES), _stems(mask_dir, (".png",))
        for stem in sorted(set(found_images) - set(found_masks)):
            problems.append((image_dir, f"{found_images[stem]}: no annotation {mask_dir / (stem + '.png')}"))
        for stem in sorted(set(found_masks) - set(found_images)):
            problems.append((mask_dir, f"{found_masks[stem]}: no image {stem}.jpg or .png in {image_dir}"))
        pairs = [(found_images[s], found_masks[s]) for s in sorted(found_images) if s in found_masks]
        if not pairs and image_dir.is_dir() and mask_dir.is_dir():
            problems.append((image_dir, f"{image_dir}: no images with annotations"))
        with ThreadPoolExecutor(min(32, 2 * (os.cpu_count() or 1))) as pool:
            checked = pool.map(lambda pair: _check_mask(pair[1], pair[0], meta.largest_raw_label), pairs)
            for (image, _), (defect, labels) in zip(pairs, checked):
                if defect is not None:
                    problems.append((mask_dir, defect))
                if labels == {-1}:  # the image's header did not read: reported already
                    continue
                seen |= labels
                images.setdefault(image, str(image_dir))
        counts[split] = len(pairs)
    held = len(holdout_indices(counts.get("training", 0)))
    counts.update(train=counts.get("training", 0) - held, holdout=held)
    used = {meta.labels(np.array([v], dtype=np.uint8))[0] for v in seen}
    return {"num_classes": meta.num_classes, "classes_seen": len({v for v in used if v < meta.num_classes}),
            "reduce_zero_label": meta.reduce_zero_label, "images": counts}


def check_segmentation_root(root: str | os.PathLike[str], tasks: Iterable[str], *,
                            num_classes: Mapping[str, int] | None = None, verify_images: bool = False,
                            verified: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """Check every task folder under ``root``: an image without its annotation or the reverse, an annotation
    whose size differs from its image's, a label at or above ``num_classes`` (255 aside), an annotation that is
    not a single-channel 8-bit map, an unreadable image or annotation (with ``verify_images``, every image is
    decoded once; ``verified`` remembers those that decoded). Every defect is one line naming its file, all of
    them in one :class:`DataError`. Returns ``{task: record}``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation root {root} does not exist or is not a folder")
    problems: list[Problem] = []
    images: dict[Path, str] = {}
    records = {task: record for task in tasks if (record := check_task_folder(
        root / task, problems, images, (num_classes or {}).get(task))) is not None}
    raise_problems(root, problems, images, verify_images, verified, progress)
    return records


def folder_fingerprint(root: Path, task_dir: Path) -> str:
    """A digest of the names, sizes and modification times of a task folder's images and annotations and of its
    meta.json (a changed, added or removed file changes it; the root's place does not)."""
    digest = hashlib.blake2b(digest_size=32)
    meta = task_dir / "meta.json"
    digest.update(meta.read_bytes() if meta.is_file() else b"<no meta.json>")
    for kind in ("images", "annotations"):
        for split in FOLDER_SPLITS:
            folder = task_dir / kind / split
            for path in sorted(folder.iterdir()) if folder.is_dir() else ():
                stat = path.stat()
                digest.update(f"|{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# --- the dataset --------------------------------------------------------------------------------------------------
def training_transform(crop_size: int, mean, std) -> v2.Compose:
    """Random resize (0.5-2.0), crop and flip of an image and its label map together, then the image's
    normalisation."""
    return v2.Compose([
        v2.ScaleJitter((crop_size, 4 * crop_size), SCALE_RANGE, antialias=True),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        *_normalise(mean, std),
    ])


def evaluation_transform(crop_size: int, mean, std) -> v2.Compose:
    """The shorter side resized to ``crop_size`` (the label map by nearest neighbour), then normalised."""
    return v2.Compose([v2.Resize(crop_size, antialias=True), *_normalise(mean, std)])


def _normalise(mean, std) -> list:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]


class SegmentationDataset(Dataset):
    """One split of a segmentation task folder: ``(float image CHW, int64 label map HW)`` pairs, the labels
    already mapped (``reduce_zero_label``; ``IGNORE_INDEX`` where nothing counts). ``augment`` says how training
    items are augmented (None: they are not), which keeps the prefix cache away from them."""

    def __init__(self, root: str | os.PathLike[str], task: str, split: str, crop_size: int, *,
                 augment: bool = False, num_classes: int | None = None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        task_dir = Path(root) / task
        if not task_dir.is_dir():
            raise DataError(f"task folder {task_dir} does not exist")
        self.task, self.split, self.crop_size = task, split, crop_size
        self.meta = read_meta(task_dir, num_classes)
        self.pairs = split_pairs(task_dir, split)
        if not self.pairs:
            raise DataError(f"{task_dir}: the {split} split has no images with annotations")
        self.augment = (f"resize {SCALE_RANGE[0]}-{SCALE_RANGE[1]}, {crop_size}-pixel crop, flip"
                        if augment else None)
        self.transform = (training_transform if augment else evaluation_transform)(crop_size, mean, std)

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def collate(batch):
        return pad_collate(batch)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The image (RGB) and its mapped labels, as stored."""
        image_path, mask_path = self.pairs[index]
        try:
            with Image.open(image_path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{image_path}: cannot read image ({type(err).__name__}: {err})") from err
        try:
            with Image.open(mask_path) as mask:
                raw = np.asarray(mask)
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{mask_path}: cannot read annotation ({type(err).__name__}: {err})") from err
        return rgb, self.meta.labels(raw)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, labels = self.read(index)
        image = tv_tensors.Image(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(labels.copy()))
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def cache_fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.task}|{self.split}|{self.crop_size}|{self.augment}|{self.transform!r}".encode())
        for image, mask in self.pairs:
            for path in (image, mask):
                stat = path.stat()
                digest.update(f"|{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (f"SegmentationDataset(task={self.task!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.meta.num_classes}, crop_size={self.crop_size})")


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label map) pairs, padding different sizes at the bottom and right (images with 0, label
    maps with ``IGNORE_INDEX``)."""
    sizes = {tuple(image.shape[-2:]) for image, _ in batch}
    if len(sizes) == 1:
        return _default_collate(batch)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros((len(batch), batch[0][0].shape[0], height, width), dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, label) in enumerate(batch):
        images[i, :, :image.shape[-2], :image.shape[-1]] = image
        labels[i, :label.shape[-2], :label.shape[-1]] = label
    return images, labels


def label_palette(count: int = 256):
    """A colour per label (uint8 ``(count, 3)``): PASCAL VOC's bit-interleaved palette, label 255 white."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value, shift = label, 7
        while value:
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    palette[255] = 255
    return palette[:count]
