"""Stage ``train@<task>``: train the task's merged configuration once per seed and keep only what changed.

``dtl.config.load_config(params, best, task=task)`` (the task's ``TaskConfig``, resolved once) ->
``dtl.experiment.run_task`` for each seed of
``evaluation.seeds`` (few-shot: for each shot count of ``data.shots`` and each seed) with two epoch callbacks (an
MLflow logger and a recorder for the ``dvc plots`` curve), then, written atomically:

- ``outputs/train/<task>/seed<S>.safetensors`` (few-shot and domain generalisation:
  ``shots<K>_seed<S>.safetensors``): the trainable weights only (kilobytes for DTL; the frozen backbone is the
  checkpoint named in ``config.json``);
- ``outputs/train/<task>/config.json``: the exact resolved settings (``evaluate`` rebuilds the model from it);
- ``outputs/train/<task>/summary.json``: per-seed results and the MLflow run id;
- ``plots/curves/<task>.tsv``: per-epoch lr / train loss / train accuracy (mean over the runs; git-tracked,
  ``dvc plots``).

MLflow (``tracking``): one run per task (``train@<task>``) with params, the training split as a dataset input,
per-epoch metrics, cost figures and these files as artifacts; with several runs (seeds, shot counts) each is a
child run holding its own curves and training list. The ``evaluate`` stage records its own run, a child of this one.

Usage: ``python -m pipeline.train TASK [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import tracking
from dtl.config import TaskConfig, read_best
from dtl.experiment import run_task
from dtl.io import atomic_dir, save_trainable, write_json, write_text
from dtl.predict import find_images
from dtl.protocols.base import PARAMETER_AND_THROUGHPUT_KEYS
from dtl.protocols.base import SCORES as PROTOCOL_SCORES
from dtl.trained import trained_metadata
from tracking.pyfunc import log_task_model, registered_name

from .outputs import OutputPaths
from .params import load_stage_params
from .stage import StageError, read_json, run_stage, stage_arguments

CURVE_COLUMNS = ("lr", "train/loss", "train/accuracy")
SCORES = tuple(f"/{score}" for score in PROTOCOL_SCORES.values())  # what a run's summary line and its task run show
# The cost figures of a training run's summary (counts, seconds, bytes), logged to its MLflow run; the task run gets
# their means over the runs.
TRAINING_COST_KEYS = (*PARAMETER_AND_THROUGHPUT_KEYS, "train_time_s", "cpu_time_s", "saved_bytes_per_batch",
                      "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes", "gpu_eval_peak_allocated_bytes",
                      "gpu_cache_bytes", "peak_rss_bytes")


def run_tags(stage: str, config: TaskConfig) -> dict[str, str]:
    """Tags that let the MLflow UI filter and compare pipeline runs."""
    return {
        "dvc_stage": f"{stage}@{config.task}",
        "task": config.task,
        "data_source": config.data.source,
        "method": config.model.method,
        "backbone": config.model.backbone,
        "protocol": config.evaluation.protocol,
        "pipeline": "dvc",
    }


def head_parameters(model) -> int:
    """Parameters of the classifier head (counted apart: DTL's published counts exclude it)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name.startswith("head"))


def weights_name(shots: int | None, seed: int) -> str:
    return f"seed{seed}.safetensors" if shots is None else f"shots{shots}_seed{seed}.safetensors"


def mean_curve(histories: list[list[dict]]) -> list[dict]:
    """Per-epoch mean over seeds of the curve columns (one seed: its own curve)."""
    rows = []
    for epoch, per_seed in enumerate(zip(*histories)):
        row: dict[str, Any] = {"epoch": epoch}
        for column in CURVE_COLUMNS:
            row[column.replace("/", "_")] = statistics.fmean(h[column] for h in per_seed)
        rows.append(row)
    return rows


def tsv(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["\t".join(columns)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns)
              for row in rows]
    return "\n".join(lines) + "\n"


def train(task: str, params_path: Path, best_path: Path, outputs: Path) -> dict[str, Any]:
    config, settings = load_stage_params(params_path, best_path)
    if task not in config.data.tasks:
        raise StageError(f"task {task!r} is not in data.tasks ({', '.join(config.data.tasks)})")
    paths = OutputPaths(outputs)
    record = read_json(paths.task_record(task), "written by the prepare stage")
    task_config = config.for_task(task)
    experiment_id = tracking.init_tracking(settings.mlflow_experiment)
    tags = {**run_tags("train", task_config), "group": record.get("group", "Other")}
    params = {**task_config.to_dict(), "task": task, "task_overrides": config.overrides.get(task) or {}}
    params.pop("overrides", None)
    runs = task_config.protocol.runs()
    started = time.perf_counter()
    with atomic_dir(paths.train_dir(task)) as staging, tracking.tracked_run(
            experiment_id, f"train@{task}", tags, params, orphans={"dvc_stage": f"train@{task}"}) as run:
        child = (experiment_id, tags) if len(runs) > 1 else None  # several runs: one child run each
        results = [train_one(task_config, shots, seed, staging, run, child=child) for shots, seed in runs]
        seed_results = [summary for summary, _ in results]
        summary = {
            "task": task, "group": record.get("group", "Other"), "num_classes": seed_results[0]["num_classes"],
            "method": task_config.model.method, "backbone": task_config.model.backbone,
            "checkpoint": task_config.model.checkpoint, "protocol": task_config.evaluation.protocol,
            "data_source": task_config.data.source, "seeds": task_config.evaluation.seeds, "per_seed": seed_results,
            "wall_time_s": time.perf_counter() - started,
            "mlflow": {"tracking_uri": tracking.tracking_uri(), "experiment_id": experiment_id, "run_id": run.run_id},
        }
        summary.update(log_trained_model(run, task_config, staging, runs[0], read_best(best_path).get(task)))
        write_json(staging / "config.json", task_config.to_dict())
        write_json(staging / "summary.json", summary)
        curve = mean_curve([history for _, history in results])
        write_text(staging / "history.tsv", tsv(curve))
        if len(runs) > 1:  # the runs' own curves are in their child runs; the task run gets the means
            run.log_metrics({key: statistics.fmean(s[key] for s in seed_results)
                             for key in {k for s in seed_results for k in s if k.endswith(SCORES)}})
        run.log_metrics({k: statistics.fmean(s[k] for s in seed_results) for k in TRAINING_COST_KEYS
                         if all(isinstance(s.get(k), (int, float)) for s in seed_results)})
        run.log_artifacts(staging, "train")
    write_text(paths.curve(task), tsv(curve))
    print(f"train@{task}: done in {summary['wall_time_s']:.0f} s; "
          + ", ".join(f"{_run_name(s)}: {_final_accuracy(s)}" for s in seed_results), flush=True)
    return summary


def train_one(task_config: TaskConfig, shots: int | None, seed: int, staging: Path, task_run, *,
              child: tuple[str, dict] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """One run of the task (a seed; a shot count and a seed): trained, its weights saved in ``staging``, its
    epochs and costs logged to ``task_run``, or, with ``child`` = (experiment id, tags), to a child run of it.
    Returns its summary and its per-epoch metrics."""
    task = task_config.task
    protocol = task_config.protocol
    what = f"seed {seed}" if shots is None else f"{shots}-shot seed {seed}"
    print(f"train@{task}: {what}: {task_config.model.method} on {task_config.model.backbone}, "
          f"{task_config.training.epochs} epochs, lr {task_config.training.lr:g}", flush=True)
    keys = {"seed": seed, **({"shots": shots} if shots is not None else {})}
    datasets = [(*protocol.split_input(task, protocol.train, shots, seed), "train")]
    if child is not None:
        experiment_id, tags = child
        context = tracking.tracked_run(experiment_id, f"train@{task} {what}", {**tags, **keys}, keys,
                                       parent=task_run, datasets=datasets)
    else:
        task_run.log_dataset(*datasets[0])
        context = nullcontext(task_run)
    with context as seed_run:
        history: list[dict] = []
        result = run_task(task_config, seed=seed, shots=shots,
                          hooks=[lambda end: history.append(end.metrics), seed_run.log_epoch])
        weights = staging / weights_name(shots, seed)
        # The settings ride in the file too, so dtl.load_trained reads a copied weights file on its own.
        metadata = {"task": task, **{k: str(v) for k, v in keys.items()}, "method": task_config.model.method,
                    "backbone": task_config.model.backbone,
                    **trained_metadata(result.config, task, result.num_classes, seed, result.image_size, shots)}
        save_trainable(result.model, weights, metadata=metadata)
        summary = {**result.summary(), "seed": seed, "weights": weights.name,
                   "head_params": head_parameters(result.model), "mlflow_run_id": seed_run.run_id}
        summary["trainable_params_excl_head"] = summary["trainable_params"] - summary["head_params"]
        cache = result.result.cache_report
        if cache:  # which variant trained (docs/design.md: the cache and drop-path)
            summary["cache_report"] = cache
            seed_run.set_tags({"prefix_cache": cache.get("mode", "?")})
        seed_run.log_metrics({k: v for k, v in summary.items() if k in TRAINING_COST_KEYS and v is not None})
    return summary, history


def log_trained_model(run, task_config: TaskConfig, staging: Path, first_run: tuple,
                      winner: dict | None) -> dict[str, Any]:
    """Log the task's trained model on its run: the first run's weights as an MLflow Model, registered as dtl-<task>
    (``tracking.pyfunc``), tagged with the sweep's settings when a sweep chose them (``winner``)."""
    task, protocol = task_config.task, task_config.protocol
    shots, seed = first_run
    example = next(iter(find_images([protocol.split_list(task, protocol.train, shots, seed)])), None)
    version = log_task_model(run, staging / weights_name(shots, seed), task, example,
                             tags={"sweep_settings": json.dumps(winner, sort_keys=True)} if winner else None)
    run.set_tags({"registered_model": f"{registered_name(task)}/{version or 'pending'}"})
    return {"sweep_winner": bool(winner), "registered_model": {"name": registered_name(task), "version": version}}


def _run_name(seed_summary: dict) -> str:
    shots = seed_summary.get("shots")
    return f"seed {seed_summary['seed']}" if shots is None else f"{shots}-shot seed {seed_summary['seed']}"


def _final_accuracy(seed_summary: dict) -> str:
    parts = [f"{k} {v:.4f}" for k, v in seed_summary.items() if k.endswith(SCORES) and not k.startswith("train")]
    return ", ".join(parts) or "no evaluation"


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage train@<task>: train the task's merged configuration per seed.",
                           task=True).parse_args(argv)
    run_stage(f"train@{args.task}", lambda: train(args.task, args.params, args.best, args.outputs),
              output=OutputPaths(args.outputs).train_dir(args.task))


if __name__ == "__main__":
    main()
