"""The one training entry point that the DVC pipeline and the sweeps both call: ``run_task``.

It turns an :class:`~dtl.config.ExperimentConfig` and a task name into datasets, a model and a finished run,
following the evaluation protocol (``evaluation.protocol``):

- ``final`` (VTAB-1K): train on train800val200 and test once at the end (the official scripts);
- ``val`` (VTAB-1K): train on train800 and score val200 (VTAB's rule for choosing hyperparameters: the test split
  is never used for selection);
- ``few_shot``: one run per shot count k and seed s: train on ``train_meta.list.num_shot_<k>.seed_<s>``, score
  ``val_meta.list`` every ``eval_every`` epochs, keep the weights best on it, test those on ``test_meta.list``;
- ``domain_generalization``: train on the source's k-shot list, score its ``val_meta.list`` (when it has one),
  then test the source's ``test_meta.list`` and every target's, each once (no target is ever used to choose).

In the two NOAH-layout protocols the seed picks the training list and seeds the run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, ExperimentConfig
from .engine import EpochCallback, StateCallback, TrainingState, TrainResult, seed_everything, train_and_evaluate
from .methods import create_model


@dataclass(frozen=True)
class Protocol:
    """Which split a run trains on, which it scores during and after training, and which evaluating the saved
    weights reports. ``layout`` is the folder layout the splits come from (``vtab``, ``few_shot``,
    ``domain_generalization``); ``keep_best`` the scored split whose best epoch's weights are kept."""

    layout: str
    train: str
    scored: dict[str, str]  # name -> split, scored after the last epoch (and every eval_every epochs)
    reported: dict[str, str]  # name -> split, what ``evaluate_saved`` scores
    keep_best: str | None = None
    selection: str = "val"  # the protocol a sweep's trials follow: never one that scores test or target sets


PROTOCOLS: dict[str, Protocol] = {
    # the authors' scripts: train on all 1,000 images, test once at the end
    "final": Protocol("vtab", "train800val200", {"test": "test"}, {"test": "test"}),
    # VTAB's rule for choosing hyperparameters: train on train800, score val200 (test reported for reference only)
    "val": Protocol("vtab", "train800", {"val": "val200"}, {"val": "val200", "test": "test"}),
    # NOAH's few-shot recipe: validate every few epochs, test the weights best on val
    "few_shot": Protocol("few_shot", "train", {"val": "val"}, {"val": "val", "test": "test"}, keep_best="val",
                         selection="few_shot"),
    # train once on the source, then test the source and every target (``reported_splits`` adds the targets)
    "domain_generalization": Protocol("domain_generalization", "train", {"val": "val"}, {"val": "val", "test": "test"},
                                      selection="domain_generalization"),
}
TARGET_PREFIX = "target:"  # reported split "target:<domain>": that target domain's test list


def uses_list_files(config: ExperimentConfig) -> bool:
    """Whether the protocol reads the NOAH layout (few-shot lists; shots and seed pick the training list)."""
    return PROTOCOLS[config.evaluation.protocol].layout != "vtab"


def split_list(config: ExperimentConfig, task: str, split: str, shots: int | None = None,
               seed: int | None = None) -> Path:
    """The list file a split of ``task`` is read from."""
    from .data.few_shot import list_file

    root = Path(config.data.root)
    if not uses_list_files(config):
        return root / task / f"{split}.txt"
    if split.startswith(TARGET_PREFIX):
        return list_file(root, split[len(TARGET_PREFIX):], "test")
    return list_file(root, task, split, shots, seed)


def split_input(config: ExperimentConfig, task: str, split: str, shots: int | None = None,
                seed: int | None = None) -> tuple[str, Path]:
    """A split's list as a dataset input: a short name (``digits/train800``,
    ``oxford-pets/train_meta.list.num_shot_4.seed_0``) and the list file."""
    path = split_list(config, task, split, shots, seed)
    return (f"{path.parent.parent.name}/{path.name}" if uses_list_files(config) else f"{task}/{split}"), path


