"""``few_shot``: few-shot fine-grained classification (NOAH's recipe).

One run per shot count k of ``data.shots`` and seed s of ``evaluation.seeds``: train on
``train_meta.list.num_shot_<k>.seed_<s>``, score ``val_meta.list`` every ``training.eval_every`` epochs, keep the
weights best on it and test those on ``test_meta.list``. The report gives accuracy per data set and shot count
(mean, std and seeds), the mean over data sets per shot count, and an accuracy-vs-shots figure.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import (
    SyntheticSuite,
    cost_summary,
    finish_accuracy_figure,
    memory_sentence,
    percent,
    plot_costs,
    pyplot,
    register_protocol,
    rounded,
    sentence_case,
    task_row,
)
from .noah import ListFileProtocol


@register_protocol
class FewShotProtocol(ListFileProtocol):
    name = "few_shot"
    description = "few-shot: per shot count and seed, train on the k-shot list, test the weights best on val"
    sources = ("few_shot",)
    keep_best = "val"
    selection = "few_shot"

    # --- data ----------------------------------------------------------------------------------------------
    def synthetic_suite(self, tasks: Sequence[str] | None = None) -> SyntheticSuite:
        # torch-free schema: runtime import
        from ..data.synthetic_few_shot import SYNTHETIC_FEW_SHOT, generate_few_shot_suite

        return SyntheticSuite(list(tasks or self.config.data.tasks), tuple(SYNTHETIC_FEW_SHOT),
                              generate_few_shot_suite, "synthetic few-shot data sets")

    def check_data(self, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
        from ..data.few_shot import check_few_shot_root  # torch-free schema: runtime import

        data = self.config.data
        return check_few_shot_root(Path(data.root), list(tasks or data.tasks), data.shots, self.config.evaluation.seeds,
                                   num_classes=data.num_classes, **options)

    def task_records(self, checked: dict[str, dict]) -> dict[str, dict]:
        return {task: self.list_record(task, checked[task]) for task in self.config.data.tasks}

    # --- results -------------------------------------------------------------------------------------------
    def build_report(self, evaluated: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
        few_shot, rows = {}, []
        for task, (metrics, info) in evaluated.items():
            by_shots = metrics.get("shots") or {}
            if not by_shots:  # one shot count: the task's own figures
                by_shots = {str(info["per_seed"][0]["shots"]): metrics}
            few_shot[task] = {shots: {"mean": part["test_accuracy"], "std": part.get("test_accuracy_std", 0.0),
                                      "seeds": part.get("num_seeds", 1),
                                      **({"val_mean": part["val_accuracy"]} if "val_accuracy" in part else {})}
                              for shots, part in sorted(by_shots.items(), key=lambda item: int(item[0]))}
            rows.append(task_row(task, metrics, info))
        counts = sorted({int(k) for entry in few_shot.values() for k in entry})
        by_shots = {str(k): statistics.fmean(entry[str(k)]["mean"] for entry in few_shot.values() if str(k) in entry)
                    for k in counts}
        return {"protocol": self.name, "few_shot": few_shot, "mean_by_shots": by_shots,
                "mean": statistics.fmean(by_shots.values()), "data_source": self.config.data.source,
                **cost_summary(rows), "rows": rows}

    def report_outputs(self, report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
        public = {k: v for k, v in report.items() if k != "rows"}
        costs = {r["task"]: r for r in report["rows"]}
        summary = {"test_acc": rounded(report["mean"]),
                   **{f"{k}shot": rounded(v) for k, v in report["mean_by_shots"].items()}}
        plot_rows = [{"task": f"{task} {k}-shot", "group": task, "test_acc": rounded(p["mean"]),
                      **plot_costs(costs[task])}
                     for task, entry in report["few_shot"].items() for k, p in entry.items()]
        return public, summary, plot_rows

    def report_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        return {**{f"test_{k}shot_mean": v for k, v in report["mean_by_shots"].items()}, "test_mean": report["mean"]}

    def report_line(self, report: dict[str, Any]) -> str:
        return ", ".join(f"{k}-shot {100 * v:.1f}" for k, v in report["mean_by_shots"].items())

    def report_markdown(self, report: dict[str, Any]) -> str:
        counts = list(report["mean_by_shots"])
        seeds = max(p["seeds"] for entry in report["few_shot"].values() for p in entry.values())
        rows = {r["task"]: r for r in report["rows"]}
        lines = ["# DTL pipeline report: few-shot classification", "",
                 f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; test accuracy in %, "
                 f"mean ± std over {seeds} seed(s) (each seed: its own training list, weights best on "
                 "val_meta.list). Trainable parameters exclude the classifier head.", "",
                 "| data set | " + " | ".join(f"{k}-shot" for k in counts) + " | trainable params |",
                 "|---|" + "---:|" * len(counts) + "---:|"]
        for task, entry in report["few_shot"].items():
            cells = [percent(entry[k]["mean"], entry[k]["std"]) if k in entry else "-" for k in counts]
            lines.append(f"| {task} | " + " | ".join(cells) + f" | {rows[task]['trainable_params_excl_head']:,} |")
        lines.append("| **mean** | " + " | ".join(f"**{percent(report['mean_by_shots'][k])}**" for k in counts)
                     + " | |")
        lines += ["", f"{sentence_case(memory_sentence(report))}; mean training throughput "
                  f"{report['mean_images_per_s']:.0f} images/s.", "",
                  "![test accuracy vs shots](report.png)", ""]
        return "\n".join(lines)

    def report_plot(self, report: dict[str, Any], path: Path) -> None:
        figure, axis = pyplot().subplots(figsize=(7, 4.5))
        for task, entry in report["few_shot"].items():
            shots = [int(k) for k in entry]
            axis.errorbar(shots, [100 * p["mean"] for p in entry.values()],
                          yerr=[100 * p["std"] for p in entry.values()], marker="o", capsize=3, label=task)
        counts = [int(k) for k in report["mean_by_shots"]]
        axis.plot(counts, [100 * v for v in report["mean_by_shots"].values()], color="black", linestyle="--",
                  marker="s", label="mean")
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(k) for k in counts])
        axis.set_xlabel("training images per class (shots)")
        finish_accuracy_figure(figure, axis, f"{', '.join(report['methods'])} on {report['data_source']}: "
                               "accuracy vs shots", path)
