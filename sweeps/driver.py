"""The sweep driver: one Ray Tune ``Tuner`` for all tasks (per-task OptunaSearch TPE + ASHA), recorded in MLflow.

Order of work, chosen so that parallel trials never race on shared state:

1. the base configuration (``dtl.config.load_config``), the search space and the task list are validated,
   and each task's plan is fixed: the trials' schedule (the pipeline's own, unless the space shortens it), ASHA's
   rungs, and the current configuration as the first trial (the incumbent);
2. the data is prepared here, once (``config.protocol.ensure_data``), and every path handed to trials is absolute
   (a trial's working directory is a throwaway folder under Ray's temp dir);
3. Ray is started (or joined with ``--address``) and the requested per-trial CPUs/GPUs are checked against the
   cluster's nodes (a request no node can hold would leave trials PENDING forever);
4. the MLflow schema, the experiment and one parent run per task are created here before any trial writes
   (concurrent creation of a SQLite store corrupts it); then ONE Tuner runs the trials of every task
   (``sweeps.search``: every free slot takes the next trial of any task), each trial writing its own child run;
5. per task, the incumbent rule (``sweeps.selection``) picks the winner among the trials trained to the end;
   winners that replace their incumbent are merged into ``sweeps/best.yaml`` (``dtl.config.write_best``),
   which the DVC pipeline reads, so ``dvc repro`` retrains them under the pipeline's protocol (VTAB-1K:
   train800val200) and tests them.

Everything the sweep needs to resume lives in ``<storage>/<name>/``: ``sweep.json`` (settings, parent run ids,
outcomes) and the Tune experiment folder ``trials/``. ``--resume`` restores the Tuner (finished trials are not
re-run; in-flight ones start again); a sweep that finished is not run again.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import tracking

from .cluster import check_resources, default_concurrency, quiet_environment, start_ray
from .keys import TIME_ATTR, metric_label, score_metric
from .pareto import parse_objectives
from .results import TaskOutcome, cost_plot, decide, decisions_table, format_params, trial_row, trials_table
from .selection import ALPHA
from .space import SearchSpace, load_space
from .state import STATE_FILE, SweepError, SweepState, find_saved_state
from .trainable import TrialSetup, plain

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"  # the DVC pipeline's params: the sweep starts from what it trains
DEFAULT_BEST = REPO_ROOT / "sweeps" / "best.yaml"  # where winners go; the pipeline reads it
DEFAULT_STORAGE = REPO_ROOT / "sweep_results"
DEFAULT_EXPERIMENT = "dtl-sweeps"
RESULTS_FILE = "results.json"
TRIALS_DIR = "trials"  # the Tune experiment, under <storage>/<name>/
SCHEDULERS = ("asha", "fifo")
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports a process it interrupted
EXIT_TERMINATED = 143  # SIGTERM (kill, timeout, a batch scheduler): 128 + 15
EXIT_FAILED = 1
EXIT_STORAGE_FULL = 75  # the storage folder filled up: free space, then --resume (sysexits' EX_TEMPFAIL)

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_STORAGE", "SCHEDULERS", "STATE_FILE", "SweepError", "SweepOptions",
           "TaskPlan", "current_settings", "plan_task", "run_sweep"]


@dataclass
class SweepOptions:
    space: str = "dtl_plus"
    tasks: list[str] | None = None  # None: the pipeline's data.tasks
    num_samples: int | None = None  # trials per task; None: the space file's num_samples
    max_concurrent: int | None = None  # trials at once over all tasks; None: as many as the cluster holds
    gpus_per_trial: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    address: str | None = None  # None: start a private local Ray instance
    scheduler: str | None = None  # None: asha for a search, fifo for a study (its points train to the end)
    seed: int = 0
    seeds: list[int] | None = None  # a study's training seeds; None: the space file's
    objectives: list[str] | None = None  # None: the score alone; e.g. [val_accuracy, saved_bytes] (sweeps.pareto)
    memory_budget: float | None = None  # bytes kept for backward per batch a winner may keep at most
    alpha: float = ALPHA  # level of the incumbent rule's paired test
    max_failures: int = 3  # restarts of a trial whose worker or node died, from its last checkpoint
    checkpoint_every: float = 60.0  # seconds between a trial's checkpoints besides ASHA's rungs (0: every epoch)
    storage_path: str = str(DEFAULT_STORAGE)
    resume: bool = False
    name: str | None = None  # None: <space>-<timestamp>; with --resume: the latest sweep of that space
    params_path: str | None = None  # None: DEFAULT_PARAMS (params.yaml)
    best_path: str | None = None  # None: DEFAULT_BEST (sweeps/best.yaml)
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment


@dataclass(frozen=True)
class TaskPlan:
    """How one task is searched."""

    task: str
    space: SearchSpace  # bounds resolved for the task's backbone
    epochs: int  # of a trial trained to the end
    final_epochs: int  # what the pipeline retrains the winner with
    grace_epochs: int  # ASHA's first rung
    start: dict[str, Any] | None  # the current configuration as a point of the space (the incumbent)
    why_not: str  # why the current configuration is not a point of the space

    @property
    def shortened(self) -> bool:
        return self.epochs < self.final_epochs


# --------------------------------------------------------------------------------------------------------
# set-up


def resolve_repo_path(value: str | Path) -> Path:
    """Relative paths in params.yaml are relative to the repository root (as the DVC stages see them)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def load_base(options: SweepOptions):
    """The pipeline's merged configuration, with every path made absolute for trials."""
    from dtl.config import load_config

    params_path = Path(options.params_path or DEFAULT_PARAMS).resolve()
    best_path = Path(options.best_path or DEFAULT_BEST).resolve()
    config = load_config(params_path, best_path)
    config.data.root = str(resolve_repo_path(config.data.root))
    if isinstance(config.model.checkpoint, str):
        config.model.checkpoint = str(resolve_repo_path(config.model.checkpoint))
    for values in config.overrides.values():
        if isinstance(values.get("checkpoint"), str):
            values["checkpoint"] = str(resolve_repo_path(values["checkpoint"]))
    if config.training.prefix_cache_dir is None:
        # Every trial of a task reads one prefix cache through this folder; pin the driver's choice
        # ($DTL_CACHE_DIR or ~/.cache/dtl/prefix) so workers of a `ray start` cluster use the same one.
        from dtl.cache import default_cache_dir

        config.training.prefix_cache_dir = str(default_cache_dir().resolve())
    else:
        config.training.prefix_cache_dir = str(resolve_repo_path(config.training.prefix_cache_dir))
    return config, params_path, best_path


