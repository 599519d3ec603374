"""A synthetic VTAB-like suite that can be generated offline in seconds.

The real VTAB-1K folders cannot be downloaded where this toolkit runs, so the toolkit writes small tasks in the
same layout (``<root>/<task>/images/*.png`` plus ``train800.txt``, ``val200.txt``, ``train800val200.txt``,
``test.txt``; docs/design.md) and the same spirit: the structured tasks mimic dSprites and CLEVR (which are
synthetic by design), ``digits`` stands in for a Natural task and ``patterns`` for a Specialized one. Every task
is balanced, deterministic for a seed, and built so that the label is not readable from a shortcut (colour,
background) that the other factors vary independently of.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dtl.data.scenes import BACKGROUNDS, PALETTE, SHAPE_IDS, render_backgrounds, render_scenes, sample_positions

#: Bump when the images a seed produces change, so stale folders are regenerated rather than silently reused.
GENERATOR_VERSION = 1
TRAIN, VAL = 800, 200
SUPERSAMPLE = 2


@dataclass(frozen=True)
class SyntheticTask:
    """What a generated task is: its class count, its VTAB group and a one-line description."""

    num_classes: int
    group: str
    description: str


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "dsprites_loc": SyntheticTask(16, "Structured", "cell (4x4 grid) holding the centre of a single random shape"),
    "dsprites_ori": SyntheticTask(16, "Structured", "orientation bin (22.5 deg) of a single semicircle"),
    "clevr_count": SyntheticTask(8, "Structured", "number of objects in the scene, 3..10"),
    "digits": SyntheticTask(10, "Natural", "scikit-learn 8x8 digits upscaled, coloured, jittered, on textures"),
    "patterns": SyntheticTask(9, "Specialized", "texture type (stripes, checkers, gradient, rings, dots, "
                                                "blobs, noise) under random colours and noise"),
}
PATTERNS: tuple[str, ...] = ("stripes_low", "stripes_high", "checker_low", "checker_high", "gradient", "rings",
                             "dots", "blobs", "noise")


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Labels with every class equally often (up to one), in random order: chance level is exactly 1/K."""
    return rng.permutation(np.arange(n) % num_classes)