def selection_objective(config: ExperimentConfig) -> str:
    """What a sweep under ``config``'s protocol selects on, in words (for its reports)."""
    protocol = PROTOCOLS[PROTOCOLS[config.evaluation.protocol].selection]
    if protocol.layout == "vtab":
        return f"{protocol.scored['val']} accuracy after training on {protocol.train}"
    shots, seed = max(config.data.shots), config.evaluation.seeds[0]
    return f"val_meta.list accuracy after training on train_meta.list.num_shot_{shots}.seed_{seed}"


def scored_splits(config: ExperimentConfig, task: str) -> dict[str, str]:
    """What a run scores while it trains. A domain-generalisation source without ``val_meta.list`` scores its
    test list after the last epoch instead (its final weights are tested either way; sweeps need the list)."""
    protocol = PROTOCOLS[config.evaluation.protocol]
    if protocol.layout == "domain_generalization" and not split_list(config, task, "val").is_file():
        return {"test": "test"}
    return dict(protocol.scored)


def reported_splits(config: ExperimentConfig, task: str) -> dict[str, str]:
    """What ``evaluate_saved`` scores: the protocol's reported splits (and every target domain)."""
    protocol = PROTOCOLS[config.evaluation.protocol]
    reported = dict(protocol.reported)
    if protocol.layout == "domain_generalization":
        if "val" not in scored_splits(config, task):
            del reported["val"]
        reported.update({target: f"{TARGET_PREFIX}{target}" for target in config.data.targets})
    return reported


def run_shots(config: ExperimentConfig, shots: int | None) -> int | None:
    """The shot count of a run: None under VTAB; the given one (or the largest of ``data.shots``) otherwise."""
    if not uses_list_files(config):
        return None
    return max(config.data.shots) if shots is None else shots


def task_num_classes(config: ExperimentConfig, task: str) -> int:
    """The class count of ``task``: ``data.num_classes``, the folder's ``meta.json``, or the known tables."""
    from .data.few_shot import few_shot_num_classes
    from .data.vtab import _task_dir, resolve_num_classes

    given = config.data.num_classes.get(task)
    if uses_list_files(config):
        return few_shot_num_classes(task, given, Path(config.data.root) / task)
    return resolve_num_classes(_task_dir(config.data.root, task), task, given)


def open_split(config: ExperimentConfig, task: str, split: str, *, num_classes: int, img_size: int,
               shots: int | None = None, seed: int | None = None, model: nn.Module | None = None) -> Dataset:
    """The dataset of one split of ``task`` as the protocol reads it: VTAB-1K's fixed transform, or the few-shot
    recipe (augmented training list, resize + centre crop otherwise; the backbone's own normalisation)."""
    from .data import FewShotDataset, VTabDataset

    root = Path(config.data.root)
    if not uses_list_files(config):
        return VTabDataset(root, task, split, img_size=img_size, num_classes=num_classes, preload=config.data.preload)
    cfg = (getattr(model.family.backbone, "pretrained_cfg", None) or {}) if model is not None else {}
    normalise = {key: tuple(cfg[key]) for key in ("mean", "std") if key in cfg}
    if split.startswith(TARGET_PREFIX):
        return FewShotDataset(root, split[len(TARGET_PREFIX):], "test", img_size=img_size, num_classes=num_classes,
                              **normalise)
    return FewShotDataset(root, task, split, shots=shots, seed=seed, img_size=img_size, num_classes=num_classes,
                          **normalise)


@dataclass
class TaskRun:
    task: str
    config: ExperimentConfig  # with the task's overrides applied
    model: nn.Module
    result: TrainResult
    num_classes: int
    shots: int | None = None  # the NOAH-layout protocols: the training list's shot count
    image_size: int = 224  # the input size the run trained at

    def reported_splits(self) -> dict[str, str]:
        """What evaluating this run reports under its protocol (``reported_splits``)."""
        return reported_splits(self.config, self.task)

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


