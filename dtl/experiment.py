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

from .config import ConfigError, ExperimentConfig
from .engine import EpochCallback, StateCallback, TrainingState, TrainResult, seed_everything, train_and_evaluate
from .methods import create_model

@dataclass(frozen=True)
class Protocol:
    """Which split a run trains on, which it scores at its last epoch, and which evaluating the saved weights
    reports."""

    train: str
    scored: dict[str, str]  # name -> split, scored after the last epoch (and every eval_every epochs)
    reported: dict[str, str]  # name -> split, what ``evaluate_saved`` scores


PROTOCOLS: dict[str, Protocol] = {
    # the authors' scripts: train on all 1,000 images, test once at the end
    "final": Protocol("train800val200", {"test": "test"}, {"test": "test"}),
    # VTAB's rule for choosing hyperparameters: train on train800, score val200 (test reported for reference only)
    "val": Protocol("train800", {"val": "val200"}, {"val": "val200", "test": "test"}),
}


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
        check_vtab_root(root, tasks, num_classes=data.num_classes)
    return root


def build_model(config: ExperimentConfig, num_classes: int, pretrained: bool | str | None = None) -> nn.Module:
    """The model of ``config`` (for one task: ``config.for_task``); settings the backbone cannot take (a start
    block past its blocks, a kernel larger than its token grid...) raise :class:`ConfigError` naming them.
    ``pretrained`` overrides ``model.checkpoint`` (``False``: random weights, enough to check the settings)."""
    from .models import CheckpointError

    model = config.model
    try:
        return create_model(
            model.backbone,
            model.method,
            num_classes,
            pretrained=model.checkpoint if pretrained is None else pretrained,
            drop_path_rate=model.drop_path,
            drop_path_scope=model.drop_path_scope,
            img_size=config.data.image_size,
            backbone_dtype=None if model.backbone_dtype == "fp32" else model.backbone_dtype,
            **model.model_options(),
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model ({model.method} on {model.backbone}): {err}") from None


_CHECKED_CHECKPOINTS: set[tuple[str, str]] = set()


def check_run(config: ExperimentConfig, task: str, train_images: int, num_classes: int) -> None:
    """Fail before any training when ``task`` cannot run with its settings here: a model its backbone cannot take,
    a batch larger than its training split, a device or precision this machine lacks (the errors name the key)."""
    from .engine import SetupError, resolve_device, resolve_precision

    from .models.backbone import CheckpointError

    resolved = config.for_task(task)
    where = f"overrides.{task} / " if config.overrides.get(task) else ""
    checkpoint = resolved.model.checkpoint
    # A local weights file is read once here (per backbone and file): a file that is not a checkpoint, or one
    # of another model, fails now rather than in the middle of the pipeline.
    local = isinstance(checkpoint, str) and (resolved.model.backbone, checkpoint) not in _CHECKED_CHECKPOINTS
    try:
        build_model(resolved, num_classes, pretrained=checkpoint if local else False)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    except CheckpointError as err:
        raise ConfigError(f"{where}model.checkpoint: {err}") from None
    if local:
        _CHECKED_CHECKPOINTS.add((resolved.model.backbone, checkpoint))
    batch = resolved.training.batch_size
    if train_images < batch:
        raise ConfigError(f"{where}training.batch_size: {batch} is larger than the {train_images} images of "
                          f"{task}'s {PROTOCOLS[resolved.evaluation.protocol].train} split (batches drop the "
                          "remainder); use at most that many")
    try:
        resolve_precision(resolved.training.precision, resolve_device(resolved.training.device))
    except SetupError as err:
        raise ConfigError(f"{where}{err}") from None


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
    protocol = PROTOCOLS[config.evaluation.protocol]
    train_split, eval_splits = protocol.train, protocol.scored
    root = Path(config.data.root)
    train_set = VTabDataset(root, task, train_split, img_size=config.data.image_size or 224,
                            num_classes=config.data.num_classes.get(task), preload=False)
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


def evaluate_saved(config: ExperimentConfig, task: str, seed: int, weights: str | Path, num_classes: int) -> dict:
    """Rebuild the trained model of ``config`` for ``task`` from its saved trainable weights
    (``dtl.io.save_trainable``) and score the protocol's reported splits: ``{"<name>_accuracy": ...,
    "<name>_loss": ...}``. Nothing is retrained; with ``checkpoint: false`` the random frozen backbone is rebuilt
    from ``seed`` as ``run_task`` built it."""
    from torch.utils.data import DataLoader

    from .data import VTabDataset
    from .engine import evaluate, resolve_device, resolve_precision
    from .io import load_trainable

    config = config.for_task(task)
    seed_everything(seed)
    model = build_model(config, num_classes)
    load_trainable(model, weights)
    device = resolve_device(config.training.device)
    precision = resolve_precision(config.training.precision, device)
    model.to(device)
    img_size = config.data.image_size or backbone_image_size(model)
    scores: dict[str, float] = {}
    for name, split in PROTOCOLS[config.evaluation.protocol].reported.items():
        data = VTabDataset(Path(config.data.root), task, split, img_size=img_size, num_classes=num_classes,
                           preload=False)
        loader = DataLoader(data, batch_size=config.training.eval_batch_size, shuffle=False,
                            num_workers=config.training.num_workers)
        for key, value in evaluate(model, loader, device, precision).items():
            scores[f"{name}_{key}"] = value
    return scores