def _dsprites_loc(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 16)
    cell = np.stack([labels % 4, labels // 4], axis=1)                 # (x, y) cell of the centre
    centre = (cell + rng.uniform(0.15, 0.85, (n, 2))) * (size / 4)     # clear of the cell borders
    scale = size / 32
    images, _ = render_scenes(rng, n, size, num_objects=1, positions=centre,
                              radii=rng.uniform(3.0, 6.0, n) * scale, supersample=SUPERSAMPLE)
    return images, labels


def _dsprites_ori(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 16)
    angles = (labels + rng.uniform(0.0, 1.0, n)) * (2 * np.pi / 16)
    scale = size / 32
    images, _ = render_scenes(rng, n, size, num_objects=1, shapes=SHAPE_IDS["semicircle"], angles=angles,
                              radii=rng.uniform(6.0, 10.0, n) * scale, supersample=SUPERSAMPLE)
    return images, labels


def _clevr_count(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, 8)
    counts = labels + 3
    radii = (rng.uniform(2.5, 4.0, (n, 10)) * (size / 32)).astype(np.float32)
    active = np.arange(10)[None, :] < counts[:, None]
    # Objects kept apart (when possible) so that the count is visible, as in CLEVR's rendered scenes.
    positions = sample_positions(rng, radii, size, active, overlap=1.05, tries=50)
    images, _ = render_scenes(rng, n, size, num_objects=counts, radii=radii[:, :counts.max()],
                              positions=positions[:, :counts.max()], supersample=SUPERSAMPLE)
    return images, labels


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download) as float alpha maps in [0, 1]."""
    from sklearn.datasets import load_digits  # ~1.6 s to import, and only the digits task needs it

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


#: The first 1000 source digits feed train/val, the other 797 feed test: no digit drawing is in both.
DIGITS_TRAIN_POOL = 1000


def _digits(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    glyphs, targets = _sklearn_digits()
    pool = np.arange(DIGITS_TRAIN_POOL) if split == "train" else np.arange(DIGITS_TRAIN_POOL, len(targets))
    labels = _balanced_labels(rng, n, 10)
    index = np.empty(n, dtype=np.int64)
    for digit in range(10):
        sel = labels == digit
        candidates = pool[targets[pool] == digit]
        index[sel] = candidates[rng.integers(0, len(candidates), int(sel.sum()))]
    # Random scale, rotation and shift through one batched affine resampling of the 8x8 glyphs.
    scale = rng.uniform(0.6, 0.9, n)
    angle = rng.uniform(-0.25, 0.25, n)
    shift = rng.uniform(-1.0, 1.0, (n, 2)) * (1.0 - scale)[:, None]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin, -(cos * shift[:, 0] - sin * shift[:, 1])], 1),
                      np.stack([sin, cos, -(sin * shift[:, 0] + cos * shift[:, 1])], 1)], 1)
    theta_t = torch.from_numpy(theta.astype(np.float32))
    grid = F.affine_grid(theta_t, [n, 1, size, size], align_corners=False)
    alpha = F.grid_sample(torch.from_numpy(glyphs[index])[:, None], grid, mode="bilinear",
                          padding_mode="zeros", align_corners=False)[:, 0, :, :, None].numpy()
    background = render_backgrounds(rng, rng.integers(0, len(BACKGROUNDS), n), size)
    ink = PALETTE[rng.integers(0, len(PALETTE), n)][:, None, None]
    images = background * (1.0 - alpha) + ink * alpha
    return np.clip(images + 0.5, 0, 255).astype(np.uint8), labels


def _patterns(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(rng, n, len(PATTERNS))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")

    def per_image(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, (n, 1, 1)).astype(np.float32)

    theta, phase, phase2 = per_image(0, 2 * np.pi), per_image(0, 2 * np.pi), per_image(0, 2 * np.pi)
    along = np.cos(theta) * xs + np.sin(theta) * ys
    across = -np.sin(theta) * xs + np.cos(theta) * ys
    low, high = per_image(1.5, 3.0), per_image(4.5, 8.0)          # cycles per image: disjoint bands
    centre = rng.uniform(-0.5, 0.5, (n, 2, 1, 1)).astype(np.float32)
    radius = np.sqrt((xs - centre[:, 0]) ** 2 + (ys - centre[:, 1]) ** 2)
    dot_u = np.mod(high * along / 1.5 + phase, 1.0) - 0.5
    dot_v = np.mod(high * across / 1.5 + phase2, 1.0) - 0.5
    blob_dirs = rng.uniform(0, 2 * np.pi, (n, 3, 1, 1)).astype(np.float32)
    blob_freq = rng.uniform(1.0, 2.5, (n, 3, 1, 1)).astype(np.float32)
    blobs = np.sin(2 * np.pi * blob_freq * (np.cos(blob_dirs) * xs + np.sin(blob_dirs) * ys)
                   + rng.uniform(0, 2 * np.pi, (n, 3, 1, 1))).mean(axis=1)
    variants: dict[str, Callable[[], np.ndarray]] = {
        "stripes_low": lambda: 0.5 + 0.5 * np.sin(2 * np.pi * low * along + phase),
        "stripes_high": lambda: 0.5 + 0.5 * np.sin(2 * np.pi * high * along + phase),
        "checker_low": lambda: (np.sin(2 * np.pi * low * along + phase)
                                * np.sin(2 * np.pi * low * across + phase2) > 0),
        "checker_high": lambda: (np.sin(2 * np.pi * high * along + phase)
                                 * np.sin(2 * np.pi * high * across + phase2) > 0),
        "gradient": lambda: np.clip(along * per_image(0.8, 1.4) + 0.5, 0, 1),
        "rings": lambda: 0.5 + 0.5 * np.sin(2 * np.pi * per_image(2.0, 5.0) * radius + phase),
        "dots": lambda: dot_u ** 2 + dot_v ** 2 < per_image(0.2, 0.35) ** 2,
        "blobs": lambda: 0.5 + 0.5 * blobs / np.abs(blobs).max(axis=(1, 2), keepdims=True),
        "noise": lambda: rng.uniform(0, 1, (n, size, size)),
    }
    mix = np.zeros((n, size, size), dtype=np.float32)
    for k, name in enumerate(PATTERNS):
        sel = labels == k
        mix[sel] = variants[name]()[sel]
    # Two contrasting colours (the second near the complement of the first) and sensor-like noise.
    c0 = rng.uniform(0, 255, (n, 1, 1, 3))
    c1 = np.clip(255 - c0 + rng.uniform(-50, 50, (n, 1, 1, 3)), 0, 255)
    images = c0 * (1 - mix[..., None]) + c1 * mix[..., None]
    images += rng.normal(0, 1, images.shape) * rng.uniform(4, 25, (n, 1, 1, 1))
    return np.clip(images + 0.5, 0, 255).astype(np.uint8), labels


_SAMPLERS: dict[str, Callable[[np.random.Generator, int, int, str], tuple[np.ndarray, np.ndarray]]] = {
    "dsprites_loc": _dsprites_loc,
    "dsprites_ori": _dsprites_ori,
    "clevr_count": _clevr_count,
    "digits": _digits,
    "patterns": _patterns,
}


def sample_task(task: str, n: int, rng: np.random.Generator, image_size: int = 32,
                split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, (n, H, W, 3)) and labels (int64, balanced) of a synthetic task, in memory.

    ``split`` ('train' or 'test') only matters for ``digits``, whose train and test images come from disjoint
    halves of scikit-learn's drawings; the procedural tasks are independent across calls anyway.
    """
    if task not in _SAMPLERS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _SAMPLERS[task](rng, n, image_size, split)


def _task_meta(task: str, image_size: int, num_test: int, seed: int) -> dict[str, object]:
    info = SYNTHETIC_TASKS[task]
    return {"task": task, "num_classes": info.num_classes, "group": info.group, "description": info.description,
            "image_size": image_size, "num_test": num_test, "seed": seed, "generator": "dtl.data.synthetic",
            "generator_version": GENERATOR_VERSION}


def _write_task(folder: Path, task: str, image_size: int, num_test: int, seed: int) -> None:
    """Write one task folder: PNGs and the four list files."""
    stream = zlib.crc32(task.encode())          # stable across runs, unlike hash()
    lines: dict[str, list[str]] = {}
    for part, count, split in (("train", TRAIN + VAL, "train"), ("test", num_test, "test")):
        images, labels = sample_task(task, count, np.random.default_rng([seed, stream, split == "test"]),
                                     image_size, split)
        lines[part] = save_images(folder, part, images, labels)
    lists = {"train800": lines["train"][:TRAIN], "val200": lines["train"][TRAIN:],
             "train800val200": lines["train"], "test": lines["test"]}
    for split, split_lines in lists.items():
        (folder / f"{split}.txt").write_text("".join(split_lines))


def generate_folder(root: Path, name: str, meta: dict[str, object], write: Callable[[Path], None],
                    overwrite: bool = False) -> bool:
    """Write the generated folder ``root/name`` with ``write(folder)`` plus ``meta.json``, unless its
    ``meta.json`` already equals ``meta``; returns whether it was (re)generated.

    The folder is written into a hidden staging folder under ``root`` (same file system) and swapped into place,
    so an interrupted run never leaves a half-written folder. A folder whose ``meta.json`` differs is replaced
    only with ``overwrite=True`` (``FileExistsError`` otherwise): it may not be ours."""
    target = root / name
    meta_path = target / "meta.json"
    existing = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if not overwrite and existing == meta:
        return False
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists but was not generated with these settings "
                              f"(its meta.json: {existing}); pass overwrite=True to replace it")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        (staging / name).mkdir()
        write(staging / name)
        (staging / name / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            os.replace(target, staging / "replaced")
        os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def generate_folders(root: str | os.PathLike[str], names: Iterable[str] | None, known: Iterable[str], what: str,
                     meta: Callable[[str], dict[str, object]], write: Callable[[Path, str], None],
                     overwrite: bool = False) -> dict[str, bool]:
    """:func:`generate_folder` for each of ``names`` (None: all ``known``); an unknown name is a ``KeyError``
    naming the known ones. Returns ``{name: whether it was generated now}``."""
    known = list(known)
    names = known if names is None else list(names)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise KeyError(f"unknown synthetic {what} {unknown}; known: {', '.join(known)}")
    return {name: generate_folder(Path(root), name, meta(name), lambda folder, name=name: write(folder, name),
                                  overwrite) for name in names}


def save_images(folder: Path, prefix: str, images: np.ndarray, labels: Iterable[int]) -> list[str]:
    """Write ``images`` as ``<folder>/images/<prefix>_<i>.png``; returns the list lines ``images/... label``."""
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"images/{prefix}_{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(f"{name} {int(label)}\n")
    return lines


def generate_synthetic_suite(root: str | os.PathLike[str], tasks: Iterable[str] | None = None,
                             image_size: int = 32, num_test: int = 1000, seed: int = 0,
                             overwrite: bool = False) -> dict[str, dict[str, object]]:
    """Write VTAB-format folders of the synthetic tasks under ``root`` and return a manifest.

    Each task is generated into a temporary folder and renamed into place, so an interrupted run never leaves a
    half-written task. A task whose ``meta.json`` already matches (same seed, size, version) is kept as is; one
    that differs is replaced only with ``overwrite=True`` (``FileExistsError`` otherwise).

    Returns ``{task: {"train800": 800, "val200": 200, "train800val200": 1000, "test": num_test,
    "num_classes": K, "group": ..., "generated": bool}}``.
    """
    generated = generate_folders(root, tasks, SYNTHETIC_TASKS, "task(s)",
                                 lambda task: _task_meta(task, image_size, num_test, seed),
                                 lambda folder, task: _write_task(folder, task, image_size, num_test, seed), overwrite)
    manifest: dict[str, dict[str, object]] = {}
    for task, fresh in generated.items():
        manifest[task] = {"train800": TRAIN, "val200": VAL, "train800val200": TRAIN + VAL, "test": num_test,
                          "num_classes": SYNTHETIC_TASKS[task].num_classes, "group": SYNTHETIC_TASKS[task].group,
                          "generated": fresh}
    return manifest
