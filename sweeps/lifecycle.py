"""The life of a sweep, whatever its strategy.

A sweep searches (:mod:`sweeps.search_strategy`: Optuna's TPE and ASHA per task, then the incumbent rule) or
studies (:mod:`sweeps.study_strategy`: a grid of points trained to the end and reported). Both live the same life,
in an order chosen so that parallel trials never race on shared state:

1. the options, the space and the task list are checked, a resumed sweep's saved state is read (once) and the
   base configuration loaded with every path made absolute (a trial's working directory is a throwaway folder);
2. the strategy fixes and validates its plan per task, so a setting that cannot train fails before anything
   starts;
3. the data is prepared here, once (``protocol.ensure_data``), so trials never race to generate it;
4. Ray is started (or joined with ``--address``) and the per-trial CPUs/GPUs are checked against its nodes (a
   request no node can hold would leave trials PENDING forever), then the sweep's state is written;
5. the MLflow schema, experiment and parent runs are created here, before any trial writes (concurrent creation
   of a SQLite store corrupts it), and the sweep's records go through its own outbox folder;
6. ONE Tuner runs every trial of every task (every free slot takes the next trial of any task) under one
   try/finally that saves the state and shuts Ray down whatever happens; SIGTERM stops it as Ctrl-C does;
7. the strategy collects the outcome, concludes (a search writes its winners), reports and closes its records;
   delayed MLflow records are delivered, and an interrupted sweep says how to resume.

Everything a sweep needs to resume lives in ``<storage>/<name>/``: ``sweep.json`` and the Tune experiment folder
``trials/``. ``--resume`` restores the Tuner (finished trials are not re-run; in-flight ones start again).

A new strategy (population-based training, say) subclasses :class:`Strategy`: its plan, its trials' setups, its
Tuner (searcher and scheduler), and what it makes of the trials; the life above stays as it is.
"""
from __future__ import annotations

import abc
import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray import tune

import tracking
from dtl.cache import default_cache_dir
from dtl.config import ExperimentConfig, load_config
from dtl.data import DataError
from dtl.io import DEFAULT_BEST, DEFAULT_PARAMS, REPO_ROOT

from .cluster import check_resources, default_concurrency, start_ray
from .options import DEFAULT_STORAGE, SweepOptions, check_options
from .records import TRACKING_WAIT_S, child_runs, deliver_records, use_sweep_outbox
from .space import SearchSpace
from .state import (
    EXIT_INTERRUPTED,
    EXIT_STORAGE_FULL,
    EXIT_TERMINATED,
    STATE_FILE,
    SweepError,
    SweepState,
    find_saved_state,
)
from .storage import SHORTAGES, StorageWatch, check_free_space
from .trainable import TrialSetup, train_trial

TRIALS_DIR = "trials"  # the Tune experiment, under <storage>/<name>/


@dataclass
class Sweep:
    """One run of a sweep, as its strategy sees it once the cluster is up and the state written."""

    options: SweepOptions
    base_config: ExperimentConfig  # every path absolute
    tasks: list[str]
    state: SweepState
    storage: Path
    gpus: float  # per trial
    max_concurrent: int = 1
    outbox: str = ""  # the sweep's MLflow outbox folder, handed to its trials

    @property
    def experiment_dir(self) -> Path:
        return self.storage / self.state.name

    def trial_setup(self, task: str, **own: Any) -> TrialSetup:
        """What every trial of ``task`` takes from the sweep; ``own``: the strategy's part (its schedule, seed,
        evaluation epochs, parent run, space, tags)."""
        state = self.state
        return TrialSetup(task=task, base_config=self.base_config.to_dict(),
                          threads=max(1, int(self.options.cpus_per_trial)), tracking_uri=state.tracking_uri,
                          experiment_id=state.experiment_id, sweep_name=state.name,
                          checkpoint_every=self.options.checkpoint_every, outbox=self.outbox, metric=state.metric,
                          **own)

    def resume_command(self) -> str:
        command = f"python sweeps/run.py --space {self.options.space} --resume --name {self.state.name}"
        return command + (f" --storage-path {self.storage}" if self.storage != DEFAULT_STORAGE else "")


