"""Accuracy and memory together: a sweep's objectives, each task's Pareto set, and the pick under a memory budget.

``python sweeps/run.py --space dtl_plus --objectives val_accuracy,saved_bytes`` makes every task's OptunaSearch
multi-objective (Optuna's TPE handles several objectives; Ray Tune passes a list of metrics and modes): it
maximises val accuracy and minimises the bytes kept for backward per batch. The first objective is the sweep's
own score (``val_miou`` for segmentation). Such a sweep runs every trial to the end (FIFO): ASHA's rungs rank on
the score alone and would stop the cheap end of the front.

The result is each task's Pareto set (the trials no other trial beats on both objectives), printed as a table,
drawn as ``pareto_<task>.png`` and put on the task's parent run. ``--memory-budget BYTES`` then picks the
configuration that ``sweeps/best.yaml`` gets: the incumbent rule (``sweeps.selection``) among the trials that keep
at most that many bytes for backward per batch; when the incumbent itself is over the budget, the best val score
within it wins. Without a budget the winner is chosen on the score, as in any sweep.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from dtl.io import atomic_path

from .keys import SCORE_METRICS, metric_label
from .results import format_params, short_name
from .state import SweepError

# cost objective name -> the trial's reported key (each minimised); the score, first, is maximised
COSTS: dict[str, str] = {
    "saved_bytes": "saved_bytes_per_batch",
    "train_time": "train_time_s",
    "trainable_params": "trainable_params",
}


def parse_objectives(text: str | Sequence[str] | None, metric: str | None = None) -> list[str]:
    """``"val_accuracy,saved_bytes"`` -> the names, checked: the score first (``metric``, the sweep's own, when
    given), then costs, no repeats. None: the score alone."""
    if text is None:
        return [metric or SCORE_METRICS[0]]
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    first = (metric,) if metric else SCORE_METRICS
    if not names or names[0] not in first or any(n not in COSTS for n in names[1:]) or len(set(names)) != len(names):
        raise SweepError(f"--objectives: expected {' or '.join(first)} first, then some of {', '.join(COSTS)} "
                         f"(comma-separated, no repeats), got {text!r}")
    return names


def metrics_and_modes(objectives: Sequence[str]) -> tuple[list[str], list[str]]:
    return ([objectives[0], *(COSTS[n] for n in objectives[1:])],
            ["max", *("min" for _ in objectives[1:])])


def objective_values(row, objectives: Sequence[str]) -> tuple[float, ...] | None:
    """A trial row's objectives, each as "larger is better" (costs negated); None when one is missing."""
    values = []
    for index, name in enumerate(objectives):
        mode = "max" if index == 0 else "min"
        value = row.val_score if index == 0 else row.cost.get(COSTS[name])
        if value is None:
            return None
        values.append(value if mode == "max" else -value)
    return tuple(values)


def pareto_set(rows: Sequence, objectives: Sequence[str]) -> list:
    """The rows trained to the end that no other such row dominates (as good on every objective, better on one)."""
    scored = [(row, objective_values(row, objectives)) for row in rows if row.status == "done"]
    scored = [(row, values) for row, values in scored if values is not None]

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [row for row, values in scored if not any(dominates(other, values) for _, other in scored)]


def within_budget(rows: Sequence, budget: float | None) -> list:
    """The rows whose recorded bytes kept for backward per batch fit ``budget`` (all rows when None)."""
    if budget is None:
        return list(rows)
    return [r for r in rows if r.cost.get("saved_bytes_per_batch") is not None
            and r.cost["saved_bytes_per_batch"] <= budget]


def pareto_table(outcome, objectives: Sequence[str]) -> str:
    front = sorted(pareto_set(outcome.rows, objectives), key=lambda r: r.cost.get("saved_bytes_per_batch", 0))
    winner = outcome.decision.winner if outcome.decision else None
    lines = [f"{outcome.task}: Pareto set of {len(front)} (of {sum(r.status == 'done' for r in outcome.rows)} "
             "trials trained to the end)",
             f"  {'trial':<12} {short_name(outcome.metric):>8} {'saved_MiB':>9} {'params':>9}  settings"]
    for row in front:
        mark = " *" if row.trial_id == winner else ""
        lines.append(f"  {row.trial_id:<12} {row.val_score:>8.4f} "
                     f"{row.cost.get('saved_bytes_per_batch', float('nan')) / 2**20:>9.2f} "
                     f"{row.cost.get('trainable_params', 0):>9,.0f}  {format_params(row.params)}{mark}")
    return "\n".join(lines)


def pareto_plot(outcome, objectives: Sequence[str], budget: float | None, path: Path) -> Path | None:
    """The val score against bytes kept for backward: every trial trained to the end, the front joined, the
    budget (if any) as a line and the pick as a star."""
    done = [r for r in outcome.rows if r.status == "done" and r.val_score is not None
            and "saved_bytes_per_batch" in r.cost]
    if not done:
        return None
    front = sorted(pareto_set(done, objectives), key=lambda r: r.cost["saved_bytes_per_batch"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([r.cost["saved_bytes_per_batch"] / 2**20 for r in done], [r.val_score for r in done],
                 c="lightgray", edgecolors="gray", label="trials")
    axis.plot([r.cost["saved_bytes_per_batch"] / 2**20 for r in front], [r.val_score for r in front], "o-",
              color="tab:blue", label="Pareto set")
    if budget is not None:
        axis.axvline(budget / 2**20, color="tab:red", linestyle="--", label="memory budget")
    best = outcome.best
    if best is not None and "saved_bytes_per_batch" in best.cost:
        axis.scatter([best.cost["saved_bytes_per_batch"] / 2**20], [best.val_score], marker="*", s=250, c="red",
                     label="pick", zorder=3)
    axis.set_xscale("log")
    axis.set_xlabel("kept for backward per batch (MiB, log)")
    axis.set_ylabel(metric_label(outcome.metric))
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    axis.set_title(f"{outcome.task}: {metric_label(outcome.metric)} against memory")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
