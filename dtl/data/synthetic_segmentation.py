"""An embedded segmentation suite: generated scenes with a label per pixel, in ADE20K's folder layout.

- ``shape_masks``: 1-4 shapes of the renderer's ten kinds, in random colours and sizes on textured backgrounds; each
  pixel is labelled with the kind of the top-most shape covering at least half of it, or ``background`` (11
  classes). A shape's kind must be read from its outline, so the label of a pixel depends on its surroundings.
- ``texture_regions``: two of the nine textures of the ``patterns`` task, each under its own random colours,
  meeting along a random straight edge or the rim of a random disc; each pixel is labelled with the texture
  under it (9 classes). A texture is a pattern over several pixels, never one pixel's colour.

Each task folder has :data:`TRAIN_IMAGES` training images (of which ``dtl.data.segmentation`` holds out a tenth
for model selection) and ``num_test`` validation images, all at ``image_size`` pixels, written as PNGs with an
8-bit label map beside each, and a ``meta.json`` naming the classes.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import SHAPES, render_scenes
from .synthetic import GENERATOR_VERSION, PATTERNS, SUPERSAMPLE, generate_folders, sample_task

TRAIN_IMAGES = 1000
GROUP = "Segmentation"


@dataclass(frozen=True)
class SegmentationTask:
    classes: tuple[str, ...]
    description: str


SYNTHETIC_SEGMENTATION: dict[str, SegmentationTask] = {
    "shape_masks": SegmentationTask(("background", *SHAPES), "the kind of shape covering each pixel, or background"),
    "texture_regions": SegmentationTask(PATTERNS, "which of two textured regions, and so which texture, each "
                                                  "pixel lies in"),
}


def _shapes(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = render_scenes(rng, n, size, radius_range=(3.0 * size / 32, 9.0 * size / 32),
                                   supersample=SUPERSAMPLE)
    return images, (labels["shape_map"].astype(np.int16) + 1).astype(np.uint8)  # -1 (background) -> 0


def _texture_regions(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    first, first_labels = sample_task("patterns", n, rng, size)
    second, second_labels = sample_task("patterns", n, rng, size)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    offset = rng.uniform(-0.25, 0.25, (n, 1, 1))
    centre = rng.uniform(-0.3, 0.3, (n, 2, 1, 1))
    radius = rng.uniform(0.2, 0.4, (n, 1, 1))
    edge = np.cos(angle) * xs + np.sin(angle) * ys > offset
    disc = (xs - centre[:, 0]) ** 2 + (ys - centre[:, 1]) ** 2 < radius ** 2
    inside = np.where(rng.random((n, 1, 1)) < 0.5, edge, disc)
    images = np.where(inside[..., None], second, first)
    labels = np.where(inside, second_labels[:, None, None], first_labels[:, None, None])
    return images.astype(np.uint8), labels.astype(np.uint8)


_SAMPLERS: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]] = {
    "shape_masks": _shapes,
    "texture_regions": _texture_regions,
}


def sample_segmentation(task: str, n: int, rng: np.random.Generator,
                        image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 (n, H, W, 3)) and label maps (uint8 (n, H, W)) of an embedded segmentation task."""
    if task not in _SAMPLERS:
        raise KeyError(f"unknown synthetic segmentation task {task!r}; known: {', '.join(SYNTHETIC_SEGMENTATION)}")
    return _SAMPLERS[task](rng, n, image_size)


def _write_task(folder: Path, task: str, image_size: int, num_test: int, seed: int) -> None:
    stream = zlib.crc32(task.encode())
    for split, count in (("training", TRAIN_IMAGES), ("validation", num_test)):
        images, labels = sample_segmentation(task, count, np.random.default_rng([seed, stream, split == "validation"]),
                                             image_size)
        (folder / "images" / split).mkdir(parents=True)
        (folder / "annotations" / split).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{split}_{i:05d}.png"
            Image.fromarray(image).save(folder / "images" / split / name)
            Image.fromarray(label, mode="L").save(folder / "annotations" / split / name)


def _meta(task: str, image_size: int, num_test: int, seed: int) -> dict[str, object]:
    info = SYNTHETIC_SEGMENTATION[task]
    return {"task": task, "num_classes": len(info.classes), "reduce_zero_label": False, "classes": list(info.classes),
            "group": GROUP, "description": info.description, "layout": "segmentation", "training": TRAIN_IMAGES,
            "image_size": image_size, "num_test": num_test, "seed": seed, "generator": "dtl.data.synthetic",
            "generator_version": GENERATOR_VERSION}


def generate_segmentation_suite(root: str | os.PathLike[str], tasks: Iterable[str] | None = None,
                                image_size: int = 32, num_test: int = 500, seed: int = 0,
                                overwrite: bool = False) -> dict[str, bool]:
    """Write the embedded segmentation tasks under ``root`` (each atomically; one generated earlier with the same
    settings is kept). Returns ``{task: whether it was generated now}``."""
    return generate_folders(root, tasks, SYNTHETIC_SEGMENTATION, "segmentation task(s)",
                            lambda task: _meta(task, image_size, num_test, seed),
                            lambda folder, task: _write_task(folder, task, image_size, num_test, seed), overwrite)
