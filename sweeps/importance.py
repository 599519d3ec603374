"""What each searched hyperparameter is worth on a task: Optuna's fANOVA importance over the sweep's trials.

The trials of a task are put into an Optuna study of their own (``optuna.trial.create_trial``, the space's
distributions) and scored with ``optuna.importance.FanovaImportanceEvaluator`` (a random forest fitted to the
trials, then the share of the objective's variance each parameter explains; seeded, so it repeats). Importances
sum to 1.

Which score: a trial's val accuracy at the latest epoch that every trial of the task reached (and scored). With
ASHA that is the first rung (25% of the epochs), the one fidelity every trial has; with FIFO it is the end.
Conditional parameters (DTL+'s kernel, only sampled with the DWConv on) are left out, since fANOVA needs every
parameter in every trial. fANOVA on a handful of trials is noise: with fewer than ``RELIABLE_TRIALS`` trials the
result is marked unreliable.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna

RELIABLE_TRIALS = 20
EVALUATOR = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"


def distribution(spec):
    if spec.type == "int":
        return optuna.distributions.IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step or 1)
    if spec.type == "float":
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return optuna.distributions.CategoricalDistribution(list(spec.choices))


def common_epoch(histories: Sequence[Mapping[int, float]]) -> int | None:
    """The latest epoch scored in every history (``{epoch: val accuracy}``), or None."""
    shared = set.intersection(*(set(h) for h in histories)) if histories else set()
    return max(shared) if shared else None


def param_importances(trials: Sequence[tuple[Mapping[str, Any], float]], space) -> dict[str, float]:
    """``trials``: (sampled values, score) pairs; the importance of every parameter of ``space`` that each trial
    has. Needs at least two trials, one varying parameter and two different scores (equal scores leave fANOVA
    no variance to attribute)."""
    specs = [spec for spec in space.params if not spec.when and all(spec.name in values for values, _ in trials)]
    if len(trials) < 2 or not specs or len({float(score) for _, score in trials}) < 2:
        return {}
    study = optuna.create_study(direction="maximize")
    distributions = {spec.name: distribution(spec) for spec in specs}
    for values, score in trials:
        study.add_trial(optuna.trial.create_trial(params={s.name: values[s.name] for s in specs},
                                                  distributions=distributions, value=float(score)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(value) for name, value in importances.items()}


def task_importance(rows, histories: Mapping[str, Mapping[int, float]], space) -> dict[str, Any]:
    """The importances of one task's sweep: ``rows`` its trial rows, ``histories`` trial id -> {epoch: val}."""
    used = [r for r in rows if r.status != "failed" and histories.get(r.trial_id)]
    epoch = common_epoch([histories[r.trial_id] for r in used])
    if epoch is None:
        return {"importance": {}, "trials": 0, "epoch": None, "reliable": False, "evaluator": EVALUATOR}
    trials = [(r.params, histories[r.trial_id][epoch]) for r in used]
    return {"importance": param_importances(trials, space), "trials": len(trials), "epoch": epoch,
            "reliable": len(trials) >= RELIABLE_TRIALS, "evaluator": EVALUATOR}


def importance_table(task: str, found: Mapping[str, Any]) -> str:
    if not found["importance"]:
        return f"{task}: no importance (too few trials scored at a common epoch)"
    note = "" if found["reliable"] else f"; UNRELIABLE: fewer than {RELIABLE_TRIALS} trials"
    ranked = sorted(found["importance"].items(), key=lambda item: -item[1])
    return (f"{task}: {', '.join(f'{name} {value:.2f}' for name, value in ranked)}  ({found['trials']} trials at "
            f"epoch {found['epoch']}{note})")
