"""Stage ``evaluate@<task>``: re-score the saved trainable weights, without retraining.

For every seed it rebuilds the model from ``outputs/train/<task>/config.json`` (the same backbone checkpoint,
method and options), loads ``seed<S>.safetensors`` into it with ``dtl.io.load_trainable`` and scores the test
split (and val200 under the ``val`` protocol) with ``dtl.engine.evaluate``. That proves the saved file holds
everything training changed: the re-scored accuracy must equal the one measured at the end of training (a
mismatch is an error). Writes ``outputs/evaluate/<task>.json`` (DVC metrics: mean and std over seeds, trainable
parameters, images/s, peak memory; numbers only), ``outputs/evaluate/<task>.details.json`` (group, method,
per-seed scores, MLflow run id) and adds the final metrics to the task's MLflow run.

Usage: ``python -m pipeline.evaluate TASK [--params params.yaml] [--outputs outputs]``
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dtl.io import write_json

from . import tracking
from .params import load_pipeline_settings
from .stage import OutputPaths, StageError, read_json, run_stage, stage_arguments

PROTOCOL_EVAL_SPLITS = {"final": {"test": "test"}, "val": {"val": "val200", "test": "test"}}
# Training measures this split at its last epoch; evaluate must reproduce it from the saved weights.
TRAIN_TIME_SPLIT = {"final": "test", "val": "val"}
# Exact on CPU fp32; a GPU's non-deterministic reductions may flip a prediction or two, a broken save many more.
MISMATCH_ERROR = 0.005


def score_seed(config, task: str, seed: int, weights: Path, num_classes: int,
               splits: dict[str, str]) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from dtl.data import VTabDataset
    from dtl.engine import evaluate, resolve_device, resolve_precision, seed_everything
    from dtl.experiment import backbone_image_size, build_model
    from dtl.io import load_trainable

    # As run_task does before building: with checkpoint: false the random frozen backbone depends on the seed
    # only, so the saved trainable weights are all that is needed to rebuild the trained model.
    seed_everything(seed)
    model = build_model(config, num_classes)
    try:
        load_trainable(model, weights)
    except ValueError as err:
        raise StageError(f"{err}; re-run train@{task}") from None
    device = resolve_device(config.training.device)
    precision = resolve_precision(config.training.precision, device)
    model.to(device)
    img_size = config.data.image_size or backbone_image_size(model)
    scores: dict[str, float] = {}
    for name, split in splits.items():
        data = VTabDataset(Path(config.data.root), task, split, img_size=img_size, num_classes=num_classes,
                           preload=False)
        loader = DataLoader(data, batch_size=config.training.eval_batch_size, shuffle=False,
                            num_workers=config.training.num_workers)
        for key, value in evaluate(model, loader, device, precision).items():
            scores[f"{name}_{key}"] = value
    return scores


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_task(task: str, params_path: Path, outputs: Path) -> dict[str, Any]:
    from dtl.config import ExperimentConfig

    paths = OutputPaths(outputs)
    train_dir = paths.train_dir(task)
    summary = read_json(train_dir / "summary.json", f"written by train@{task}")
    config = ExperimentConfig.from_dict(read_json(train_dir / "config.json", f"written by train@{task}"),
                                        where=str(train_dir / "config.json"))
    protocol = config.evaluation.protocol
    splits = PROTOCOL_EVAL_SPLITS[protocol]
    checked_split = TRAIN_TIME_SPLIT[protocol]

    per_seed = []
    for seed_summary in summary["per_seed"]:
        weights = train_dir / seed_summary["weights"]
        if not weights.is_file():
            raise StageError(f"{weights} is missing; re-run train@{task}")
        scores = score_seed(config, task, seed_summary["seed"], weights, summary["num_classes"], splits)
        at_training = seed_summary.get(f"{checked_split}/accuracy")
        rescored = scores[f"{checked_split}_accuracy"]
        if at_training is not None and abs(rescored - at_training) > MISMATCH_ERROR:
            raise StageError(f"{weights}: re-scored {checked_split} accuracy {rescored:.6f} differs from "
                             f"{at_training:.6f} measured at the end of training: the saved weights do not "
                             "reproduce the trained model")
        if at_training is not None and rescored != at_training:
            print(f"evaluate@{task}: note: re-scored {checked_split} accuracy {rescored:.6f} vs {at_training:.6f} "
                  "at training (non-deterministic kernels)", flush=True)
        per_seed.append({"seed": seed_summary["seed"], **scores})
        print(f"evaluate@{task}: seed {seed_summary['seed']}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.endswith("accuracy")), flush=True)

    metrics: dict[str, Any] = {}
    for key in per_seed[0]:
        if key == "seed":
            continue
        mean, std = mean_std([s[key] for s in per_seed])
        metrics[key] = mean
        if key.endswith("accuracy"):
            metrics[f"{key}_std"] = std

    def seed_mean(key: str) -> float | None:
        values = [s.get(key) for s in summary["per_seed"]]
        return statistics.fmean(values) if all(isinstance(v, (int, float)) for v in values) else None

    gpu_peak = seed_mean("peak_memory_bytes")
    metrics.update({
        "trainable_params": summary["per_seed"][0]["trainable_params"],
        "trainable_params_excl_head": summary["per_seed"][0]["trainable_params_excl_head"],
        "images_per_s": seed_mean("images_per_s"),
        "train_time_s": seed_mean("train_time_s"),
        # GPU: torch's peak allocated memory; CPU: the training process's peak resident memory.
        "peak_memory_mb": (gpu_peak if gpu_peak is not None else seed_mean("peak_rss_bytes")) / 2**20,
        "num_seeds": len(per_seed),
    })
    details = {"task": task, "group": summary.get("group", "Other"), "method": summary["method"],
               "backbone": summary["backbone"], "protocol": protocol, "data_source": summary["data_source"],
               "memory_kind": "gpu_allocated" if gpu_peak is not None else "process_rss",
               "seeds": [s["seed"] for s in per_seed], "per_seed": per_seed,
               "mlflow_run_id": summary["mlflow"]["run_id"]}

    settings = load_pipeline_settings(params_path)
    experiment_id = tracking.init_tracking(settings.mlflow_experiment)
    run_id = summary["mlflow"]["run_id"]
    stage_tags = {"dvc_stage_evaluate": f"evaluate@{task}", "evaluated": "true"}
    if tracking.run_exists(run_id):
        run_context = tracking.resumed_run(run_id, stage_tags)
    else:  # the store was switched or deleted since training: record the evaluation on its own run
        print(f"evaluate@{task}: MLflow run {run_id} of train@{task} is not in {tracking.tracking_uri()}; "
              "logging to a new run", flush=True)
        tags = {"dvc_stage": f"evaluate@{task}", "task": task, "data_source": summary["data_source"],
                "method": summary["method"], "backbone": summary["backbone"], "protocol": protocol,
                "pipeline": "dvc", "git_commit": tracking.git_commit() or "uncommitted"}
        run_context = tracking.tracked_run(experiment_id, f"evaluate@{task}", tags, config.to_dict())
    with run_context as run:
        details["mlflow_run_id"] = run.info.run_id
        tracking.log_numbers({f"eval_{k}": v for k, v in metrics.items()})
        write_json(paths.details(task), details)
        write_json(paths.metrics(task), metrics)  # last: its presence means the task is fully evaluated
        import mlflow

        mlflow.log_artifact(str(paths.metrics(task)), artifact_path="evaluate")
        mlflow.log_artifact(str(paths.details(task)), artifact_path="evaluate")
    return {**metrics, "details": details}


def main(argv: list[str] | None = None) -> None:
    args = stage_arguments("Stage evaluate@<task>: re-score the saved trainable weights.", task=True).parse_args(argv)
    run_stage(f"evaluate@{args.task}", lambda: evaluate_task(args.task, args.params, args.outputs))


if __name__ == "__main__":
    main()
