"""The search strategy: per task, Optuna's TPE draws trials and ASHA stops weak ones, all tasks in one Tuner
(:mod:`sweeps.search`); then the incumbent rule picks each task's winner.

* The plan (:mod:`sweeps.planning`) makes the task's current configuration its first trial, the incumbent.
* After ``fit()``, the incumbent rule (:mod:`sweeps.selection`) picks the winner among the trials trained to the
  end, within ``--memory-budget`` if one is set; each parameter's importance and, with several ``--objectives``,
  the Pareto set (:mod:`sweeps.pareto`) are recorded beside it.
* Winners that replace their incumbent are merged into the best-configuration file (``sweeps/best.yaml``), which
  the DVC pipeline reads, so ``dvc repro`` retrains them under the pipeline's protocol and tests them.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from ray import tune
from ray.tune.analysis import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

import tracking
from dtl.config import ConfigError, ExperimentConfig, check_best_entries, check_override_entry, load_config, read_best
from dtl.io import file_lock, write_json, write_text

from .importance import EVALUATOR, importance_table, task_importance
from .keys import TASK_KEY, TIME_ATTR, metric_label, score_metric
from .lifecycle import Strategy, Sweep, tuner_for
from .options import SweepOptions
from .pareto import metrics_and_modes, pareto_plot, pareto_set, pareto_table, parse_objectives, within_budget
from .planning import TaskPlan, plan_task
from .progress import ProgressView
from .records import ChildRunCloser, error_summary, open_parent_run, reconcile_runs, record_decision, status_callback
from .results import TaskOutcome, cost_plot, decide, decisions_table, format_params, trial_row, trials_table
from .search import TaskASHA, TaskSearch
from .state import EXIT_FAILED, SweepError, SweepState
from .trainable import TrialSetup, plain

RESULTS_FILE = "results.json"
BEST_HEADER = (
    "Best per-task configurations found by the sweeps (sweeps/run.py rewrites the entries of the tasks it\n"
    "swept and keeps the others). Keys: flat override keys of dtl.config.OVERRIDE_KEYS. They take precedence\n"
    "over params.yaml (global sections < params.yaml overrides.<task> < this file). To clear a task, set its\n"
    "entry back to {} (every task keeps an entry: DVC fails on a missing templated params key)."
)


class SearchStrategy(Strategy):
    kind = "sweep"

    def __init__(self, space):
        super().__init__(space)
        self.plans: dict[str, TaskPlan] = {}
        self.outcomes: list[TaskOutcome] = []
        self.closer: ChildRunCloser | None = None

    def check(self, options: SweepOptions) -> None:
        if options.seeds is not None:
            raise SweepError("--seeds: only a study (a space of grid parameters) trains several seeds per point")
        if options.objectives and len(options.objectives) > 1 and options.scheduler == "asha":
            raise SweepError("--scheduler asha: a multi-objective sweep trains every trial to the end (fifo), since "
                             "ASHA's rungs rank on accuracy alone and would stop the cheap end of the Pareto front")

    def settle(self, options: SweepOptions, saved: SweepState | None) -> SweepOptions:
        multi = bool(options.objectives and len(options.objectives) > 1)
        options = replace(options, scheduler=options.scheduler or ("fifo" if multi else "asha"))
        if saved:  # a resumed sweep keeps its own settings and files
            options = replace(options, params_path=saved.params_path, best_path=saved.best_path,
                              num_samples=saved.num_samples, scheduler=saved.scheduler, seed=saved.seed,
                              alpha=saved.alpha, objectives=saved.objectives, memory_budget=saved.memory_budget)
        return options

    def report_finished(self, saved: SweepState, storage: Path) -> int:
        print(f"sweep {saved.name} finished earlier: nothing to run", flush=True)
        self.outcomes = [TaskOutcome.from_dict(saved.tasks[task]["outcome"]) for task in saved.tasks]
        print_report(saved, self.outcomes, storage / saved.name, 0.0)
        return self.exit_status()

    def metric(self, base_config: ExperimentConfig) -> str:
        return score_metric(base_config.for_selection().protocol)

    def plan(self, base_config: ExperimentConfig, tasks: Sequence[str], options: SweepOptions) -> None:
        parse_objectives(options.objectives, self.metric(base_config))  # the sweep's own score first
        self.plans = {task: plan_task(base_config, task, self.space, options.scheduler) for task in tasks}

    def summary(self) -> str:
        return self.space.summary()

    def state_settings(self, options: SweepOptions) -> dict:
        return {"num_samples": options.num_samples or self.space.num_samples, "scheduler": options.scheduler}

    def num_trials(self, state: SweepState) -> int:
        return len(self.plans) * state.num_samples

    def open_records(self, sweep: Sweep) -> None:
        state = sweep.state
        for task, plan in self.plans.items():
            entry = state.tasks.setdefault(task, {})
            entry["parent_run_id"] = open_parent_run(state.experiment_id, state.tracking_uri, state.name, task,
                                                     plan.space, sweep.base_config, plan.epochs,
                                                     entry.get("parent_run_id"))
        self.closer = ChildRunCloser(state.tracking_uri, state.experiment_id,
                                     {task: state.tasks[task]["parent_run_id"] for task in self.plans},
                                     {task: plan.epochs for task, plan in self.plans.items()})

    def callbacks(self, sweep: Sweep) -> list:
        progress = ProgressView({task: (sweep.state.num_samples, plan.epochs) for task, plan in self.plans.items()},
                                metric=sweep.state.metric)
        return [status_callback(self.closer), progress]

    def setups(self, sweep: Sweep) -> dict[str, TrialSetup]:
        return {task: sweep.trial_setup(task, training=dict(plan.space.training),
                                        seed=sweep.base_config.evaluation.seeds[0], eval_every=plan.grace_epochs,
                                        parent_run_id=self.closer.parents[task], space_name=plan.space.name)
                for task, plan in self.plans.items()}

    def new_tuner(self, sweep: Sweep, trainable, callbacks: list) -> tune.Tuner:
        state = sweep.state
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # group=True (below) is what conditional spaces need; Optuna flags the argument as experimental on every run.
        warnings.filterwarnings("ignore", message="Argument ``group`` is an experimental feature",
                                category=optuna.exceptions.ExperimentalWarning)
        metrics, modes = metrics_and_modes(parse_objectives(state.objectives, state.metric))
        searchers = {}
        for index, (task, plan) in enumerate(self.plans.items()):
            # Multivariate TPE models the parameters jointly (rank and lr interact); the constant liar keeps
            # parallel trials from all being drawn at the same point.
            sampler = optuna.samplers.TPESampler(seed=state.seed + index, multivariate=True, group=True,
                                                 constant_liar=True,
                                                 n_startup_trials=max(2, min(10, state.num_samples // 3)))
            # one objective: plain TPE on the val score; several: Optuna's multi-objective TPE (a Pareto front)
            searchers[task] = OptunaSearch(space=plan.space.define_by_run(),
                                           metric=metrics if len(metrics) > 1 else state.metric,
                                           mode=modes if len(modes) > 1 else "max", sampler=sampler,
                                           points_to_evaluate=[plan.start] if plan.start else None)
        search = TaskSearch(searchers, dict.fromkeys(self.plans, state.num_samples),
                            {task: plan.start is not None for task, plan in self.plans.items()}, metric=state.metric,
                            mode="max")
        if state.scheduler == "asha":
            scheduler = TaskASHA({task: ASHAScheduler(time_attr=TIME_ATTR, metric=state.metric, mode="max",
                                                      max_t=plan.epochs, grace_period=plan.grace_epochs,
                                                      reduction_factor=plan.space.reduction_factor)
                                  for task, plan in self.plans.items()},
                                 {task: plan.epochs for task, plan in self.plans.items()}, TIME_ATTR)
        else:
            scheduler = FIFOScheduler()
        return tuner_for(sweep, trainable, callbacks, search_alg=search, scheduler=scheduler,
                         num_samples=len(self.plans) * state.num_samples)

    def announce(self, sweep: Sweep, resuming: bool) -> None:
        state = sweep.state
        if resuming:
            print(f"resuming the Tune experiment of sweep {state.name}", flush=True)
            return
        print(f"{len(self.plans)} tasks x {state.num_samples} trials, up to {sweep.max_concurrent} at a time over all "
              f"tasks ({sweep.options.cpus_per_trial:g} CPU, {sweep.gpus:g} GPU per trial)", flush=True)
        for task, plan in self.plans.items():
            length = (f"{plan.epochs} epochs, SHORTER than the {plan.final_epochs} the winner is retrained with"
                      if plan.shortened else f"{plan.epochs} epochs (the pipeline's schedule)")
            rungs = f"ASHA from epoch {plan.grace_epochs}" if state.scheduler == "asha" else "no early stopping"
            first = (f"first trial = the current configuration ({format_params(plan.start)})" if plan.start
                     else f"the current configuration is not tried first: {plan.why_not}")
            print(f"[{task}] {length}, {rungs}; {first}", flush=True)

    def collect(self, sweep: Sweep, experiment_path: str) -> bool:
        """Rows, the incumbent rule's decision, MLflow records and the cost plot for every task."""
        state = sweep.state
        trials = ExperimentAnalysis(experiment_path).trials
        client = tracking.client(state.tracking_uri)
        self.outcomes = []
        for task, plan in self.plans.items():
            own = [t for t in trials if (t.config or {}).get(TASK_KEY) == task]
            runs = reconcile_runs(client, self.closer, task, own)
            outcome = TaskOutcome(task=task, epochs=plan.epochs, final_epochs=plan.final_epochs, metric=state.metric)
            for trial in own:
                outcome.rows.append(trial_row(trial, plan.epochs, state.metric, runs.get(trial.trial_id),
                                              error_summary(trial) if trial.status == "ERROR" else None))
            outcome.finished = len(own) >= state.num_samples and all(r.status != "unfinished" for r in outcome.rows)
            parent = tracking.Run(state.tasks[task]["parent_run_id"], state.tracking_uri)
            if outcome.finished:
                decide_task(outcome, state)
                plot = cost_plot(outcome, sweep.experiment_dir / f"cost_{task}.png")
                if outcome.best:
                    record_decision(parent, outcome, plot)
                record_analysis(parent, outcome, own, plan, state, sweep.experiment_dir)
            counts = outcome.counts()
            parent.log_metrics({"trials_done": counts["done"], "trials_stopped_early": counts["stopped early"],
                                "trials_failed": counts["failed"],
                                "trials_restarted": sum(r.restarts > 0 for r in outcome.rows)})
            parent.finish(("FINISHED" if outcome.best else "FAILED") if outcome.finished else "KILLED",
                          error=None if outcome.best or not outcome.finished else "no trial trained to the end")
            state.tasks[task]["outcome"] = outcome.to_dict()
            self.outcomes.append(outcome)
        return all(o.finished for o in self.outcomes)

    def conclude(self, sweep: Sweep) -> None:
        write_winners(sweep.state, self.outcomes)

    def report(self, sweep: Sweep, wall_time_s: float) -> None:
        print_report(sweep.state, self.outcomes, sweep.experiment_dir, wall_time_s)

    def trials_kept(self) -> int:
        return sum(o.counts()["done"] + o.counts()["stopped early"] for o in self.outcomes)

    def exit_status(self) -> int:
        if not any(o.best for o in self.outcomes):
            print("\nNo trial trained to the end: nothing was written to the best-configuration file.", flush=True)
            return EXIT_FAILED
        return 0