def task_backbone(config, task: str):
    """The task's backbone (random weights) seen through its family interface: its number of blocks fixes the
    symbolic bound ``last_block``, and each method's defaults for it say what a ``null`` option means."""
    from dtl.models import create_backbone, family_for

    resolved = config.for_task(task)
    return family_for(create_backbone(resolved.model.backbone, False, img_size=config.data.image_size))


def current_settings(config, task: str, space: SearchSpace, family) -> dict[str, Any]:
    """What the task trains with now (params.yaml, its overrides and any earlier sweep winner) as flat override
    keys with the defaults filled in: the sweep's first trial. A space with a fixed method of its own (lora,
    adaptformer) starts from the current lr, weight decay and drop-path with that method's default options."""
    from dtl.methods import canonical_name, get_method

    from .space import METHOD_SPECIFIC

    resolved = config.for_task(task)
    method = resolved.model.method if "method" in space.param_names else space.method
    values = {**asdict(resolved.training), **asdict(resolved.model), "method": method}
    if canonical_name(method) != canonical_name(resolved.model.method):
        values.update(dict.fromkeys(METHOD_SPECIFIC))  # another method's options do not carry over
    spec = get_method(canonical_name(method))
    options = spec.make_options({k: values[k] for k in spec.options.names() if values.get(k) is not None})
    values.update(options.resolved(family))
    return values


