"""Load what training produced as a ready model: ``load_trained(path)``.

A trained task model is its frozen backbone (the checkpoint its settings name) plus the trainable weights training
changed (kilobytes for DTL), so every source below holds the settings and those weights, never the backbone:

- a train stage's output folder (``outputs/train/<task>/``: ``config.json``, ``summary.json`` and one weights file
  per seed; ``seed=`` picks one, default the first);
- one weights file written by the train stage or by :func:`export_trained` (``.safetensors`` whose metadata holds
  the settings, the task, the class count and the seed: a single file to hand on);
- a sweep trial's checkpoint folder (``training_state.pt`` beside the ``trained.json`` the trial writes).

The model comes back in eval mode on the device asked for, with a :class:`TrainedInfo` as ``model.trained``: the
task, its class names, the input size and the transform that turns an image into the model's input.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from .config import ConfigError, ExperimentConfig, TaskConfig
from .engine import SetupError, TrainingState, resolve_device, resolve_precision, seed_everything
from .experiment import backbone_image_size, build_model
from .io import WeightsMismatchError, load_trainable, save_trainable
from .models import CheckpointError

METADATA_KEY = "dtl"  # the safetensors metadata entry that holds a trained file's record (JSON)
RECORD_FILE = "trained.json"  # beside a sweep trial's training_state.pt
TRIAL_STATE_FILE = "training_state.pt"


class TrainedModelError(ValueError):
    """A trained model cannot be loaded from what was given (the message names the file)."""


@dataclass(frozen=True)
class TrainedInfo:
    """What a loaded task model was trained for and how to feed it."""

    task: str
    config: TaskConfig
    num_classes: int
    seed: int
    image_size: int
    source: Path  # the weights file (or trial checkpoint) the trainable weights came from
    class_names: tuple[str, ...] = field(default=())
    precision: str = "fp32"  # the autocast training used on this device (fp32, bf16, fp16)
    normalisation: dict[str, tuple[float, ...]] = field(default_factory=dict)  # the backbone's mean / std

    @property
    def input_format(self) -> tuple:
        """What the transform depends on: models with equal formats read an image into the same tensor."""
        return self.config.protocol.input_format(self.image_size, self.normalisation)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> model input, exactly as the task's evaluation read its images."""
        return self.config.protocol.transform(self.image_size, self.normalisation)


def record(config: TaskConfig, task: str, num_classes: int, seed: int, image_size: int | None,
           shots: int | None = None) -> dict[str, Any]:
    """The settings a trained file carries (``export_trained``, the train stage's weights, trial checkpoints)."""
    return {"task": task, "num_classes": num_classes, "seed": seed, "image_size": image_size,
            **({"shots": shots} if shots is not None else {}), "config": config.to_dict()}


def trained_metadata(config: TaskConfig, task: str, num_classes: int, seed: int, image_size: int,
                     shots: int | None = None) -> dict[str, str]:
    """safetensors metadata that makes a weights file loadable on its own by :func:`load_trained`."""
    return {METADATA_KEY: json.dumps(record(config, task, num_classes, seed, image_size, shots))}