def decide_task(outcome: TaskOutcome, state: SweepState) -> None:
    """The incumbent rule among the trials within the memory budget (all of them without one)."""
    eligible = within_budget(outcome.rows, state.memory_budget)
    outcome.decision = decide(eligible, state.alpha)
    incumbent = next((r for r in outcome.rows if r.incumbent), None)
    if state.memory_budget is not None and incumbent is not None and incumbent not in eligible \
            and incumbent.status == "done":
        # the current configuration does not fit: whatever fits replaces it
        outcome.decision.incumbent = incumbent.trial_id
        outcome.decision.replaced = outcome.decision.winner is not None
        if outcome.best is not None:
            outcome.decision.margin = outcome.best.val_score - incumbent.val_score
        outcome.decision.reason = (f"the incumbent keeps {incumbent.cost.get('saved_bytes_per_batch', 0) / 2**20:.2f} "
                                   f"MiB per batch, over the budget of {state.memory_budget / 2**20:.2f} MiB: the "
                                   "best val score within the budget wins")


def trial_history(trial, metric: str) -> dict[int, float]:
    """{epoch: val score} of every report of ``trial`` that scored val (Tune's result.json in its folder)."""
    history: dict[int, float] = {}
    path = Path(trial.path) / "result.json" if getattr(trial, "path", None) else None
    if path is None or not path.is_file():
        return history
    for line in path.read_text().splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result.get(metric), (int, float)) and TIME_ATTR in result:
            history[int(result[TIME_ATTR])] = float(result[metric])
    return history


