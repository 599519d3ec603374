"""Studies: the paper's ablations as a grid of points, each trained to the end and tested, never selected.

A study space (``sweeps/spaces/study_*.yaml``, every parameter ``type: grid``) runs through the same driver as
a search, ``python sweeps/run.py --space study_start_block``:

* one Ray Tune ``Tuner`` whose ``param_space`` is a ``tune.grid_search`` over the tasks, the study's seeds and
  each grid: every task and point is in flight at once (FIFO, no early stopping), all trials of a task read one
  prefix cache whatever their start block;
* each trial trains under the base configuration's own protocol (``evaluation.protocol`` of the params file:
  VTAB-1K ``final`` trains on train800val200 and tests once; few-shot and domain generalisation keep their own)
  and scores every split the pipeline would report;
* one MLflow parent run per study, one child run per trial (a point on one task with one seed);
* ``sweeps/best.yaml`` is never written: a study reports.

Outputs in ``<storage>/<name>/``: ``study.json`` (every trial and the aggregates), ``study.md`` (a table ready to
paste: the test score (accuracy; mIoU for segmentation) mean ± std over seeds per task and point, the group mean,
trainable parameters, bytes kept for backward, peak memory, images/s) and ``study.png`` (the score against the
varied parameter with memory on a second axis; for a study of methods, the score against training memory). The
same files go on the parent run.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import tracking
from dtl.protocols.base import SCORES

from .keys import SEED_KEY, TASK_KEY, TIME_ATTR, TRIAL_ERROR, metric_label, score_metric
from .space import SearchSpace
from .state import SweepError, SweepState
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
    from dtl.data.vtab import group_summary

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtl.io import atomic_path

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


# --------------------------------------------------------------------------------------------------------
# the run


def plan_study(base_config, space: SearchSpace, tasks: Sequence[str]) -> dict[str, tuple[SearchSpace, int]]:
    """Per task: the space with its bounds resolved for the task's backbone, and the epochs of a point. Every point
    is validated here (schema and model) so that a point that cannot train fails before any trial."""
    from dtl.config import ConfigError

    from .driver import _check_model_cached, task_backbone

    plans = {}
    for task in tasks:
        resolved = space.resolve(len(task_backbone(base_config, task).blocks))
        for label, entry in resolved.grid_points():
            try:
                _check_model_cached(base_config.for_task(task, entry, where=""))
            except ConfigError as err:
                raise SweepError(f"{space.path}: the point {label} cannot be trained on {task}: {err}") from None
        plans[task] = (resolved, base_config.for_task(task).training.epochs)
    return plans


def open_study_run(state: SweepState, space: SearchSpace, base_config, tasks: Sequence[str], seeds: Sequence[int]):
    """The study's one MLflow parent run: created with the grids, tasks, seeds and protocol; reopened on --resume."""
    import tracking

    if state.study_run_id:
        return tracking.Run.reopen(state.study_run_id, state.tracking_uri)
    parent = tracking.Run.create(state.experiment_id, f"study {space.name} ({state.name})", {
        "kind": "study", "sweep": state.name, "space": space.name}, {
        "space_file": str(space.path), "tasks": ",".join(tasks), "seeds": ",".join(map(str, seeds)),
        "protocol": base_config.evaluation.protocol,
        **{f"grid.{p.name}": p.describe().split(": ", 1)[1] for p in space.params}}, uri=state.tracking_uri)
    state.study_run_id = parent.run_id
    return parent


