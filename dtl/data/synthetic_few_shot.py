"""An embedded few-shot suite: fine-grained-like synthetic data sets in the NOAH few-shot layout.

Each data set is a folder that :class:`~dtl.data.few_shot.FewShotDataset` reads exactly as it reads the real
release (``annotations/train_meta.list.num_shot_<k>.seed_<s>``, ``val_meta.list``, ``test_meta.list``), for every
shot count of :data:`~dtl.data.few_shot.SHOTS` and every seed of :data:`~dtl.data.few_shot.SEEDS`:

- ``emblems``: 12 classes, one of four star-like shapes in one of three warm colours (red, orange, magenta), on a
  textured background next to a distractor object: classes differ in a detail, as aircraft variants do;
- ``textures``: the nine texture types of the synthetic ``patterns`` task (stripes and checkers at two
  frequencies, gradient, rings, dots, blobs, noise) under random colours;
- ``silhouettes``: which of the renderer's ten shapes one black silhouette is, at any size and angle.

Per class, a seed's k-shot list is the first k images of that seed's shuffle of a training pool of
:data:`POOL_PER_CLASS` images, so a seed's 1-shot images are among its 2-shot ones and so on, and the three seeds
draw different images. Validation (:data:`VAL_PER_CLASS` per class) and test images are drawn apart from the pool.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .few_shot import SEEDS, SHOTS
from .scenes import SHAPE_IDS, SHAPES, render_scenes
from .synthetic import GENERATOR_VERSION, SUPERSAMPLE, SyntheticTask, generate_folders, sample_task, save_images

POOL_PER_CLASS = 32
VAL_PER_CLASS = 10
GROUP = "Few-shot"

_EMBLEM_SHAPES = ("star", "hexagon", "cross", "triangle")
_EMBLEM_COLOURS = (0, 6, 5)  # red, orange, magenta (PALETTE ids): close hues
_DISTRACTOR_SHAPES = ("circle", "square", "ring", "bar")
_DISTRACTOR_COLOURS = (1, 2, 4, 8)  # green, blue, cyan, white


def _emblems(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % (len(_EMBLEM_SHAPES) * len(_EMBLEM_COLOURS)))
    shape = np.array([SHAPE_IDS[s] for s in _EMBLEM_SHAPES])[labels // len(_EMBLEM_COLOURS)]
    colour = np.array(_EMBLEM_COLOURS)[labels % len(_EMBLEM_COLOURS)]
    distractor_shape = np.array([SHAPE_IDS[s] for s in _DISTRACTOR_SHAPES])[rng.integers(0, 4, n)]
    distractor_colour = np.array(_DISTRACTOR_COLOURS)[rng.integers(0, 4, n)]
    scale = size / 32
    radii = np.stack([rng.uniform(3.0, 5.0, n), rng.uniform(5.0, 8.0, n)], axis=1) * scale
    images, _ = render_scenes(rng, n, size, num_objects=2, shapes=np.stack([distractor_shape, shape], 1),
                              colours=np.stack([distractor_colour, colour], 1), radii=radii,
                              supersample=SUPERSAMPLE)  # the emblem is drawn last, on top
    return images, labels


def _silhouettes(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    radii = rng.uniform(6.0, 11.0, n).astype(np.float32) * (size / 32)
    images, _ = render_scenes(rng, n, size, num_objects=1, shapes=labels, radii=radii, colours=9,  # black
                              supersample=SUPERSAMPLE)
    return images, labels


def _from_vtab_task(task: str) -> Callable[[np.random.Generator, int, int, str], tuple[np.ndarray, np.ndarray]]:
    return lambda rng, n, size, split: sample_task(task, n, rng, size, split)


SYNTHETIC_FEW_SHOT: dict[str, SyntheticTask] = {
    "emblems": SyntheticTask(12, GROUP, "4 star-like shapes x 3 warm colours, beside a distractor, on textures"),
    "textures": SyntheticTask(9, GROUP, "texture type (the synthetic patterns task) under random colours"),
    "silhouettes": SyntheticTask(10, GROUP, "the shape (10) of one black silhouette, any size and angle, on textures"),
}
_SAMPLERS = {"emblems": _emblems, "textures": _from_vtab_task("patterns"), "silhouettes": _silhouettes}


def _balanced(rng: np.random.Generator, sampler, per_class: int, num_classes: int, size: int,
              split: str) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class, sorted by class (the samplers balance the labels exactly)."""
    images, labels = sampler(rng, per_class * num_classes, size, split)
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def write_training_lists(folder: Path, images: np.ndarray, labels: np.ndarray, num_classes: int,
                         key: list[int]) -> None:
    """Write class-sorted ``images`` (:data:`POOL_PER_CLASS` + :data:`VAL_PER_CLASS` per class) as the training
    pool and ``val_meta.list``, and every seed's k-shot list: per class, the first k of that seed's shuffle of the
    pool (``key`` + the seed seeds the shuffle)."""
    annotations = folder / "annotations"
    is_val = (np.arange(len(labels)) % (POOL_PER_CLASS + VAL_PER_CLASS)) >= POOL_PER_CLASS
    pool = np.array(save_images(folder, "train", images[~is_val], labels[~is_val]))
    (annotations / "val_meta.list").write_text("".join(save_images(folder, "val", images[is_val], labels[is_val])))
    for list_seed in SEEDS:
        order = np.random.default_rng([*key, list_seed]).permuted(
            np.arange(num_classes * POOL_PER_CLASS).reshape(num_classes, POOL_PER_CLASS), axis=1)
        for shots in SHOTS:
            (annotations / f"train_meta.list.num_shot_{shots}.seed_{list_seed}").write_text(
                "".join(pool[order[:, :shots].reshape(-1)]))  # class by class


