"""Predict images with trained task models: ``python -m dtl.predict --model outputs/train/<task> PATH...``.

Inputs are image files, folders (every image below them, in name order) and list files (``.txt`` / ``.list``:
one ``<path> [label]`` per line, the VTAB-1K and NOAH layouts, paths relative to the list's folder or, for NOAH's
``annotations/`` lists, to the folder above it). Several ``--model`` folders predict every image for every task;
the DTL tasks among them share one frozen pass (``dtl.multitask``). The output's suffix picks CSV or JSON: one row
per image and task with ``path, task, label, name, score`` and then ``top<i>_label, top<i>_score``.

A segmentation model (one per run) writes into the ``--output`` folder one PNG label map per image (the image's
size, a class index per pixel, with a palette so it can be looked at) and ``fractions.csv``: per image, its
mask file and the share of its pixels predicted as each class.

An image that cannot be read is reported on stderr with its path and skipped; the run goes on. Exit status: 0 when
every image was predicted, 1 when some were skipped, 2 when nothing could run (bad arguments, a model that does
not load, no images found).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .data.segmentation import label_palette
from .engine import autocast
from .io import atomic_path, write_json, write_text
from .multitask import MultiTaskModel
from .objectives import resized_logits, sliding_window
from .trained import TrainedModelError, load_trained

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LIST_SUFFIXES = (".txt", ".list")
EXAMPLES = """examples:
  python -m dtl.predict --model outputs/train/patterns data/synthetic/patterns/images --output preds.csv
  python -m dtl.predict --model outputs/train/patterns photo1.png photo2.jpg --output preds.json --top-k 3
  python -m dtl.predict --model outputs/train/digits --model outputs/train/patterns \\
      data/synthetic/digits/test.txt --output both.csv           # two tasks, one shared frozen pass
  python -m dtl.predict --model outputs/train/shape_masks data/segmentation/shape_masks/images/validation \\
      --output masks/                                           # a segmentation model: masks/*.png + fractions