def plan_task(config, task: str, space: SearchSpace, scheduler: str = "asha") -> TaskPlan:
    """Fail before any trial starts if the base settings + the space's schedule do not validate; else the plan."""
    from dtl.config import ConfigError

    schedule = {**space.training, **space.constants()}  # what every trial of the space trains with
    try:
        training = config.for_task(task, schedule, where=f"{space.path} training + base config").training
        final_epochs = config.for_task(task).training.epochs
    except ConfigError as err:
        raise SweepError(str(err)) from None
    grace = space.grace_epochs(training.epochs)
    every = training.eval_every
    if config.protocol.keep_best and every and grace % every:
        # a trial keeps its best-validated epoch as the pipeline will: on the pipeline's evaluation epochs only
        grace = max(every, round(grace / every) * every)
    # During warm-up the lr is still ramping from warmup_lr: an ASHA rung there ranks untrained models, and
    # stops good configurations at random.
    if scheduler == "asha" and grace <= training.warmup_epochs < training.epochs:
        raise SweepError(f"{space.path}: scheduler.grace_period ({space.grace_period}: epoch {grace} of "
                         f"{training.epochs}) must exceed the trials' warmup_epochs ({training.warmup_epochs}): "
                         "ASHA's first rung would compare models still warming up. Raise grace_period")
    check_validation_list(config, task)
    family = task_backbone(config, task)
    resolved_space = space.resolve(len(family.blocks))
    start, why_not = resolved_space.start_point(current_settings(config, task, space, family))
    check_space_bounds(config, task, resolved_space, schedule)
    return TaskPlan(task=task, space=resolved_space, epochs=training.epochs, final_epochs=final_epochs,
                    grace_epochs=grace, start=start, why_not=why_not)


def check_validation_list(config, task: str) -> None:
    """Trials select on a validation list, never on test or target sets: a domain-generalisation source without
    ``val_meta.list`` cannot be swept."""
    selection = config.for_selection().protocol
    if "val" not in selection.scored_splits(task):
        raise SweepError(f"{task}: sweeps select on {selection.split_list(task, 'val')}, which does not exist; add "
                         "held-out source images there (lines 'relative/path label'), never target or test images")


def check_space_bounds(config, task: str, space: SearchSpace, schedule: Mapping[str, Any]) -> None:
    """Every value a trial may draw must be a valid setting for the task's backbone: each parameter's low and high
    (each choice of a categorical one) is validated against the schema, and those of model options by building
    the model once with random weights (the start block against the backbone's blocks, the kernel against its
    token grid...). So a space that cannot work fails here, before any trial, naming the bound."""
    from dtl.config import ConfigError
    from dtl.methods import all_option_names

    for spec in space.params:
        enabling = {name: allowed[0] for name, allowed in spec.when.items()}  # earlier parameters it depends on
        bounds = ([("choices", choice) for choice in spec.choices] if spec.type == "categorical"
                  else [("low", spec.low), ("high", spec.high)])
        for which, value in bounds:
            try:
                resolved = config.for_task(task, {**schedule, **enabling, spec.name: value}, where="")
                if spec.name in all_option_names() or spec.name == "method":
                    _check_model_cached(resolved)
            except ConfigError as err:
                # the schema's message without the check's own location ("overrides.<task>: training.<key>: ",
                # "model (<method> on <backbone>): "): the bound named above is the location
                reason = re.sub(r"^:?\s*((overrides\.[^:\s]+|[a-z_]+\.[a-z_]+|model \([^)]*\)): )*", "", str(err))
                raise SweepError(f"{space.path}: params.{spec.name}.{which}: {value!r} cannot be trained with "
                                 f"{config.model.backbone}: {reason}") from None


_CHECKED_MODELS: set[str] = set()


def _check_model_cached(resolved) -> None:
    """``build_model`` with random weights, once per distinct backbone, method and options."""
    from dtl.experiment import build_model

    key = repr((resolved.model.backbone, resolved.data.image_size, resolved.model.method,
                sorted(resolved.model.model_options().items()), resolved.model.drop_path_scope))
    if key not in _CHECKED_MODELS:
        build_model(resolved, 2, pretrained=False)
        _CHECKED_MODELS.add(key)


