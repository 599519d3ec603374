"""Stage ``report``: one table over the tasks, VTAB group means, a plot, and an MLflow record.

Reads ``outputs/evaluate/<task>.json`` for every task of ``data.tasks`` and writes:

- ``outputs/report.md``: per-task test accuracy (mean +- std over seeds), trainable parameters, memory,
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

from pathlib import Path
from typing import Any

import tracking
from dtl.io import write_json, write_text
from dtl.predict import segment
from dtl.trained import load_trained

from .outputs import OutputPaths
from .params import load_stage_params
from .stage import read_json, run_stage, stage_arguments


def evaluated_tasks(tasks: list[str], outputs: Path) -> dict[str, tuple[dict, dict]]:
    """task -> (its ``evaluate`` metrics, its ``evaluate`` details), for every task of ``tasks``."""
    paths = OutputPaths(outputs)
    return {task: (read_json(paths.metrics(task), f"written by evaluate@{task}"),
                   read_json(paths.details(task), f"written by evaluate@{task}")) for task in tasks}


def log_to_mlflow(rows: list[dict[str, Any]], metrics: dict[str, float], paths: OutputPaths, experiment: str,
                  source: str) -> str:
    """The report's run (its metrics and files, also attached to every task run it summarises); the experiment's
    id."""
    experiment_id = tracking.init_tracking(experiment)
    tags = {"dvc_stage": "report", "data_source": source, "pipeline": "dvc", "tasks": ",".join(r["task"] for r in rows)}
    files = [paths.report_md, paths.report_json, paths.report_png, paths.summary_metrics, paths.tasks_plot]
    with tracking.tracked_run(experiment_id, "report", tags, {"tasks": [r["task"] for r in rows]},
                              orphans={"dvc_stage": "report"}) as run:
        run.log_metrics(metrics)
        for path in files:
            run.log_artifacts(path, "report")
    for row in rows:  # attach the report to each task run it summarises
        task_run = tracking.Run(row["mlflow_run_id"]) if row.get("mlflow_run_id") else None
        if task_run is not None and task_run.exists():
            task_run.set_tags({"report_run_id": run.run_id})
            for path in files:
                task_run.log_artifacts(path, "report")
    return experiment_id


def trained_segmenter(paths: OutputPaths):
    """task -> its trained segmentation model (the train stage's first run) as a function from a PIL image to its
    label map, loaded when asked."""
    def load(task: str):
        model = load_trained(paths.train_dir(task), device="cpu")
        return lambda image: segment(model, image)

    return load


def make_report(params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    """Aggregate the evaluated tasks as the protocol reports them, write the report files, record them."""
    config, settings = load_stage_params(params_path, best_path)
    protocol = config.protocol
    paths = OutputPaths(outputs)
    report = protocol.build_report(evaluated_tasks(config.data.tasks, outputs))
    public, summary, plot_rows = protocol.report_outputs(report)
    write_json(paths.tasks_plot, plot_rows)
    protocol.report_samples(report, trained_segmenter(paths))
    protocol.report_plot(report, paths.report_png)
    write_text(paths.report_md, protocol.report_markdown(report))
    write_json(paths.report_json, public)
    write_json(paths.summary_metrics, summary)
    costs = {key: value for key, value in report.items()
             if key in ("mean_trainable_params", "mean_images_per_s") or key.startswith("max_")}
    experiment_id = log_to_mlflow(report["rows"], {**protocol.report_metrics(report), **costs}, paths,
                                  settings.mlflow_experiment, config.data.source)
    print(f"report: {protocol.report_line(report)} -> {paths.report_md}", flush=True)
    print(f"report: every run in MLflow: {tracking.where_to_look(experiment_id)}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage report: aggregate the per-task metrics.", task=False).parse_args(argv)
    run_stage("report", lambda: make_report(args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).report_md)


if __name__ == "__main__":
    main()