@dataclass(frozen=True)
class SyntheticSuite:
    """The embedded suite of a protocol's layout: the folders a config needs from it, the names it knows, its
    generator (``generate(root, names, image_size=, num_test=, seed=, overwrite=)``) and what its folders are."""

    names: list[str]
    known: tuple[str, ...]
    generate: Callable[..., object]
    what: str


def synthetic_suite(config: ExperimentConfig, tasks: Sequence[str] | None = None) -> SyntheticSuite:
    from .data import SYNTHETIC_TASKS, generate_synthetic_suite
    from .data.synthetic_domain_shift import DOMAINS, generate_domain_shift_suite
    from .data.synthetic_few_shot import SYNTHETIC_FEW_SHOT, generate_few_shot_suite

    layout = PROTOCOLS[config.evaluation.protocol].layout
    tasks = list(tasks or config.data.tasks)
    known, generate, what = {
        "vtab": (SYNTHETIC_TASKS, generate_synthetic_suite, "synthetic tasks"),
        "few_shot": (SYNTHETIC_FEW_SHOT, generate_few_shot_suite, "synthetic few-shot data sets"),
        "domain_generalization": (DOMAINS, generate_domain_shift_suite, "synthetic domains"),
    }[layout]
    names = [*tasks, *config.data.targets] if layout == "domain_generalization" else tasks
    return SyntheticSuite(names, tuple(known), generate, what)


def check_data(config: ExperimentConfig, tasks: Sequence[str] | None = None, **options) -> dict[str, dict]:
    """Check every list the protocol reads for ``tasks`` (default ``data.tasks``) with the layout's checker
    (``dtl.data.check_vtab_root``, ``check_few_shot_root`` or ``check_domain_root``, whose ``verify_images``,
    ``verified`` and ``progress`` options pass through); problems raise one :class:`~dtl.data.DataError`.
    Returns the checker's manifest."""
    from .data import check_vtab_root
    from .data.domain_generalization import check_domain_root
    from .data.few_shot import check_few_shot_root

    data = config.data
    tasks = list(tasks or data.tasks)
    root = Path(data.root)
    layout = PROTOCOLS[config.evaluation.protocol].layout
    if layout == "vtab":
        return check_vtab_root(root, tasks, num_classes=data.num_classes, **options)
    seeds = config.evaluation.seeds
    if layout == "few_shot":
        return check_few_shot_root(root, tasks, data.shots, seeds, num_classes=data.num_classes, **options)
    return check_domain_root(root, tasks[0], data.targets, data.shots, seeds,
                             num_classes=data.num_classes.get(tasks[0]), **options)


def ensure_data(config: ExperimentConfig, tasks: Sequence[str] | None = None) -> Path:
    """Make sure the task folders exist: generate the protocol's synthetic suite if needed, or check the folders
    (every list of every task; problems raise one :class:`~dtl.data.DataError`)."""
    data = config.data
    root = Path(data.root)
    if data.source == "synthetic":
        suite = synthetic_suite(config, tasks)
        suite.generate(root, suite.names, image_size=data.image_size or 32, num_test=data.num_test,
                       seed=data.generator_seed)
    check_data(config, tasks)
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
        split = ("smallest training list" if uses_list_files(resolved)
                 else f"{PROTOCOLS[resolved.evaluation.protocol].train} split")
        raise ConfigError(f"{where}training.batch_size: {batch} is larger than the {train_images} images of "
                          f"{task}'s {split} (batches drop the remainder); use at most that many")
    try:
        resolve_precision(resolved.training.precision, resolve_device(resolved.training.device))
    except SetupError as err:
        raise ConfigError(f"{where}{err}") from None


