"""Stage ``report``: one table over the tasks, VTAB group means, a plot, and an MLflow record.

Reads ``outputs/evaluate/<task>.json`` for every task of ``data.tasks`` and writes:

- ``outputs/report.md``: per-task test accuracy (mean +- std over seeds), trainable parameters, peak memory,
  images/s; then the Natural / Specialized / Structured means, their mean (the "group mean" papers quote) and
  the plain mean over tasks (the 19-task mean on VTAB-1K);
- ``outputs/report.json``: the same numbers;
- ``metrics/summary.json``: the group means, the group mean and the task mean (DVC metrics, git-tracked);
- ``plots/tasks.json``: one row per task (``dvc plots``: accuracy per task, accuracy vs trainable parameters /
  memory; ``dvc plots diff`` compares experiments side by side; git-tracked);
- ``outputs/report.png``: the same plots as a static image.

Few-shot and domain-generalisation runs (``evaluation.protocol``) write the same files with their own content:
accuracy per data set and shot count (mean, std and seeds; a table, an accuracy-vs-shots plot, one
``plots/tasks.json`` row per data set and shot count), or the source's and every target's accuracy (masked too
for targets holding a subset of the classes; one row per domain). ``outputs/report.json`` says which in
``"protocol"`` and holds the numbers under ``"few_shot"`` or ``"domain_generalization"``.

MLflow: a ``report`` run holds the aggregate metrics and these files; the report is also attached to every
task run it summarises (artifact folder ``report/``).

Usage: ``python -m pipeline.report [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dtl.config import load_config
from dtl.data.vtab import group_summary as summarise
from dtl.io import atomic_path, write_json, write_text

from .params import load_pipeline_settings
from .stage import OutputPaths, read_json, run_stage, stage_arguments

GROUP_COLOURS = {"Natural": "tab:green", "Specialized": "tab:orange", "Structured": "tab:blue"}


def task_rows(tasks: list[str], outputs: Path) -> list[dict[str, Any]]:
    paths = OutputPaths(outputs)
    rows = []
    for task in tasks:
        metrics = read_json(paths.metrics(task), f"written by evaluate@{task}")
        info = read_json(paths.details(task), f"written by evaluate@{task}")
        rows.append({
            "task": task,
            "group": info.get("group", "Other"),
            "method": info.get("method"),
            "test_accuracy": metrics["test_accuracy"],
            "test_accuracy_std": metrics.get("test_accuracy_std", 0.0),
            "val_accuracy": metrics.get("val_accuracy"),
            "trainable_params": metrics["trainable_params"],
            "trainable_params_excl_head": metrics["trainable_params_excl_head"],
            "peak_memory_mb": metrics["peak_memory_mb"],
            "memory_kind": info.get("memory_kind"),
            "images_per_s": metrics["images_per_s"],
            "num_seeds": metrics.get("num_seeds", 1),
            "mlflow_run_id": info.get("mlflow_run_id"),
        })
    return rows


def build_report(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    report: dict[str, Any] = {"test": summarise(rows, "test_accuracy")}
    if any(row.get("val_accuracy") is not None for row in rows):
        report["val"] = summarise(rows, "val_accuracy")
    report.update({
        "mean_trainable_params": statistics.fmean(r["trainable_params"] for r in rows),
        "mean_trainable_params_excl_head": statistics.fmean(r["trainable_params_excl_head"] for r in rows),
        "max_peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "mean_images_per_s": statistics.fmean(r["images_per_s"] for r in rows),
        "data_source": source,
        "methods": sorted({str(r["method"]) for r in rows}),
    })
    return report


def report_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the report for ``outputs/report.json`` (DVC metrics): accuracy means and costs."""
    metrics: dict[str, Any] = {}
    for split in ("test", "val"):
        if split in report:
            part = report[split]
            metrics[split] = {**{group: mean for group, mean in part["groups"].items()},
                              "group_mean": part["group_mean"], "task_mean": part["task_mean"],
                              "num_tasks": part["num_tasks"]}
    metrics.update({key: report[key] for key in ("mean_trainable_params", "mean_trainable_params_excl_head",
                                                 "max_peak_memory_mb", "mean_images_per_s")})
    return metrics


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """``metrics/summary.json``: the group mean first (``test_acc``, the column it shares with the per-task
    files), then each group's mean and the plain mean over tasks, under names short enough for a terminal."""
    test = report["test"]
    return {"test_acc": _round(test["group_mean"]),
            **{group.lower(): _round(mean) for group, mean in test["groups"].items()},
            "task_mean": _round(test["task_mean"])}


