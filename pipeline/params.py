"""The pipeline's own side of ``params.yaml``: where the files are, its ``mlflow`` section, and DVC's needs.

The experiment itself (``params.yaml`` + ``sweeps/best.yaml``, merged with the sweep winners on top) is read by
``dtl.config.load_config``, the same loader the sweeps use, so ``load_config(DEFAULT_PARAMS, DEFAULT_BEST,
task=task)`` is exactly what the ``train@<task>`` stage trains.

DVC fails in the middle of a run when a templated params key (``overrides.${item}``, ``best.yaml: ${item}``)
is missing, so :func:`check_dvc_entries` names any task of ``data.tasks`` that lacks an entry, up front.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dtl.config import ConfigError, ExperimentConfig, load_config, params_config, read_yaml, tool_section
from dtl.io import DEFAULT_BEST, DEFAULT_PARAMS


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of the pipeline itself (``mlflow`` section of params.yaml)."""

    mlflow_experiment: str = "dtl-pipeline"  # MLflow experiment that the train/evaluate/report runs go to


def load_stage_params(params_path: str | Path, best_path: str | Path | None = None
                      ) -> tuple[ExperimentConfig, PipelineSettings]:
    """What a stage reads from ``params_path`` (parsed once): the experiment, with ``best_path``'s entries
    merged (``dtl.config.load_config``), and the pipeline's own settings."""
    raw = read_yaml(params_path)
    return params_config(raw, str(params_path), best_path), load_pipeline_settings(params_path, raw)


def load_pipeline_settings(params_path: str | Path = DEFAULT_PARAMS, raw=None) -> PipelineSettings:
    """The pipeline-only settings of ``params_path`` (``raw``: its parsed content, if read already); unknown
    keys are errors naming the key."""
    where = str(params_path)
    section = tool_section(params_path, "mlflow", raw)
    unknown = sorted(set(section) - {"experiment"})
    if unknown:
        raise ConfigError(f"{where}: mlflow: unknown key(s) {', '.join(unknown)}; allowed: experiment")
    experiment = section.get("experiment", PipelineSettings.mlflow_experiment)
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"{where}: mlflow.experiment: expected a non-empty experiment name, got {experiment!r}")
    return PipelineSettings(mlflow_experiment=experiment)


def check_dvc_entries(
    params_path: str | Path = DEFAULT_PARAMS,
    best_path: str | Path = DEFAULT_BEST,
    tasks: Iterable[str] | None = None,
) -> None:
    """Every task the pipeline runs needs ``overrides.<task>`` in params.yaml and ``<task>`` in best.yaml
    (DVC resolves both as templated params keys and fails mid-run when one is missing); name the gaps."""
    raw = read_yaml(params_path) or {}
    if tasks is None:
        tasks = load_config(params_path).data.tasks
    overrides = (raw.get("overrides") if isinstance(raw, dict) else None) or {}
    best_raw = read_yaml(best_path, missing_ok=True) or {}
    problems = []
    for task in tasks:
        if task not in overrides:
            problems.append(f"{params_path}: add 'overrides: {{{task}: {{}}}}' (an empty entry is fine)")
        if not isinstance(best_raw, dict) or task not in best_raw:
            problems.append(f"{best_path}: add '{task}: {{}}' (an empty entry is fine)")
    if problems:
        raise ConfigError("DVC needs a params entry for every task in data.tasks:\n  " + "\n  ".join(problems))