class Strategy(abc.ABC):
    """What a strategy plugs into the life of a sweep (:func:`run_sweep`), in the order it is asked."""

    kind = "sweep"  # recorded in the sweep's state

    def __init__(self, space: SearchSpace):
        self.space = space

    @abc.abstractmethod
    def check(self, options: SweepOptions) -> None:
        """Refuse options that make no sense for this strategy."""

    @abc.abstractmethod
    def settle(self, options: SweepOptions, saved: SweepState | None) -> SweepOptions:
        """The options with this strategy's defaults filled in; a resumed sweep keeps its saved settings."""

    def report_finished(self, saved: SweepState, storage: Path) -> int | None:
        """``--resume`` of a sweep that had finished: its report and exit status; None runs it again."""
        return None

    @abc.abstractmethod
    def metric(self, base_config: ExperimentConfig) -> str:
        """What trials report and are ranked on (``val_accuracy``, ``test_miou``...)."""

    @abc.abstractmethod
    def plan(self, base_config: ExperimentConfig, tasks: Sequence[str], options: SweepOptions) -> None:
        """Fix and validate the plan of every task; printed by :meth:`summary`."""

    @abc.abstractmethod
    def summary(self) -> str: ...

    @abc.abstractmethod
    def state_settings(self, options: SweepOptions) -> dict[str, Any]:
        """What a new sweep's state records of this strategy (``num_samples`` trials per task, ``scheduler``...)."""

    @abc.abstractmethod
    def num_trials(self, state: SweepState) -> int: ...

    @abc.abstractmethod
    def open_records(self, sweep: Sweep) -> None:
        """Create (or reopen on --resume) the MLflow parent runs the trials' runs go under."""

    @abc.abstractmethod
    def callbacks(self, sweep: Sweep) -> list[tune.Callback]:
        """Tune callbacks: the progress view and the closer of child runs."""

    @abc.abstractmethod
    def setups(self, sweep: Sweep) -> dict[str, TrialSetup]:
        """Per task, what its trials need besides their sampled values."""

    @abc.abstractmethod
    def new_tuner(self, sweep: Sweep, trainable, callbacks: list[tune.Callback]) -> tune.Tuner:
        """A Tuner over every task (:func:`tuner_for` with this strategy's searcher and scheduler)."""

    @abc.abstractmethod
    def announce(self, sweep: Sweep, resuming: bool) -> None: ...

    @abc.abstractmethod
    def collect(self, sweep: Sweep, experiment_path: str) -> bool:
        """Read the trials back after ``fit()``; True when every trial the sweep asked for has ended."""

    def conclude(self, sweep: Sweep) -> None:
        """After a sweep that ran to its end, before it is marked finished (a search writes its winners)."""
        return None

    @abc.abstractmethod
    def report(self, sweep: Sweep, wall_time_s: float) -> None: ...

    def close_records(self, sweep: Sweep, interrupted: bool) -> None:
        """Close what :meth:`open_records` opened and :meth:`collect` did not."""
        return None

    @abc.abstractmethod
    def trials_kept(self) -> int:
        """Trials that ended and are kept (said when the sweep is interrupted)."""

    @abc.abstractmethod
    def exit_status(self) -> int:
        """0, or :data:`~sweeps.state.EXIT_FAILED` with a line saying why, for a sweep that ran to its end."""


