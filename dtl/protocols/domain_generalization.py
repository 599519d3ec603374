"""``domain_generalization``: train once on a source domain, then test it and every target domain.

``data.tasks`` is the one source, ``data.targets`` its target domains (same classes; a target may hold only
some of them), ``data.shots`` the one shot count of the source's training list. Each seed trains on
``train_meta.list.num_shot_<k>.seed_<s>``, scores the source's ``val_meta.list`` when it has one, then tests the
source's ``test_meta.list`` and every target's, each once: no target is ever used to choose anything. Targets
with a subset of the classes are also scored masked (the argmax over the classes they hold).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..validation import need
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
    task_row,
)
from .noah import TARGET_PREFIX, ListFileProtocol


@register_protocol
class DomainGeneralizationProtocol(ListFileProtocol):
    name = "domain_generalization"
    description = "domain generalisation: train on the source's k-shot list, test the source and every target"
    sources = ("domain_generalization",)
    selection = "domain_generalization"

    def check(self) -> None:
        data = self.config.data
        need(len(data.tasks) == 1, "data.tasks", "one task, the source domain (domain_generalization)", data.tasks)
        need(len(data.shots) == 1, "data.shots", "one shot count, the source's training list "
             "(domain_generalization), e.g. [16]", data.shots)
        need(bool(data.targets), "data.targets", "at least one target domain (domain_generalization)", data.targets)

    # --- data ----------------------------------------------------------------------------------------------
    def synthetic_suite(self, tasks: Sequence[str] | None = None) -> SyntheticSuite:
        # torch-free schema: runtime import
        from ..data.synthetic_domain_shift import DOMAINS, generate_domain_shift_suite

        names = [*(tasks or self.config.data.tasks), *self.config.data.targets]
        return SyntheticSuite(names, tuple(DOMAINS), generate_domain_shift_suite, "synthetic domains",
                              key="data.tasks / data.targets")

    def check_data(self, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
        from ..data.domain_generalization import check_domain_root  # torch-free schema: runtime import

        data = self.config.data
        source = list(tasks or data.tasks)[0]
        return check_domain_root(Path(data.root), source, data.targets, data.shots, self.config.evaluation.seeds,
                                 num_classes=data.num_classes.get(source), **options)

    def task_records(self, checked: dict[str, dict]) -> dict[str, dict]:
        source = self.config.data.tasks[0]
        return {source: self.list_record(source, checked["source"], checked["targets"])}

    # --- runs ----------------------------------------------------------------------------------------------
    def scored_splits(self, task: str) -> dict[str, str]:
        # A source without val_meta.list scores its test list after the last epoch instead (its final weights
        # are tested either way; sweeps need the list).
        if not self.split_list(task, "val").is_file():
            return {"test": "test"}
        return dict(self.scored)

    def reported_splits(self, task: str) -> dict[str, str]:
        reported = dict(self.reported)
        if "val" not in self.scored_splits(task):
            del reported["val"]
        reported.update({target: f"{TARGET_PREFIX}{target}" for target in self.targets()})
        return reported

    def targets(self) -> list[str]:
        return list(self.config.data.targets)

    def target_splits(self) -> set[str]:
        return {f"{TARGET_PREFIX}{target}" for target in self.targets()}

    # --- results -------------------------------------------------------------------------------------------
    def build_report(self, evaluated: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
        task = self.config.data.tasks[0]
        metrics, info = evaluated[task]
        source = {"name": task, "accuracy": metrics["test_accuracy"], "std": metrics.get("test_accuracy_std", 0.0),
                  "seeds": metrics.get("num_seeds", 1), "shots": info["per_seed"][0].get("shots"),
                  "num_classes": info.get("num_classes")}
        if "val_accuracy" in metrics:
            source["val_accuracy"] = metrics["val_accuracy"]
        entries = {}
        for target in self.targets():
            entry = {"accuracy": metrics[f"{target}_accuracy"], "std": metrics.get(f"{target}_accuracy_std", 0.0),
                     "classes": info.get("target_classes", {}).get(target)}
            if f"{target}_accuracy_masked" in metrics:
                entry.update(accuracy_masked=metrics[f"{target}_accuracy_masked"],
                             std_masked=metrics.get(f"{target}_accuracy_masked_std", 0.0))
            entries[target] = entry
        rows = [task_row(task, metrics, info)]
        return {"protocol": self.name,
                "domain_generalization": {"source": source, "targets": entries,
                                          "target_mean": statistics.fmean(e["accuracy"] for e in entries.values())},
                "data_source": self.config.data.source, **cost_summary(rows), "rows": rows}

    def report_outputs(self, report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
        public = {k: v for k, v in report.items() if k != "rows"}
        dg = report["domain_generalization"]
        summary = {"test_acc": rounded(dg["source"]["accuracy"]), "target_mean": rounded(dg["target_mean"]),
                   **{t: rounded(e["accuracy"]) for t, e in dg["targets"].items()}}
        costs = plot_costs(report["rows"][0])
        plot_rows = [{"task": dg["source"]["name"], "group": "source", "test_acc": summary["test_acc"], **costs}]
        plot_rows += [{"task": t, "group": "target", "test_acc": rounded(e["accuracy"]), **costs}
                      for t, e in dg["targets"].items()]
        return public, summary, plot_rows

    def report_metrics(self, report: dict[str, Any]) -> dict[str, float]:
        dg = report["domain_generalization"]
        return {"test_source": dg["source"]["accuracy"], "test_target_mean": dg["target_mean"],
                **{f"test_{t}": e["accuracy"] for t, e in dg["targets"].items()},
                **{f"test_{t}_masked": e["accuracy_masked"] for t, e in dg["targets"].items()
                   if "accuracy_masked" in e}}

    def report_line(self, report: dict[str, Any]) -> str:
        dg = report["domain_generalization"]
        return (f"source {100 * dg['source']['accuracy']:.1f} | "
                + ", ".join(f"{t} {100 * e['accuracy']:.1f}" for t, e in dg["targets"].items()))

    def report_markdown(self, report: dict[str, Any]) -> str:
        dg = report["domain_generalization"]
        src = dg["source"]
        lines = ["# DTL pipeline report: domain generalisation", "",
                 f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; trained once per seed "
                 f"on the source's {src['shots']}-shot list, then tested on the source and every target (none is "
                 f"used to choose anything). Accuracy in %, mean ± std over {src['seeds']} seed(s). Masked: the "
                 "argmax over the classes the target holds (for targets with a subset of the classes).", "",
                 "| domain | role | classes | accuracy | masked accuracy |", "|---|---|---:|---:|---:|",
                 f"| {src['name']} | source | {src['num_classes']} | {percent(src['accuracy'], src['std'])} | - |"]
        for target, entry in dg["targets"].items():
            masked = percent(entry["accuracy_masked"], entry["std_masked"]) if "accuracy_masked" in entry else "-"
            lines.append(f"| {target} | target | {entry['classes'] or '-'} | "
                         f"{percent(entry['accuracy'], entry['std'])} | {masked} |")
        lines.append(f"| **target mean** | | | **{percent(dg['target_mean'])}** | |")
        if "val_accuracy" in src:
            lines += ["", f"Source validation accuracy (val_meta.list): {percent(src['val_accuracy'])}."]
        row = report["rows"][0]
        lines += ["", f"Trainable parameters {row['trainable_params_excl_head']:,} ({row['trainable_params']:,} with "
                  f"the head); {memory_sentence(report)}.", "",
                  "![accuracy per domain](report.png)", ""]
        return "\n".join(lines)

    def report_plot(self, report: dict[str, Any], path: Path) -> None:
        dg = report["domain_generalization"]
        names = [dg["source"]["name"], *dg["targets"]]
        values = [dg["source"]] + list(dg["targets"].values())
        figure, axis = pyplot().subplots(figsize=(7, 4.5))
        x = list(range(len(names)))
        axis.bar([i - 0.2 for i in x], [100 * v["accuracy"] for v in values], width=0.4,
                 yerr=[100 * v["std"] for v in values], color=["tab:blue"] + ["tab:orange"] * len(dg["targets"]),
                 label="accuracy (all classes)")
        masked = [(i, v) for i, v in zip(x, values) if "accuracy_masked" in v]
        if masked:
            axis.bar([i + 0.2 for i, _ in masked], [100 * v["accuracy_masked"] for _, v in masked], width=0.4,
                     yerr=[100 * v["std_masked"] for _, v in masked], color="tab:green",
                     label="masked to the target's classes")
        axis.set_xticks(x, names, rotation=20, ha="right")
        finish_accuracy_figure(figure, axis, f"{', '.join(report['methods'])}: source {names[0]} and its target "
                               "domains", path)