def backbone_image_size(model: nn.Module) -> int:
    cfg = getattr(model.family.backbone, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    patch_embed = getattr(model.family.backbone, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    return int(img_size[0]) if img_size else int(size)


def run_task(
    config: ExperimentConfig,
    task: str,
    *,
    seed: int | None = None,
    shots: int | None = None,
    callbacks: Sequence[EpochCallback] = (),
    resume_from: TrainingState | None = None,
    save_state: StateCallback | None = None,
) -> TaskRun:
    """Train and evaluate ``config``'s method on ``task`` (overrides applied) and return the finished run.

    ``shots`` (NOAH-layout protocols; default: the largest of ``data.shots``) and ``seed`` pick the training list
    ``train_meta.list.num_shot_<shots>.seed_<seed>``. ``save_state`` / ``resume_from``: checkpoint the run after
    every epoch / continue from such a checkpoint (``dtl.engine.train_and_evaluate``)."""
    config = config.for_task(task)
    if seed is not None:
        config.training = replace(config.training, seed=seed)
    protocol = PROTOCOLS[config.evaluation.protocol]
    shots = run_shots(config, shots)
    num_classes = task_num_classes(config, task)
    seed_everything(config.training.seed)  # the fresh head/CSN init must not depend on earlier runs in this process
    model = build_model(config, num_classes)
    img_size = config.data.image_size or backbone_image_size(model)

    def dataset(split: str) -> Dataset:
        return open_split(config, task, split, num_classes=num_classes, img_size=img_size, shots=shots,
                          seed=config.training.seed, model=model)

    result = train_and_evaluate(
        model,
        dataset(protocol.train),
        {name: dataset(split) for name, split in scored_splits(config, task).items()},
        config.training,
        callbacks,
        resume_from=resume_from,
        save_state=save_state,
        keep_best=protocol.keep_best,
    )
    return TaskRun(task=task, config=config, model=model, result=result, num_classes=num_classes, shots=shots,
                   image_size=img_size)


def evaluate_saved(config: ExperimentConfig, task: str, seed: int, weights: str | Path, num_classes: int,
                   shots: int | None = None) -> dict:
    """Rebuild the trained model of ``config`` for ``task`` from its saved trainable weights
    (``dtl.io.save_trainable``) and score the protocol's reported splits: ``{"<name>_accuracy": ...,
    "<name>_loss": ...}``, plus ``<name>_accuracy_masked`` for a split that holds only some of the classes (the
    argmax over those: ImageNet-A and -R). Nothing is retrained; with ``checkpoint: false`` the random frozen
    backbone is rebuilt from ``seed`` as ``run_task`` built it."""
    from .io import load_trainable

    config = config.for_task(task)
    seed_everything(seed)
    model = build_model(config, num_classes)
    load_trainable(model, weights)
    return evaluate_model(config, task, model, num_classes, seed=seed, shots=shots)


def evaluate_model(config: ExperimentConfig, task: str, model: nn.Module, num_classes: int, *, seed: int,
                   shots: int | None = None, splits: dict[str, str] | None = None) -> dict:
    """Score a trained ``model`` of ``task`` (``config`` with the task's overrides applied) on ``splits`` (default:
    the protocol's reported splits), as :func:`evaluate_saved` does."""
    from torch.utils.data import DataLoader

    from .engine import evaluate, resolve_device, resolve_precision

    device = resolve_device(config.training.device)
    precision = resolve_precision(config.training.precision, device)
    model.to(device)
    img_size = config.data.image_size or backbone_image_size(model)
    scores: dict[str, float] = {}
    for name, split in (reported_splits(config, task) if splits is None else splits).items():
        data = open_split(config, task, split, num_classes=num_classes, img_size=img_size, shots=shots, seed=seed,
                          model=model)
        present = sorted({label for _, label in getattr(data, "samples", [])})
        classes = present if 0 < len(present) < num_classes and split.startswith(TARGET_PREFIX) else None
        loader = DataLoader(data, batch_size=config.training.eval_batch_size, shuffle=False,
                            num_workers=config.training.num_workers)
        for key, value in evaluate(model, loader, device, precision, classes=classes).items():
            scores[f"{name}_{key}"] = value
    return scores
