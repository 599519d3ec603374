"""The one experiment schema shared by the DVC pipeline (``params.yaml``) and the sweeps.

An experiment is data + model + training + evaluation, plus per-task ``overrides`` (the paper tunes lr,
drop-path and the DTL+ kernel per task; a sweep's best configuration lands there too). Overrides use the flat
field names of the model and training sections, e.g. ``overrides: {cifar: {lr: 0.0003, drop_path: 0.1}}``.
Everything is validated on load; an error names the key (``model.rank``, ``overrides.cifar.lr``) and what is
allowed.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .engine import TrainConfig
from .models import BACKBONE_DTYPES, DROP_PATH_SCOPES, METHODS, METHOD_OPTIONS

DATA_SOURCES = ("synthetic", "vtab1k")
PROTOCOLS = ("final", "val")


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic: the generated embedded suite; vtab1k: a VTAB-1K folder
    root: str = "data/synthetic"  # the folder holding one sub-folder per task (relative to the working dir)
    tasks: list[str] = field(default_factory=lambda: ["dsprites_loc", "dsprites_ori", "clevr_count", "digits",
                                                      "patterns"])
    image_size: int | None = None  # None: the backbone's native input size
    num_test: int = 1000  # synthetic only: test images per task
    generator_seed: int = 0  # synthetic only
    preload: bool = True  # decode every image once and keep it in memory

    def validate(self) -> None:
        _need(self.source in DATA_SOURCES, "data.source", f"one of {', '.join(DATA_SOURCES)}", self.source)
        _need(isinstance(self.root, str) and self.root, "data.root", "a folder path", self.root)
        _need(isinstance(self.tasks, list) and self.tasks and all(isinstance(t, str) and t for t in self.tasks),
              "data.tasks", "a non-empty list of task folder names", self.tasks)
        _need(len(set(self.tasks)) == len(self.tasks), "data.tasks", "no repeated task", self.tasks)
        _need(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 8),
              "data.image_size", "null or an integer >= 8", self.image_size)
        _need(isinstance(self.num_test, int) and self.num_test >= 1, "data.num_test", "an integer >= 1", self.num_test)


@dataclass
class ModelConfig:
    backbone: str = "vit_micro_patch4_32"
    checkpoint: bool | str = True  # true: the hub/embedded weights; false: random init; a path: local file
    method: str = "dtl_plus"
    rank: int | None = None  # None: the family's paper default (ViT 2, Swin 4; LoRA 8; adapter 8)
    start_block: int | None = None  # M; None: the paper default (ViT 6, Swin 14)
    extract_start: int | None = None  # first block with a side map; None: the paper default (ViT 0, Swin 4)
    beta: float = 100.0
    kernel_size: int | None = None  # DTL+ only; None: the paper default (ViT 3, Swin 5)
    drop_path: float = 0.0
    # all: timm's rule on every block (the authors' code); suffix: only blocks gradients flow through (after M for
    # DTL, none for the linear probe), which keeps the frozen part deterministic and the prefix cache exact
    drop_path_scope: str = "all"
    grad_checkpointing: bool | str = False  # dtl/dtl_plus: true (lowest memory) or "mlp" (recompute MLP hidden only)
    backbone_dtype: str = "fp32"  # dtl/dtl_plus: bf16/fp16 stores and runs the frozen backbone in low precision

    def validate(self) -> None:
        _need(self.method in METHODS, "model.method", f"one of {', '.join(METHODS)}", self.method)
        _need(isinstance(self.backbone, str) and self.backbone, "model.backbone", "a timm model name", self.backbone)
        _need(isinstance(self.checkpoint, (bool, str)), "model.checkpoint", "true, false or a file path",
              self.checkpoint)
        for name in ("rank", "start_block", "extract_start", "kernel_size"):
            value = getattr(self, name)
            low = 0 if name in ("start_block", "extract_start") else 1
            _need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= low),
                  f"model.{name}", f"null or an integer >= {low}", value)
        _need(isinstance(self.beta, (int, float)) and self.beta > 0, "model.beta", "a number > 0", self.beta)
        _need(isinstance(self.drop_path, (int, float)) and 0 <= self.drop_path < 1, "model.drop_path",
              "a number in [0, 1)", self.drop_path)
        _need(self.drop_path_scope in DROP_PATH_SCOPES, "model.drop_path_scope", f"one of {', '.join(DROP_PATH_SCOPES)}",
              self.drop_path_scope)
        _need(isinstance(self.grad_checkpointing, bool) or self.grad_checkpointing == "mlp",
              "model.grad_checkpointing", 'false, true or "mlp"', self.grad_checkpointing)
        _need(self.backbone_dtype in BACKBONE_DTYPES, "model.backbone_dtype", f"one of {', '.join(BACKBONE_DTYPES)}",
              self.backbone_dtype)
        _need(self.backbone_dtype == "fp32" or self.method in ("dtl", "dtl_plus"), "model.backbone_dtype",
              f"fp32 for method {self.method!r} (low-precision backbones are for dtl and dtl_plus)",
              self.backbone_dtype)

    def model_options(self) -> dict[str, Any]:
        """The keyword options of ``dtl.create_model`` that this method uses (unset ones left to defaults)."""
        options = {name: getattr(self, name) for name in METHOD_OPTIONS[self.method] if getattr(self, name) is not None}
        if not self.grad_checkpointing:
            options.pop("grad_checkpointing", None)
        return options


@dataclass
class EvaluationConfig:
    protocol: str = "final"  # final: train on train800val200, test once; val: train on train800, score val200
    seeds: list[int] = field(default_factory=lambda: [42])

    def validate(self) -> None:
        _need(self.protocol in PROTOCOLS, "evaluation.protocol", f"one of {', '.join(PROTOCOLS)}", self.protocol)
        _need(isinstance(self.seeds, list) and self.seeds and all(isinstance(s, int) for s in self.seeds),
              "evaluation.seeds", "a non-empty list of integers", self.seeds)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainConfig, "evaluation": EvaluationConfig}
# Keys a per-task override may set, and the section each belongs to.
OVERRIDE_KEYS: dict[str, str] = {
    **{f.name: "model" for f in fields(ModelConfig)},
    **{f.name: "training" for f in fields(TrainConfig)
       if f.name not in ("device", "progress", "num_workers", "prefix_cache_dir")},
}


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "config") -> "ExperimentConfig":
        """Build and validate from a plain dict (e.g. ``yaml.safe_load(params.yaml)``); extra top-level keys
        that other tools own (such as a sweep section) are rejected too, so typos cannot pass silently."""
        raw = copy.deepcopy(raw or {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
        allowed = set(_SECTIONS) | {"overrides"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        sections = {}
        for name, section_class in _SECTIONS.items():
            sections[name] = _build(section_class, raw.get(name) or {}, where, name)
        overrides = raw.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: overrides: expected a mapping of task -> settings")
        config = cls(**sections, overrides={task: dict(values or {}) for task, values in overrides.items()})
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        try:
            self.data.validate()
            self.model.validate()
            self.evaluation.validate()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for task, values in self.overrides.items():
            check_override_entry(values, f"{where}: overrides.{task}")
            self.for_task(task, where)  # the merged settings must validate too

    def for_task(self, task: str, where: str = "config") -> "ExperimentConfig":
        """This experiment with ``overrides[task]`` applied (unknown tasks get the global settings)."""
        values = self.overrides.get(task) or {}
        model = {k: v for k, v in values.items() if OVERRIDE_KEYS[k] == "model"}
        training = {k: v for k, v in values.items() if OVERRIDE_KEYS[k] == "training"}
        try:
            merged = replace(self, model=replace(self.model, **model), overrides={})
            merged.model.validate()
            merged.training = _build(TrainConfig, {**asdict(self.training), **training}, "", "training")
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"{where}: overrides.{task}: {err}") from None
        return merged

    def to_dict(self) -> dict:
        return asdict(self)


def check_override_entry(values: Any, where: str) -> dict[str, Any]:
    """One task's override entry: a mapping whose keys are flat override keys (values are checked on merge)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of setting -> value (or {{}}), got {type(values).__name__}")
    unknown = sorted(map(str, set(values) - set(OVERRIDE_KEYS)))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(OVERRIDE_KEYS))}")
    return dict(values)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment file (such as ``params.yaml``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return ExperimentConfig.from_dict(raw, where=str(path))


def _need(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _build(section_class, values: dict, where: str, section: str):
    prefix = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}{section}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(section_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    try:
        return section_class(**values)
    except ValueError as err:  # TrainConfig validates itself and names the field as training.<name>
        raise ConfigError(f"{prefix}{err}") from None