def run_sweep(options: SweepOptions, strategy: Strategy, started: float | None = None) -> int:
    """Run (or resume) a sweep of ``strategy`` over its space; returns the process exit code. ``started``: a
    ``time.perf_counter()`` taken at process start, so the reported wall time includes the imports."""
    started = time.perf_counter() if started is None else started
    space = strategy.space
    check_options(options)
    strategy.check(options)
    storage = Path(options.storage_path).expanduser().resolve()  # Tune needs an absolute storage path
    saved = find_saved_state(options.name, storage, space.name) if options.resume else None
    if saved is None and options.name and (storage / options.name).exists():
        raise SweepError(f"{storage / options.name} exists already: pass --resume to continue that sweep, "
                         "or another --name")
    options = strategy.settle(options, saved)
    if saved and saved.finished:
        finished = strategy.report_finished(saved, storage)
        if finished is not None:
            return finished
    base_config, params_path, best_path = load_base(options)
    tasks = list(saved.tasks) if saved else list(options.tasks or base_config.data.tasks)
    if len(set(tasks)) != len(tasks):
        raise SweepError(f"--tasks: a task is repeated in {tasks}")
    strategy.plan(base_config, tasks, options)
    print(strategy.summary(), flush=True)
    prepare_data(base_config, tasks)

    metric = saved.metric if saved else strategy.metric(base_config)
    state, total, gpus = start_cluster(options, strategy, saved, tasks, params_path, best_path, storage, metric)
    sweep = Sweep(options, base_config, tasks, state, storage, gpus)
    earlier_wall_time = state.wall_time_s  # of earlier, interrupted runs of this sweep
    sweep.outbox = use_sweep_outbox(sweep.experiment_dir)  # before the first record: the parent runs
    print(f"{strategy.kind} {state.name}: results in {sweep.experiment_dir}; MLflow experiment {state.experiment!r} "
          f"at {state.tracking_uri}", flush=True)
    client = tracking.client(state.tracking_uri)
    interrupted, terminated = False, []
    try:
        sweep.max_concurrent = options.max_concurrent or default_concurrency(
            total, options.cpus_per_trial, gpus, strategy.num_trials(state))
        strategy.open_records(sweep)
        state.save()
        interrupted = not fit(sweep, strategy, terminated)
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

    if not interrupted:
        strategy.conclude(sweep)
        state.finished = True
        state.save()
    strategy.report(sweep, elapsed)
    strategy.close_records(sweep, interrupted)
    # Results are written and the trials' processes are gone, so their journals are free to send.
    deliver_records(sweep.experiment_dir, wait=0 if interrupted else TRACKING_WAIT_S)
    if interrupted:
        return report_interrupted(sweep, strategy.trials_kept(), bool(terminated))
    return strategy.exit_status()


def fit(sweep: Sweep, strategy: Strategy, terminated: list[int]) -> bool:
    """Run the strategy's Tuner (a new one, or the saved one restored) and collect its trials; True when every
    trial ended. A SIGTERM that arrives while Tune runs lands in ``terminated``."""
    callbacks = [*strategy.callbacks(sweep), StorageWatch(sweep.experiment_dir)]
    trainable = tune.with_resources(tune.with_parameters(train_trial, setups=strategy.setups(sweep)),
                                    {"cpu": sweep.options.cpus_per_trial, "gpu": sweep.gpus})
    path = str(sweep.experiment_dir / TRIALS_DIR)
    resuming = tune.Tuner.can_restore(path)
    # Finished trials stay finished (errored ones too: a NaN or a bad config would fail again); in-flight
    # trials start again and reopen their MLflow child run.
    tuner = (tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False) if resuming
             else strategy.new_tuner(sweep, trainable, callbacks))
    strategy.announce(sweep, resuming)
    with graceful_sigterm() as received:
        try:
            grid = tuner.fit()
        finally:
            terminated.extend(received)
    return strategy.collect(sweep, grid.experiment_path)


def tuner_for(sweep: Sweep, trainable, callbacks: list[tune.Callback], param_space: Mapping[str, Any] | None = None,
              **tune_config: Any) -> tune.Tuner:
    """A Tuner with what every strategy shares: short trial folders, one process per slot (imports paid once),
    restarts of trials whose worker died, one checkpoint kept, no Tune console output."""
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(
            name=TRIALS_DIR, storage_path=str(sweep.experiment_dir), verbose=0,
            # A raised error means the worker or its node died: the trial restarts from its last checkpoint (a
            # trial that fails on its own reports the error instead, see sweeps.trainable, and is not retried).
            failure_config=tune.FailureConfig(max_failures=sweep.options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks))


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default puts every parameter in the name)."""
    return trial.trial_id


def resolve_repo_path(value: str | Path) -> Path:
    """Relative paths in params.yaml are relative to the repository root (as the DVC stages see them)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def load_base(options: SweepOptions) -> tuple[ExperimentConfig, Path, Path]:
    """The pipeline's merged configuration, with every path made absolute for trials."""
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
        config.training.prefix_cache_dir = str(default_cache_dir().resolve())
    else:
        config.training.prefix_cache_dir = str(resolve_repo_path(config.training.prefix_cache_dir))
    return config, params_path, best_path