def study_tuner(options, state: SweepState, space: SearchSpace, base_config, tasks: Sequence[str],
                seeds: Sequence[int], gpus: float, max_concurrent: int, parent_run_id: str, callbacks: list,
                path: Path):
    """The Tuner of a study: ``tune.grid_search`` over tasks, seeds and every grid, FIFO; or the saved one."""
    from ray import tune

    from .driver import TRIALS_DIR, trial_dirname
    from .records import use_sweep_outbox
    from .trainable import TrialSetup, train_trial

    setups = {task: TrialSetup(
        task=task, base_config=base_config.to_dict(), training={}, seed=seeds[0],
        eval_every=base_config.for_task(task).training.eval_every, threads=max(1, int(options.cpus_per_trial)),
        tracking_uri=state.tracking_uri, experiment_id=state.experiment_id, parent_run_id=parent_run_id,
        sweep_name=state.name, space_name=space.name, checkpoint_every=options.checkpoint_every,
        tags={"study": space.name}, study=True, outbox=use_sweep_outbox(path.parent), metric=state.metric)
        for task in tasks}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setups=setups),
                                    {"cpu": options.cpus_per_trial, "gpu": gpus})
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    param_space = {**space.constants(), TASK_KEY: tune.grid_search(list(tasks)), SEED_KEY: tune.grid_search(list(seeds)),
                   **{spec.name: tune.grid_search(list(spec.choices)) for spec in space.params}}
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune.TuneConfig(
        num_samples=1, max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(name=TRIALS_DIR, storage_path=str(path.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=options.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks))


def run_study(options, space: SearchSpace, started: float) -> int:
    """Run (or resume) a study; returns the exit status (0; 1 when no point finished; 130 when interrupted)."""
    import ray

    from .cluster import default_concurrency
    from .driver import TRIALS_DIR, load_base, prepare_data, start_cluster
    from .progress import ProgressView
    from .records import ChildRunCloser, status_callback, use_sweep_outbox
    from .state import find_saved_state
    from .storage import StorageWatch

    storage = Path(options.storage_path).expanduser().resolve()
    saved = find_saved_state(options.name, storage, space.name) if options.resume else None
    if saved:
        if options.seeds is not None and list(options.seeds) != list(saved.seeds):
            raise SweepError(f"--seeds: the study {saved.name} runs seeds {', '.join(map(str, saved.seeds))} and "
                             "keeps them when resumed; start a new study (without --resume) for other seeds")
        options = replace(options, params_path=saved.params_path, seeds=saved.seeds)
    seeds = list(options.seeds or space.seeds)
    space = replace(space, seeds=tuple(seeds))
    base_config, params_path, best_path = load_base(options)
    tasks = list(saved.tasks) if saved else list(options.tasks or base_config.data.tasks)
    if len(set(tasks)) != len(tasks):
        raise SweepError(f"--tasks: a task is repeated in {tasks}")
    plans = plan_study(base_config, space, tasks)
    resolved = plans[tasks[0]][0]  # symbolic grid values (last_block) resolved for the backbone
    points = [label for label, _ in resolved.grid_points()]
    print(resolved.summary(), flush=True)
    prepare_data(base_config, tasks)
    metric = score_metric(base_config.protocol, "test")
    state, total, gpus = start_cluster(replace(options, num_samples=len(points) * len(seeds), scheduler="fifo"),
                                       space, tasks, params_path, best_path, storage, metric)
    state.kind, state.seeds = "study", seeds
    experiment_dir = storage / state.name
    use_sweep_outbox(experiment_dir)  # before the first record
    parent = open_study_run(state, space, base_config, tasks, seeds)
    for task in tasks:
        state.tasks.setdefault(task, {})["parent_run_id"] = parent.run_id
    state.save()
    num_trials = len(tasks) * len(points) * len(seeds)
    print(f"study {state.name}: {len(tasks)} tasks x {len(points)} points x {len(seeds)} seeds = {num_trials} runs; "
          f"results in {experiment_dir}; MLflow experiment {state.experiment!r} at {state.tracking_uri}", flush=True)

    epochs = {task: plans[task][1] for task in tasks}
    closer = ChildRunCloser(state.tracking_uri, state.experiment_id, dict.fromkeys(tasks, parent.run_id), epochs)
    progress = ProgressView({task: (len(points) * len(seeds), epochs[task]) for task in tasks},
                            metric=metric, metric_label="best test")
    max_concurrent = options.max_concurrent or default_concurrency(total, options.cpus_per_trial, gpus, num_trials)
    interrupted, rows = False, []
    try:
        tuner = study_tuner(options, state, resolved, base_config, tasks, seeds, gpus, max_concurrent, parent.run_id,
                            [status_callback(closer), progress, StorageWatch(experiment_dir)],
                            experiment_dir / TRIALS_DIR)
        print(f"up to {max_concurrent} runs at a time ({options.cpus_per_trial:g} CPU, {gpus:g} GPU each)", flush=True)
        grid = tuner.fit()
        from ray.tune.analysis import ExperimentAnalysis

        from .records import reconcile_runs

        trials = ExperimentAnalysis(grid.experiment_path).trials
        reconcile_runs(None, closer, tasks[0], trials)  # one parent run holds every task's trials
        rows = [study_row(trial, resolved, epochs, metric) for trial in trials]
        interrupted = len(rows) < num_trials or any(r.status == "unfinished" for r in rows)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        state.wall_time_s += time.perf_counter() - started
        state.save()
        ray.shutdown()

    if rows:
        report_study(state, resolved, base_config, rows, points, tasks, seeds, epochs, experiment_dir, parent)
    return close_study(options, state, parent, rows, interrupted, storage, experiment_dir)


def close_study(options, state, parent, rows: list, interrupted: bool, storage: Path, experiment_dir: Path) -> int:
    """Close the study's run with its outcome, say how to resume an interrupted study; the exit status."""
    from .driver import DEFAULT_STORAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STORAGE_FULL
    from .records import deliver_records
    from .storage import SHORTAGES

    if interrupted:
        resume = f"python sweeps/run.py --space {options.space} --resume --name {state.name}"
        why = f"stopped because {SHORTAGES[-1].describe()}; free space there" if SHORTAGES else "interrupted"
        print(f"\nThe study was {why}; finished runs are kept. Resume it with:\n  {resume}"
              + (f" --storage-path {storage}" if storage != DEFAULT_STORAGE else ""), flush=True)
        parent.finish("KILLED", wait=0)
        deliver_records(experiment_dir, wait=0)
        return EXIT_STORAGE_FULL if SHORTAGES else EXIT_INTERRUPTED
    state.finished = True
    state.save()
    finished = any(r.status == "done" for r in rows)
    parent.finish("FINISHED" if finished else "FAILED", error=None if finished else "no point finished", wait=0)
    deliver_records(experiment_dir)
    return 0 if finished else EXIT_FAILED


def report_study(state: SweepState, space: SearchSpace, base_config, rows: Sequence[StudyRow], points: Sequence[str],
                 tasks: Sequence[str], seeds: Sequence[int], epochs: Mapping[str, int], experiment_dir: Path,
                 parent) -> None:
    from dtl.data.vtab import task_group
    from dtl.io import write_json, write_text

    root = Path(base_config.data.root)
    groups = {task: task_group(task, root / task) for task in tasks}
    summary = aggregate(rows, points, tasks, groups)
    protocol = base_config.evaluation.protocol
    table = markdown(state.name, summary, tasks, seeds, max(epochs.values()), protocol, state.metric)
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "unfinished")}
    print(f"\n{table}\n{len(rows)} runs: {counts['done']} done, {counts['failed']} failed, {counts['unfinished']} "
          f"unfinished; wall time {state.wall_time_s:.0f} s", flush=True)
    for row in rows:
        if row.error:
            print(f"  failed: {row.task} {row.point} seed {row.seed}: {row.error}", flush=True)
    write_json(experiment_dir / "study.json", {
        "study": state.name, "space": space.name, "protocol": protocol, "tasks": tasks, "seeds": list(seeds),
        "groups": groups, "wall_time_s": state.wall_time_s, "date": datetime.now().isoformat(timespec="seconds"),
        "points": summary, "runs": [asdict(r) for r in rows]})
    write_text(experiment_dir / "study.md", table)
    plot(state.name, space, summary, tasks, experiment_dir / "study.png", state.metric)
    for index, point in enumerate(summary):
        if point["group_mean"]["mean"] is not None:
            parent.log_metrics({f"group_mean_{state.metric}": point["group_mean"]["mean"],
                                **({"saved_bytes_per_batch": point["saved_bytes_per_batch"]}
                                   if "saved_bytes_per_batch" in point else {})}, step=index)
    parent.set_tags({f"point.{index}": point["point"] for index, point in enumerate(summary)})
    for name in STUDY_FILES:
        if (experiment_dir / name).is_file():
            parent.log_artifacts(experiment_dir / name)
    print(f"study table, plot and records: {experiment_dir}/study.md, study.png, study.json (also on its MLflow "
          f"run: {tracking.where_to_look(state.experiment_id, parent.run_id, state.tracking_uri)})", flush=True)