def prepare_state(options: SweepOptions, space: SearchSpace, tasks: list[str], params_path: Path, best_path: Path,
                  storage: Path, metric: str) -> SweepState:
    from tracking import init_tracking, tracking_uri

    if options.resume:
        state = find_saved_state(options.name, storage, space.name)
        os.environ["MLFLOW_TRACKING_URI"] = state.tracking_uri  # the same store as before, whatever the env says
        init_tracking(state.experiment)
        return state
    name = options.name or f"{space.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if (storage / name).exists():
        raise SweepError(f"{storage / name} exists already: pass --resume to continue that sweep, or another --name")
    uri = tracking_uri()
    experiment_id = init_tracking(options.experiment)  # creates the schema here, before any trial writes
    state = SweepState(
        path=storage / name / STATE_FILE, name=name, space=space.name, space_file=str(space.path),
        tasks={task: {} for task in tasks}, num_samples=options.num_samples or space.num_samples,
        scheduler=options.scheduler, seed=options.seed, alpha=options.alpha, params_path=str(params_path),
        best_path=str(best_path), experiment=options.experiment, experiment_id=experiment_id, tracking_uri=uri,
        started=datetime.now().isoformat(timespec="seconds"), objectives=options.objectives,
        memory_budget=options.memory_budget, metric=metric)
    state.save()
    return state


