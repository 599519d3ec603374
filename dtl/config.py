"""The one experiment schema shared by the DVC pipeline (``params.yaml``) and the sweeps.

An experiment is data + model + training + evaluation, plus per-task ``overrides`` (the paper tunes lr,
drop-path and the DTL+ kernel per task; a sweep's best configuration lands there too). Overrides use the flat
field names of the model and training sections, e.g. ``overrides: {cifar: {lr: 0.0003, drop_path: 0.1}}``.
Everything is validated on load; an error names the key (``model.rank``, ``overrides.cifar.lr``) and what is
allowed. One task's settings, its overrides applied, are a :class:`TaskConfig` (``ExperimentConfig.for_task``).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .methods import (
    BACKBONE_DTYPES,
    all_option_names,
    available_methods,
    canonical_name,
    float_option_names,
    get_method,
    method_options,
)
from .protocols import Protocol, available_protocols, data_sources, get_protocol, protocols_for_source
from .validation import ConfigError, describe_number, is_int, is_number, need

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# DTL's frozen-prefix feature cache (dtl.cache): auto = use it when it is exact, memory/disk = require it, off
CACHE_MODES = ("auto", "memory", "disk", "off")
# where drop-path applies: every block (timm's rule) or only the blocks gradients flow through (dtl.methods)
DROP_PATH_SCOPES = ("all", "suffix")
# segmentation decode heads (dtl.methods.heads): BatchNorm + 1x1 conv on the last block; a light multi-level FPN
DECODE_HEADS = ("linear", "fpn")


@dataclass
class DataConfig:
    # synthetic: the generated embedded suite of the protocol; vtab1k: a VTAB-1K folder; few_shot: few-shot data
    # sets in the NOAH layout; domain_generalization: a source and target domains in that layout
    source: str = "synthetic"
    root: str = "data/synthetic"  # the folder holding one sub-folder per task (relative to the working dir)
    tasks: list[str] = field(default_factory=lambda: ["dsprites_loc", "dsprites_ori", "clevr_count", "digits",
                                                      "patterns"])
    image_size: int | None = None  # None: the backbone's native input size
    num_test: int = 1000  # synthetic only: test images per task
    generator_seed: int = 0  # synthetic only
    preload: bool = True  # decode every image once and keep it in memory
    # class counts of tasks that are not VTAB-1K tasks (a folder of your own in the VTAB-1K layout), e.g.
    # {my_task: 12}; a meta.json {"num_classes": K} in the task folder works too
    num_classes: dict[str, int] = field(default_factory=dict)
    # few_shot protocol: the shot counts to train (one run per shot count and seed); domain_generalization: one
    # value, the source's training list (train_meta.list.num_shot_<k>.seed_<s>)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    targets: list[str] = field(default_factory=list)  # domain_generalization: the target domain folders

    def validate(self) -> None:
        sources = data_sources()
        need(self.source in sources, "data.source", f"one of {', '.join(sources)}", self.source)
        need(isinstance(self.root, str) and self.root, "data.root", "a folder path", self.root)
        need(isinstance(self.tasks, list) and self.tasks and all(isinstance(t, str) and t for t in self.tasks),
              "data.tasks", "a non-empty list of task folder names", self.tasks)
        need(len(set(self.tasks)) == len(self.tasks), "data.tasks", "no repeated task", self.tasks)
        need(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 8),
              "data.image_size", "null or an integer >= 8", self.image_size)
        need(isinstance(self.num_test, int) and self.num_test >= 1, "data.num_test", "an integer >= 1", self.num_test)
        need(isinstance(self.generator_seed, int) and not isinstance(self.generator_seed, bool), "data.generator_seed",
              "an integer", self.generator_seed)
        need(isinstance(self.preload, bool), "data.preload", "true or false", self.preload)
        need(isinstance(self.num_classes, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in self.num_classes.items()), "data.num_classes",
              "a mapping of task -> number of classes (an integer >= 1), e.g. {my_task: 12}", self.num_classes)
        need(isinstance(self.shots, list) and self.shots and len(set(self.shots)) == len(self.shots) and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.shots), "data.shots",
              "a non-empty list of distinct shot counts (integers >= 1), e.g. [1, 2, 4, 8, 16]", self.shots)
        need(isinstance(self.targets, list) and all(isinstance(t, str) and t for t in self.targets)
              and len(set(self.targets)) == len(self.targets), "data.targets",
              "a list of distinct target domain folder names", self.targets)


class _ModelSection:
    """The ``model`` section: common fields (backbone, checkpoint, method, drop-path, backbone dtype) and every
    registered method's options as flat keys (``model.rank``, ``model.prompt_length``...; ``null`` = the method's
    default for the backbone). The option fields are derived from the method registry (``dtl.methods``), so a new
    method's options are config keys and per-task override keys without touching this file."""

    def validate(self) -> None:
        need(isinstance(self.method, str) and self.method in method_options(), "model.method",
              f"one of {', '.join(available_methods())}", self.method)
        need(isinstance(self.backbone, str) and self.backbone, "model.backbone", "a timm model name", self.backbone)
        need(isinstance(self.checkpoint, (bool, str)), "model.checkpoint", "true, false or a file path",
              self.checkpoint)
        checks = _option_checks()
        for name in all_option_names():  # every option that is set, whichever method it belongs to
            value = getattr(self, name)
            if value is not None and name in checks:
                need(checks[name][0](value), f"model.{name}", f"null or {checks[name][1]}", value)
        need(isinstance(self.drop_path, (int, float)) and 0 <= self.drop_path < 1, "model.drop_path",
              "a number in [0, 1)", self.drop_path)
        need(self.drop_path_scope in DROP_PATH_SCOPES, "model.drop_path_scope", f"one of {', '.join(DROP_PATH_SCOPES)}",
              self.drop_path_scope)
        need(isinstance(self.backbone_dtype, str) and self.backbone_dtype in BACKBONE_DTYPES, "model.backbone_dtype",
              f"one of {', '.join(BACKBONE_DTYPES)}", self.backbone_dtype)
        need(self.decode_head is None or self.decode_head in DECODE_HEADS, "model.decode_head",
             f"null (a classifier) or one of {', '.join(DECODE_HEADS)} (segmentation)", self.decode_head)
        capable = [m for m in available_methods() if get_method(m).low_precision_backbone]
        need(self.backbone_dtype == "fp32" or canonical_name(self.method) in capable, "model.backbone_dtype",
              f"fp32 for method {self.method!r} (low-precision backbones are for {', '.join(capable)})",
              self.backbone_dtype)

    def model_options(self) -> dict[str, Any]:
        """The keyword options of ``dtl.create_model`` that this method uses (unset ones left to its defaults)."""
        return {name: getattr(self, name) for name in method_options()[self.method] if getattr(self, name) is not None}