def export_trained(model: nn.Module, path: str | Path) -> Path:
    """Write a model returned by :func:`load_trained` (or trained and given a ``trained`` info) as one file."""
    info: TrainedInfo | None = getattr(model, "trained", None)
    if info is None:
        raise TrainedModelError("export_trained needs a model from load_trained (it carries the task's settings)")
    save_trainable(model, path, trained_metadata(info.config, info.task, info.num_classes, info.seed,
                                                 info.image_size))
    return Path(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainedModelError(f"{path}: missing (a train stage's output folder holds config.json and "
                                "summary.json)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise TrainedModelError(f"{path}: not readable JSON ({err})") from None


def _stage_folder(folder: Path, seed: int | None) -> tuple[dict[str, Any], Path]:
    summary = _read_json(folder / "summary.json")
    runs = summary.get("per_seed") or []
    if not runs:
        raise TrainedModelError(f"{folder / 'summary.json'}: lists no trained runs (per_seed is empty)")
    chosen = runs[0] if seed is None else next((r for r in runs if r.get("seed") == seed), None)
    if chosen is None:
        seeds = [r.get("seed") for r in runs]
        raise TrainedModelError(f"{folder}: no run with seed {seed} (trained seeds: {seeds})")
    config = _read_json(folder / "config.json")
    entry = {"task": summary.get("task", folder.name), "num_classes": summary["num_classes"],
             "seed": chosen["seed"], "config": config, **({"shots": chosen["shots"]} if chosen.get("shots") else {})}
    return entry, folder / chosen["weights"]


def _file_record(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a file that is not one of its files
        raise TrainedModelError(f"{path}: not a safetensors weights file ({err})") from None
    text = metadata.get(METADATA_KEY)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as err:
        raise TrainedModelError(f"{path}: its {METADATA_KEY!r} metadata is not JSON ({err})") from None


def _trial_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    entry = _read_json(folder / RECORD_FILE)
    try:
        state = TrainingState.load(folder / TRIAL_STATE_FILE)
    except Exception as err:  # torch.load's errors for a truncated or foreign file vary
        raise TrainedModelError(f"{folder / TRIAL_STATE_FILE}: not a trial checkpoint ({err})") from None
    return entry, state.trainable


def _source(path: Path, seed: int | None) -> tuple[dict[str, Any], Path, dict[str, torch.Tensor] | None]:
    """(record, weights path, weights if already read)."""
    if path.is_dir():
        if (path / TRIAL_STATE_FILE).is_file():
            entry, weights = _trial_folder(path)
            return entry, path / TRIAL_STATE_FILE, weights
        return (*_stage_folder(path, seed), None)
    if not path.exists():
        raise TrainedModelError(f"{path}: no such file or folder (give a train stage's output folder, a trained "
                                ".safetensors file or a sweep trial's checkpoint folder)")
    entry = _file_record(path)
    if entry is None:  # a train stage's weights file without a record: its folder has the settings
        if not (path.parent / "summary.json").is_file():
            raise TrainedModelError(f"{path}: carries no training settings and has no summary.json beside it "
                                    "(export it with dtl.trained.export_trained, or give its train folder)")
        entry, _ = _stage_folder(path.parent, seed)
    return entry, path, None


def read_class_names(config: ExperimentConfig, task: str, num_classes: int) -> tuple[str, ...]:
    """The class names of ``task``'s data folder (``classes.txt``, one per line, or ``meta.json``'s
    ``classes``), else the indices as names."""
    folder = Path(config.data.root) / task
    names: list[str] = []
    try:
        if (folder / "classes.txt").is_file():
            names = [line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip()]
        elif (folder / "meta.json").is_file():
            names = [str(n) for n in json.loads((folder / "meta.json").read_text()).get("classes", [])]
    except (OSError, json.JSONDecodeError, AttributeError):
        names = []
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return tuple(names)


def load_trained(path: str | Path, *, seed: int | None = None, device: str | torch.device | None = None) -> nn.Module:
    """The trained task model at ``path`` (see the module docstring), in eval mode on ``device`` (default: the
    device its settings train on: ``auto`` is the GPU when there is one). Problems raise
    :class:`TrainedModelError` with one line naming the file."""
    path = Path(path)
    entry, weights_path, weights = _source(path, seed)
    where = weights_path
    try:
        task, num_classes, run_seed = entry["task"], int(entry["num_classes"]), int(entry["seed"])
        config = TaskConfig.from_dict(entry["config"], where=str(where), task=task)
    except ConfigError as err:
        raise TrainedModelError(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        raise TrainedModelError(f"{where}: incomplete training record ({err})") from None
    seed_everything(run_seed)  # a random frozen backbone (checkpoint: false) is rebuilt as training built it
    try:
        model = build_model(config, num_classes)
    except CheckpointError as err:
        raise TrainedModelError(f"{where}: its backbone checkpoint cannot be read: {err}") from None
    except ConfigError as err:
        raise TrainedModelError(f"{where}: {err}") from None
    try:
        load_trainable(model, weights_path, state=weights)
    except WeightsMismatchError as err:
        raise TrainedModelError(f"{err} (settings from {where})") from None
    try:
        target = resolve_device(str(device) if device is not None else config.training.device)
        precision = resolve_precision(config.training.precision, target)
    except SetupError as err:
        raise TrainedModelError(f"{where}: {err}") from None
    model.to(target).eval()
    image_size = int(entry.get("image_size") or config.data.image_size or backbone_image_size(model))
    cfg = getattr(model.family.backbone, "pretrained_cfg", None) or {}
    model.trained = TrainedInfo(task=task, config=config, num_classes=num_classes, seed=run_seed,
                                image_size=image_size, source=weights_path,
                                class_names=read_class_names(config, task, num_classes), precision=precision,
                                normalisation={key: tuple(cfg[key]) for key in ("mean", "std") if key in cfg})
    return model