def check_options(options: SweepOptions, study: bool = False) -> None:
    if study:
        if options.num_samples is not None:
            raise SweepError("--num-samples: a study runs every point of its grids; change the grids instead")
        if options.scheduler not in (None, "fifo"):
            raise SweepError(f"--scheduler {options.scheduler}: a study trains every point to the end (fifo)")
        if options.seeds is not None and (not options.seeds or len(set(options.seeds)) != len(options.seeds)):
            raise SweepError(f"--seeds: expected distinct integers, got {options.seeds}")
    elif options.seeds is not None:
        raise SweepError("--seeds: only a study (a space of grid parameters) trains several seeds per point")
    if options.memory_budget is not None and not options.memory_budget > 0:
        raise SweepError(f"--memory-budget: expected bytes > 0, got {options.memory_budget}")
    if study and (options.objectives or options.memory_budget is not None):
        raise SweepError("--objectives / --memory-budget: a study reports every point; they are for searches")
    if options.objectives and len(options.objectives) > 1 and options.scheduler == "asha":
        raise SweepError("--scheduler asha: a multi-objective sweep trains every trial to the end (fifo), since "
                         "ASHA's rungs rank on accuracy alone and would stop the cheap end of the Pareto front")
    if options.num_samples is not None and options.num_samples < 1:
        raise SweepError(f"--num-samples: expected an integer >= 1, got {options.num_samples}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise SweepError(f"--max-concurrent: expected an integer >= 1, got {options.max_concurrent}")
    if options.scheduler is not None and options.scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler: expected one of {', '.join(SCHEDULERS)}, got {options.scheduler!r}")
    if options.cpus_per_trial <= 0 or (options.gpus_per_trial is not None and options.gpus_per_trial < 0):
        raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if options.gpus_per_trial is not None and options.gpus_per_trial > 1:
        raise SweepError(f"--gpus-per-trial {options.gpus_per_trial:g}: a trial trains on one GPU, so at most 1 (a "
                         "fraction such as 0.25 packs several trials on one GPU)")
    if options.max_failures < 0:
        raise SweepError(f"--max-failures: expected an integer >= 0, got {options.max_failures}")
    if not options.checkpoint_every >= 0:
        raise SweepError(f"--checkpoint-every: expected seconds >= 0, got {options.checkpoint_every}")
    if not 0 < options.alpha < 1:
        raise SweepError(f"--alpha: expected a level in (0, 1) such as 0.05, got {options.alpha}")


# --------------------------------------------------------------------------------------------------------
# the Tuner


def build_tuner(state: SweepState, plans: Mapping[str, TaskPlan], base_config, cpus: float, gpus: float,
                max_concurrent: int, options: SweepOptions, closer, progress, experiment_dir: Path):
    """A new Tuner over every task, or the saved one restored (``--resume``)."""
    from ray import tune

    from .records import status_callback, use_sweep_outbox
    from .storage import StorageWatch
    from .trainable import train_trial

    setups = {task: TrialSetup(
        task=task, base_config=base_config.to_dict(), training=dict(plan.space.training),
        seed=base_config.evaluation.seeds[0], eval_every=plan.grace_epochs, threads=max(1, int(cpus)),
        tracking_uri=state.tracking_uri,
        experiment_id=state.experiment_id, parent_run_id=closer.parents[task], sweep_name=state.name,
        space_name=plan.space.name, checkpoint_every=options.checkpoint_every,
        outbox=use_sweep_outbox(experiment_dir), metric=state.metric) for task, plan in plans.items()}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setups=setups), {"cpu": cpus, "gpu": gpus})
    path = experiment_dir / TRIALS_DIR
    if tune.Tuner.can_restore(str(path)):
        # Finished trials stay finished (errored ones too: a NaN or a bad config would fail again);
        # in-flight trials start again and reopen their MLflow child run.
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False), True
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .search import TaskASHA, TaskSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # group=True (below) is what conditional spaces need; Optuna flags the argument as experimental on every run.
    warnings.filterwarnings("ignore", message="Argument ``group`` is an experimental feature",
                            category=optuna.exceptions.ExperimentalWarning)
    searchers = {}
    for index, (task, plan) in enumerate(plans.items()):
        # Multivariate TPE models the parameters jointly (rank and lr interact); the constant liar keeps
        # parallel trials from all being drawn at the same point.
        sampler = optuna.samplers.TPESampler(seed=state.seed + index, multivariate=True, group=True,
                                             constant_liar=True,
                                             n_startup_trials=max(2, min(10, state.num_samples // 3)))
        from .pareto import metrics_and_modes

        metrics, modes = metrics_and_modes(parse_objectives(state.objectives, state.metric))
        # one objective: plain TPE on the val score; several: Optuna's multi-objective TPE (a Pareto front)
        searchers[task] = OptunaSearch(space=plan.space.define_by_run(),
                                       metric=metrics if len(metrics) > 1 else state.metric,
                                       mode=modes if len(modes) > 1 else "max", sampler=sampler,
                                       points_to_evaluate=[plan.start] if plan.start else None)
    search = TaskSearch(searchers, dict.fromkeys(plans, state.num_samples),
                        {task: plan.start is not None for task, plan in plans.items()}, metric=state.metric, mode="max")
    if state.scheduler == "asha":
        scheduler = TaskASHA({task: ASHAScheduler(time_attr=TIME_ATTR, metric=state.metric, mode="max",
                                                  max_t=plan.epochs,
                                                  grace_period=plan.grace_epochs,
                                                  reduction_factor=plan.space.reduction_factor)
                              for task, plan in plans.items()},
                             {task: plan.epochs for task, plan in plans.items()}, TIME_ATTR)
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=len(plans) * state.num_samples,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),  # one process per slot: imports are paid once
        run_config=tune.RunConfig(
            name=TRIALS_DIR, storage_path=str(experiment_dir), verbose=0,
            # A raised error means the worker or its node died: the trial restarts from its last checkpoint (a
            # trial that fails on its own reports the error instead, see sweeps.trainable, and is not retried).
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[status_callback(closer), progress, StorageWatch(experiment_dir)]),
    )
    return tuner, False


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default puts every parameter in the name)."""
    return trial.trial_id


# --------------------------------------------------------------------------------------------------------
# the whole sweep


def run_sweep(options: SweepOptions, started: float | None = None) -> int:
    """Run (or resume) a sweep; returns the process exit code. ``started``: a ``time.perf_counter()`` taken at
    process start, so the reported wall time includes the imports."""
    quiet_environment(options.address)
    started = time.perf_counter() if started is None else started
    space = load_space(options.space)
    check_options(options, study=space.is_study)
    if space.is_study:
        from .study import run_study

        return run_study(options, space, started)
    multi = bool(options.objectives and len(options.objectives) > 1)
    options = replace(options, scheduler=options.scheduler or ("fifo" if multi else "asha"))
    storage = Path(options.storage_path).expanduser().resolve()  # Tune needs an absolute storage path

    saved = find_saved_state(options.name, storage, space.name) if options.resume else None
    if not options.resume and options.name and (storage / options.name).exists():
        raise SweepError(f"{storage / options.name} exists already: pass --resume to continue that sweep, "
                         "or another --name")
    if saved:  # a resumed sweep keeps its own settings and files
        options = replace(options, params_path=saved.params_path, best_path=saved.best_path,
                          num_samples=saved.num_samples, scheduler=saved.scheduler, seed=saved.seed, alpha=saved.alpha,
                          objectives=saved.objectives, memory_budget=saved.memory_budget)
        if saved.finished:
            return report_finished(saved, storage)
    base_config, params_path, best_path = load_base(options)
    metric = saved.metric if saved else score_metric(base_config.for_selection().protocol)
    parse_objectives(options.objectives, metric)  # the sweep's own score first
    tasks = list(saved.tasks) if saved else list(options.tasks or base_config.data.tasks)
    if len(set(tasks)) != len(tasks):
        raise SweepError(f"--tasks: a task is repeated in {tasks}")
    plans = {task: plan_task(base_config, task, space, options.scheduler) for task in tasks}

    print(space.summary(), flush=True)
    prepare_data(base_config, tasks)

    import ray

    import tracking

    from .records import TRACKING_WAIT_S, deliver_records, use_sweep_outbox

    state, total, gpus = start_cluster(options, space, tasks, params_path, best_path, storage, metric)
    earlier_wall_time = state.wall_time_s  # of earlier, interrupted runs of this sweep
    experiment_dir = storage / state.name
    use_sweep_outbox(experiment_dir)  # before the first record: the parent runs
    print(f"sweep {state.name}: results in {experiment_dir}; MLflow experiment {state.experiment!r} at "
          f"{state.tracking_uri}", flush=True)
    client = tracking.client(state.tracking_uri)
    outcomes: list[TaskOutcome] = []
    interrupted = False
    terminated: list[int] = []
    try:
        max_concurrent = options.max_concurrent or default_concurrency(total, options.cpus_per_trial, gpus,
                                                                       len(tasks) * state.num_samples)
        outcomes = fit(state, plans, base_config, options, gpus, max_concurrent, client, experiment_dir, terminated)
        interrupted = not all(o.finished for o in outcomes)
    except BaseException as err:  # Ctrl-C outside Tune's own handling, or a crash: leave no run RUNNING
        close_open_runs(state, client, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if not isinstance(err, KeyboardInterrupt):
            raise
        interrupted = True
    finally:
        elapsed = time.perf_counter() - started
        state.wall_time_s = earlier_wall_time + elapsed
        state.save()
        ray.shutdown()

    if outcomes and not interrupted:
        write_winners(state, outcomes)
        state.finished = True
        state.save()
    report(state, outcomes, experiment_dir, elapsed)
    # Results and best.yaml are written; the trials' processes are gone, so their journals are free to send.
    deliver_records(experiment_dir, wait=0 if interrupted else TRACKING_WAIT_S)
    if interrupted:
        return report_interrupted(options, state, storage, outcomes, bool(terminated))
    if not any(o.best for o in outcomes):
        print("\nNo trial trained to the end: nothing was written to the best-configuration file.", flush=True)
        return EXIT_FAILED
    return 0


def start_cluster(options: SweepOptions, space: SearchSpace, tasks: list[str], params_path: Path, best_path: Path,
                  storage: Path, metric: str) -> tuple[SweepState, dict, float]:
    """Start (or join) Ray and check that it holds a trial before anything of the sweep is written; the sweep's
    state (new, or the one resumed), the cluster's resources and the GPUs per trial."""
    import ray

    from .storage import check_free_space

    check_free_space(storage)
    start_ray(options.address)
    try:
        total = check_resources(options.cpus_per_trial, options.gpus_per_trial or 0)
        gpus = options.gpus_per_trial if options.gpus_per_trial is not None else (1.0 if total["GPU"] > 0 else 0.0)
        check_resources(options.cpus_per_trial, gpus)
        return prepare_state(options, space, tasks, params_path, best_path, storage, metric), total, gpus
    except BaseException:
        ray.shutdown()
        raise


