"""An embedded domain-shift suite: one source domain of shapes and four shifted target domains of the same classes.

It stands in for ImageNet and its shifted versions, in the layout the domain-generalisation protocol reads
(:mod:`dtl.data.domain_generalization`): the source folder holds few-shot training lists
(``annotations/train_meta.list.num_shot_<k>.seed_<s>``), a validation list of other source images
(``val_meta.list``) and a test list (``test_meta.list``); every target folder holds a ``test_meta.list`` whose
labels are the source's class indices. The ten classes are the renderer's ten shapes.

- ``shapes`` (source, like ImageNet): one shape in a saturated colour, any size and angle, on a textured background;
- ``shapes-v2`` (like ImageNet-V2): the same renderer drawn afresh, objects a little smaller: a mild shift;
- ``shapes-sketch`` (like ImageNet-Sketch): the edges of the shape, dark lines on white, no colour or texture;
- ``shapes-a`` (like ImageNet-A: hard images of a subset of the classes): small shapes on busy backgrounds
  under heavy sensor noise, 5 of the 10 classes;
- ``shapes-r`` (like ImageNet-R: renditions of a subset of the classes): colour negatives posterised to four
  levels, 6 of the 10 classes (overlapping the -A subset, as ImageNet-A's and -R's 200 classes overlap).

The -a and -r lists hold only their subset's labels, so their accuracy is reported over all ten classes and
with the logits masked to the subset (``accuracy_masked``), as for ImageNet-A and -R.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .scenes import BACKGROUNDS, SHAPES, render_scenes
from .synthetic import GENERATOR_VERSION, SUPERSAMPLE, generate_folders, save_images
from .synthetic_few_shot import POOL_PER_CLASS, VAL_PER_CLASS, write_training_lists

SOURCE_DOMAIN = "shapes"
NUM_CLASSES = len(SHAPES)
TARGET_DOMAINS: dict[str, str] = {
    "shapes-v2": "the source renderer drawn afresh, objects a little smaller",
    "shapes-sketch": "edges only: dark lines on white",
    "shapes-a": "small shapes, busy backgrounds, heavy noise; 5 of the 10 classes",
    "shapes-r": "colour negatives posterised to 4 levels; 6 of the 10 classes",
}
SUBSETS: dict[str, tuple[int, ...]] = {"shapes-a": (0, 2, 4, 5, 8), "shapes-r": (1, 2, 3, 5, 6, 9)}
DOMAINS: tuple[str, ...] = (SOURCE_DOMAIN, *TARGET_DOMAINS)


def _labels(rng: np.random.Generator, n: int, classes: tuple[int, ...]) -> np.ndarray:
    return np.asarray(classes)[rng.permutation(np.arange(n) % len(classes))]


def _render(rng: np.random.Generator, labels: np.ndarray, size: int, radius: tuple[float, float],
            backgrounds: np.ndarray | int | None = None) -> np.ndarray:
    scale = size / 32
    images, _ = render_scenes(rng, len(labels), size, num_objects=1, shapes=labels,
                              radii=rng.uniform(*radius, len(labels)) * scale, backgrounds=backgrounds,
                              supersample=SUPERSAMPLE)
    return images


def _sketch(images: np.ndarray) -> np.ndarray:
    grey = images.astype(np.float32).mean(axis=-1)
    dx = np.abs(np.diff(grey, axis=2, append=grey[:, :, -1:]))
    dy = np.abs(np.diff(grey, axis=1, append=grey[:, -1:, :]))
    ink = np.clip((dx + dy) * 3.0, 0, 255)
    return np.repeat((255 - ink)[..., None], 3, axis=-1).astype(np.uint8)


def sample_domain(domain: str, n: int, rng: np.random.Generator, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, (n, H, W, 3)) and labels (class indices of the source) of one domain."""
    if domain == SOURCE_DOMAIN:
        labels = _labels(rng, n, tuple(range(NUM_CLASSES)))
        return _render(rng, labels, image_size, (5.0, 10.0)), labels
    if domain == "shapes-v2":
        labels = _labels(rng, n, tuple(range(NUM_CLASSES)))
        return _render(rng, labels, image_size, (4.0, 8.0)), labels
    if domain == "shapes-sketch":
        labels = _labels(rng, n, tuple(range(NUM_CLASSES)))
        return _sketch(_render(rng, labels, image_size, (5.0, 10.0), backgrounds=BACKGROUNDS.index("flat"))), labels
    if domain == "shapes-a":
        labels = _labels(rng, n, SUBSETS[domain])
        busy = rng.choice([BACKGROUNDS.index(b) for b in ("noise", "stripes", "checker")], n)
        images = _render(rng, labels, image_size, (3.5, 5.5), backgrounds=busy).astype(np.float32)
        images += rng.normal(0.0, 30.0, images.shape)
        return np.clip(images, 0, 255).astype(np.uint8), labels
    if domain == "shapes-r":
        labels = _labels(rng, n, SUBSETS[domain])
        negative = 255 - _render(rng, labels, image_size, (5.0, 10.0))
        return ((negative // 64) * 85).astype(np.uint8), labels
    raise KeyError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")


def _write_domain(folder: Path, domain: str, image_size: int, num_test: int, seed: int) -> None:
    stream = zlib.crc32(domain.encode())
    annotations = folder / "annotations"
    annotations.mkdir()
    images, labels = sample_domain(domain, num_test, np.random.default_rng([seed, stream, 1]), image_size)
    (annotations / "test_meta.list").write_text("".join(save_images(folder, "test", images, labels)))
    if domain != SOURCE_DOMAIN:
        return
    images, labels = sample_domain(domain, (POOL_PER_CLASS + VAL_PER_CLASS) * NUM_CLASSES,
                                   np.random.default_rng([seed, stream, 0]), image_size)
    order = np.argsort(labels, kind="stable")
    write_training_lists(folder, images[order], labels[order], NUM_CLASSES, [seed, stream, 2])


def _meta(domain: str, image_size: int, num_test: int, seed: int) -> dict[str, object]:
    description = "source domain" if domain == SOURCE_DOMAIN else TARGET_DOMAINS[domain]
    return {"data_set": domain, "num_classes": NUM_CLASSES, "group": "Domain shift", "description": description,
            "layout": "domain_generalization", "classes": list(SUBSETS.get(domain, range(NUM_CLASSES))),
            "image_size": image_size, "num_test": num_test, "seed": seed, "generator": "dtl.data.synthetic",
            "generator_version": GENERATOR_VERSION}


def generate_domain_shift_suite(root: str | os.PathLike[str], domains: Iterable[str] | None = None,
                                image_size: int = 32, num_test: int = 500, seed: int = 0,
                                overwrite: bool = False) -> dict[str, bool]:
    """Write the source and target domain folders under ``root`` (each atomically; one generated earlier with the
    same settings is kept). Returns ``{domain: whether it was generated now}``."""
    return generate_folders(root, domains, DOMAINS, "domain(s)", lambda name: _meta(name, image_size, num_test, seed),
                            lambda folder, name: _write_domain(folder, name, image_size, num_test, seed), overwrite)