def _option_checks() -> dict[str, tuple]:
    checks: dict[str, tuple] = {}
    for name in available_methods():
        for option, check in get_method(name).options.checks.items():
            checks.setdefault(option, check)
    return checks


ModelConfig = make_dataclass("ModelConfig", [
    ("backbone", str, field(default="vit_micro_patch4_32")),
    ("checkpoint", "bool | str", field(default=True)),  # true: hub / embedded weights; false: random; a file path
    ("method", str, field(default="dtl_plus")),
    ("drop_path", float, field(default=0.0)),
    # all: timm's rule on every block (the authors' code); suffix: only blocks gradients flow through (after M for
    # DTL, none for the linear probe), which keeps the frozen part deterministic and the prefix cache exact
    ("drop_path_scope", str, field(default="all")),
    ("backbone_dtype", str, field(default="fp32")),  # bf16/fp16: store and run the frozen backbone in low precision
    ("decode_head", "str | None", field(default=None)),  # segmentation: linear or fpn; null: a classifier
    *[(name, Any, field(default=None)) for name in all_option_names()],
], bases=(_ModelSection,))
ModelConfig.__module__ = __name__  # so configs pickle into Ray workers by this module's name
ModelConfig.__doc__ = _ModelSection.__doc__


@dataclass
class TrainConfig:
    """Optimisation settings for one run; the defaults are the paper's recipe (the official VTAB-1K scripts:
    AdamW, weight decay 0.05 except on 1-D parameters, batch 32 with drop_last, timm's cosine schedule with 10
    warm-up epochs stepped per epoch, 100 cosine + 10 cool-down epochs, seed 42). Validated on construction;
    errors name the field (``training.lr``)."""

    epochs: int = 110  # total epochs run; the last ``cooldown_epochs`` sit at ``min_lr``
    warmup_epochs: int = 10
    cooldown_epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-8
    warmup_lr: float = 1e-7
    weight_decay: float = 0.05
    batch_size: int = 32
    eval_batch_size: int = 256
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 42
    device: str = "auto"  # auto: cuda if available, else cpu
    num_workers: int = 0
    eval_every: int = 0  # evaluate every N epochs (0: only after the last epoch)
    progress: bool = True
    # DTL's frozen-prefix feature cache (dtl.cache): auto = use it when it is exact (DTL model, no drop-path in
    # blocks 0..M, no augmentation), on disk when the dataset identifies itself; memory/disk = require it.
    prefix_cache: str = "auto"
    prefix_cache_dir: str | None = None  # None: $DTL_CACHE_DIR or ~/.cache/dtl/prefix

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def integer(name: str, low: int, high: int | None = None) -> None:
            need(is_int(low, high)(getattr(self, name)), f"training.{name}",
                 f"an integer >= {low}" if high is None else f"an integer in {low}..{high}", getattr(self, name))

        def number(name: str, low: float, *, above: bool = False, below: float | None = None,
                   optional: bool = False) -> None:
            value = getattr(self, name)
            ok = (optional and value is None) or is_number(low, above=above, below=below)(value)
            expected = describe_number(low, above=above, below=below)
            need(ok, f"training.{name}", ("null or " if optional else "") + expected, value)

        integer("epochs", 1)
        integer("warmup_epochs", 0)
        integer("cooldown_epochs", 0, self.epochs - 1 if isinstance(self.epochs, int) else None)
        number("lr", 0, above=True)
        number("min_lr", 0)
        number("warmup_lr", 0)
        number("weight_decay", 0)
        integer("batch_size", 1)
        integer("eval_batch_size", 1)
        number("label_smoothing", 0, below=1)
        number("grad_clip", 0, above=True, optional=True)
        need(self.precision in PRECISIONS, "training.precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        integer("seed", 0)
        need(isinstance(self.device, str) and (self.device == "auto" or self.device.split(":")[0] in
                                               ("cpu", "cuda", "mps")), "training.device",
             "auto, cpu, cuda or cuda:N", self.device)
        integer("num_workers", 0)
        integer("eval_every", 0)
        need(isinstance(self.progress, bool), "training.progress", "true or false", self.progress)
        need(self.prefix_cache in CACHE_MODES, "training.prefix_cache", f"one of {', '.join(CACHE_MODES)}",
             self.prefix_cache)
        need(self.prefix_cache_dir is None or (isinstance(self.prefix_cache_dir, str) and self.prefix_cache_dir),
             "training.prefix_cache_dir", "null or a folder path", self.prefix_cache_dir)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationConfig:
    # final: train on train800val200, test once; val: train on train800, score val200; few_shot: per shot count and
    # seed, train on the k-shot list, validate every eval_every epochs, test the weights best on val;
    # domain_generalization: train on the source's k-shot list, test the source and every target (dtl.protocols)
    protocol: str = "final"
    seeds: list[int] = field(default_factory=lambda: [42])

    def validate(self) -> None:
        protocols = available_protocols()
        need(self.protocol in protocols, "evaluation.protocol", f"one of {', '.join(protocols)}", self.protocol)
        need(isinstance(self.seeds, list) and self.seeds and all(isinstance(s, int) for s in self.seeds),
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
            self._check_protocol()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for task, values in self.overrides.items():
            check_override_entry(values, f"{where}: overrides.{task}")
            self.for_task(task, where=where)  # the merged settings must validate too

    def _check_protocol(self) -> None:
        protocol, source = self.evaluation.protocol, self.data.source
        allowed = protocols_for_source(source)
        need(protocol in allowed, "evaluation.protocol", f"one of {', '.join(allowed)} for data.source {source}",
             protocol)
        head = self.model.decode_head
        if self.protocol.segments:
            need(head is not None, "model.decode_head", f"one of {', '.join(DECODE_HEADS)} for evaluation.protocol "
                 f"{protocol} (a segmentation model ends in a decode head)", head)
        else:
            need(head is None, "model.decode_head", f"null for evaluation.protocol {protocol} (decode heads are for "
                 "the segmentation protocols)", head)
        self.protocol.check()

    @property
    def protocol(self) -> Protocol:
        """The evaluation protocol of this configuration (``dtl.protocols``), bound to it."""
        return get_protocol(self.evaluation.protocol)(self)

    def for_selection(self) -> "ExperimentConfig":
        """This experiment under the protocol its sweeps' trials follow (``final`` -> ``val``: a trial never
        scores a test or target set)."""
        selection = self.protocol.selection
        return replace(self, evaluation=replace(self.evaluation, protocol=selection))

    def for_task(self, task: str, entry: Mapping[str, Any] | None = None,
                 where: str = "config") -> "TaskConfig":
        """This experiment with ``overrides[task]`` applied (unknown tasks get the global settings); ``entry`` (flat
        override keys: a sweep trial's values, a best-file entry) is laid over that task's overrides first."""
        values = {**(self.overrides.get(task) or {}), **(entry or {})}
        model_values = {k: v for k, v in values.items() if OVERRIDE_KEYS[k] == "model"}
        training_values = {k: v for k, v in values.items() if OVERRIDE_KEYS[k] == "training"}
        try:
            model = replace(self.model, **_with_numbers(ModelConfig, model_values))
            model.validate()
            training = _build(TrainConfig, {**asdict(self.training), **training_values}, "", "training")
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"{where}: overrides.{task}: {err}") from None
        return TaskConfig(data=self.data, model=model, training=training, evaluation=self.evaluation, overrides={},
                          task=task)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskConfig(ExperimentConfig):
    """One task's settings: the experiment with the task's overrides (and a sweep's or best-file entry) merged
    into its sections, as :meth:`ExperimentConfig.for_task` returns them, so its ``overrides`` are empty. Resolved
    once, it is what a run, a trained model's record and its evaluation take."""

    task: str = field(kw_only=True)

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "config", *, task: str) -> "TaskConfig":
        """Settings written by :meth:`to_dict` (a trained run's ``config.json``), validated, as ``task``'s."""
        return ExperimentConfig.from_dict(raw, where).for_task(task, where=where)

    def to_dict(self) -> dict:
        """The settings as an experiment's, without the task (``ExperimentConfig.from_dict`` reads them back)."""
        settings = super().to_dict()
        del settings["task"]
        return settings