def fit(state: SweepState, plans: Mapping[str, TaskPlan], base_config, options: SweepOptions, gpus: float,
        max_concurrent: int, client, experiment_dir: Path, terminated: list[int]) -> list[TaskOutcome]:
    """Open each task's parent run, run every trial of every task in one Tuner, and collect the outcomes; a
    SIGTERM that arrives while Tune runs lands in ``terminated``."""
    from .progress import ProgressView
    from .records import ChildRunCloser, open_parent_run

    for task, plan in plans.items():
        entry = state.tasks.setdefault(task, {})
        entry["parent_run_id"] = open_parent_run(state.experiment_id, state.tracking_uri, state.name, task,
                                                 plan.space, base_config, plan.epochs, entry.get("parent_run_id"))
    state.save()
    closer = ChildRunCloser(state.tracking_uri, state.experiment_id,
                            {task: state.tasks[task]["parent_run_id"] for task in plans},
                            {task: plan.epochs for task, plan in plans.items()})
    progress = ProgressView({task: (state.num_samples, plan.epochs) for task, plan in plans.items()},
                            metric=state.metric)
    tuner, resuming = build_tuner(state, plans, base_config, options.cpus_per_trial, gpus, max_concurrent,
                                  options, closer, progress, experiment_dir)
    announce(plans, state, max_concurrent, options.cpus_per_trial, gpus, resuming)
    with graceful_sigterm() as received:
        try:
            grid = tuner.fit()
        finally:
            terminated.extend(received)
    return collect(grid, plans, state, client, closer, experiment_dir)


