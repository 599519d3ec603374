"""VTAB-1K folders as PyTorch datasets, with errors that say which file and line is wrong.

The layout is the one most PETL code reads (docs/design.md): ``<root>/<task>/`` holds the images and four
list files (``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``) whose lines are
``relative/path/to/image.jpg <integer label>``. Users assemble these folders by hand or by script, so every
problem is reported as a :class:`DataError` naming the file, the line and what was expected; and
:func:`check_vtab_root` reports all problems of a root at once instead of one per run.
"""
from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from .lists import LINE_FORMAT, DataError, Problem, check_list, parse_list, raise_problems, summarise

VTAB_TASKS: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
GROUP_ORDER = tuple(TASK_GROUPS)


def task_group(task: str, folder: Path) -> str:
    """A task's VTAB group: ``meta.json``'s ``group`` in its folder, else the VTAB-1K table, else ``Other``."""
    meta = folder / "meta.json"
    if meta.is_file():
        group = json.loads(meta.read_text()).get("group")
        if group:
            return str(group)
    for group, tasks in TASK_GROUPS.items():
        if task in tasks:
            return group
    return "Other"


def group_summary(rows: list[dict[str, Any]], key: str = "test_accuracy") -> dict[str, Any]:
    """Group means of ``rows`` (each with ``group`` and ``key``; the VTAB order, then any other group), their mean
    (the "group mean" papers quote), and the plain mean over tasks."""
    by_group: dict[str, list[float]] = {}
    for row in rows:
        if row.get(key) is not None:
            by_group.setdefault(row["group"], []).append(row[key])
    order = [g for g in GROUP_ORDER if g in by_group] + sorted(g for g in by_group if g not in GROUP_ORDER)
    group_means = {group: statistics.fmean(by_group[group]) for group in order}
    values = [row[key] for row in rows if row.get(key) is not None]
    return {
        "groups": group_means,
        "group_mean": statistics.fmean(group_means.values()) if group_means else None,
        "task_mean": statistics.fmean(values) if values else None,
        "num_tasks": len(values),
        "tasks_per_group": {group: len(by_group[group]) for group in order},
    }


def _geometry(img_size: int) -> v2.Compose:
    """The deterministic, uint8 part of the official transform: PIL bicubic resize, centre crop."""
    return v2.Compose([
        v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC),
        v2.CenterCrop(img_size),
        v2.PILToTensor(),
    ])


def _to_float() -> v2.Compose:
    """uint8 CHW -> float in [-1, 1]: ToTensor's /255 then Normalize(mean = std = 0.5)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])


def vtab_transform(img_size: int) -> v2.Compose:
    """The official VTAB-1K transform (no augmentation): resize bicubic, centre crop, ToTensor, Normalize(0.5)."""
    return v2.Compose([_geometry(img_size), _to_float()])


def resolve_num_classes(task_dir: Path, task: str, num_classes: int | None = None) -> int:
    """Class count: explicit value > ``meta.json`` in the task folder (synthetic tasks) > the VTAB table."""
    if num_classes is not None:
        if num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {num_classes} (task {task!r})")
        return num_classes
    meta = task_dir / "meta.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text())["num_classes"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta}: expected a JSON object with an integer 'num_classes' ({err})") from err
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{meta}: 'num_classes' must be a positive integer, got {value!r}")
        return value
    if task in VTAB_TASKS:
        return VTAB_TASKS[task]
    raise DataError(f"cannot tell how many classes task {task!r} has: it is not one of the 19 VTAB-1K tasks. Give "
                    f"the count in params.yaml (data.num_classes: {{{task}: <classes>}}) or in {meta} "
                    '({"num_classes": <classes>})')


def _task_dir(root: str | os.PathLike[str], task: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VTAB root {root} does not exist or is not a folder "
                        f"(expected <root>/<task>/{{{','.join(SPLITS)}}}.txt)")
    task_dir = root / task
    if not task_dir.is_dir():
        raise DataError(f"task folder {task_dir} does not exist (tasks found in {root}: "
                        f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'none'})")
    return task_dir


class VTabDataset(Dataset):
    """One split of one VTAB-1K task: ``(float tensor CHW in [-1, 1], int label)`` pairs.

    ``preload=True`` decodes, resizes and crops every image once and keeps them as uint8, so the many epochs of
    VTAB-1K's 1000-image training sets cost no decoding. The transform is deterministic, so this is exact.
    """

    def __init__(self, root: str | os.PathLike[str], task: str, split: str, img_size: int = 224,
                 num_classes: int | None = None, preload: bool = False) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        task_dir = _task_dir(root, task)
        self.task = task
        self.split = split
        self.img_size = img_size
        self.num_classes = resolve_num_classes(task_dir, task, num_classes)
        self.list_file = task_dir / f"{split}.txt"
        if not self.list_file.is_file():
            raise DataError(f"list file {self.list_file} does not exist (expected lines {LINE_FORMAT})")
        self.samples, self._line_numbers, problems = parse_list(self.list_file, self.num_classes)
        if problems:
            raise DataError(summarise(problems, f"{self.list_file}: {len(problems)} malformed line(s)"))
        if not self.samples:
            raise DataError(f"{self.list_file} lists no images (expected lines {LINE_FORMAT})")
        self._geometry = _geometry(img_size)
        self._to_float = _to_float()
        self._cache = [self._load(i) for i in range(len(self.samples))] if preload else None

    def _load(self, index: int) -> torch.Tensor:
        """Decode, resize and crop one image to uint8 CHW, naming the list line that referenced a bad file."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return self._geometry(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for missing/corrupt/truncated files
            raise DataError(f"{self.list_file}:{self._line_numbers[index]}: cannot read image {path} "
                            f"({type(err).__name__}: {err})") from err

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._cache[index] if self._cache is not None else self._load(index)
        return self._to_float(image), self.samples[index][1]

    def __repr__(self) -> str:
        return (f"VTabDataset(task={self.task!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, img_size={self.img_size})")


