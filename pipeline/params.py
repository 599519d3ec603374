"""Loading ``params.yaml`` + ``sweeps/best.yaml``: the one merged configuration the pipeline and sweeps share.

Precedence for a task's settings (lowest first):

1. the global sections of ``params.yaml`` (``data``, ``model``, ``training``, ``evaluation``);
2. ``params.yaml`` ``overrides.<task>`` (hand-set per-task values, e.g. the paper's lr / drop-path / kernel);
3. ``sweeps/best.yaml`` ``<task>`` (a sweep's best configuration: sweep winners win).

:func:`load_params` returns an :class:`~dtl.config.ExperimentConfig` whose ``overrides[task]`` already holds
layers 2 + 3, so ``load_params().for_task(task)`` (or ``load_params(task=task)``) is exactly what the
``train@<task>`` stage trains. The sweeps call the same function for their base configuration.

``params.yaml`` may also hold pipeline-only settings (the ``mlflow`` section) that are not part of the
experiment schema; they are popped before validation and returned by :func:`load_pipeline_settings`.

DVC fails in the middle of a run when a templated params key (``overrides.${item}``, ``best.yaml: ${item}``)
is missing, so :func:`check_dvc_entries` names any task of ``data.tasks`` that lacks an entry, up front.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtl.config import ConfigError, ExperimentConfig, check_override_entry

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
DEFAULT_BEST = REPO_ROOT / "sweeps" / "best.yaml"

# Top-level sections of params.yaml that belong to the pipeline, not to the experiment schema.
PIPELINE_SECTIONS = ("mlflow",)

DEFAULT_BEST_HEADER = (
    "Best per-task configurations found by the sweeps (sweeps/run.py rewrites the entries of the tasks it\n"
    "swept and keeps the others). Keys: flat override keys of dtl.config.OVERRIDE_KEYS. They take precedence\n"
    "over params.yaml (global sections < params.yaml overrides.<task> < this file). To clear a task, set its\n"
    "entry back to {} (every task keeps an entry: DVC fails on a missing templated params key)."
)


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of the pipeline itself (``mlflow`` section of params.yaml)."""

    mlflow_experiment: str = "dtl-pipeline"  # MLflow experiment that the train/evaluate/report runs go to


def read_yaml(path: str | Path, *, missing_ok: bool = False) -> Any:
    """Parse a YAML file; a missing file (unless ``missing_ok``) or a syntax error names the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def _split_params(raw: Any, where: str) -> tuple[dict, dict]:
    """(experiment part, pipeline part) of a params.yaml mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    pipeline = {name: raw.pop(name) for name in PIPELINE_SECTIONS if name in raw}
    return raw, pipeline


def load_pipeline_settings(params_path: str | Path = DEFAULT_PARAMS) -> PipelineSettings:
    """The pipeline-only settings of ``params_path``; unknown keys are errors naming the key."""
    where = str(params_path)
    _, pipeline = _split_params(read_yaml(params_path), where)
    section = pipeline.get("mlflow") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: mlflow: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - {"experiment"})
    if unknown:
        raise ConfigError(f"{where}: mlflow: unknown key(s) {', '.join(unknown)}; allowed: experiment")
    experiment = section.get("experiment", PipelineSettings.mlflow_experiment)
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"{where}: mlflow.experiment: expected a non-empty experiment name, got {experiment!r}")
    return PipelineSettings(mlflow_experiment=experiment)


def read_best(best_path: str | Path = DEFAULT_BEST) -> dict[str, dict[str, Any]]:
    """``sweeps/best.yaml`` as ``{task: {override key: value}}`` (a missing file: no entries).

    Only the shape and the key names are checked here; values are checked against the base configuration by
    :func:`load_params`.
    """
    where = str(best_path)
    raw = read_yaml(best_path, missing_ok=True)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of task -> settings, got {type(raw).__name__}")
    entries: dict[str, dict[str, Any]] = {}
    for task, values in raw.items():
        entries[str(task)] = _check_entry(values, f"{where}: {task}")
    return entries


def _merge_best_entry(base: ExperimentConfig, task: str, values: Mapping[str, Any], best_path) -> dict[str, Any]:
    """``params.yaml``'s overrides of ``task`` updated by its ``sweeps/best.yaml`` entry, validated as merged;
    an invalid value is an error naming the best file and the task."""
    combined = {**base.overrides.get(task, {}), **values}
    try:
        ExperimentConfig(data=base.data, model=base.model, training=base.training,
                         evaluation=base.evaluation, overrides={task: combined}).for_task(task, where="")
    except ConfigError as err:
        reason = str(err).split(f"overrides.{task}: ", 1)[-1]
        raise ConfigError(f"{best_path}: {task}: {reason}") from None
    return combined


