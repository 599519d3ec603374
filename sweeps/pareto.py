"""Accuracy and memory together: a sweep's objectives, each task's Pareto set, and the pick under a memory budget.

``python sweeps/run.py --space dtl_plus --objectives val_accuracy,saved_bytes`` makes every task's OptunaSearch
multi-objective (Optuna's TPE handles several objectives; Ray Tune passes a list of metrics and modes): it
maximises val accuracy and minimises the bytes kept for backward per batch. Such a sweep runs every trial to the
end (FIFO): ASHA's rungs rank on accuracy alone and would stop the cheap end of the front.

The result is each task's Pareto set (the trials no other trial beats on both objectives), printed as a table,
drawn as ``pareto_<task>.png`` and put on the task's parent run. ``--memory-budget BYTES`` then picks the
configuration that ``sweeps/best.yaml`` gets: the incumbent rule (``sweeps.selection``) among the trials that keep
at most that many bytes for backward per batch; when the incumbent itself is over the budget, the best val
accuracy within it wins. Without a budget the winner is chosen on accuracy, as in any sweep.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .state import SweepError

# objective name -> (the trial's reported key, the direction)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_accuracy": ("val_accuracy", "max"),
    "saved_bytes": ("saved_bytes_per_batch", "min"),
    "train_time": ("train_time_s", "min"),
    "trainable_params": ("trainable_params", "min"),
}


def parse_objectives(text: str | Sequence[str] | None) -> list[str]:
    """``"val_accuracy,saved_bytes"`` -> the names, checked: val accuracy first, no repeats, known names."""
    if text is None:
        return ["val_accuracy"]
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or names[0] != "val_accuracy" or len(set(names)) != len(names):
        raise SweepError(f"--objectives: expected val_accuracy first, then some of "
                         f"{', '.join(n for n in OBJECTIVES if n != 'val_accuracy')} (comma-separated, no repeats), "
                         f"got {text!r}")
    return names


def metrics_and_modes(objectives: Sequence[str]) -> tuple[list[str], list[str]]:
    return [OBJECTIVES[n][0] for n in objectives], [OBJECTIVES[n][1] for n in objectives]


def objective_values(row, objectives: Sequence[str]) -> tuple[float, ...] | None:
    """A trial row's objectives, each as "larger is better" (costs negated); None when one is missing."""
    values = []
    for name in objectives:
        key, mode = OBJECTIVES[name]
        value = row.val_accuracy if key == "val_accuracy" else row.cost.get(key)
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
    from .results import format_params

    front = sorted(pareto_set(outcome.rows, objectives), key=lambda r: r.cost.get("saved_bytes_per_batch", 0))
    winner = outcome.decision.winner if outcome.decision else None
    lines = [f"{outcome.task}: Pareto set of {len(front)} (of {sum(r.status == 'done' for r in outcome.rows)} "
             "trials trained to the end)",
             f"  {'trial':<12} {'val_acc':>8} {'saved_MiB':>9} {'params':>9}  settings"]
    for row in front:
        mark = " *" if row.trial_id == winner else ""
        lines.append(f"  {row.trial_id:<12} {row.val_accuracy:>8.4f} "
                     f"{row.cost.get('saved_bytes_per_batch', float('nan')) / 2**20:>9.2f} "
                     f"{row.cost.get('trainable_params', 0):>9,.0f}  {format_params(row.params)}{mark}")
    return "\n".join(lines)


def pareto_plot(outcome, objectives: Sequence[str], budget: float | None, path: Path) -> Path | None:
    """Val accuracy against bytes kept for backward: every trial trained to the end, the front joined, the
    budget (if any) as a line and the pick as a star."""
    done = [r for r in outcome.rows if r.status == "done" and r.val_accuracy is not None
            and "saved_bytes_per_batch" in r.cost]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtl.io import atomic_path

    front = sorted(pareto_set(done, objectives), key=lambda r: r.cost["saved_bytes_per_batch"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([r.cost["saved_bytes_per_batch"] / 2**20 for r in done], [r.val_accuracy for r in done],
                 c="lightgray", edgecolors="gray", label="trials")
    axis.plot([r.cost["saved_bytes_per_batch"] / 2**20 for r in front], [r.val_accuracy for r in front], "o-",
              color="tab:blue", label="Pareto set")
    if budget is not None:
        axis.axvline(budget / 2**20, color="tab:red", linestyle="--", label="memory budget")
    best = outcome.best
    if best is not None and "saved_bytes_per_batch" in best.cost:
        axis.scatter([best.cost["saved_bytes_per_batch"] / 2**20], [best.val_accuracy], marker="*", s=250, c="red",
                     label="pick", zorder=3)
    axis.set_xscale("log")
    axis.set_xlabel("kept for backward per batch (MiB, log)")
    axis.set_ylabel("val accuracy")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    axis.set_title(f"{outcome.task}: accuracy against memory")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
