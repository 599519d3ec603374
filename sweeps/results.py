"""What a sweep found: one row per trial, the incumbent rule's decision per task, the table, the cost plot."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from dtl.io import atomic_path

from .keys import COST_METRICS, PER_IMAGE, RUN_KEY, TIME_ATTR, TRIAL_ERROR, metric_label
from .selection import ALPHA, Candidate, Comparison, Decision, choose_winner, decode_scores
from .trainable import plain, split_trial_config

STATUSES = ("done", "stopped early", "failed", "unfinished")


@dataclass
class TrialRow:
    task: str
    trial_id: str
    status: str  # done | stopped early | failed | unfinished
    epochs: int
    val_score: float | None  # the sweep's metric: val accuracy (val mIoU for segmentation)
    params: dict[str, Any]
    incumbent: bool = False
    cost: dict[str, float] = field(default_factory=dict)  # COST_METRICS of a trial trained to the end
    per_image: str | None = None  # each val image's score, encoded (sweeps.selection)
    error: str | None = None
    run_id: str | None = None
    restarts: int = 0  # times the trial was restarted from its checkpoint after its worker or node died


@dataclass
class TaskOutcome:
    task: str
    epochs: int  # epochs of a trial trained to the end
    final_epochs: int  # epochs the pipeline retrains the winner with
    rows: list[TrialRow] = field(default_factory=list)
    decision: Decision | None = None
    finished: bool = False
    importance: dict[str, Any] = field(default_factory=dict)  # sweeps.importance.task_importance
    pareto: list[str] = field(default_factory=list)  # trial ids of the Pareto set (multi-objective sweeps)
    metric: str = "val_accuracy"  # what the trials are ranked on (sweeps.keys.score_metric)

    @property
    def best(self) -> TrialRow | None:
        if self.decision is None or self.decision.winner is None:
            return None
        return next(r for r in self.rows if r.trial_id == self.decision.winner)

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.rows) for status in STATUSES}

    def to_dict(self) -> dict:
        return {**asdict(self), "decision": self.decision.to_dict() if self.decision else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskOutcome":
        data = dict(data)
        legacy = {"val_accuracy": "val_score", "correct": "per_image"}  # results written before segmentation
        rows = [TrialRow(**{legacy.get(k, k): v for k, v in row.items()}) for row in data.pop("rows")]
        decision = data.pop("decision")
        if decision:
            comparisons = [Comparison(**{legacy.get(k, k): v for k, v in c.items()}) for c in decision["comparisons"]]
            decision = Decision(**{**decision, "comparisons": comparisons})
        return cls(**data, rows=rows, decision=decision)


def trial_row(trial, epochs: int, metric: str, run=None, error: str | None = None) -> TrialRow:
    """A Tune trial as a row (``epochs``: the length of a trial trained to the end; ``metric``: its score)."""
    task, incumbent, params = split_trial_config(trial.config or {})
    result = trial.last_result or {}
    score = result.get(metric)
    epoch = int(result.get(TIME_ATTR, 0) or 0)
    if trial.status == "ERROR" or TRIAL_ERROR in result:
        status, error = "failed", result.get(TRIAL_ERROR) or error
    elif trial.status == "TERMINATED":
        status = "done" if epoch >= epochs else "stopped early"
    else:
        status = "unfinished"
    return TrialRow(
        task=task, trial_id=trial.trial_id, status=status, epochs=epoch,
        val_score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
        params=plain(params), incumbent=incumbent,
        cost={k: float(result[k]) for k in COST_METRICS if isinstance(result.get(k), (int, float))},
        per_image=result.get(PER_IMAGE) if status == "done" else None, error=error,
        run_id=run.info.run_id if run else result.get(RUN_KEY),
        restarts=int(getattr(trial, "num_failures", 0) or 0))


def decide(rows: Sequence[TrialRow], alpha: float = ALPHA) -> Decision:
    """The incumbent rule over the trials trained to the end (``sweeps.selection.choose_winner``)."""
    done = [r for r in rows if r.status == "done" and r.val_score is not None]

    def candidate(row: TrialRow) -> Candidate:
        return Candidate(row.trial_id, row.val_score, decode_scores(row.per_image) if row.per_image else None)

    incumbent = next((candidate(r) for r in done if r.incumbent), None)
    challengers = [candidate(r) for r in done if not r.incumbent]
    if incumbent is None:
        failed = next((r for r in rows if r.incumbent), None)
        decision = choose_winner(None, challengers, alpha)
        if failed is not None:
            decision.reason = f"the incumbent trial {failed.trial_id} {failed.status}: the best val score wins"
        return decision
    return choose_winner(incumbent, challengers, alpha, tried=sum(not r.incumbent for r in rows))


# --- output -----------------------------------------------------------------------------------------------------
def format_params(params: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={show(v)}" for k, v in params.items())


def short_name(metric: str) -> str:
    """A column heading for a metric: val_accuracy -> val_acc, val_miou -> val_miou."""
    return metric.replace("accuracy", "acc")


def trials_table(outcomes: Sequence[TaskOutcome]) -> str:
    metric = short_name(outcomes[0].metric) if outcomes else "val_acc"
    header = (f"{'task':<14} {'trial':<12} {'status':<16} {'epochs':>6} {metric:>8} {'train_s':>8} "
              f"{'saved_MiB':>9}  params")
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        winner = outcome.decision.winner if outcome.decision else None
        for row in outcome.rows:
            status = row.status + (" *" if row.trial_id == winner else "") + (" (i)" if row.incumbent else "")
            score = f"{row.val_score:.4f}" if row.val_score is not None else "-"
            train_s = f"{row.cost['train_time_s']:.0f}" if "train_time_s" in row.cost else "-"
            saved = (f"{row.cost['saved_bytes_per_batch'] / 2**20:.1f}" if "saved_bytes_per_batch" in row.cost
                     else "-")
            lines.append(f"{row.task:<14} {row.trial_id:<12} {status:<16} {row.epochs:>6} {score:>8} "
                         f"{train_s:>8} {saved:>9}  {format_params(row.params)}"
                         + (f"  [{row.error}]" if row.error else ""))
    return "\n".join(lines)


def decisions_table(outcomes: Sequence[TaskOutcome]) -> str:
    header = f"{'task':<14} {'incumbent':>9} {'winner':>8} {'margin':>7} {'+/- images':>10} {'p':>8}  decision"
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        decision = outcome.decision
        if decision is None:
            lines.append(f"{outcome.task:<14} {'':>9} {'':>8} {'':>7} {'':>10} {'':>8}  unfinished")
            continue
        incumbent = next((r for r in outcome.rows if r.trial_id == decision.incumbent), None)
        best = outcome.best
        chosen = next((c for c in decision.comparisons if c.trial_id == decision.winner), None)
        best_challenger = max(decision.comparisons, key=lambda c: c.val_score, default=None)
        shown = chosen or best_challenger
        lines.append(
            f"{outcome.task:<14} {_score(incumbent.val_score if incumbent else None):>9} "
            f"{_score(best.val_score if best else None):>8} "
            f"{(f'{decision.margin:+.3f}' if decision.margin is not None else '-'):>7} "
            f"{(f'+{shown.wins}/-{shown.losses}' if shown else '-'):>10} "
            f"{(f'{shown.p_value:.2g}' if shown else '-'):>8}  {decision.reason}")
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def cost_plot(outcome: TaskOutcome, path: Path) -> Path | None:
    """The val score against training time, memory kept for backward and trainable parameters, one point per trial
    trained to the end, coloured by start block M (DTL's memory/accuracy knob); incumbent and winner marked."""
    rows = [r for r in outcome.rows if r.status == "done" and r.val_score is not None and r.cost]
    if not rows:
        return None
    axes_spec = (("train_time_s", "training time (s)", 1.0), ("saved_bytes_per_batch",
                 "kept for backward per batch (MiB)", 2.0 ** 20), ("trainable_params", "trainable parameters", 1.0))
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    blocks = [r.params.get("start_block") for r in rows]
    colours = [b if isinstance(b, (int, float)) else -1 for b in blocks]
    winner = outcome.decision.winner if outcome.decision else None
    for axis, (key, label, scale) in zip(axes, axes_spec):
        points = [(r.cost.get(key, math.nan) / scale, r.val_score) for r in rows]
        scatter = axis.scatter([x for x, _ in points], [y for _, y in points], c=colours, cmap="viridis",
                               vmin=-1, vmax=max(max(colours), 1), s=40)
        for row, (x, y) in zip(rows, points):
            if row.incumbent:
                axis.scatter([x], [y], s=160, facecolors="none", edgecolors="black", label="incumbent")
            if row.trial_id == winner:
                axis.scatter([x], [y], s=220, marker="*", c="red", label="winner")
        axis.set_xlabel(label)
        if key == "trainable_params":
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(metric_label(outcome.metric))
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes[0].legend(unique.values(), unique.keys(), loc="lower right")
    figure.colorbar(scatter, ax=axes, label="start block M (-1: none)")
    stopped = outcome.counts()["stopped early"]
    figure.suptitle(f"{outcome.task}: {len(rows)} trials trained {outcome.epochs} epochs"
                    + (f" ({stopped} stopped early, not shown)" if stopped else ""))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