def record_analysis(parent, outcome: TaskOutcome, trials, plan: TaskPlan, state: SweepState,
                    experiment_dir: Path) -> None:
    """Each parameter's importance and, for a multi-objective sweep, the Pareto set: on the outcome (results.json,
    the console) and on the task's parent run."""
    outcome.importance = task_importance(outcome.rows, {t.trial_id: trial_history(t, state.metric) for t in trials},
                                         plan.space)
    if outcome.importance["importance"]:
        parent.log_metrics({f"importance.{k}": v for k, v in outcome.importance["importance"].items()})
        parent.set_tags({"importance": f"{outcome.importance['evaluator']}; {outcome.importance['trials']} trials at "
                                       f"epoch {outcome.importance['epoch']}"
                                       + ("" if outcome.importance["reliable"] else "; unreliable: too few trials")})
    objectives = parse_objectives(state.objectives, state.metric)
    if len(objectives) > 1:
        outcome.pareto = [r.trial_id for r in pareto_set(outcome.rows, objectives)]
        plot = pareto_plot(outcome, objectives, state.memory_budget, experiment_dir / f"pareto_{outcome.task}.png")
        parent.set_tags({"pareto_set": ",".join(outcome.pareto)})
        if plot is not None:
            parent.log_artifacts(plot)


