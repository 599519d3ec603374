"""Stage ``evaluate@<task>``: re-score the saved trainable weights, without retraining.

For every trained run (seed; few-shot: shot count and seed), ``dtl.experiment.evaluate_saved`` rebuilds the model
from ``outputs/train/<task>/config.json`` (the same backbone checkpoint, method and options), loads its weights
file into it and scores the protocol's reported splits (test; val200 too under the ``val`` protocol; few-shot:
``val_meta.list`` and ``test_meta.list``; domain generalisation: the source's lists and every target's test list,
a target that holds a subset of the classes also with the logits masked to them). That proves the saved file holds
everything training changed: the re-scored accuracy of the split scored at the end of training must equal the
one measured then (a mismatch is an error). Writes ``outputs/evaluate/<task>.json`` (mean and std over seeds,
per shot count under ``shots`` for few-shot runs, losses, trainable parameters, images/s, memory; numbers
only), ``outputs/evaluate/<task>.details.json`` (group,
method, per-seed scores, MLflow run ids) and ``metrics/<task>.json`` (the DVC metrics: test accuracy, trainable
parameters excluding the head, memory figures named for what they measure, images/s).

MLflow: an ``evaluate@<task>`` run of its own, a child of the task's ``train@<task>`` run, so each stage's run
lasts as long as that stage's work.

Usage: ``python -m pipeline.evaluate TASK [--params params.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import tracking
from dtl import experiment
from dtl.config import TaskConfig
from dtl.io import WeightsMismatchError, write_json
from dtl.protocols.base import SCORES
from tracking.pyfunc import tag_tested_version

from .outputs import OutputPaths
from .params import load_pipeline_settings
from .stage import StageError, read_json, run_stage, stage_arguments

# Exact on a CPU in fp32; on a GPU, non-deterministic reductions and reduced-precision kernels may flip a
# prediction or two, a broken save many more: up to this many images, or this share of the split if larger.
MISMATCH_IMAGES = 2
MISMATCH_SHARE = 0.005
MIB = 2**20


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers for MLflow: the per-shot figures as ``<k>shot_<key>``."""
    flat = {k: v for k, v in metrics.items() if k != "shots"}
    for shots, part in metrics.get("shots", {}).items():
        flat.update({f"{shots}shot_{k}": v for k, v in part.items()})
    return flat


def evaluate_task(task: str, params_path: Path, outputs: Path) -> dict[str, Any]:
    paths = OutputPaths(outputs)
    train_dir = paths.train_dir(task)
    summary = read_json(train_dir / "summary.json", f"written by train@{task}")
    config = TaskConfig.from_dict(read_json(train_dir / "config.json", f"written by train@{task}"),
                                  where=str(train_dir / "config.json"), task=task)
    protocol = config.protocol
    experiment_id = tracking.init_tracking(load_pipeline_settings(params_path).mlflow_experiment)
    train_run = tracking.Run(summary["mlflow"]["run_id"])
    parent = train_run if train_run.exists() else None  # None: the store was switched or deleted since training
    tags = {"dvc_stage": f"evaluate@{task}", "task": task, "data_source": summary["data_source"],
            "method": summary["method"], "backbone": summary["backbone"], "protocol": protocol.name,
            "pipeline": "dvc"}
    datasets = [(*protocol.split_input(task, split), "validation" if name == "val" else "test")
                for name, split in protocol.reported_splits(task).items()]
    with tracking.tracked_run(experiment_id, f"evaluate@{task}", tags, {"seeds": summary["seeds"]}, parent=parent,
                              datasets=datasets, orphans={"dvc_stage": f"evaluate@{task}"}) as run:
        per_seed = rescore(config, task, train_dir, summary)
        metrics: dict[str, Any] = {**protocol.aggregate(per_seed), **cost_metrics(summary)}
        targets = protocol.targets()
        record = read_json(paths.task_record(task), "written by the prepare stage")
        details = {"task": task, "group": summary.get("group", "Other"), "method": summary["method"],
                   "backbone": summary["backbone"], "protocol": protocol.name, "data_source": summary["data_source"],
                   "seeds": sorted({s["seed"] for s in per_seed}), "per_seed": per_seed,
                   "num_classes": record.get("num_classes"),
                   "target_classes": {t: record["targets"][t]["classes_seen"] for t in targets},
                   "mlflow_run_id": summary["mlflow"]["run_id"], "mlflow_evaluate_run_id": run.run_id}
        run.log_metrics(flat_metrics(metrics))
        write_json(paths.details(task), details)
        write_json(paths.metrics(task), metrics)
        write_json(paths.task_metrics(task), protocol.dvc_metrics(metrics))  # last: the task is fully evaluated
        run.log_artifacts(paths.metrics(task), "evaluate")
        run.log_artifacts(paths.details(task), "evaluate")
    if parent is not None:  # the task's run shows its test score too
        parent.log_metrics({f"eval_{k}": v for k, v in flat_metrics(metrics).items()})
        if summary.get("registered_model"):  # its registered model version, tested now
            tag_tested_version(summary["registered_model"],
                               {f"test_{s}": metrics[f"test_{s}"] for s in SCORES.values() if f"test_{s}" in metrics},
                               summary.get("sweep_winner", False))
    return {**metrics, "details": details}