def tasks_plot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``plots/tasks.json``: what ``dvc plots`` draws per task (accuracy, and accuracy against cost)."""
    return [{"task": r["task"], "group": r["group"], "test_acc": _round(r["test_accuracy"]),
             "params": r["trainable_params_excl_head"], "memory_mb": round(r["peak_memory_mb"], 1),
             "images_s": round(r["images_per_s"], 1)} for r in rows]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} ± {100 * std:.1f}" if std else f"{100 * value:.1f}"


def markdown(rows: list[dict[str, Any]], report: dict[str, Any]) -> str:
    has_val = "val" in report
    memory_kind = {r["memory_kind"] for r in rows}
    memory_label = "peak GPU memory (MB)" if memory_kind == {"gpu_allocated"} else "peak memory (MB, process RSS)"
    seeds = max(r["num_seeds"] for r in rows)
    lines = [
        "# DTL pipeline report",
        "",
        f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; "
        f"accuracy in %, mean{' ± std' if seeds > 1 else ''} over {seeds} seed(s). Trainable parameters exclude "
        "the classifier head (as the paper counts them); the total is in brackets.",
        "",
        f"| task | group | test acc |{' val acc |' if has_val else ''} trainable params | {memory_label} | images/s |",
        f"|---|---|---:|{'---:|' if has_val else ''}---:|---:|---:|",
    ]
    for r in rows:
        val = f" {_pct(r['val_accuracy'])} |" if has_val else ""
        lines.append(f"| {r['task']} | {r['group']} | {_pct(r['test_accuracy'], r['test_accuracy_std'])} |{val} "
                     f"{r['trainable_params_excl_head']:,} ({r['trainable_params']:,}) | {r['peak_memory_mb']:.0f} | "
                     f"{r['images_per_s']:.0f} |")
    lines += ["", "| summary | test acc |" + (" val acc |" if has_val else ""),
              "|---|---:|" + ("---:|" if has_val else "")]
    test = report["test"]
    val = report.get("val", {})
    for group, mean in test["groups"].items():
        extra = f" {_pct(val['groups'].get(group))} |" if has_val else ""
        lines.append(f"| {group} mean ({test['tasks_per_group'][group]} tasks) | {_pct(mean)} |{extra}")
    extra = f" {_pct(val.get('group_mean'))} |" if has_val else ""
    lines.append(f"| **group mean** (mean of the group means) | **{_pct(test['group_mean'])}** |{extra}")
    extra = f" {_pct(val.get('task_mean'))} |" if has_val else ""
    lines.append(f"| mean over {test['num_tasks']} tasks | {_pct(test['task_mean'])} |{extra}")
    lines += [
        "",
        f"Mean trainable parameters per task: {report['mean_trainable_params_excl_head']:,.0f} "
        f"({report['mean_trainable_params']:,.0f} with the head); maximum {memory_label}: "
        f"{report['max_peak_memory_mb']:.0f}; mean training throughput {report['mean_images_per_s']:.0f} images/s.",
        "",
        "![accuracy per task and accuracy vs cost](report.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    colours = [GROUP_COLOURS.get(r["group"], "tab:gray") for r in rows]
    accuracy = [100 * r["test_accuracy"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.4, 1, 1]})
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
    memory_label = ("peak GPU memory (MB)" if {r["memory_kind"] for r in rows} == {"gpu_allocated"}
                    else "peak memory (MB, process RSS)")
    for axis, key, label in ((axes[1], "trainable_params", "trainable parameters (incl. head)"),
                             (axes[2], "peak_memory_mb", memory_label)):
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
    _save(figure, path)


def log_to_mlflow(rows: list[dict[str, Any]], metrics: dict[str, float], paths: OutputPaths, experiment: str,
                  source: str) -> str:
    import tracking

    experiment_id = tracking.init_tracking(experiment)
    tags = {"dvc_stage": "report", "data_source": source, "pipeline": "dvc", "tasks": ",".join(r["task"] for r in rows)}
    files = [paths.report_md, paths.report_json, paths.report_png, paths.summary_metrics, paths.tasks_plot]
    tracking.close_orphaned_runs(experiment_id, dvc_stage="report")
    run = tracking.Run.create(experiment_id, "report", tags, {"tasks": [r["task"] for r in rows]})
    with tracking.recorded(run):
        run.log_metrics(metrics)
        for path in files:
            run.log_artifacts(path, "report")
    for row in rows:  # attach the report to each task run it summarises
        task_run = tracking.Run(row["mlflow_run_id"]) if row.get("mlflow_run_id") else None
        if task_run is not None and task_run.exists():
            task_run.set_tags({"report_run_id": run.run_id})
            for path in files:
                task_run.log_artifacts(path, "report")
    return run.run_id


def few_shot_report(tasks: list[str], outputs: Path, source: str) -> dict[str, Any]:
    """Accuracy per data set and shot count (mean, std and seeds) from ``outputs/evaluate/<task>.json``."""
    paths = OutputPaths(outputs)
    few_shot, rows = {}, []
    for task in tasks:
        metrics = read_json(paths.metrics(task), f"written by evaluate@{task}")
        info = read_json(paths.details(task), f"written by evaluate@{task}")
        by_shots = metrics.get("shots") or {}
        if not by_shots:  # one shot count: the task's own figures
            shots = str(info["per_seed"][0]["shots"])
            by_shots = {shots: metrics}
        few_shot[task] = {shots: {"mean": part["test_accuracy"], "std": part.get("test_accuracy_std", 0.0),
                                  "seeds": part.get("num_seeds", 1),
                                  **({"val_mean": part["val_accuracy"]} if "val_accuracy" in part else {})}
                          for shots, part in sorted(by_shots.items(), key=lambda item: int(item[0]))}
        rows.append({"task": task, "method": info.get("method"), "mlflow_run_id": info.get("mlflow_run_id"),
                     "memory_kind": info.get("memory_kind"), **_costs(metrics)})
    counts = sorted({int(k) for entry in few_shot.values() for k in entry})
    by_shots = {str(k): statistics.fmean(entry[str(k)]["mean"] for entry in few_shot.values() if str(k) in entry)
                for k in counts}
    return {"protocol": "few_shot", "few_shot": few_shot, "mean_by_shots": by_shots,
            "mean": statistics.fmean(by_shots.values()), "rows": rows, "data_source": source,
            "methods": sorted({str(r["method"]) for r in rows}), **_cost_summary(rows)}


def domain_report(task: str, targets: list[str], outputs: Path, source: str) -> dict[str, Any]:
    """The source's accuracy and every target's (A/R-style subsets also masked) from ``outputs/evaluate``."""
    paths = OutputPaths(outputs)
    metrics = read_json(paths.metrics(task), f"written by evaluate@{task}")
    info = read_json(paths.details(task), f"written by evaluate@{task}")
    shots = info["per_seed"][0].get("shots")
    source_entry = {"name": task, "accuracy": metrics["test_accuracy"], "std": metrics.get("test_accuracy_std", 0.0),
                    "seeds": metrics.get("num_seeds", 1), "shots": shots, "num_classes": info.get("num_classes")}
    if "val_accuracy" in metrics:
        source_entry["val_accuracy"] = metrics["val_accuracy"]
    entries = {}
    for target in targets:
        entry = {"accuracy": metrics[f"{target}_accuracy"], "std": metrics.get(f"{target}_accuracy_std", 0.0),
                 "classes": info.get("target_classes", {}).get(target)}
        if f"{target}_accuracy_masked" in metrics:
            entry.update(accuracy_masked=metrics[f"{target}_accuracy_masked"],
                         std_masked=metrics.get(f"{target}_accuracy_masked_std", 0.0))
        entries[target] = entry
    row = {"task": task, "method": info.get("method"), "mlflow_run_id": info.get("mlflow_run_id"),
           "memory_kind": info.get("memory_kind"), **_costs(metrics)}
    return {"protocol": "domain_generalization",
            "domain_generalization": {"source": source_entry, "targets": entries,
                                      "target_mean": statistics.fmean(e["accuracy"] for e in entries.values())},
            "rows": [row], "data_source": source, "methods": [str(row["method"])], **_cost_summary([row])}


def _costs(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in ("trainable_params", "trainable_params_excl_head", "peak_memory_mb",
                                          "images_per_s")}


def _cost_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mean_trainable_params": statistics.fmean(r["trainable_params"] for r in rows),
            "mean_trainable_params_excl_head": statistics.fmean(r["trainable_params_excl_head"] for r in rows),
            "max_peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
            "mean_images_per_s": statistics.fmean(r["images_per_s"] for r in rows)}


def _memory_label(rows: list[dict[str, Any]]) -> str:
    return ("peak GPU memory (MB)" if {r["memory_kind"] for r in rows} == {"gpu_allocated"}
            else "peak memory (MB, process RSS)")


def few_shot_markdown(report: dict[str, Any]) -> str:
    counts = list(report["mean_by_shots"])
    seeds = max(p["seeds"] for entry in report["few_shot"].values() for p in entry.values())
    rows = {r["task"]: r for r in report["rows"]}
    lines = ["# DTL pipeline report: few-shot classification", "",
             f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; test accuracy in %, mean "
             f"± std over {seeds} seed(s) (each seed: its own training list, weights best on val_meta.list). "
             "Trainable parameters exclude the classifier head.", "",
             "| data set | " + " | ".join(f"{k}-shot" for k in counts) + " | trainable params |",
             "|---|" + "---:|" * len(counts) + "---:|"]
    for task, entry in report["few_shot"].items():
        cells = [_pct(entry[k]["mean"], entry[k]["std"]) if k in entry else "-" for k in counts]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {rows[task]['trainable_params_excl_head']:,} |")
    lines.append("| **mean** | " + " | ".join(f"**{_pct(report['mean_by_shots'][k])}**" for k in counts) + " | |")
    lines += ["", f"Maximum {_memory_label(report['rows'])}: {report['max_peak_memory_mb']:.0f}; mean training "
              f"throughput {report['mean_images_per_s']:.0f} images/s.", "",
              "![test accuracy vs shots](report.png)", ""]
    return "\n".join(lines)


def domain_markdown(report: dict[str, Any]) -> str:
    dg = report["domain_generalization"]
    src = dg["source"]
    lines = ["# DTL pipeline report: domain generalisation", "",
             f"Data: `{report['data_source']}`; method(s): {', '.join(report['methods'])}; trained once per seed on "
             f"the source's {src['shots']}-shot list, then tested on the source and every target (none is used to "
             f"choose anything). Accuracy in %, mean ± std over {src['seeds']} seed(s). Masked: the argmax over the "
             "classes the target holds (for targets with a subset of the classes).", "",
             "| domain | role | classes | accuracy | masked accuracy |", "|---|---|---:|---:|---:|",
             f"| {src['name']} | source | {src['num_classes']} | {_pct(src['accuracy'], src['std'])} | - |"]
    for target, entry in dg["targets"].items():
        masked = _pct(entry["accuracy_masked"], entry["std_masked"]) if "accuracy_masked" in entry else "-"
        lines.append(f"| {target} | target | {entry['classes'] or '-'} | {_pct(entry['accuracy'], entry['std'])} | "
                     f"{masked} |")
    lines.append(f"| **target mean** | | | **{_pct(dg['target_mean'])}** | |")
    if "val_accuracy" in src:
        lines += ["", f"Source validation accuracy (val_meta.list): {_pct(src['val_accuracy'])}."]
    row = report["rows"][0]
    lines += ["", f"Trainable parameters {row['trainable_params_excl_head']:,} ({row['trainable_params']:,} with the "
              f"head); {_memory_label(report['rows'])}: {report['max_peak_memory_mb']:.0f}.", "",
              "![accuracy per domain](report.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(figure, axis, title: str, path: Path) -> None:
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    _save(figure, path)


def few_shot_plot(report: dict[str, Any], path: Path) -> None:
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    for task, entry in report["few_shot"].items():
        shots = [int(k) for k in entry]
        axis.errorbar(shots, [100 * p["mean"] for p in entry.values()], yerr=[100 * p["std"] for p in entry.values()],
                      marker="o", capsize=3, label=task)
    counts = [int(k) for k in report["mean_by_shots"]]
    axis.plot(counts, [100 * v for v in report["mean_by_shots"].values()], color="black", linestyle="--",
              marker="s", label="mean")
    axis.set_xscale("log", base=2)
    axis.set_xticks(counts, [str(k) for k in counts])
    axis.set_xlabel("training images per class (shots)")
    _finish(figure, axis, f"{', '.join(report['methods'])} on {report['data_source']}: accuracy vs shots", path)


def domain_plot(report: dict[str, Any], path: Path) -> None:
    dg = report["domain_generalization"]
    names = [dg["source"]["name"], *dg["targets"]]
    values = [dg["source"]] + list(dg["targets"].values())
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
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
    _finish(figure, axis, f"{', '.join(report['methods'])}: source {names[0]} and its target domains", path)


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def transfer_outputs(report: dict[str, Any]) -> tuple[dict, dict, list[dict]]:
    """(``outputs/report.json``, ``metrics/summary.json``, ``plots/tasks.json`` rows) of a few-shot or
    domain-generalisation report."""
    public = {k: v for k, v in report.items() if k != "rows"}
    costs = {r["task"]: r for r in report["rows"]}
    plot_rows = []
    if report["protocol"] == "few_shot":
        summary = {"test_acc": _round(report["mean"]),
                   **{f"{k}shot": _round(v) for k, v in report["mean_by_shots"].items()}}
        for task, entry in report["few_shot"].items():
            plot_rows += [{"task": f"{task} {k}-shot", "group": task, "test_acc": _round(p["mean"]),
                           **_plot_costs(costs[task])} for k, p in entry.items()]
    else:
        dg = report["domain_generalization"]
        summary = {"test_acc": _round(dg["source"]["accuracy"]), "target_mean": _round(dg["target_mean"]),
                   **{t: _round(e["accuracy"]) for t, e in dg["targets"].items()}}
        row = costs[dg["source"]["name"]]
        plot_rows = [{"task": dg["source"]["name"], "group": "source", "test_acc": summary["test_acc"],
                      **_plot_costs(row)}]
        plot_rows += [{"task": t, "group": "target", "test_acc": _round(e["accuracy"]), **_plot_costs(row)}
                      for t, e in dg["targets"].items()]
    return public, summary, plot_rows


def _plot_costs(row: dict[str, Any]) -> dict[str, Any]:
    return {"params": row["trainable_params_excl_head"], "memory_mb": round(row["peak_memory_mb"], 1),
            "images_s": round(row["images_per_s"], 1)}


def make_report(params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    config = load_config(params_path, best_path)
    paths = OutputPaths(outputs)
    protocol = config.evaluation.protocol
    if protocol in ("few_shot", "domain_generalization"):
        return make_transfer_report(config, params_path, paths)
    rows = task_rows(config.data.tasks, outputs)
    report = build_report(rows, config.data.source)
    write_json(paths.tasks_plot, tasks_plot(rows))
    plot(rows, report, paths.report_png)
    write_text(paths.report_md, markdown(rows, report))
    write_json(paths.report_json, {"protocol": protocol, **report_metrics(report)})
    write_json(paths.summary_metrics, summary_metrics(report))
    test = report["test"]
    metrics = {f"test_{group}": mean for group, mean in test["groups"].items()}
    metrics.update({"test_group_mean": test["group_mean"], "test_task_mean": test["task_mean"]})
    log_to_mlflow(rows, {**metrics, **_mlflow_costs(report)}, paths,
                  load_pipeline_settings(params_path).mlflow_experiment, config.data.source)
    print("report: " + ", ".join(f"{g} {100 * m:.1f}" for g, m in test["groups"].items())
          + f" | group mean {100 * test['group_mean']:.1f} | mean over {test['num_tasks']} tasks "
            f"{100 * test['task_mean']:.1f} -> {paths.report_md}", flush=True)
    return report


def make_transfer_report(config, params_path: Path, paths: OutputPaths) -> dict[str, Any]:
    """The report of a few-shot or domain-generalisation run (same files as the VTAB report)."""
    if config.evaluation.protocol == "few_shot":
        report = few_shot_report(config.data.tasks, paths.root, config.data.source)
        few_shot_plot(report, paths.report_png)
        write_text(paths.report_md, few_shot_markdown(report))
        metrics = {f"test_{k}shot_mean": v for k, v in report["mean_by_shots"].items()}
        metrics["test_mean"] = report["mean"]
        line = ", ".join(f"{k}-shot {100 * v:.1f}" for k, v in report["mean_by_shots"].items())
    else:
        report = domain_report(config.data.tasks[0], config.data.targets, paths.root, config.data.source)
        domain_plot(report, paths.report_png)
        write_text(paths.report_md, domain_markdown(report))
        dg = report["domain_generalization"]
        metrics = {"test_source": dg["source"]["accuracy"], "test_target_mean": dg["target_mean"],
                   **{f"test_{t}": e["accuracy"] for t, e in dg["targets"].items()},
                   **{f"test_{t}_masked": e["accuracy_masked"] for t, e in dg["targets"].items()
                      if "accuracy_masked" in e}}
        line = (f"source {100 * dg['source']['accuracy']:.1f} | "
                + ", ".join(f"{t} {100 * e['accuracy']:.1f}" for t, e in dg["targets"].items()))
    public, summary, plot_rows = transfer_outputs(report)
    write_json(paths.tasks_plot, plot_rows)
    write_json(paths.report_json, public)
    write_json(paths.summary_metrics, summary)
    log_to_mlflow(report["rows"], {**metrics, **_mlflow_costs(report)}, paths,
                  load_pipeline_settings(params_path).mlflow_experiment, config.data.source)
    print(f"report: {line} -> {paths.report_md}", flush=True)
    return public


def _mlflow_costs(report: dict[str, Any]) -> dict[str, float]:
    return {key: report[key] for key in ("mean_trainable_params", "max_peak_memory_mb", "mean_images_per_s")}


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage report: aggregate the per-task metrics.", task=False).parse_args(argv)
    run_stage("report", lambda: make_report(args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).report_md)


if __name__ == "__main__":
    main()