def write_winners(state: SweepState, outcomes: Sequence[TaskOutcome]) -> None:
    """Merge the winners that replaced their incumbent into the best-configuration file; a kept incumbent is
    what the task trains with already, so its entry stays as it is (and ``dvc repro`` retrains nothing)."""
    entries = {o.task: plain(o.best.params) for o in outcomes if o.best and o.best.trial_id != o.decision.incumbent}
    if not entries:
        return
    header = (BEST_HEADER + f"\nLast written by `python sweeps/run.py --space {state.space}` (sweep {state.name}, "
              f"{datetime.now().isoformat(timespec='seconds')}); `dvc repro` retrains these entries.")
    write_best(state.best_path, entries, header, params_path=state.params_path)


def write_best(best_path: str | Path, entries: Mapping[str, Mapping[str, Any]], header: str = BEST_HEADER, *,
               params_path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Replace the entries of ``entries``' tasks in a best-configuration file (keeping every other entry),
    atomically. Keys are checked against the flat override keys; values by merging them into the configuration
    of ``params_path`` (when it exists), so an invalid winner never lands in the file. ``header`` becomes a
    ``#`` comment block at the top. Returns the full new mapping."""
    best_path = Path(best_path)
    # Two sweeps over different tasks may finish at once: each merges into what the other wrote.
    with file_lock(best_path.with_name(f".{best_path.name}.lock")):
        current = read_best(best_path)
        for name, values in entries.items():
            current[str(name)] = check_override_entry(plain(values), f"{best_path}: {name}")
        if params_path is not None and Path(params_path).is_file():
            check_best_entries(params_path, {str(name): current[str(name)] for name in entries}, best_path)
        comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines()) if header else ""
        body = yaml.safe_dump(current, sort_keys=False, default_flow_style=None, width=120)
        write_text(best_path, comment + body)  # atomic: a reader (dvc repro) sees the old file or the new one
    return current