def report_finished(saved: SweepState, storage: Path) -> int:
    """``--resume`` of a sweep that had finished: its report again, nothing trained."""
    outcomes = [TaskOutcome.from_dict(saved.tasks[task]["outcome"]) for task in saved.tasks]
    print(f"sweep {saved.name} finished earlier: nothing to run", flush=True)
    report(saved, outcomes, storage / saved.name, 0.0)
    return 0 if any(o.best for o in outcomes) else EXIT_FAILED


def prepare_data(base_config, tasks: list[str]) -> None:
    """Generate or check the tasks' data here, once, so trials never race to generate it."""
    from dtl.data import DataError

    print(f"preparing data under {base_config.data.root} for {', '.join(tasks)}", flush=True)
    try:
        base_config.protocol.ensure_data(tasks)
    except (DataError, KeyError, FileExistsError) as err:
        raise SweepError(f"data ({base_config.data.source} at {base_config.data.root}): {err}") from None


def close_open_runs(state: SweepState, client, parent_status: str) -> None:
    """After a crash or a Ctrl-C outside Tune's handling: every trial run still RUNNING closed KILLED (tagged
    interrupted), every task's parent run closed ``parent_status``."""
    import tracking

    from .records import child_runs

    for entry in state.tasks.values():
        if entry.get("parent_run_id"):
            for run in child_runs(client, state.experiment_id, entry["parent_run_id"]).values():
                if run.info.status == "RUNNING":
                    cut = tracking.Run(run.info.run_id, state.tracking_uri)
                    cut.set_tags({"interrupted": "true"})
                    cut.finish("KILLED", wait=0)
            tracking.Run(entry["parent_run_id"], state.tracking_uri).finish(parent_status, wait=0)


def report_interrupted(options: SweepOptions, state: SweepState, storage: Path, outcomes: Sequence[TaskOutcome],
                       terminated: bool) -> int:
    """Say why the sweep stopped, how much of it is kept and the command that resumes it; the exit code."""
    from .storage import SHORTAGES

    resume = f"python sweeps/run.py --space {options.space} --resume --name {state.name}"
    if storage != DEFAULT_STORAGE:
        resume += f" --storage-path {storage}"
    done = sum(o.counts()["done"] + o.counts()["stopped early"] for o in outcomes)
    full = SHORTAGES[-1] if SHORTAGES and not terminated else None
    head = "stopped by SIGTERM" if terminated else f"stopped because {full.describe()}" if full else \
        "stopped by Ctrl-C"
    print(f"\n{head}: sweep {state.name}, {done} of {len(state.tasks) * state.num_samples} trials finished and "
          f"kept; {'free space there, then ' if full else ''}resume with: {resume}", flush=True)
    return EXIT_TERMINATED if terminated else EXIT_STORAGE_FULL if full else EXIT_INTERRUPTED