"""


class PredictError(RuntimeError):
    """Nothing can be predicted (one line for the user)."""


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files of ``paths`` in order: files as given, folders walked in name order, list files' entries."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            found.extend(list_entries(path))
        elif path.exists() or path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)  # a missing or broken image is reported when it is read, like any unreadable one
        else:
            raise PredictError(f"{path}: no such image, folder or list file")
    return found


def list_entries(path: Path) -> list[Path]:
    entries = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PredictError(f"{path}: cannot read the list file ({err})") from None
    for line in lines:
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        name = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line.strip()
        image = path.parent / name
        if not image.exists() and (path.parent.parent / name).exists():
            image = path.parent.parent / name  # NOAH: annotations/<list> names images of the data set's folder
        entries.append(image)
    return entries


@dataclass
class Prediction:
    path: Path
    task: str
    labels: list[int]  # top-k, best first
    scores: list[float]  # softmax probabilities
    names: list[str]

    def row(self) -> dict:
        out = {"path": str(self.path), "task": self.task, "label": self.labels[0], "name": self.names[0],
               "score": round(self.scores[0], 6)}
        for i, (label, score) in enumerate(zip(self.labels, self.scores), start=1):
            out[f"top{i}_label"] = label
            out[f"top{i}_score"] = round(score, 6)
        return out


def read_image(path: Path, transform: Callable) -> torch.Tensor:
    with Image.open(path) as image:
        image.load()
        return transform(image.convert("RGB"))


def decode_batches(images: Sequence[Path], transform: Callable, batch_size: int,
                   on_skip: Callable[[Path, str], None]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """``(paths, batch)`` of the readable images, ``batch_size`` at a time; unreadable ones go to ``on_skip``."""
    paths: list[Path] = []
    tensors: list[torch.Tensor] = []
    for path in images:
        try:
            tensors.append(read_image(path, transform))
        except Exception as err:  # PIL raises many types for a truncated, foreign or missing file
            on_skip(path, f"{type(err).__name__}: {err}")
            continue
        paths.append(path)
        if len(paths) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if paths:
        yield paths, torch.stack(tensors)


class Predictor:
    """Top-k predictions of one or several loaded task models (``dtl.load_trained``) for image batches."""

    def __init__(self, models: Sequence[nn.Module], top_k: int = 5):
        infos = [model.trained for model in models]
        tasks = [info.task for info in infos]
        if len(set(tasks)) != len(tasks):
            raise PredictError(f"each --model must be another task (got {', '.join(tasks)})")
        if len({info.input_format for info in infos}) > 1:
            raise PredictError("the models read their images differently (input size or normalisation): predict "
                               "them in separate runs")
        self.infos = {info.task: info for info in infos}
        self.transform = infos[0].transform()
        self.device = next(models[0].parameters()).device
        self.precision = infos[0].precision
        self.model = MultiTaskModel({info.task: model for info, model in zip(infos, models)}).eval()
        self.top_k = top_k

    def predict(self, paths: list[Path], batch: torch.Tensor) -> list[Prediction]:
        with torch.no_grad(), autocast(self.device, self.precision):
            logits = self.model(batch.to(self.device))
        top = {}
        for task, task_logits in logits.items():
            probabilities = task_logits.float().softmax(-1).cpu()
            top[task] = probabilities.topk(min(self.top_k, self.infos[task].num_classes), dim=-1)
        out = []
        for i, path in enumerate(paths):
            for task, (scores, labels) in top.items():
                row_labels = labels[i].tolist()
                names = self.infos[task].class_names
                out.append(Prediction(path, task, row_labels, scores[i].tolist(), [names[j] for j in row_labels]))
        return out


def write_predictions(rows: list[dict], path: Path) -> None:
    if path.suffix.lower() == ".json":
        write_json(path, rows)
        return
    buffer = io.StringIO()
    fields = list(rows[0]) if rows else ["path", "task", "label", "name", "score"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def is_segmentation(model: nn.Module) -> bool:
    return model.trained.config.protocol.segments


def segment(model: nn.Module, image) -> "np.ndarray":
    """The label map (uint8, the image's own size) a loaded segmentation model predicts for a PIL ``image``: read
    as its evaluation read images (the shorter side resized to the training crop), through a sliding window, the
    logits resized back to the image."""
    info = model.trained
    device = next(model.parameters()).device
    tensor = info.transform()(image.convert("RGB"))
    with torch.no_grad(), autocast(device, info.precision):
        logits = sliding_window(model, tensor[None].to(device), info.image_size)
    return resized_logits(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu().numpy()


def mask_image(labels: "np.ndarray"):
    """A label map as a palette PNG image: the pixel values are the class indices, the palette shows them."""
    image = Image.fromarray(labels, mode="P")
    image.putpalette(label_palette().reshape(-1).tolist())
    return image


def class_fractions(labels: "np.ndarray", names: Sequence[str]) -> dict[str, float]:
    """The share of the pixels predicted as each class, by class name."""
    counts = np.bincount(labels.reshape(-1), minlength=len(names))[:len(names)]
    return {name: round(float(count) / labels.size, 6) for name, count in zip(names, counts)}


def predict_masks(model: nn.Module, images: Sequence[Path], output: Path, on_skip: Callable[[Path, str], None],
                  on_done: Callable[[], None]) -> int:
    """Write a mask per readable image of ``images`` into ``output`` and ``fractions.csv`` beside them; returns how
    many were predicted."""
    output.mkdir(parents=True, exist_ok=True)
    names = model.trained.class_names
    rows, used = [], set()
    for path in images:
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.convert("RGB")
        except Exception as err:  # PIL raises many types for a truncated, foreign or missing file
            on_skip(path, f"{type(err).__name__}: {err}")
            continue
        labels = segment(model, image)
        name = f"{path.stem}.png"
        for counter in range(1, len(used) + 2):  # images of the same name from other folders get a suffix
            if name not in used:
                break
            name = f"{path.stem}-{counter}.png"
        used.add(name)
        with atomic_path(output / name) as tmp:
            mask_image(labels).save(tmp, format="PNG")
        rows.append({"path": str(path), "mask": name, **class_fractions(labels, names)})
        on_done()
    write_predictions(rows, output / "fractions.csv")
    return len(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dtl.predict", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or list files")
    parser.add_argument("--model", action="append", required=True, metavar="TRAINED",
                        help="a train stage's output folder (outputs/train/<task>), a trained .safetensors file or "
                             "a sweep trial's checkpoint folder; repeat for several tasks")
    parser.add_argument("--output", type=Path, required=True,
                        help="predictions file: .csv or .json; for a segmentation model, a folder for the masks")
    parser.add_argument("--top-k", type=int, default=5, help="top classes per image and task (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, auto (default: the device the model's settings name, usually auto)")
    parser.add_argument("--seed", type=int, default=None,
                        help="which seed's weights of a train folder (default: its first)")
    args = parser.parse_args(argv)
    if args.output.suffix and args.output.suffix.lower() not in (".csv", ".json"):
        parser.error(f"--output {args.output}: expected a .csv or .json file name (or, for a segmentation model, a "
                     "folder)")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = [load_trained(path, seed=args.seed, device=args.device) for path in args.model]
        dense = [model.trained.task for model in models if is_segmentation(model)]
        if dense and len(models) > 1:
            raise PredictError(f"segmentation models predict one per run (got {', '.join(dense)} among "
                               f"{len(models)} models)")
        if dense and args.output.suffix.lower() in (".csv", ".json"):
            raise PredictError(f"--output {args.output}: a segmentation model writes masks into a folder; give a "
                               "folder name")
        if not dense and args.output.suffix.lower() not in (".csv", ".json"):
            raise PredictError(f"--output {args.output}: expected a .csv or .json file name")
        predictor = None if dense else Predictor(models, top_k=args.top_k)
        images = find_images(args.paths)
    except (TrainedModelError, PredictError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not images:
        print(f"error: no images found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    skipped: list[Path] = []
    rows: list[dict] = []
    # A bar on a terminal only (disable=None), where a skipped image's line is written above it.
    few = len(images) < 2 * args.batch_size
    with tqdm(total=len(images), unit="img", desc="predict", disable=True if few else None,
              file=sys.stderr) as progress:

        def skip(path: Path, reason: str) -> None:
            skipped.append(path)
            progress.write(f"skipped {path}: {reason}", file=sys.stderr)
            progress.update(1)

        if dense:
            done = predict_masks(models[0], images, args.output, skip, lambda: progress.update(1))
        else:
            for paths, batch in decode_batches(images, predictor.transform, args.batch_size, skip):
                rows.extend(p.row() for p in predictor.predict(paths, batch))
                progress.update(len(paths))
    if dense:
        print(f"wrote {done} mask(s) of task {dense[0]} and fractions.csv to {args.output}"
              + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""), file=sys.stderr)
        return 1 if skipped else 0
    write_predictions(rows, args.output)
    done = len(images) - len(skipped)
    tasks = ", ".join(predictor.infos)
    print(f"wrote {args.output}: {done} image(s) x {len(predictor.infos)} task(s) ({tasks})"
          + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""), file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