def objective(state: SweepState) -> str:
    try:
        return load_config(state.params_path).protocol.selection_objective()
    except (ConfigError, OSError):  # the params file changed since the sweep: say it plainly
        return "the validation score"


def print_report(state: SweepState, outcomes: Sequence[TaskOutcome], experiment_dir: Path, wall_time_s: float) -> None:
    """The search's results on the console (trials, decisions, winners, Pareto sets, importances, where the
    runs are) and in ``results.json``."""
    print(f"\nResults of sweep {state.name} (space {state.space}; objective: {objective(state)}; * winner, "
          f"(i) incumbent = the current configuration)\n{trials_table(outcomes)}")
    rows = [row for outcome in outcomes for row in outcome.rows]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "stopped early", "failed", "unfinished")}
    restarted = sum(r.restarts > 0 for r in rows)
    print(f"\n{len(rows)} trials: {counts['done']} done, {counts['stopped early']} stopped early by ASHA, "
          f"{counts['failed']} failed, {counts['unfinished']} unfinished"
          + (f", {restarted} restarted from a checkpoint after their worker died" if restarted else "")
          + f"; wall time {wall_time_s:.0f} s"
          + (f" ({state.wall_time_s:.0f} s with the earlier runs of this sweep)"
             if state.wall_time_s > wall_time_s + 1 else ""))
    shortened = [o for o in outcomes if o.epochs < o.final_epochs]
    if shortened:
        print("NOTE: trials trained SHORTER than the final training ("
              + ", ".join(f"{o.task}: {o.epochs} of {o.final_epochs} epochs" for o in shortened)
              + "): their ranking may not hold when the winner is retrained")
    decided = [o for o in outcomes if o.decision]
    if decided:
        test = ("exact McNemar test on the same val images" if state.metric == "val_accuracy" else
                "exact sign test on the same val images' own scores")
        print(f"\nIncumbent rule ({test}, one-sided, level {state.alpha:g} Bonferroni-corrected over the "
              f"challengers):\n{decisions_table(decided)}")
        replaced = {o.task: o.best for o in decided if o.best and o.decision.replaced}
        if replaced:
            print(f"\nWinners that replace the current configuration, written to {state.best_path}:")
            for task, row in replaced.items():
                print(f"  {task}: {state.metric} {row.val_score:.4f}  {format_params(row.params)}")
            print("Retrain them with the pipeline's protocol and test them:  dvc repro")
        else:
            print(f"\nNo task's incumbent was beaten: {state.best_path} is unchanged.")
        print(f"{metric_label(state.metric).capitalize()} vs cost per task: {experiment_dir}/cost_<task>.png (also "
              "on each task's parent run)")
        objectives = parse_objectives(state.objectives, state.metric)
        if len(objectives) > 1:
            budget = (f"; pick (*) within {state.memory_budget:.0f} bytes kept for backward per batch"
                      if state.memory_budget is not None else "; pick (*) by the incumbent rule on the score")
            print(f"\nPareto sets ({', '.join(objectives)}{budget}):")
            for outcome in decided:
                print(pareto_table(outcome, objectives))
            print(f"Plots: {experiment_dir}/pareto_<task>.png")
        print(f"\nParameter importance ({EVALUATOR}; the val score at the latest epoch every trial reached):")
        for outcome in decided:
            if outcome.importance:
                print("  " + importance_table(outcome.task, outcome.importance))
    print(f"MLflow: experiment {state.experiment!r} at {state.tracking_uri}; its runs (this sweep's: filter "
          f"tags.sweep = '{state.name}'): {tracking.where_to_look(state.experiment_id, uri=state.tracking_uri)}")
    for outcome in outcomes:
        parent = state.tasks.get(outcome.task, {}).get("parent_run_id")
        if parent:
            print(f"  {outcome.task}'s parent run: {tracking.runs_url(state.experiment_id, parent, state.tracking_uri)}")
    write_json(experiment_dir / RESULTS_FILE, {
        "sweep": state.name, "space": state.space, "wall_time_s": state.wall_time_s, "alpha": state.alpha,
        "tasks": {o.task: o.to_dict() for o in outcomes},
        "best": {o.task: asdict(o.best) for o in outcomes if o.best},
    })
