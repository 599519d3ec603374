"""``segmentation`` and ``segmentation_val``: semantic segmentation on folders in ADE20K's layout.

``segmentation`` trains on every ``training`` image (augmented: random resize 0.5-2.0, crop, flip) and scores
``validation`` once, after the last epoch; it plays the part a test split plays elsewhere, so its scores are
``test_*``. ``segmentation_val`` is the rule a sweep's trials follow: train on ``training`` less a held-out tenth
and score that tenth (``val``), so ``validation`` never chooses anything. The folder layout, the checks and the
splits are ``dtl.data.segmentation``'s; the scores (mIoU, pixel accuracy, per-class IoU) ``dtl.objectives``'.
The report gives mIoU per task, the per-class IoU, and a figure with a few validation images of each task: the
input, its labels and the trained model's prediction.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import (
    MEMORY_LABELS,
    Protocol,
    SyntheticSuite,
    cost_summary,
    dvc_costs,
    measured_memory,
    memory_sentence,
    percent,
    plot_costs,
    pyplot,
    register_protocol,
    rounded,
    save_figure,
    seed_means,
    sentence_case,
    task_row,
)

GROUP = "Segmentation"
SAMPLES = 3  # validation images per task in the report's figure


@register_protocol
class SegmentationProtocol(Protocol):
    name = "segmentation"
    description = "semantic segmentation: train on training (augmented), score mIoU on validation once"
    sources = ("segmentation",)
    objective = "segmentation"
    train = "training"
    scored = {"test": "validation"}
    reported = {"test": "validation"}
    selection = "segmentation_val"

    # --- data ----------------------------------------------------------------------------------------------
    def split_list(self, task: str, split: str, shots: int | None = None, seed: int | None = None) -> Path:
        """The folder of ``split``'s images (``train`` and ``holdout`` are parts of ``training``)."""
        folder = "validation" if split == "validation" else "training"
        return Path(self.config.data.root) / task / "images" / folder

    def meta(self, task: str):
        from ..data.segmentation import read_meta  # torch-free schema: runtime import

        data = self.config.data
        return read_meta(Path(data.root) / task, data.num_classes.get(task))

    def num_classes(self, task: str) -> int:
        return self.meta(task).num_classes

    def class_names(self, task: str) -> tuple[str, ...]:
        return self.meta(task).class_names()

    def open_split(self, task: str, split: str, *, num_classes: int, img_size: int, shots: int | None = None,
                   seed: int | None = None, model=None):
        from ..data.segmentation import SegmentationDataset  # torch-free schema: runtime import

        cfg = getattr(getattr(getattr(model, "family", None), "backbone", None), "pretrained_cfg", None) or {}
        return SegmentationDataset(self.config.data.root, task, split, img_size, augment=split in ("training", "train"),
                                   num_classes=num_classes, mean=cfg.get("mean", (0.5,) * 3),
                                   std=cfg.get("std", (0.5,) * 3))

    def transform(self, image_size: int, normalisation: dict):
        from torchvision.transforms import v2  # torch-free schema: runtime import

        from ..data.segmentation import evaluation_transform  # torch-free schema: runtime import

        return v2.Compose([v2.ToImage(), evaluation_transform(image_size, normalisation.get("mean", (0.5,) * 3),
                                                                  normalisation.get("std", (0.5,) * 3))])

    def synthetic_suite(self, tasks: Sequence[str] | None = None) -> SyntheticSuite:
        # torch-free schema: runtime import
        from ..data.synthetic_segmentation import SYNTHETIC_SEGMENTATION, generate_segmentation_suite

        return SyntheticSuite(list(tasks or self.config.data.tasks), tuple(SYNTHETIC_SEGMENTATION),
                              generate_segmentation_suite, "synthetic segmentation tasks")

    def check_data(self, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
        from ..data.segmentation import check_segmentation_root  # torch-free schema: runtime import

        data = self.config.data
        return check_segmentation_root(Path(data.root), list(tasks or data.tasks), num_classes=data.num_classes,
                                       **options)

    def task_records(self, checked: dict[str, dict]) -> dict[str, dict]:
        from ..data.segmentation import folder_fingerprint  # torch-free schema: runtime import

        data = self.config.data
        root = Path(data.root)
        return {task: {"task": task, "source": data.source, "root": data.root, "group": GROUP, **checked[task],
                       "train_images": checked[task]["images"][self.train],
                       "fingerprint": folder_fingerprint(root, root / task)} for task in data.tasks}

    # --- runs ----------------------------------------------------------------------------------------------
    def training_split_words(self) -> str:
        return f"{self.train} images"

    def selection_objective(self) -> str:
        return "mIoU on the held-out tenth of training after training on the rest"

    # --- results -------------------------------------------------------------------------------------------
    def aggregate(self, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        numbers = [{k: v for k, v in run.items() if not isinstance(v, list)} for run in per_seed]
        return {**seed_means(numbers), "num_seeds": len(per_seed)}

    def dvc_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        short = {"test_miou": round(metrics["test_miou"], 4), "test_acc": round(metrics["test_accuracy"], 4)}
        if "val_miou" in metrics:
            short["val_miou"] = round(metrics["val_miou"], 4)
        return {**short, **dvc_costs(metrics)}

    def build_report(self, evaluated: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
        rows = []
        for task, (metrics, info) in evaluated.items():
            class_iou = _mean_class_iou([run["test_class_iou"] for run in info["per_seed"] if "test_class_iou" in run])
            rows.append({**task_row(task, metrics, info), "group": GROUP, "test_miou": metrics["test_miou"],
                         "test_miou_std": metrics.get("test_miou_std", 0.0), "test_accuracy": metrics["test_accuracy"],
                         "num_seeds": metrics.get("num_seeds", 1), "class_iou": class_iou,
                         "num_classes": info.get("num_classes") or self.num_classes(task),
                         "classes": list(self.class_names(task)) if len(class_iou) else []})
        return {"protocol": self.name, "mean_miou": statistics.fmean(r["test_miou"] for r in rows),
                "mean_pixel_accuracy": statistics.fmean(r["test_accuracy"] for r in rows),
                "data_source": self.config.data.source, **cost_summary(rows), "rows": rows}

    def report_samples(self, report: dict[str, Any], segmenter: Callable[[str], Callable]) -> None:
        """A few validation images per task with their labels and the trained model's prediction (its label map
        for a PIL image, ``dtl.predict.segment``), for the figure (``report["samples"]``: task -> a list of
        (image, labels, prediction) arrays; unlabelled pixels shown as such in the prediction too)."""
        import numpy as np  # torch-free schema: reading a params file loads no numpy either

        from ..data.segmentation import SegmentationDataset  # torch-free schema: runtime import
        from ..objectives import IGNORE_INDEX  # torch-free schema: runtime import

        samples = {}
        for row in report["rows"]:
            task = row["task"]
            predict = segmenter(task)
            data = SegmentationDataset(self.config.data.root, task, "validation", self.config.data.image_size or 32,
                                       num_classes=row["num_classes"])
            picked = []
            for index in range(min(SAMPLES, len(data))):
                rgb, labels = data.read(index)
                prediction = np.array(predict(rgb), dtype=np.uint8)
                prediction[labels == IGNORE_INDEX] = IGNORE_INDEX
                picked.append((np.asarray(rgb), labels, prediction))
            samples[task] = picked
        report["samples"] = samples

    def report_outputs(self, report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
        public = {k: v for k, v in report.items() if k not in ("rows", "samples")}
        public["tasks"] = {r["task"]: {"miou": r["test_miou"], "miou_std": r["test_miou_std"],
                                       "pixel_accuracy": r["test_accuracy"],
                                       "class_iou": dict(zip(r["classes"], r["class_iou"]))} for r in report["rows"]}
        summary = {"test_miou": rounded(report["mean_miou"]), "test_acc": rounded(report["mean_pixel_accuracy"]),
                   **{r["task"]: rounded(r["test_miou"]) for r in report["rows"]}}
        plot_rows = [{"task": r["task"], "group": GROUP, "test_acc": rounded(r["test_accuracy"]),
                      "test_miou": rounded(r["test_miou"]), **plot_costs(r)} for r in report["rows"]]
        return public, summary, plot_rows

    def report_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        return {"test_mean_miou": report["mean_miou"], "test_mean_pixel_accuracy": report["mean_pixel_accuracy"],
                **{f"test_miou_{r['task']}": r["test_miou"] for r in report["rows"]}}

    def report_line(self, report: dict[str, Any]) -> str:
        return (", ".join(f"{r['task']} {100 * r['test_miou']:.1f}" for r in report["rows"])
                + f" | mean mIoU {100 * report['mean_miou']:.1f}")

    def report_markdown(self, report: dict[str, Any]) -> str:
        rows = report["rows"]
        memory = measured_memory(rows)
        saved = all("saved_for_backward_mb" in r for r in rows)
        seeds = max(r["num_seeds"] for r in rows)
        lines = ["# DTL pipeline report: semantic segmentation", "",
                 f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; mIoU and pixel "
                 f"accuracy on each task's validation images in %, mean{' ± std' if seeds > 1 else ''} over {seeds} "
                 "seed(s). mIoU: each class's intersection over union, summed over the whole split, averaged over "
                 "the classes present. Trainable parameters exclude the decode head; the total is in brackets.", "",
                 f"| task | mIoU | pixel accuracy | trainable params |"
                 f"{f' {MEMORY_LABELS[SAVED]} |' if saved else ''} {MEMORY_LABELS[memory]} | images/s |",
                 f"|---|---:|---:|---:|{'---:|' if saved else ''}---:|---:|"]
        for r in rows:
            kept = f" {r[SAVED]:.1f} |" if saved else ""
            lines.append(f"| {r['task']} | {percent(r['test_miou'], r['test_miou_std'])} | {percent(r['test_accuracy'])}"
                         f" | {r['trainable_params_excl_head']:,} ({r['trainable_params']:,}) |{kept} {r[memory]:.0f} |"
                         f" {r['images_per_s']:.0f} |")
        lines.append(f"| **mean** | **{percent(report['mean_miou'])}** | {percent(report['mean_pixel_accuracy'])} |"
                     " | " + ("| " if saved else "") + "| |")
        for r in rows:
            if not r["class_iou"]:
                continue
            lines += ["", f"IoU per class, {r['task']} (%; - where the class occurs in neither labels nor predictions):",
                      "", "| class | IoU |", "|---|---:|"]
            lines += [f"| {name} | {percent(value)} |" for name, value in zip(r["classes"], r["class_iou"])]
        lines += ["", f"{sentence_case(memory_sentence(report))}; mean training throughput "
                  f"{report['mean_images_per_s']:.0f} images/s.", "",
                  "![mIoU per task and validation images: input, labels, prediction](report.png)", ""]
        return "\n".join(lines)

    def report_plot(self, report: dict[str, Any], path: Path) -> None:
        import numpy as np  # torch-free schema: reading a params file loads no numpy either

        from ..data.segmentation import label_palette  # torch-free schema: runtime import

        rows, samples = report["rows"], report.get("samples", {})
        palette = label_palette()
        columns = max(3, 3 * min(SAMPLES, max((len(s) for s in samples.values()), default=0)))
        figure = pyplot().figure(figsize=(1.6 * columns, 2.2 + 1.8 * len(samples)))
        grid = figure.add_gridspec(1 + len(samples), columns, height_ratios=[2.2] + [1.6] * len(samples))
        bars = figure.add_subplot(grid[0, :])
        bars.bar(range(len(rows)), [100 * r["test_miou"] for r in rows], width=0.5,
                 yerr=[100 * r["test_miou_std"] for r in rows], color="tab:blue", label="mIoU")
        bars.scatter(range(len(rows)), [100 * r["test_accuracy"] for r in rows], color="black", marker="_", s=300,
                     zorder=3, label="pixel accuracy")
        bars.set_xticks(range(len(rows)), [r["task"] for r in rows])
        bars.set_ylim(0, 100)
        bars.set_ylabel("%")
        bars.legend(fontsize=8)
        bars.set_title(f"{', '.join(report['methods'])} on {report['data_source']}: mean mIoU "
                       f"{100 * report['mean_miou']:.1f}%")
        for line, (task, picked) in enumerate(samples.items(), start=1):
            for i, (image, labels, prediction) in enumerate(picked):
                for j, (shown, title) in enumerate(((image, "input"), (labels, "labels"), (prediction, "prediction"))):
                    axis = figure.add_subplot(grid[line, 3 * i + j])
                    axis.imshow(shown if shown.ndim == 3 else palette[np.asarray(shown)], interpolation="nearest")
                    axis.set_xticks([])
                    axis.set_yticks([])
                    axis.set_title(f"{task}: {title}" if j == 0 and i == 0 else title, fontsize=8)
        figure.tight_layout()
        save_figure(figure, path)


@register_protocol
class SegmentationValProtocol(SegmentationProtocol):
    name = "segmentation_val"
    description = ("semantic segmentation, for choosing settings: train on training less a held-out tenth, score "
                   "that tenth (validation reported for reference)")
    train = "train"
    scored = {"val": "holdout"}
    reported = {"val": "holdout", "test": "validation"}


SAVED = "saved_for_backward_mb"


def _mean_class_iou(runs: list[list[float | None]]) -> list[float | None]:
    """Per class, the mean IoU over the runs where it occurred (None where it never did)."""
    if not runs:
        return []
    means = []
    for values in zip(*runs):
        present = [v for v in values if v is not None and not math.isnan(v)]
        means.append(statistics.fmean(present) if present else None)
    return means