def _check_task(root: Path, task: str, problems: list[Problem], num_classes: int | None = None,
                images: dict[Path, str] | None = None) -> dict[str, int] | None:
    """Validate one task folder, appending every problem found; returns its manifest entry."""
    task_dir = root / task
    if not task_dir.is_dir():
        problems.append((task_dir, f"{task_dir}: task folder does not exist"))
        return None
    try:
        num_classes = resolve_num_classes(task_dir, task, num_classes)
    except DataError as err:
        problems.append((task_dir, str(err)))
        return None
    entry: dict[str, int] = {}
    lines: dict[str, Counter[tuple[Path, int]]] = {}
    labels_seen: set[int] = set()
    for split in SPLITS:
        path = task_dir / f"{split}.txt"
        samples = check_list(path, num_classes, problems, images)
        if samples is None:
            continue
        entry[split] = len(samples)
        lines[split] = Counter(samples)
        labels_seen.update(label for _, label in samples)
    if all(split in lines for split in ("train800", "val200", "train800val200")):
        if lines["train800"] + lines["val200"] != lines["train800val200"]:
            path = task_dir / "train800val200.txt"
            problems.append((path, f"{path}: should hold exactly the lines of train800.txt and val200.txt "
                                   f"({entry['train800']} + {entry['val200']} parsed lines), has "
                                   f"{entry['train800val200']} parsed lines that differ"))
    entry["num_classes"] = num_classes
    entry["classes_seen"] = len(labels_seen)
    return entry


def check_vtab_root(root: str | os.PathLike[str], tasks: Iterable[str] | None = None, *,
                    num_classes: Mapping[str, int] | None = None, verify_images: bool = False,
                    verified: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, dict[str, int]]:
    """Validate a VTAB-1K root and return ``{task: {split: count, "num_classes": K, "classes_seen": n}}``.

    Checks every task folder and list file: existence, line format, label range, that every referenced image
    exists, and that train800val200 is train800 + val200; with ``verify_images`` also that every image decodes
    (:func:`unreadable_images`; ``verified`` remembers the files that did). All problems are collected and raised
    as ONE :class:`DataError`, so a user fixes a broken root in one pass. ``tasks=None`` checks every sub-folder of
    ``root`` that holds a list file; ``num_classes`` gives the class counts of tasks that are not VTAB-1K tasks.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VTAB root {root} does not exist or is not a folder")
    if tasks is None:
        names = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and any((p / f"{s}.txt").is_file() for s in SPLITS))
        if not names:
            raise DataError(f"{root}: no task folders with list files ({', '.join(SPLITS)}) found")
    else:
        names = list(tasks)
    problems: list[Problem] = []
    images: dict[Path, str] = {}  # every image that exists -> where it is first listed
    manifest = {task: entry for task in names
                if (entry := _check_task(root, task, problems, (num_classes or {}).get(task), images)) is not None}
    raise_problems(root, problems, images, verify_images, verified, progress)
    return manifest