def rescore(config: TaskConfig, task: str, train_dir: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trained run's scores on the protocol's reported splits, from its saved weights; the split training
    scored at its last epoch must score as it did then (``MISMATCH_ERROR``)."""
    checked = next(iter(config.protocol.scored_splits(task)))
    per_seed = []
    for seed_summary in summary["per_seed"]:
        weights = train_dir / seed_summary["weights"]
        if not weights.is_file():
            raise StageError(f"{weights} is missing; re-run train@{task}")
        try:
            scores = experiment.evaluate_saved(config, seed_summary["seed"], weights, summary["num_classes"],
                                    shots=seed_summary.get("shots"))
        except WeightsMismatchError as err:
            raise StageError(f"{err}; re-run train@{task}") from None
        at_training = seed_summary.get(f"{checked}/accuracy")
        rescored = scores[f"{checked}_accuracy"]
        if at_training is not None:
            check_rescore(weights, checked, rescored, at_training, scores[f"{checked}_images"])
        if at_training is not None and rescored != at_training:
            print(f"evaluate@{task}: note: re-scored {checked} accuracy {rescored:.6f} vs {at_training:.6f} "
                  "at training (non-deterministic kernels)", flush=True)
        shots = seed_summary.get("shots")
        per_seed.append({"seed": seed_summary["seed"], **({"shots": shots} if shots is not None else {}), **scores})
        print(f"evaluate@{task}: {'' if shots is None else f'{shots}-shot '}seed {seed_summary['seed']}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.endswith(tuple(SCORES.values()))), flush=True)
    return per_seed


def check_rescore(weights: Path, split: str, rescored: float, at_training: float, images: int) -> None:
    """The re-scored accuracy must be the one training measured, up to ``MISMATCH_IMAGES`` images (or
    ``MISMATCH_SHARE`` of the split): counted in images, since accuracies are fractions whose difference rounds."""
    differ = round(abs(rescored - at_training) * images)
    allowed = max(MISMATCH_IMAGES, int(MISMATCH_SHARE * images))
    if differ > allowed:
        raise StageError(f"{weights}: re-scored {split} accuracy {rescored:.6f} differs from {at_training:.6f} "
                         f"measured at the end of training ({differ} of {images} images, more than the {allowed} "
                         "that non-deterministic GPU kernels can flip): the saved weights do not reproduce the "
                         "trained model")


def seed_mean(summary: dict[str, Any], key: str) -> float | None:
    values = [s.get(key) for s in summary["per_seed"]]
    return statistics.fmean(values) if all(isinstance(v, (int, float)) for v in values) else None


def cost_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The training costs of the task's runs (means over them) from the train stage's summary, each memory
    figure named for what it measures (``dtl.protocols.base.MEMORY_LABELS``; the GPU's only where it trained on
    one)."""
    costs = {
        "trainable_params": summary["per_seed"][0]["trainable_params"],
        "trainable_params_excl_head": summary["per_seed"][0]["trainable_params_excl_head"],
        "images_per_s": seed_mean(summary, "images_per_s"),
        "train_time_s": seed_mean(summary, "train_time_s"),
    }
    for name, key in (("saved_for_backward_mb", "saved_bytes_per_batch"), ("peak_rss_mb", "peak_rss_bytes"),
                      ("gpu_peak_allocated_mb", "gpu_peak_allocated_bytes"),
                      ("gpu_peak_reserved_mb", "gpu_peak_reserved_bytes"),
                      ("gpu_eval_peak_allocated_mb", "gpu_eval_peak_allocated_bytes"),
                      ("gpu_cache_mb", "gpu_cache_bytes")):
        value = seed_mean(summary, key)
        if value is not None:
            costs[name] = value / MIB
    return costs


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage evaluate@<task>: re-score the saved trainable weights.", task=True).parse_args(argv)
    run_stage(f"evaluate@{args.task}", lambda: evaluate_task(args.task, args.params, args.outputs),
              output=OutputPaths(args.outputs).metrics(args.task))


if __name__ == "__main__":
    main()