@contextlib.contextmanager
def graceful_sigterm() -> Iterator[list[int]]:
    """While Tune runs: SIGTERM stops the sweep as Ctrl-C does (Tune's own graceful stop: running trials end,
    the experiment state is saved), instead of Ray's native crash report. A second SIGTERM kills at once. Yields
    a list that holds the signal once one arrived."""
    received: list[int] = []

    def on_sigterm(signum, frame):
        if received:  # asked twice: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        # Tune registers its stop handler on SIGUSR1 (and SIGINT) once fit() has started; before that there is
        # nothing to stop gracefully.
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop):
            tune_stop(signum, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init, so it replaces Ray's native handler
    try:
        yield received
    finally:
        # None: the previous handler was not Python's (Ray's native one); the default is what a later signal needs
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def announce(plans: Mapping[str, TaskPlan], state: SweepState, max_concurrent: int, cpus: float, gpus: float,
             resuming: bool) -> None:
    if resuming:
        print(f"resuming the Tune experiment of sweep {state.name}", flush=True)
        return
    print(f"{len(plans)} tasks x {state.num_samples} trials, up to {max_concurrent} at a time over all tasks "
          f"({cpus:g} CPU, {gpus:g} GPU per trial)", flush=True)
    for task, plan in plans.items():
        length = (f"{plan.epochs} epochs, SHORTER than the {plan.final_epochs} the winner is retrained with"
                  if plan.shortened else f"{plan.epochs} epochs (the pipeline's schedule)")
        rungs = f"ASHA from epoch {plan.grace_epochs}" if state.scheduler == "asha" else "no early stopping"
        first = (f"first trial = the current configuration ({format_params(plan.start)})" if plan.start
                 else f"the current configuration is not tried first: {plan.why_not}")
        print(f"[{task}] {length}, {rungs}; {first}", flush=True)


def collect(grid, plans: Mapping[str, TaskPlan], state: SweepState, client, closer, experiment_dir: Path):
    """Rows, the incumbent rule's decision, MLflow records and the cost plot for every task."""
    from ray.tune.analysis import ExperimentAnalysis

    import tracking

    from .keys import TASK_KEY
    from .records import error_summary, reconcile_runs, record_decision

    trials = ExperimentAnalysis(grid.experiment_path).trials
    outcomes = []
    for task, plan in plans.items():
        own = [t for t in trials if (t.config or {}).get(TASK_KEY) == task]
        runs = reconcile_runs(client, closer, task, own)
        outcome = TaskOutcome(task=task, epochs=plan.epochs, final_epochs=plan.final_epochs, metric=state.metric)
        for trial in own:
            outcome.rows.append(trial_row(trial, plan.epochs, state.metric, runs.get(trial.trial_id),
                                          error_summary(trial) if trial.status == "ERROR" else None))
        outcome.finished = len(own) >= state.num_samples and all(r.status != "unfinished" for r in outcome.rows)
        parent = tracking.Run(state.tasks[task]["parent_run_id"], state.tracking_uri)
        if outcome.finished:
            decide_task(outcome, state)
            plot = cost_plot(outcome, experiment_dir / f"cost_{task}.png")
            if outcome.best:
                record_decision(parent, outcome, plot)
            record_analysis(parent, outcome, own, plan, state, experiment_dir)
        counts = outcome.counts()
        parent.log_metrics({"trials_done": counts["done"], "trials_stopped_early": counts["stopped early"],
                            "trials_failed": counts["failed"], "trials_restarted": sum(r.restarts > 0 for r in outcome.rows)})
        parent.finish(("FINISHED" if outcome.best else "FAILED") if outcome.finished else "KILLED",
                      error=None if outcome.best or not outcome.finished else "no trial trained to the end")
        state.tasks[task]["outcome"] = outcome.to_dict()
        outcomes.append(outcome)
    return outcomes


def decide_task(outcome: TaskOutcome, state: SweepState) -> None:
    """The incumbent rule among the trials within the memory budget (all of them without one)."""
    from .pareto import within_budget

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
    import json

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
    from .importance import task_importance
    from .pareto import pareto_plot, pareto_set

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
    from dtl.config import BEST_HEADER, write_best

    entries = {o.task: plain(o.best.params) for o in outcomes if o.best and o.best.trial_id != o.decision.incumbent}
    if not entries:
        return
    header = (BEST_HEADER + f"\nLast written by `python sweeps/run.py --space {state.space}` (sweep {state.name}, "
              f"{datetime.now().isoformat(timespec='seconds')}); `dvc repro` retrains these entries.")
    write_best(state.best_path, entries, header, params_path=state.params_path)


def objective(state: SweepState) -> str:
    from dtl.config import ConfigError, load_config
    try:
        return load_config(state.params_path).protocol.selection_objective()
    except (ConfigError, OSError):  # the params file changed since the sweep: say it plainly
        return "the validation score"


def report(state: SweepState, outcomes: Sequence[TaskOutcome], experiment_dir: Path, wall_time_s: float) -> None:
    from dtl.io import write_json

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
        from .importance import EVALUATOR, importance_table
        from .pareto import pareto_table

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
