"""Stage ``train@<task>``: train the task's merged configuration once per seed and keep only what changed.

``load_params(task)`` -> ``dtl.experiment.run_task`` for each seed of ``evaluation.seeds`` with two epoch
callbacks (an MLflow logger and a recorder for the ``dvc plots`` curve), then, written atomically:

- ``outputs/train/<task>/seed<S>.safetensors``: the trainable weights only (kilobytes for DTL; the frozen
  backbone is the checkpoint named in ``config.json``);
- ``outputs/train/<task>/config.json``: the exact resolved settings (``evaluate`` rebuilds the model from it);
- ``outputs/train/<task>/summary.json``: per-seed results and the MLflow run id;
- ``outputs/history/<task>.tsv``: per-epoch lr / train loss / train accuracy (mean over seeds).

MLflow: one run per task (``train@<task>``) with params, per-epoch metrics and these files as artifacts;
with several seeds every seed is a child run holding its own curves. The ``evaluate`` stage adds its metrics to
the same run.

Usage: ``python -m pipeline.train TASK [--params params.yaml] [--best sweeps/best.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dtl.config import ExperimentConfig
from dtl.io import save_trainable, write_json, write_text

from . import tracking
from .params import load_params, load_pipeline_settings
from .stage import OutputPaths, StageError, atomic_dir, read_json, run_stage, stage_arguments

CURVE_COLUMNS = ("lr", "train/loss", "train/accuracy")


def run_tags(stage: str, task: str, config: ExperimentConfig) -> dict[str, str]:
    """Tags that let the MLflow UI filter and compare pipeline runs."""
    return {
        "dvc_stage": f"{stage}@{task}",
        "task": task,
        "data_source": config.data.source,
        "method": config.model.method,
        "backbone": config.model.backbone,
        "protocol": config.evaluation.protocol,
        "git_commit": tracking.git_commit() or "uncommitted",
        "pipeline": "dvc",
    }


def head_parameters(model) -> int:
    """Parameters of the classifier head (counted apart: DTL's published counts exclude it)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name.startswith("head"))


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
    from dtl.experiment import run_task

    config = load_params(params_path, best_path)
    if task not in config.data.tasks:
        raise StageError(f"task {task!r} is not in data.tasks ({', '.join(config.data.tasks)})")
    paths = OutputPaths(outputs)
    record = read_json(paths.task_record(task), "written by the prepare stage")
    task_config = config.for_task(task)
    seeds = task_config.evaluation.seeds
    settings = load_pipeline_settings(params_path)
    experiment_id = tracking.init_tracking(settings.mlflow_experiment)
    tags = {**run_tags("train", task, task_config), "group": record.get("group", "Other")}
    params = {**task_config.to_dict(), "task": task, "task_overrides": config.overrides.get(task) or {}}
    params.pop("overrides", None)

    started = time.perf_counter()
    seed_results: list[dict[str, Any]] = []
    histories: list[list[dict]] = []
    with atomic_dir(paths.train_dir(task)) as staging, \
            tracking.tracked_run(experiment_id, f"train@{task}", tags, params) as run:
        run_id = run.info.run_id
        for seed in seeds:
            print(f"train@{task}: seed {seed}: {task_config.model.method} on {task_config.model.backbone}, "
                  f"{task_config.training.epochs} epochs, lr {task_config.training.lr:g}", flush=True)
            seed_run = (tracking.child_run(experiment_id, run_id, f"train@{task} seed {seed}",
                                           {**tags, "seed": seed}, {"seed": seed})
                        if len(seeds) > 1 else nullcontext(run_id))
            with seed_run as seed_run_id:
                history: list[dict] = []
                result = run_task(config, task, seed=seed,
                                  callbacks=[lambda epoch, metrics: history.append(metrics),
                                             tracking.epoch_logger(seed_run_id)])
                weights = staging / f"seed{seed}.safetensors"
                save_trainable(result.model, weights, metadata={"task": task, "seed": str(seed),
                                                                "method": task_config.model.method,
                                                                "backbone": task_config.model.backbone})
                summary = {**result.summary(), "seed": seed, "weights": weights.name,
                           "head_params": head_parameters(result.model), "mlflow_run_id": seed_run_id}
                summary["trainable_params_excl_head"] = summary["trainable_params"] - summary["head_params"]
                cache = getattr(result.result, "prefix_cache", None)
                if cache:  # which variant trained (docs/design.md: the cache and drop-path)
                    summary["prefix_cache"] = cache
                    mlflow_set_tag(seed_run_id, "prefix_cache", cache.get("mode", "?"))
                tracking.log_numbers({k: v for k, v in summary.items() if k in COST_KEYS}, seed_run_id)
            seed_results.append(summary)
            histories.append(history)

        summary = {
            "task": task,
            "group": record.get("group", "Other"),
            "num_classes": seed_results[0]["num_classes"],
            "method": task_config.model.method,
            "backbone": task_config.model.backbone,
            "checkpoint": task_config.model.checkpoint,
            "protocol": task_config.evaluation.protocol,
            "data_source": task_config.data.source,
            "seeds": seeds,
            "per_seed": seed_results,
            "wall_time_s": time.perf_counter() - started,
            "mlflow": {"tracking_uri": tracking.tracking_uri(), "experiment_id": experiment_id, "run_id": run_id},
        }
        write_json(staging / "config.json", task_config.to_dict())
        write_json(staging / "summary.json", summary)
        curve = mean_curve(histories)
        write_text(staging / "history.tsv", tsv(curve))

        import mlflow

        if len(seeds) > 1:  # the seeds' own curves are in their child runs; the task run gets the means
            for key in {k for s in seed_results for k in s if k.endswith("/accuracy")}:
                tracking.log_numbers({key: statistics.fmean(s[key] for s in seed_results)})
        tracking.log_numbers({k: statistics.fmean(s[k] for s in seed_results) for k in COST_KEYS
                              if all(isinstance(s.get(k), (int, float)) for s in seed_results)})
        mlflow.log_artifacts(str(staging), artifact_path="train")

    write_text(paths.history(task), tsv(curve))
    print(f"train@{task}: done in {summary['wall_time_s']:.0f} s; "
          + ", ".join(f"seed {s['seed']}: {_final_accuracy(s)}" for s in seed_results), flush=True)
    return summary


COST_KEYS = ("trainable_params", "trainable_params_excl_head", "images_per_s", "train_time_s",
             "peak_memory_bytes", "peak_rss_bytes")


def mlflow_set_tag(run_id: str, key: str, value: Any) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking.tracking_uri()).set_tag(run_id, key, str(value))


def _final_accuracy(seed_summary: dict) -> str:
    parts = [f"{k} {v:.4f}" for k, v in seed_summary.items() if k.endswith("/accuracy") and not k.startswith("train")]
    return ", ".join(parts) or "no evaluation"


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage train@<task>: train the task's merged configuration per seed.",
                           task=True).parse_args(argv)
    run_stage(f"train@{args.task}", lambda: train(args.task, args.params, args.best, args.outputs))


if __name__ == "__main__":
    main()