def _write_data_set(folder: Path, name: str, image_size: int, num_test: int, seed: int) -> None:
    info, sampler = SYNTHETIC_FEW_SHOT[name], _SAMPLERS[name]
    stream = zlib.crc32(name.encode())
    (folder / "annotations").mkdir()
    images, labels = _balanced(np.random.default_rng([seed, stream, 0]), sampler, POOL_PER_CLASS + VAL_PER_CLASS,
                               info.num_classes, image_size, "train")
    write_training_lists(folder, images, labels, info.num_classes, [seed, stream, 2])
    test_images, test_labels = sampler(np.random.default_rng([seed, stream, 1]), num_test, image_size, "test")
    (folder / "annotations" / "test_meta.list").write_text("".join(save_images(folder, "test", test_images,
                                                                               test_labels)))


def _meta(name: str, image_size: int, num_test: int, seed: int) -> dict[str, object]:
    info = SYNTHETIC_FEW_SHOT[name]
    return {"data_set": name, "num_classes": info.num_classes, "group": info.group, "description": info.description,
            "layout": "few_shot", "shots": list(SHOTS), "seeds": list(SEEDS), "pool_per_class": POOL_PER_CLASS,
            "val_per_class": VAL_PER_CLASS, "image_size": image_size, "num_test": num_test, "seed": seed,
            "generator": "dtl.data.synthetic", "generator_version": GENERATOR_VERSION}


def generate_few_shot_suite(root: str | os.PathLike[str], data_sets: Iterable[str] | None = None,
                            image_size: int = 32, num_test: int = 600, seed: int = 0,
                            overwrite: bool = False) -> dict[str, bool]:
    """Write the synthetic few-shot data sets under ``root`` (each atomically; one generated earlier with the
    same settings is kept). Returns ``{data set: whether it was generated now}``."""
    return generate_folders(root, data_sets, SYNTHETIC_FEW_SHOT, "few-shot data set(s)",
                            lambda name: _meta(name, image_size, num_test, seed),
                            lambda folder, name: _write_data_set(folder, name, image_size, num_test, seed), overwrite)
