"""A study's results: one row per run (a point on one task with one seed), the aggregates over seeds and tasks,
the table and the plot. The study itself runs as :mod:`sweeps.study_strategy`.

Outputs in ``<storage>/<name>/``: ``study.json`` (every run and the aggregates), ``study.md`` (a table ready to
paste: the test score (accuracy; mIoU for segmentation) mean ± std over seeds per task and point, the group mean,
trainable parameters, bytes kept for backward, peak memory, images/s) and ``study.png`` (the score against the
varied parameter with memory on a second axis; for a study of methods, the score against training memory). The
same files go on the study's parent run.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from dtl.data.vtab import group_summary
from dtl.io import atomic_path
from dtl.protocols.base import SCORES

from .keys import SEED_KEY, TIME_ATTR, TRIAL_ERROR, metric_label
from .space import SearchSpace
from .trainable import plain, split_trial_config

STUDY_FILES = ("study.json", "study.md", "study.png")
# The split scores a study keeps per point: each objective's score, and the masked accuracy of a partial test set.
SPLIT_SCORES = (*(f"_{score}" for score in SCORES.values()), "_accuracy_masked")
# Per trial, what a study keeps next to its test score (from dtl.engine.TrainResult and, off a GPU, the
# estimated peak of sweeps.trainable.study_scores).
STUDY_COSTS = ("trainable_params", "saved_bytes_per_batch", "gpu_peak_allocated_bytes", "cpu_peak_estimate_bytes",
               "images_per_s", "train_time_s")
# The peak column: the GPU's where every point trained on one, else the CPU estimate.
PEAK_COLUMNS = (("gpu_peak_allocated_bytes", "GPU peak allocated (MiB)"),
                ("cpu_peak_estimate_bytes", "peak, CPU estimate (MiB)"))


@dataclass
class StudyRow:
    task: str
    point: str  # the point's label, e.g. "start_block=3"
    params: dict[str, Any]  # the override entry the point sets
    seed: int
    status: str  # done | failed | unfinished
    score: float | None  # the protocol's test score (accuracy; mIoU for segmentation)
    scores: dict[str, float] = field(default_factory=dict)  # every reported score (val, targets...)
    cost: dict[str, float] = field(default_factory=dict)
    trial_id: str = ""
    error: str | None = None


def study_row(trial, space: SearchSpace, epochs: Mapping[str, int], metric: str) -> StudyRow:
    config = dict(trial.config or {})
    task, _, params = split_trial_config(config)
    label = ", ".join(spec.label(config[spec.name]) for spec in space.params if spec.name in config)
    result = trial.last_result or {}
    done = trial.status == "TERMINATED" and int(result.get(TIME_ATTR, 0) or 0) >= epochs[task]
    error = result.get(TRIAL_ERROR)
    status = "failed" if error or trial.status == "ERROR" else ("done" if done and metric in result
                                                                else "unfinished")
    score = result.get(metric) if status == "done" else None
    return StudyRow(task=task, point=label, params=plain(params), seed=int(config.get(SEED_KEY, 0)), status=status,
                    score=float(score) if isinstance(score, (int, float)) else None,
                    scores={k: float(v) for k, v in result.items()
                            if k.endswith(SPLIT_SCORES)} if status == "done" else {},
                    cost={k: float(result[k]) for k in STUDY_COSTS if isinstance(result.get(k), (int, float))},
                    trial_id=trial.trial_id, error=error)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: Sequence[StudyRow], points: Sequence[str], tasks: Sequence[str],
              groups: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per point: each task's test score mean ± std over seeds and its mean costs, and the group mean (the
    mean of the VTAB group means, per seed, then mean ± std over the seeds that finished on every task)."""
    out = []
    for point in points:
        mine = [r for r in rows if r.point == point and r.status == "done"]
        per_task = {}
        for task in tasks:
            runs = [r for r in mine if r.task == task]
            mean, std = _mean_std([r.score for r in runs])
            per_task[task] = {"mean": mean, "std": std, "seeds": len(runs),
                              **{k: statistics.fmean(r.cost[k] for r in runs) for k in STUDY_COSTS
                                 if runs and all(k in r.cost for r in runs)}}
        seeds = sorted({r.seed for r in mine})
        group_means = []
        for seed in seeds:
            by_task = {r.task: r.score for r in mine if r.seed == seed}
            if set(by_task) == set(tasks):
                group_means.append(group_summary([{"group": groups.get(t, "Other"), "test_accuracy": a}
                                                  for t, a in by_task.items()])["group_mean"])
        mean, std = _mean_std(group_means)
        costs = {k: statistics.fmean(v[k] for v in per_task.values()) for k in STUDY_COSTS
                 if all(k in v for v in per_task.values())}
        out.append({"point": point, "params": next((r.params for r in rows if r.point == point), {}),
                    "tasks": per_task, "group_mean": {"mean": mean, "std": std, "seeds": len(group_means)}, **costs})
    return out


