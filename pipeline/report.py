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

MLflow: a ``report`` run holds the aggregate metrics and these files; the report is also attached to every
task run it summarises (artifact folder ``report/``).

Usage: ``python -m pipeline.report [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dtl.config import load_config
from dtl.io import atomic_path, write_json, write_text

from .params import load_pipeline_settings
from .stage import OutputPaths, read_json, run_stage, stage_arguments

GROUP_ORDER = ("Natural", "Specialized", "Structured")
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


def summarise(rows: list[dict[str, Any]], key: str = "test_accuracy") -> dict[str, Any]:
    """Group means (in the VTAB order, then any other group), their mean, and the plain mean over tasks."""
    by_group: dict[str, list[float]] = {}
    for row in rows:
        if row.get(key) is not None:
            by_group.setdefault(row["group"], []).append(row[key])
    order = [g for g in GROUP_ORDER if g in by_group] + sorted(g for g in by_group if g not in GROUP_ORDER)
    group_means = {group: statistics.fmean(by_group[group]) for group in order}
    values = [row[key] for row in rows if row.get(key) is not None]
    return {
        "groups": group_means,
        "group_mean": statistics.fmean(group_means.values()) if group_means else None,
        "task_mean": statistics.fmean(values) if values else None,
        "num_tasks": len(values),
        "tasks_per_group": {group: len(by_group[group]) for group in order},
    }


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def log_to_mlflow(rows: list[dict[str, Any]], report: dict[str, Any], paths: OutputPaths, experiment: str,
                  source: str) -> str:
    import tracking

    experiment_id = tracking.init_tracking(experiment)
    tags = {"dvc_stage": "report", "data_source": source, "pipeline": "dvc", "tasks": ",".join(r["task"] for r in rows)}
    files = [paths.report_md, paths.report_json, paths.report_png, paths.summary_metrics, paths.tasks_plot]
    tracking.close_orphaned_runs(experiment_id, dvc_stage="report")
    run = tracking.Run.create(experiment_id, "report", tags, {"tasks": [r["task"] for r in rows]})
    with tracking.recorded(run):
        metrics = {f"test_{group}": mean for group, mean in report["test"]["groups"].items()}
        metrics.update({"test_group_mean": report["test"]["group_mean"], "test_task_mean": report["test"]["task_mean"],
                        "mean_trainable_params": report["mean_trainable_params"],
                        "max_peak_memory_mb": report["max_peak_memory_mb"],
                        "mean_images_per_s": report["mean_images_per_s"]})
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


def make_report(params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    config = load_config(params_path, best_path)
    paths = OutputPaths(outputs)
    rows = task_rows(config.data.tasks, outputs)
    report = build_report(rows, config.data.source)
    write_json(paths.tasks_plot, tasks_plot(rows))
    plot(rows, report, paths.report_png)
    write_text(paths.report_md, markdown(rows, report))
    write_json(paths.report_json, report_metrics(report))
    write_json(paths.summary_metrics, summary_metrics(report))
    log_to_mlflow(rows, report, paths, load_pipeline_settings(params_path).mlflow_experiment, config.data.source)
    test = report["test"]
    print("report: " + ", ".join(f"{g} {100 * m:.1f}" for g, m in test["groups"].items())
          + f" | group mean {100 * test['group_mean']:.1f} | mean over {test['num_tasks']} tasks "
            f"{100 * test['task_mean']:.1f} -> {paths.report_md}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage report: aggregate the per-task metrics.", task=False).parse_args(argv)
    run_stage("report", lambda: make_report(args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).report_md)


if __name__ == "__main__":
    main()
