"""The one training entry point that the DVC pipeline and the sweeps both call: ``run_task``.

It turns a task's settings (a :class:`~dtl.config.TaskConfig`, resolved once by ``ExperimentConfig.for_task``)
into datasets, a model and a finished run. Which splits a run trains on, scores and reports, and how they open, is the configuration's evaluation protocol's
to say (``config.protocol``, from ``dtl.protocols``); this module only asks it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, ExperimentConfig, TaskConfig, task_settings
from .devices import SetupError, image_loader, resolve_device, resolve_precision
from .engine import EpochHook, TrainingState, TrainResult, evaluate, seed_everything, train_and_evaluate
from .io import load_trainable
from .methods import create_model
from .models import CheckpointError
from .objectives import Objective, objective_for


@dataclass
class TaskRun:
    task: str
    config: TaskConfig
    model: nn.Module
    result: TrainResult
    num_classes: int
    shots: int | None = None  # the NOAH-layout protocols: the training list's shot count
    image_size: int = 224  # the input size the run trained at

    def reported_splits(self) -> dict[str, str]:
        """What evaluating this run reports under its protocol (``reported_splits``)."""
        return self.config.protocol.reported_splits(self.task)

    def summary(self) -> dict:
        model = self.config.model
        return {
            "task": self.task,
            "method": model.method,
            "backbone": model.backbone,
            "protocol": self.config.evaluation.protocol,
            "seed": self.config.training.seed,
            **({"shots": self.shots} if self.shots is not None else {}),
            "num_classes": self.num_classes,
            "device": self.result.device,
            "precision": self.result.precision,
            "prefix_cache": self.result.cache_report.get("mode", "off"),
            **self.result.summary(),
        }


def build_model(config: TaskConfig, num_classes: int, pretrained: bool | str | None = None) -> nn.Module:
    """The model of a task's settings ``config``; settings the backbone cannot take (a start
    block past its blocks, a kernel larger than its token grid...) raise :class:`ConfigError` naming them.
    ``pretrained`` overrides ``model.checkpoint`` (``False``: random weights, enough to check the settings)."""
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
            decode_head=model.decode_head,
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
        split = resolved.protocol.training_split_words()
        raise ConfigError(f"{where}training.batch_size: {batch} is larger than the {train_images} images of "
                          f"{task}'s {split} (batches drop the remainder); use at most that many")
    try:
        resolve_precision(resolved.training.precision, resolve_device(resolved.training.device))
    except SetupError as err:
        raise ConfigError(f"{where}{err}") from None


def task_objective(config: TaskConfig, num_classes: int, image_size: int) -> Objective:
    """What ``config``'s protocol optimises and scores (``dtl.objectives``), for a model reading ``image_size``."""
    return objective_for(config.protocol.objective, num_classes=num_classes, crop_size=image_size,
                         label_smoothing=config.training.label_smoothing)


def backbone_image_size(model: nn.Module) -> int:
    cfg = getattr(model.family.backbone, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    patch_embed = getattr(model.family.backbone, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    return int(img_size[0]) if img_size else int(size)


def run_task(
    config: TaskConfig | ExperimentConfig,
    task: str | None = None,
    *,
    seed: int | None = None,
    shots: int | None = None,
    hooks: Sequence[EpochHook] = (),
    resume_from: TrainingState | None = None,
) -> TaskRun:
    """Train and evaluate a task's settings ``config`` (``ExperimentConfig.for_task``) and return the finished run.
    An experiment not resolved yet is resolved here for ``task``.

    ``shots`` (NOAH-layout protocols; default: the largest of ``data.shots``) and ``seed`` pick the training list
    ``train_meta.list.num_shot_<shots>.seed_<seed>``. ``hooks`` get every epoch's metrics and resumable state;
    ``resume_from`` continues from such a state (``dtl.engine.train_and_evaluate``)."""
    config = task_settings(config, task)
    task = config.task
    if seed is not None:  # a copy: the caller's settings keep their seed
        config = replace(config, training=replace(config.training, seed=seed))
    protocol = config.protocol
    shots = protocol.run_shots(shots)
    num_classes = protocol.num_classes(task)
    seed_everything(config.training.seed)  # the fresh head/CSN init must not depend on earlier runs in this process
    model = build_model(config, num_classes)
    img_size = config.data.image_size or backbone_image_size(model)

    def dataset(split: str) -> Dataset:
        return protocol.open_split(task, split, num_classes=num_classes, img_size=img_size, shots=shots,
                                   seed=config.training.seed, model=model)

    result = train_and_evaluate(
        model,
        dataset(protocol.train),
        {name: dataset(split) for name, split in protocol.scored_splits(task).items()},
        config.training,
        hooks,
        resume_from=resume_from,
        keep_best=protocol.keep_best,
        objective=task_objective(config, num_classes, img_size),
    )
    return TaskRun(task=task, config=config, model=model, result=result, num_classes=num_classes, shots=shots,
                   image_size=img_size)


def evaluate_saved(config: TaskConfig, seed: int, weights: str | Path, num_classes: int,
                   shots: int | None = None) -> dict:
    """Rebuild the trained model of a task's settings ``config`` from its saved trainable weights
    (``dtl.io.save_trainable``) and score the protocol's reported splits: ``{"<name>_accuracy": ...,
    "<name>_loss": ...}``, plus ``<name>_accuracy_masked`` for a split that holds only some of the classes (the
    argmax over those: ImageNet-A and -R). Nothing is retrained; with ``checkpoint: false`` the random frozen
    backbone is rebuilt from ``seed`` as ``run_task`` built it."""
    seed_everything(seed)
    model = build_model(config, num_classes)
    load_trainable(model, weights)
    return evaluate_model(config, config.task, model, num_classes, seed=seed, shots=shots)


def evaluate_model(config: TaskConfig, task: str, model: nn.Module, num_classes: int, *, seed: int,
                   shots: int | None = None, splits: dict[str, str] | None = None) -> dict:
    """Score a trained ``model`` of ``task`` (``config``: its settings) on ``splits`` (default:
    the protocol's reported splits), as :func:`evaluate_saved` does; ``<name>_images`` is each split's size (and,
    for segmentation, ``<name>_miou`` and the list ``<name>_class_iou``)."""
    device = resolve_device(config.training.device)
    precision = resolve_precision(config.training.precision, device)
    model.to(device)
    img_size = config.data.image_size or backbone_image_size(model)
    scores: dict[str, float] = {}
    protocol = config.protocol
    objective = task_objective(config, num_classes, img_size)
    for name, split in (protocol.reported_splits(task) if splits is None else splits).items():
        data = protocol.open_split(task, split, num_classes=num_classes, img_size=img_size, shots=shots, seed=seed,
                          model=model)
        present = sorted({label for _, label in getattr(data, "samples", [])})
        classes = present if 0 < len(present) < num_classes and split in protocol.target_splits() else None
        loader = image_loader(data, config.training.eval_batch_size, device, config.training.num_workers,
                              persistent=False)
        for key, value in evaluate(model, loader, device, precision, classes=classes, objective=objective).items():
            scores[f"{name}_{key}"] = value
        scores[f"{name}_images"] = len(data)
    return scores