def prepare_data(base_config: ExperimentConfig, tasks: list[str]) -> None:
    """Generate or check the tasks' data here, once, so trials never race to generate it."""
    print(f"preparing data under {base_config.data.root} for {', '.join(tasks)}", flush=True)
    try:
        base_config.protocol.ensure_data(tasks)
    except (DataError, KeyError, FileExistsError) as err:
        raise SweepError(f"data ({base_config.data.source} at {base_config.data.root}): {err}") from None


def start_cluster(options: SweepOptions, strategy: Strategy, saved: SweepState | None, tasks: list[str],
                  params_path: Path, best_path: Path, storage: Path,
                  metric: str) -> tuple[SweepState, dict[str, float], float]:
    """Start (or join) Ray and check that it holds a trial before anything of the sweep is written; the sweep's
    state (new, or the one resumed), the cluster's resources and the GPUs per trial."""
    check_free_space(storage)
    start_ray(options.address)
    try:
        total = check_resources(options.cpus_per_trial, options.gpus_per_trial or 0)
        gpus = options.gpus_per_trial if options.gpus_per_trial is not None else (1.0 if total["GPU"] > 0 else 0.0)
        check_resources(options.cpus_per_trial, gpus)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved.tracking_uri  # the same store as before, whatever the env says
            tracking.init_tracking(saved.experiment)
            return saved, total, gpus
        return new_state(options, strategy, tasks, params_path, best_path, storage, metric), total, gpus
    except BaseException:
        ray.shutdown()
        raise


def new_state(options: SweepOptions, strategy: Strategy, tasks: list[str], params_path: Path, best_path: Path,
              storage: Path, metric: str) -> SweepState:
    name = options.name or f"{strategy.space.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri()
    experiment_id = tracking.init_tracking(options.experiment)  # creates the schema here, before any trial writes
    state = SweepState(
        path=storage / name / STATE_FILE, name=name, space=strategy.space.name, space_file=str(strategy.space.path),
        tasks={task: {} for task in tasks}, seed=options.seed, alpha=options.alpha, params_path=str(params_path),
        best_path=str(best_path), experiment=options.experiment, experiment_id=experiment_id, tracking_uri=uri,
        started=datetime.now().isoformat(timespec="seconds"), objectives=options.objectives,
        memory_budget=options.memory_budget, metric=metric, kind=strategy.kind, **strategy.state_settings(options))
    state.save()
    return state


def close_open_runs(state: SweepState, client, parent_status: str) -> None:
    """After a crash or a Ctrl-C outside Tune's handling: every trial run still RUNNING closed KILLED (tagged
    interrupted), every parent run closed ``parent_status``."""
    parents = {entry["parent_run_id"] for entry in state.tasks.values() if entry.get("parent_run_id")}
    for parent in parents:  # a study's tasks share one
        for run in child_runs(client, state.experiment_id, parent).values():
            if run.info.status == "RUNNING":
                cut = tracking.Run(run.info.run_id, state.tracking_uri)
                cut.set_tags({"interrupted": "true"})
                cut.finish("KILLED", wait=0)
        tracking.Run(parent, state.tracking_uri).finish(parent_status, wait=0)


def report_interrupted(sweep: Sweep, kept: int, terminated: bool) -> int:
    """Say why the sweep stopped, how much of it is kept and the command that resumes it; the exit code."""
    full = SHORTAGES[-1] if SHORTAGES and not terminated else None
    head = "stopped by SIGTERM" if terminated else f"stopped because {full.describe()}" if full else \
        "stopped by Ctrl-C"
    total = len(sweep.state.tasks) * sweep.state.num_samples
    print(f"\n{head}: {sweep.state.kind} {sweep.state.name}, {kept} of {total} trials finished and kept; "
          f"{'free space there, then ' if full else ''}resume with: {sweep.resume_command()}", flush=True)
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