def task_settings(config: ExperimentConfig, task: str | None = None) -> TaskConfig:
    """``config`` as one task's settings: a :class:`TaskConfig` as it is (``task``: None or its own), else the
    experiment resolved for ``task``."""
    if isinstance(config, TaskConfig) and task in (None, config.task):
        return config
    if task is None:
        raise TypeError("an ExperimentConfig that is not resolved for a task needs the task to resolve it for")
    return config.for_task(task)


def check_override_entry(values: Any, where: str) -> dict[str, Any]:
    """One task's override entry: a mapping whose keys are flat override keys (values are checked on merge)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of setting -> value (or {{}}), got {type(values).__name__}")
    unknown = sorted(map(str, set(values) - set(OVERRIDE_KEYS)))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(OVERRIDE_KEYS))}")
    return dict(values)


# Top-level sections of a params file that tools around the library own (the DVC pipeline's MLflow experiment):
# set aside when the experiment is read, and validated by those tools (``tool_section``).
TOOL_SECTIONS = ("mlflow",)

def read_yaml(path: str | Path, *, missing_ok: bool = False) -> Any:
    """Parse a YAML file; a missing file (unless ``missing_ok``) or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def _split_sections(raw: Any, where: str) -> tuple[dict, dict]:
    """(experiment part, tools' sections) of a params file's mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    tools = {name: raw.pop(name) for name in TOOL_SECTIONS if name in raw}
    return raw, tools


def tool_section(path: str | Path, name: str, raw: Any = None) -> dict[str, Any]:
    """The raw ``name`` section of a params file (``{}`` if absent), for the tool that owns it to validate;
    ``raw``: the file's parsed content, if the caller read it already."""
    section = _split_sections(read_yaml(path) if raw is None else raw, str(path))[1].get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {name}: expected a mapping, got {type(section).__name__}")
    return section