def _pct(mean: float | None, std: float | None, count: int = 2) -> str:
    """A mean in %, with its std when at least two seeds gave one."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" if count < 2 else f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def markdown(name: str, summary: Sequence[dict[str, Any]], tasks: Sequence[str], seeds: Sequence[int],
             epochs: int, protocol: str, metric: str = "test_accuracy") -> str:
    peak, peak_label = next(((key, label) for key, label in PEAK_COLUMNS if all(key in p for p in summary)),
                            PEAK_COLUMNS[-1])
    header = ["point", *tasks, "group mean", "trainable params", "kept for backward (MiB/batch)", peak_label,
              "images/s"]
    spread = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]} only"
    lines = [f"Study {name}: {metric_label(metric)} (%), {spread}; every point "
             f"trained {epochs} epochs under the {protocol} protocol. Costs: means over tasks.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for point in summary:
        cells = [point["point"]] + [_pct(point["tasks"][t]["mean"], point["tasks"][t]["std"],
                                          point["tasks"][t].get("seeds", 2)) for t in tasks]
        cells.append(_pct(point["group_mean"]["mean"], point["group_mean"]["std"], point["group_mean"]["seeds"]))
        cells.append(f"{point['trainable_params']:,.0f}" if "trainable_params" in point else "-")
        cells.append(f"{point['saved_bytes_per_batch'] / 2**20:.2f}" if "saved_bytes_per_batch" in point else "-")
        cells.append(f"{point[peak] / 2**20:.0f}" if peak in point else "-")
        cells.append(f"{point['images_per_s']:.0f}" if "images_per_s" in point else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(name: str, space: SearchSpace, summary: Sequence[dict[str, Any]], tasks: Sequence[str], path: Path,
         metric: str = "test_accuracy") -> None:
    """The score against the varied parameter, memory kept for backward on a second axis; for a study that
    varies the method, the score against that memory (the paper's Figure 1)."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    memory = [p.get("saved_bytes_per_batch", math.nan) / 2**20 for p in summary]
    accuracy = [100 * (p["group_mean"]["mean"] if p["group_mean"]["mean"] is not None else math.nan) for p in summary]
    methods = len(space.params) == 1 and space.params[0].name == "method"  # the paper's Figure 1
    if methods:
        for point, x, y in zip(summary, memory, accuracy):
            axis.errorbar([x], [y], yerr=[100 * (point["group_mean"]["std"] or 0)], fmt="o", capsize=3)
            axis.annotate(point["point"].replace("method=", ""), (x, y), textcoords="offset points", xytext=(5, 5))
        axis.set_xscale("log")
        axis.set_xlabel("memory kept for backward per batch (MiB, log)")
        axis.set_ylabel(f"{metric_label(metric)} (%), group mean")
    else:
        spec = space.params[0]
        numeric = len(space.params) == 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in spec.choices)
        xs = list(spec.choices) if numeric else list(range(len(summary)))
        for task in tasks:
            axis.plot(xs, [100 * (p["tasks"][task]["mean"] if p["tasks"][task]["mean"] is not None else math.nan)
                           for p in summary], marker=".", alpha=0.5, label=task)
        axis.errorbar(xs, accuracy, yerr=[100 * (p["group_mean"]["std"] or 0) for p in summary], marker="o",
                      color="black", capsize=3, label="group mean")
        axis.set_xlabel(spec.name if numeric else "point")
        if not numeric:
            axis.set_xticks(xs, [p["point"] for p in summary], rotation=20, ha="right")
        axis.set_ylabel(f"{metric_label(metric)} (%)")
        second = axis.twinx()
        second.plot(xs, memory, linestyle="--", color="tab:red", marker="s", label="kept for backward")
        second.set_ylabel("kept for backward per batch (MiB)", color="tab:red")
        axis.legend(loc="best", fontsize=8)
    axis.grid(alpha=0.3)
    axis.set_title(f"study {name}: mean ± std over seeds")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
