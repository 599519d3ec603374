"""The one training entry point that the DVC pipeline and the sweeps both call: ``run_task``.

It turns an :class:`~dtl.config.ExperimentConfig` and a task name into datasets, a model and a finished run,
following the evaluation protocol: ``final`` trains on train800val200 and tests once at the end (the
official scripts); ``val`` trains on train800 and scores val200 (VTAB's rule for choosing hyperparameters:
the test split is never used for selection).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from .config import ExperimentConfig
from .engine import EpochCallback, StateCallback, TrainingState, TrainResult, seed_everything, train_and_evaluate
from .models import create_model

PROTOCOL_SPLITS = {"final": ("train800val200", {"test": "test"}), "val": ("train800", {"val": "val200"})}


@dataclass
class TaskRun:
    task: str
    config: ExperimentConfig  # with the task's overrides applied
    model: nn.Module
    result: TrainResult
    num_classes: int

    def summary(self) -> dict:
        model = self.config.model
        return {
            "task": self.task,
            "method": model.method,
            "backbone": model.backbone,
            "protocol": self.config.evaluation.protocol,
            "seed": self.config.training.seed,
            "num_classes": self.num_classes,
            "device": self.result.device,
            "precision": self.result.precision,
            "prefix_cache": self.result.prefix_cache.get("mode", "off"),
            **self.result.summary(),
        }


def ensure_data(config: ExperimentConfig, tasks: Sequence[str] | None = None) -> Path:
    """Make sure the task folders exist: generate the synthetic suite if needed, or check a VTAB-1K root."""
    from .data import check_vtab_root, generate_synthetic_suite

    data = config.data
    tasks = list(tasks or data.tasks)
    root = Path(data.root)
    if data.source == "synthetic":
        generate_synthetic_suite(root, tasks=tasks, image_size=data.image_size or 32, num_test=data.num_test,
                                 seed=data.generator_seed)
    else:
        check_vtab_root(root, tasks)
    return root


def build_model(config: ExperimentConfig, num_classes: int) -> nn.Module:
    model = config.model
    return create_model(
        model.backbone,
        model.method,
        num_classes,
        pretrained=model.checkpoint,
        drop_path_rate=model.drop_path,
        drop_path_scope=model.drop_path_scope,
        img_size=config.data.image_size,
        backbone_dtype=None if model.backbone_dtype == "fp32" else model.backbone_dtype,
        **model.model_options(),
    )


def backbone_image_size(model: nn.Module) -> int:
    cfg = getattr(model.adapter.backbone, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    patch_embed = getattr(model.adapter.backbone, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    return int(img_size[0]) if img_size else int(size)


def run_task(
    config: ExperimentConfig,
    task: str,
    *,
    seed: int | None = None,
    callbacks: Sequence[EpochCallback] = (),
    resume_from: TrainingState | None = None,
    save_state: StateCallback | None = None,
) -> TaskRun:
    """Train and evaluate ``config``'s method on ``task`` (overrides applied) and return the finished run.

    ``save_state`` / ``resume_from``: checkpoint the run after every epoch / continue from such a checkpoint
    (``dtl.engine.train_and_evaluate``)."""
    from .data import VTabDataset

    config = config.for_task(task)
    if seed is not None:
        config.training = replace(config.training, seed=seed)
    train_split, eval_splits = PROTOCOL_SPLITS[config.evaluation.protocol]
    root = Path(config.data.root)
    train_set = VTabDataset(root, task, train_split, img_size=config.data.image_size or 224, preload=False)
    seed_everything(config.training.seed)  # the fresh head/CSN init must not depend on earlier runs in this process
    model = build_model(config, train_set.num_classes)
    img_size = config.data.image_size or backbone_image_size(model)

    def dataset(split: str) -> VTabDataset:
        return VTabDataset(root, task, split, img_size=img_size, num_classes=train_set.num_classes,
                           preload=config.data.preload)

    result = train_and_evaluate(
        model,
        dataset(train_split),
        {name: dataset(split) for name, split in eval_splits.items()},
        config.training,
        callbacks,
        resume_from=resume_from,
        save_state=save_state,
    )
    return TaskRun(task=task, config=config, model=model, result=result, num_classes=train_set.num_classes)