def read_best(best_path: str | Path) -> dict[str, dict[str, Any]]:
    """A best-configuration file (``sweeps/best.yaml``) as ``{task: {override key: value}}`` (missing: none).

    Only the shape and the key names are checked here; values are checked against a base configuration when
    they are merged (:func:`load_config`)."""
    where = str(best_path)
    raw = read_yaml(best_path, missing_ok=True)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of task -> settings, got {type(raw).__name__}")
    return {str(task): ({} if values is None else check_override_entry(values, f"{where}: {task}"))
            for task, values in raw.items()}


def _merge_best_entry(base: ExperimentConfig, task: str, values: Mapping[str, Any], best_path) -> dict[str, Any]:
    """The base's overrides of ``task`` updated by its best-file entry, validated as merged; an invalid value is
    an error naming the best file and the task."""
    combined = {**base.overrides.get(task, {}), **values}
    try:
        base.for_task(task, values, where="")
    except ConfigError as err:
        reason = str(err).split(f"overrides.{task}: ", 1)[-1]
        raise ConfigError(f"{best_path}: {task}: {reason}") from None
    return combined


def load_config(path: str | Path, best_path: str | Path | None = None, *,
                task: str | None = None) -> ExperimentConfig | TaskConfig:
    """The validated experiment of a params file (``params.yaml``), with a best-configuration file's entries
    merged into ``overrides`` (``best_path``; None ignores sweep results).

    Precedence for a task, lowest first: the global sections < ``overrides.<task>`` < the best file's ``<task>``
    (a sweep's winner wins). With ``task`` given, the result is ``config.for_task(task)``, a :class:`TaskConfig`:
    exactly what that task trains with. The tools' sections (``TOOL_SECTIONS``) are set aside. Errors name the file
    and the key (``params.yaml: model.rank: expected ...``, ``sweeps/best.yaml: cifar: unknown key(s) lrr;
    allowed: ...``).
    """
    return params_config(read_yaml(path), str(path), best_path, task=task)