def _check_entry(values: Any, where: str) -> dict[str, Any]:
    return {} if values is None else check_override_entry(values, where)


def load_params(
    params_path: str | Path = DEFAULT_PARAMS,
    best_path: str | Path | None = DEFAULT_BEST,
    *,
    task: str | None = None,
) -> ExperimentConfig:
    """The validated experiment of ``params_path`` with ``best_path``'s sweep winners merged into ``overrides``.

    ``overrides[task] = {**params.yaml overrides[task], **best.yaml[task]}``. With ``task`` given, the result
    is ``config.for_task(task)``: the exact settings that task trains with. ``best_path=None`` ignores the
    sweep results. Errors name the file and the key (``params.yaml: model.rank: expected ...``,
    ``sweeps/best.yaml: cifar: unknown key(s) lrr; allowed: ...``).
    """
    where = str(params_path)
    experiment_raw, _ = _split_params(read_yaml(params_path), where)
    load_pipeline_settings(params_path)  # unknown keys in the pipeline sections are errors too
    base = ExperimentConfig.from_dict(experiment_raw, where=where)
    best = read_best(best_path) if best_path is not None else {}

    merged = {task_name: dict(values) for task_name, values in base.overrides.items()}
    for task_name, values in best.items():
        merged[task_name] = _merge_best_entry(base, task_name, values, best_path)
    config = copy.copy(base)
    config.overrides = merged
    if task is not None:
        return config.for_task(task, where=where)
    return config


def check_dvc_entries(
    params_path: str | Path = DEFAULT_PARAMS,
    best_path: str | Path = DEFAULT_BEST,
    tasks: Iterable[str] | None = None,
) -> None:
    """Every task the pipeline runs needs ``overrides.<task>`` in params.yaml and ``<task>`` in best.yaml
    (DVC resolves both as templated params keys and fails mid-run when one is missing); name the gaps."""
    experiment_raw, _ = _split_params(read_yaml(params_path), str(params_path))
    if tasks is None:
        tasks = ExperimentConfig.from_dict(experiment_raw, where=str(params_path)).data.tasks
    overrides = experiment_raw.get("overrides") or {}
    best_raw = read_yaml(best_path, missing_ok=True) or {}
    problems = []
    for task in tasks:
        if task not in overrides:
            problems.append(f"{params_path}: add 'overrides: {{{task}: {{}}}}' (an empty entry is fine)")
        if not isinstance(best_raw, dict) or task not in best_raw:
            problems.append(f"{best_path}: add '{task}: {{}}' (an empty entry is fine)")
    if problems:
        raise ConfigError("DVC needs a params entry for every task in data.tasks:\n  " + "\n  ".join(problems))


def write_best(
    best_path: str | Path,
    entries: Mapping[str, Mapping[str, Any]],
    header: str = DEFAULT_BEST_HEADER,
    *,
    params_path: str | Path | None = DEFAULT_PARAMS,
) -> dict[str, dict[str, Any]]:
    """Replace the entries of ``entries``' tasks in ``best_path`` (keeping every other entry) atomically.

    Keys are checked against ``dtl.config.OVERRIDE_KEYS``; values are checked by merging them into the
    configuration of ``params_path`` (when that file exists) so an invalid winner never lands in the file.
    ``header`` is written as a ``#`` comment block at the top. Returns the full new mapping.
    """
    import yaml

    from dtl.io import write_text

    best_path = Path(best_path)
    current = read_best(best_path)
    for task, values in entries.items():
        current[str(task)] = _check_entry(_plain(values), f"{best_path}: {task}")
    if params_path is not None and Path(params_path).is_file():
        experiment_raw, _ = _split_params(read_yaml(params_path), str(params_path))
        base = ExperimentConfig.from_dict(experiment_raw, where=str(params_path))
        for task in entries:
            _merge_best_entry(base, str(task), current[str(task)], best_path)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines()) if header else ""
    body = yaml.safe_dump(current, sort_keys=False, default_flow_style=None, width=120)
    write_text(best_path, comment + body)
    return current


def _plain(values: Any) -> Any:
    """numpy scalars (as Ray/Optuna return them) -> Python numbers, so YAML stays plain."""
    if isinstance(values, Mapping):
        return {str(k): _plain(v) for k, v in values.items()}
    if hasattr(values, "item") and not isinstance(values, (str, bytes)):
        return values.item()
    return values
