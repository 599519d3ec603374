"""The VTAB-1K folder layout that the ``final`` and ``val`` protocols read, and their report.

A task folder holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt`` (``<image> <label>``
per line) and the images; every split is read with the fixed transform of the official scripts (resize to the
input size, no augmentation). The report gives per-task accuracy and the Natural / Specialized / Structured
means, their mean (the "group mean" papers quote) and the plain mean over tasks.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import (
    MEMORY_LABELS,
    Protocol,
    SyntheticSuite,
    cost_summary,
    fingerprint,
    get_protocol,
    measured_memory,
    memory_sentence,
    percent,
    plot_costs,
    pyplot,
    rounded,
    save_figure,
    task_row,
)

LIST_SPLITS = ("train800", "val200", "train800val200", "test")
GROUP_COLOURS = {"Natural": "tab:green", "Specialized": "tab:orange", "Structured": "tab:blue"}
SAVED = "saved_for_backward_mb"


class VtabProtocol(Protocol):
    sources = ("vtab1k",)

    # --- data ----------------------------------------------------------------------------------------------
    def split_list(self, task: str, split: str, shots: int | None = None, seed: int | None = None) -> Path:
        return Path(self.config.data.root) / task / f"{split}.txt"

    def num_classes(self, task: str) -> int:
        from ..data.vtab import _task_dir, resolve_num_classes  # torch-free schema: runtime import

        data = self.config.data
        return resolve_num_classes(_task_dir(data.root, task), task, data.num_classes.get(task))

    def open_split(self, task: str, split: str, *, num_classes: int, img_size: int, shots: int | None = None,
                   seed: int | None = None, model=None):
        from ..data import VTabDataset  # torch-free schema: runtime import

        data = self.config.data
        return VTabDataset(Path(data.root), task, split, img_size=img_size, num_classes=num_classes,
                           preload=data.preload)

    def transform(self, image_size: int, normalisation: dict):
        from ..data.vtab import vtab_transform  # torch-free schema: runtime import

        return vtab_transform(image_size)

    def synthetic_suite(self, tasks: Sequence[str] | None = None) -> SyntheticSuite:
        from ..data import SYNTHETIC_TASKS, generate_synthetic_suite  # torch-free schema: runtime import

        return SyntheticSuite(list(tasks or self.config.data.tasks), tuple(SYNTHETIC_TASKS), generate_synthetic_suite,
                              "synthetic tasks")

    def check_data(self, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
        from ..data import check_vtab_root  # torch-free schema: runtime import

        data = self.config.data
        return check_vtab_root(Path(data.root), list(tasks or data.tasks), num_classes=data.num_classes, **options)

    def task_records(self, checked: dict[str, dict]) -> dict[str, dict]:
        from ..data.vtab import task_group  # torch-free schema: runtime import

        data = self.config.data
        root = Path(data.root)
        records = {}
        for task in data.tasks:
            folder, counts = root / task, checked[task]
            records[task] = {
                "task": task, "source": data.source, "root": data.root, "group": task_group(task, folder),
                "num_classes": counts["num_classes"], "classes_seen": counts["classes_seen"],
                "images": {split: counts[split] for split in LIST_SPLITS},
                "train_images": counts[self.train],  # the split this protocol trains on
                "fingerprint": fingerprint(root, [folder / f"{split}.txt" for split in LIST_SPLITS]
                                           + [folder / "meta.json"]),
            }
        return records

    def manifest_totals(self, records: dict[str, dict]) -> dict[str, Any]:
        return {"total_images": {split: sum(r["images"][split] for r in records.values()) for split in LIST_SPLITS}}

    # --- runs ----------------------------------------------------------------------------------------------
    def selection_objective(self) -> str:
        selection = get_protocol(self.selection)
        return f"{selection.scored['val']} accuracy after training on {selection.train}"

    # --- results -------------------------------------------------------------------------------------------
    def build_report(self, evaluated: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
        from ..data.vtab import group_summary  # torch-free schema: runtime import

        rows = [{**task_row(task, metrics, info), "group": info.get("group", "Other"),
                 "test_accuracy": metrics["test_accuracy"], "test_accuracy_std": metrics.get("test_accuracy_std", 0.0),
                 "val_accuracy": metrics.get("val_accuracy"), "num_seeds": metrics.get("num_seeds", 1)}
                for task, (metrics, info) in evaluated.items()]
        report: dict[str, Any] = {"protocol": self.name, "test": group_summary(rows, "test_accuracy")}
        if any(row.get("val_accuracy") is not None for row in rows):
            report["val"] = group_summary(rows, "val_accuracy")
        return {**report, **cost_summary(rows), "data_source": self.config.data.source, "rows": rows}

    def report_outputs(self, report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
        public: dict[str, Any] = {"protocol": report["protocol"]}
        for split in ("test", "val"):
            if split in report:
                part = report[split]
                public[split] = {**part["groups"], "group_mean": part["group_mean"], "task_mean": part["task_mean"],
                                 "num_tasks": part["num_tasks"]}
        public.update({key: value for key, value in report.items() if key.startswith(("mean_", "max_"))})
        test = report["test"]
        # the group mean first (test_acc, the column it shares with the per-task files), then each group's mean
        summary = {"test_acc": rounded(test["group_mean"]),
                   **{group.lower(): rounded(mean) for group, mean in test["groups"].items()},
                   "task_mean": rounded(test["task_mean"])}
        plot_rows = [{"task": r["task"], "group": r["group"], "test_acc": rounded(r["test_accuracy"]),
                      **plot_costs(r)} for r in report["rows"]]
        return public, summary, plot_rows

    def report_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        test = report["test"]
        return {**{f"test_{group}": mean for group, mean in test["groups"].items()},
                "test_group_mean": test["group_mean"], "test_task_mean": test["task_mean"]}

    def report_line(self, report: dict[str, Any]) -> str:
        test = report["test"]
        return (", ".join(f"{g} {100 * m:.1f}" for g, m in test["groups"].items())
                + f" | group mean {100 * test['group_mean']:.1f} | mean over {test['num_tasks']} tasks "
                  f"{100 * test['task_mean']:.1f}")

    def report_markdown(self, report: dict[str, Any]) -> str:
        rows = report["rows"]
        has_val = "val" in report
        memory = measured_memory(rows)
        saved = all("saved_for_backward_mb" in r for r in rows)
        seeds = max(r["num_seeds"] for r in rows)
        lines = [
            "# DTL pipeline report",
            "",
            f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; "
            f"accuracy in %, mean{' ± std' if seeds > 1 else ''} over {seeds} seed(s). Trainable parameters exclude "
            "the classifier head (as the paper counts them); the total is in brackets.",
            "",
            f"| task | group | test acc |{' val acc |' if has_val else ''} trainable params |"
            f"{f' {MEMORY_LABELS[SAVED]} |' if saved else ''} {MEMORY_LABELS[memory]} | images/s |",
            f"|---|---|---:|{'---:|' if has_val else ''}---:|{'---:|' if saved else ''}---:|---:|",
        ]
        for r in rows:
            val = f" {percent(r['val_accuracy'])} |" if has_val else ""
            kept = f" {r[SAVED]:.1f} |" if saved else ""
            lines.append(f"| {r['task']} | {r['group']} | {percent(r['test_accuracy'], r['test_accuracy_std'])} |"
                         f"{val} {r['trainable_params_excl_head']:,} ({r['trainable_params']:,}) |{kept} "
                         f"{r[memory]:.0f} | {r['images_per_s']:.0f} |")
        lines += ["", "| summary | test acc |" + (" val acc |" if has_val else ""),
                  "|---|---:|" + ("---:|" if has_val else "")]
        test = report["test"]
        val = report.get("val", {})
        for group, mean in test["groups"].items():
            extra = f" {percent(val['groups'].get(group))} |" if has_val else ""
            lines.append(f"| {group} mean ({test['tasks_per_group'][group]} tasks) | {percent(mean)} |{extra}")
        extra = f" {percent(val.get('group_mean'))} |" if has_val else ""
        lines.append(f"| **group mean** (mean of the group means) | **{percent(test['group_mean'])}** |{extra}")
        extra = f" {percent(val.get('task_mean'))} |" if has_val else ""
        lines.append(f"| mean over {test['num_tasks']} tasks | {percent(test['task_mean'])} |{extra}")
        lines += [
            "",
            f"Mean trainable parameters per task: {report['mean_trainable_params_excl_head']:,.0f} "
            f"({report['mean_trainable_params']:,.0f} with the head); {memory_sentence(report)}; mean training "
            f"throughput {report['mean_images_per_s']:.0f} images/s.",
            "",
            "![accuracy per task and accuracy vs cost](report.png)",
            "",
        ]
        return "\n".join(lines)

    def report_plot(self, report: dict[str, Any], path: Path) -> None:
        rows = report["rows"]
        colours = [GROUP_COLOURS.get(r["group"], "tab:gray") for r in rows]
        accuracy = [100 * r["test_accuracy"] for r in rows]
        figure, axes = pyplot().subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.4, 1, 1]})
        bars = axes[0]
        bars.bar(range(len(rows)), accuracy, yerr=[100 * r["test_accuracy_std"] for r in rows], color=colours)
        bars.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=45, ha="right")
        bars.set_ylabel("test accuracy (%)")
        bars.set_ylim(0, 120)  # room above 100 % for the legend
        bars.set_yticks(range(0, 101, 20))
        group_mean = report["test"]["group_mean"]
        bars.axhline(100 * group_mean, color="black", linestyle="--", linewidth=1,
                     label=f"group mean {100 * group_mean:.1f}")
        for group, mean in report["test"]["groups"].items():
            bars.axhline(100 * mean, color=GROUP_COLOURS.get(group, "tab:gray"), linestyle=":", linewidth=1,
                         label=f"{group} {100 * mean:.1f}")
        bars.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
        bars.set_title("accuracy per task")
        memory = measured_memory(rows)
        for axis, key, label in ((axes[1], "trainable_params", "trainable parameters (incl. head)"),
                                 (axes[2], memory, MEMORY_LABELS[memory])):
            axis.scatter([r[key] for r in rows], accuracy, c=colours)
            for r, acc in zip(rows, accuracy):
                axis.annotate(r["task"], (r[key], acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel(label)
            axis.set_ylabel("test accuracy (%)")
            axis.set_title(f"accuracy vs {label.split(' (')[0]}")
            axis.set_xlim(0, 1.15 * max(r[key] for r in rows))  # from zero: the cost's scale, not its spread
            axis.set_ylim(0, 100)
            axis.ticklabel_format(axis="x", style="plain")
        figure.suptitle(f"{', '.join(report['methods'])} on {report['data_source']}: group mean "
                        f"{100 * group_mean:.1f}%, mean over {report['test']['num_tasks']} tasks "
                        f"{100 * report['test']['task_mean']:.1f}%")
        figure.tight_layout()
        save_figure(figure, path)