def params_config(raw: Any, where: str, best_path: str | Path | None = None, *,
                  task: str | None = None) -> ExperimentConfig | TaskConfig:
    """:func:`load_config` of a params file's parsed content ``raw`` (read from ``where``): for a caller that
    reads the file's tool sections too and parses it once."""
    experiment, _ = _split_sections(raw, where)
    base = ExperimentConfig.from_dict(experiment, where=where)
    merged = {name: dict(values) for name, values in base.overrides.items()}
    if best_path is not None:
        for name, values in read_best(best_path).items():
            merged[name] = _merge_best_entry(base, name, values, best_path)
    config = copy.copy(base)
    config.overrides = merged
    return config.for_task(task, where=where) if task is not None else config


def check_best_entries(params_path: str | Path, entries: Mapping[str, Mapping[str, Any]],
                       best_path: str | Path) -> None:
    """Best-file ``entries`` merged as :func:`load_config` would merge them over the experiment of
    ``params_path``; an invalid value is an error naming the best file and the task."""
    experiment, _ = _split_sections(read_yaml(params_path), str(params_path))
    base = ExperimentConfig.from_dict(experiment, where=str(params_path))
    for name, values in entries.items():
        _merge_best_entry(base, str(name), values, best_path)


# PyYAML follows YAML 1.1, which reads an exponent without a dot (``1e-4``) as text, not as a number.
_YAML_EXPONENT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*$")


def yaml_number(value: Any) -> Any:
    """``"1e-4"`` (how YAML 1.1 reads ``1e-4``) -> ``0.0001``; anything else unchanged."""
    return float(value) if isinstance(value, str) and _YAML_EXPONENT.match(value) else value


def _float_fields(section_class) -> set[str]:
    names = {f.name for f in fields(section_class) if "float" in str(f.type)}
    return names | (float_option_names() if section_class is ModelConfig else set())


def _with_numbers(section_class, values: dict) -> dict:
    """The section's values with YAML-1.1 exponent text in its number fields read as numbers."""
    numeric = _float_fields(section_class)
    return {k: yaml_number(v) if k in numeric else v for k, v in values.items()}


def _build(section_class, values: dict, where: str, section: str):
    prefix = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}{section}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(section_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    try:
        return section_class(**_with_numbers(section_class, values))
    except ValueError as err:  # TrainConfig validates itself and names the field as training.<name>
        raise ConfigError(f"{prefix}{err}") from None
