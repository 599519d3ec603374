"""The study strategy: the paper's ablations as a grid of points, each trained to the end and tested, never
selected (a space whose parameters are all ``type: grid``, e.g. ``python sweeps/run.py --space study_start_block``).

* One Tuner whose ``param_space`` is a ``tune.grid_search`` over the tasks, the study's seeds and each grid: every
  task and point is in flight at once (FIFO, no early stopping), and all trials of a task read one prefix cache
  whatever their start block.
* Each trial trains under the base configuration's own protocol (``evaluation.protocol`` of the params file:
  VTAB-1K ``final`` trains on train800val200 and tests once; few-shot and domain generalisation keep their own)
  and scores every split the pipeline would report.
* One MLflow parent run per study, one child run per trial (a point on one task with one seed); the study's
  table, plot and JSON (:mod:`sweeps.study`) go on the parent run too.
* ``sweeps/best.yaml`` is never written: a study reports.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

from ray import tune
from ray.tune.analysis import ExperimentAnalysis

import tracking
from dtl.config import ConfigError, ExperimentConfig
from dtl.data.vtab import task_group
from dtl.io import write_json, write_text

from .keys import SEED_KEY, TASK_KEY, score_metric
from .lifecycle import Strategy, Sweep, tuner_for
from .options import SweepOptions
from .planning import check_model_builds, task_backbone
from .progress import ProgressView
from .records import ChildRunCloser, reconcile_runs, status_callback
from .space import SearchSpace
from .state import EXIT_FAILED, SweepError, SweepState
from .study import STUDY_FILES, StudyRow, aggregate, markdown, plot, study_row
from .trainable import TrialSetup


class StudyStrategy(Strategy):
    kind = "study"

    def __init__(self, space: SearchSpace):
        super().__init__(space)
        self.seeds: list[int] = list(space.seeds)
        self.tasks: list[str] = []
        self.epochs: dict[str, int] = {}  # of a point, per task
        self.eval_every: dict[str, int] = {}
        self.points: list[str] = []
        self.rows: list[StudyRow] = []
        self.parent = None  # the study's one MLflow parent run
        self.closer: ChildRunCloser | None = None

    def check(self, options: SweepOptions) -> None:
        if options.num_samples is not None:
            raise SweepError("--num-samples: a study runs every point of its grids; change the grids instead")
        if options.scheduler not in (None, "fifo"):
            raise SweepError(f"--scheduler {options.scheduler}: a study trains every point to the end (fifo)")
        if options.seeds is not None and (not options.seeds or len(set(options.seeds)) != len(options.seeds)):
            raise SweepError(f"--seeds: expected distinct integers, got {options.seeds}")
        if options.objectives or options.memory_budget is not None:
            raise SweepError("--objectives / --memory-budget: a study reports every point; they are for searches")

    def settle(self, options: SweepOptions, saved: SweepState | None) -> SweepOptions:
        if saved:
            if options.seeds is not None and list(options.seeds) != list(saved.seeds):
                raise SweepError(f"--seeds: the study {saved.name} runs seeds {', '.join(map(str, saved.seeds))} "
                                 "and keeps them when resumed; start a new study (without --resume) for other seeds")
            options = replace(options, params_path=saved.params_path, seeds=saved.seeds)
        self.seeds = list(options.seeds or self.space.seeds)
        self.space = replace(self.space, seeds=tuple(self.seeds))
        return replace(options, scheduler="fifo")

    def metric(self, base_config: ExperimentConfig) -> str:
        return score_metric(base_config.protocol, "test")

    def plan(self, base_config: ExperimentConfig, tasks: Sequence[str], options: SweepOptions) -> None:
        """Per task: the space with its bounds resolved for the task's backbone, and the epochs of a point. Every
        point is validated here (schema and model) so that a point that cannot train fails before any trial."""
        resolved_spaces = {}
        for task in tasks:
            settings = base_config.for_task(task)
            resolved = self.space.resolve(len(task_backbone(settings).blocks))
            for label, entry in resolved.grid_points():
                try:
                    check_model_builds(base_config.for_task(task, entry, where=""))
                except ConfigError as err:
                    raise SweepError(f"{self.space.path}: the point {label} cannot be trained on {task}: "
                                     f"{err}") from None
            resolved_spaces[task] = resolved
            self.epochs[task], self.eval_every[task] = settings.training.epochs, settings.training.eval_every
        self.tasks = list(tasks)
        self.space = resolved_spaces[self.tasks[0]]  # symbolic grid values (last_block) resolved for the backbone
        self.points = [label for label, _ in self.space.grid_points()]

    def summary(self) -> str:
        return self.space.summary()

    def state_settings(self, options: SweepOptions) -> dict:
        return {"num_samples": len(self.points) * len(self.seeds), "scheduler": "fifo", "seeds": self.seeds}

    def num_trials(self, state: SweepState) -> int:
        return len(self.tasks) * len(self.points) * len(self.seeds)

    def open_records(self, sweep: Sweep) -> None:
        """The study's one MLflow parent run: created with the grids, tasks, seeds and protocol; reopened on
        --resume."""
        state = sweep.state
        if state.study_run_id:
            self.parent = tracking.Run.reopen(state.study_run_id, state.tracking_uri)
        else:
            self.parent = tracking.Run.create(state.experiment_id, f"study {self.space.name} ({state.name})", {
                "kind": "study", "sweep": state.name, "space": self.space.name}, {
                "space_file": str(self.space.path), "tasks": ",".join(self.tasks),
                "seeds": ",".join(map(str, self.seeds)), "protocol": sweep.base_config.evaluation.protocol,
                **{f"grid.{p.name}": p.describe().split(": ", 1)[1] for p in self.space.params}},
                uri=state.tracking_uri)
            state.study_run_id = self.parent.run_id
        for task in self.tasks:
            state.tasks.setdefault(task, {})["parent_run_id"] = self.parent.run_id
        self.closer = ChildRunCloser(state.tracking_uri, state.experiment_id,
                                     dict.fromkeys(self.tasks, self.parent.run_id), self.epochs)

    def callbacks(self, sweep: Sweep) -> list:
        progress = ProgressView({task: (len(self.points) * len(self.seeds), self.epochs[task]) for task in self.tasks},
                                metric=sweep.state.metric, metric_label="best test")
        return [status_callback(self.closer), progress]

    def setups(self, sweep: Sweep) -> dict[str, TrialSetup]:
        return {task: sweep.trial_setup(task, training={}, seed=self.seeds[0], eval_every=self.eval_every[task],
                                        parent_run_id=self.parent.run_id, space_name=self.space.name,
                                        tags={"study": self.space.name}, study=True)
                for task in self.tasks}

    def new_tuner(self, sweep: Sweep, trainable, callbacks: list) -> tune.Tuner:
        """``tune.grid_search`` over tasks, seeds and every grid, FIFO."""
        param_space = {**self.space.constants(), TASK_KEY: tune.grid_search(self.tasks),
                       SEED_KEY: tune.grid_search(self.seeds),
                       **{spec.name: tune.grid_search(list(spec.choices)) for spec in self.space.params}}
        return tuner_for(sweep, trainable, callbacks, param_space=param_space, num_samples=1)

    def announce(self, sweep: Sweep, resuming: bool) -> None:
        print(f"study {sweep.state.name}: {len(self.tasks)} tasks x {len(self.points)} points x {len(self.seeds)} "
              f"seeds = {self.num_trials(sweep.state)} runs, up to {sweep.max_concurrent} at a time "
              f"({sweep.options.cpus_per_trial:g} CPU, {sweep.gpus:g} GPU each)", flush=True)

    def collect(self, sweep: Sweep, experiment_path: str) -> bool:
        trials = ExperimentAnalysis(experiment_path).trials
        reconcile_runs(None, self.closer, self.tasks[0], trials)  # one parent run holds every task's trials
        self.rows = [study_row(trial, self.space, self.epochs, sweep.state.metric) for trial in trials]
        return len(self.rows) >= self.num_trials(sweep.state) and all(r.status != "unfinished" for r in self.rows)

    def report(self, sweep: Sweep, wall_time_s: float) -> None:
        if self.rows:
            report_study(sweep, self.space, self.rows, self.points, self.seeds, self.epochs, self.parent)

    def close_records(self, sweep: Sweep, interrupted: bool) -> None:
        if interrupted:
            self.parent.finish("KILLED", wait=0)
        else:
            finished = any(r.status == "done" for r in self.rows)
            self.parent.finish("FINISHED" if finished else "FAILED", error=None if finished else "no point finished",
                               wait=0)

    def trials_kept(self) -> int:
        return sum(r.status == "done" for r in self.rows)

    def exit_status(self) -> int:
        if not any(r.status == "done" for r in self.rows):
            print("\nNo point of the study trained to the end.", flush=True)
            return EXIT_FAILED
        return 0


def report_study(sweep: Sweep, space: SearchSpace, rows: Sequence[StudyRow], points: Sequence[str],
                 seeds: Sequence[int], epochs: dict[str, int], parent) -> None:
    """The table (printed, ``study.md``), the plot (``study.png``) and every run (``study.json``), also on the
    study's parent run."""
    state, tasks, experiment_dir = sweep.state, sweep.tasks, sweep.experiment_dir
    root = Path(sweep.base_config.data.root)
    groups = {task: task_group(task, root / task) for task in tasks}
    summary = aggregate(rows, points, tasks, groups)
    protocol = sweep.base_config.evaluation.protocol
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
