"""The sweep driver: one Ray Tune ``Tuner`` (OptunaSearch TPE + ASHA) per task, recorded in MLflow.

Order of work, chosen so that parallel trials never race on shared state:

1. the base configuration (``pipeline.params.load_params``), the search space and the task list are validated;
2. the data is prepared here, once (``dtl.experiment.ensure_data``), and every path handed to trials is absolute
   (a trial's working directory is a throwaway folder under Ray's temp dir);
3. Ray is started (or joined with ``--address``) and the requested per-trial CPUs/GPUs are checked against the
   cluster's nodes (a request no node can hold would leave trials PENDING forever);
4. the MLflow schema and experiment are created here before any trial writes (concurrent creation of a SQLite
   store corrupts it); then for each task: a parent run, the Tuner, one child run per trial (written by the
   trial itself, see ``sweeps/trainable.py``), the best trial tagged ``best=true`` and its values on the parent;
5. the best configuration per task is merged into ``sweeps/best.yaml`` (``pipeline.params.write_best``), which
   the DVC pipeline reads, so ``dvc repro`` retrains the winners on train800val200 and tests them.

Everything the sweep needs to resume lives in ``<storage>/<name>/``: ``sweep.json`` (settings, parent run ids,
finished tasks) and one Tune experiment folder per task. ``--resume`` restores the unfinished task's Tuner
(finished trials are not re-run; in-flight ones start again) and skips finished tasks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .space import SearchSpace, load_space
from .trainable import METRIC, TAG_KIND, TAG_PARENT, TAG_SWEEP, TAG_TASK, TAG_TRIAL, TIME_ATTR, TrialSetup, plain

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = REPO_ROOT / "sweep_results"
DEFAULT_EXPERIMENT = "dtl-sweeps"
STATE_FILE = "sweep.json"
RESULTS_FILE = "results.json"
SCHEDULERS = ("asha", "fifo")
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1


class SweepError(RuntimeError):
    """A sweep cannot start or go on; the message says why and what to do."""


@dataclass
class SweepOptions:
    space: str = "dtl_plus"
    tasks: list[str] | None = None  # None: the pipeline's data.tasks
    num_samples: int | None = None  # None: the space file's num_samples
    max_concurrent: int | None = None  # None: as many trials as the cluster holds
    gpus_per_trial: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    address: str | None = None  # None: start a private local Ray instance
    scheduler: str = "asha"
    seed: int = 0
    storage_path: str = str(DEFAULT_STORAGE)
    resume: bool = False
    name: str | None = None  # None: <space>-<timestamp>; with --resume: the latest sweep of that space
    params_path: str | None = None  # None: pipeline.params.DEFAULT_PARAMS (params.yaml)
    best_path: str | None = None  # None: pipeline.params.DEFAULT_BEST (sweeps/best.yaml)
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment


@dataclass
class TrialRow:
    task: str
    trial_id: str
    status: str  # done | stopped early | failed | unfinished
    epochs: int
    val_accuracy: float | None
    params: dict[str, Any]
    error: str | None = None
    run_id: str | None = None


@dataclass
class TaskOutcome:
    task: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    finished: bool = False


# --------------------------------------------------------------------------------------------------------
# set-up


def quiet_environment() -> None:
    """Settings Ray reads at import/start time (PITFALLS: quiet output, frequent experiment snapshots)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # `ray start` clusters use token authentication; Ray reads this before `ray.init`, so set it first
    # (a driver without it retries ~20 s, then fails). RAY_AUTH_MODE=disabled in the environment still wins.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # after a kill, at most ~1 s of progress is lost
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "30")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    # A resumed trial reports steps Optuna saw before the stop; its warning about that is noise.
    warnings.filterwarnings("ignore", message="The reported value is ignored")


def resolve_repo_path(value: str | Path) -> Path:
    """Relative paths in params.yaml are relative to the repository root (as the DVC stages see them)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def load_base(options: SweepOptions):
    """The pipeline's merged configuration, with every path made absolute for trials."""
    from pipeline.params import DEFAULT_BEST, DEFAULT_PARAMS, load_params

    params_path = Path(options.params_path or DEFAULT_PARAMS).resolve()
    best_path = Path(options.best_path or DEFAULT_BEST).resolve()
    config = load_params(params_path, best_path)
    config.data.root = str(resolve_repo_path(config.data.root))
    if isinstance(config.model.checkpoint, str):
        config.model.checkpoint = str(resolve_repo_path(config.model.checkpoint))
    for values in config.overrides.values():
        if isinstance(values.get("checkpoint"), str):
            values["checkpoint"] = str(resolve_repo_path(values["checkpoint"]))
    if config.training.prefix_cache_dir is None:
        # Trials with the same M share DTL's prefix features through this folder; pin the driver's choice
        # ($DTL_CACHE_DIR or ~/.cache/dtl/prefix) so workers of a `ray start` cluster use the same one.
        from dtl.cache import default_cache_dir

        config.training.prefix_cache_dir = str(default_cache_dir().resolve())
    else:
        config.training.prefix_cache_dir = str(resolve_repo_path(config.training.prefix_cache_dir))
    return config, params_path, best_path


def backbone_facts(config, task: str) -> tuple[int, dict[str, Any]]:
    """N, the number of blocks of the task's backbone (for the symbolic bound ``last_block``), and the DTL
    settings the paper uses on it (what a ``null`` rank, start block or kernel size means)."""
    from dtl.models import adapter_for, create_backbone

    resolved = config.for_task(task)
    adapter = adapter_for(create_backbone(resolved.model.backbone, False, img_size=config.data.image_size))
    return len(adapter.blocks), dict(adapter.paper_defaults)


def current_settings(config, task: str, space: SearchSpace, paper_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What the task trains with now (params.yaml, its overrides and any earlier sweep winner) as flat override
    keys with the defaults filled in: the sweep's first trial. A space with a fixed method of its own (lora,
    adapter) starts from the current lr, weight decay and drop-path with that method's default options."""
    from dtl.models import BASELINE_RANK

    from .space import METHOD_SPECIFIC

    resolved = config.for_task(task)
    method = resolved.model.method if "method" in space.param_names else space.method
    values = {**asdict(resolved.training), **asdict(resolved.model), "method": method}
    if method != resolved.model.method:
        values.update(dict.fromkeys(METHOD_SPECIFIC))  # another method's options do not carry over
    defaults = paper_defaults if method in ("dtl", "dtl_plus") else {"rank": BASELINE_RANK}
    for name, default in defaults.items():
        if values.get(name) is None:
            values[name] = default
    return values


def check_task_config(config, task: str, space: SearchSpace, scheduler: str = "asha") -> int:
    """Fail before any trial starts if the base settings + the space's budget do not validate; return epochs."""
    from dtl.config import ConfigError, ExperimentConfig

    overrides = {**config.overrides.get(task, {}), **space.training, **space.constants()}
    probe = ExperimentConfig(data=config.data, model=config.model, training=config.training,
                             evaluation=config.evaluation, overrides={task: overrides})
    try:
        training = probe.for_task(task, where=f"{space.path} training + base config").training
    except ConfigError as err:
        raise SweepError(str(err)) from None
    # During warm-up the lr is still ramping from warmup_lr: an ASHA rung there ranks untrained models, and
    # stops good configurations at random.
    if scheduler == "asha" and space.grace_period <= training.warmup_epochs < training.epochs:
        raise SweepError(f"{space.path}: scheduler.grace_period ({space.grace_period}) must exceed the trials' "
                         f"warmup_epochs ({training.warmup_epochs}): ASHA's first rung would compare models still "
                         "warming up. Raise grace_period or lower the space's training.warmup_epochs")
    return training.epochs


def start_ray(options: SweepOptions) -> None:
    import ray

    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    if options.address:
        try:
            ray.init(address=options.address, **common)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SweepError(f"--address {options.address}: could not join the Ray cluster ({err}). Start it with "
                             "`ray start --head --port 6379` and pass the address it prints.") from None
    else:
        # "local" forces a private instance even while another `ray start` cluster runs on this machine.
        ray.init(address="local", **common)
    # Tune logs every failed trial's full traceback; the sweep prints one line per failure and keeps the
    # traceback in the trial's error file and its MLflow run instead.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Some alive node must hold one trial, or Tune would leave every trial PENDING forever."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus_per_trial]
    if not fits:
        sizes = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "none"
        raise SweepError(f"no Ray node can hold a trial of --cpus-per-trial {cpus_per_trial:g} and --gpus-per-trial "
                         f"{gpus_per_trial:g} (nodes: {sizes}); lower them or add nodes")
    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}


def default_concurrency(total: Mapping[str, float], cpus: float, gpus: float, num_samples: int) -> int:
    slots = math.floor(total["CPU"] / cpus) if cpus > 0 else num_samples
    if gpus > 0:
        slots = min(slots, math.floor(total["GPU"] / gpus + 1e-9))
    return max(1, min(slots, num_samples))


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default puts every parameter in the name)."""
    return trial.trial_id


# --------------------------------------------------------------------------------------------------------
# MLflow


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def open_parent_run(client, experiment_id: str, state: "SweepState", task: str, space: SearchSpace,
                    base_config, epochs: int) -> str:
    """The task's parent run: created once, reopened on --resume."""
    from mlflow.entities import Param

    from pipeline.tracking import flatten, git_commit

    entry = state.tasks.setdefault(task, {})
    if entry.get("parent_run_id"):
        client.update_run(entry["parent_run_id"], status="RUNNING")
        return entry["parent_run_id"]
    commit = git_commit()
    run = client.create_run(experiment_id, tags={
        "mlflow.runName": f"{state.name}/{task}", TAG_KIND: "sweep", TAG_SWEEP: state.name, TAG_TASK: task,
        "space": space.name, **({"git_commit": commit} if commit else {})})
    values = {"space": space.name, "space_file": str(space.path), "num_samples": state.num_samples,
              "scheduler": state.scheduler, "seed": state.seed, "epochs": epochs,
              **{f"sweep.training.{k}": v for k, v in space.training.items()},
              **{f"search.{p.name}": p.describe().split(": ", 1)[1] for p in space.params},
              **{f"base.{k}": v for k, v in flatten(base_config.for_task(task).to_dict()).items()
                 if not k.startswith("overrides")}}
    params = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in values.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    entry["parent_run_id"] = run.info.run_id
    state.save()
    return run.info.run_id


def child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """trial id -> the trial's child run."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                              max_results=10000)
    return {run.data.tags.get(TAG_TRIAL): run for run in runs}


def error_summary(trial) -> str | None:
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return None
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    causes = [line for line in lines if ("Error" in line or "error" in line) and not line.startswith("File ")]
    return (causes[-1] if causes else lines[-1])[:300] if lines else None


class ChildRunStatusCallback:
    """Closes child runs that their trial could not close itself: trials that ASHA stopped (the process ends
    while the trial waits in ``tune.report``) and trials whose worker died. Trials that end normally or raise
    close their own run first; this leaves those alone. Built as a plain object and wrapped into a
    ``ray.tune.Callback`` by :func:`status_callback` so that it pickles with the Tuner for --resume."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.epochs = epochs

    def close(self, trial, status: str) -> None:
        from .trainable import find_child_run

        try:
            client = mlflow_client(self.tracking_uri)
            run = find_child_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return
            epoch = int(trial.last_result.get(TIME_ATTR, 0) or 0)
            if status == "FINISHED" and epoch < self.epochs:
                client.set_tag(run.info.run_id, "stopped_early", f"epoch {epoch} of {self.epochs} (ASHA)")
            if status == "FAILED":
                client.set_tag(run.info.run_id, "error", error_summary(trial) or "the trial's worker died")
            client.set_terminated(run.info.run_id, status)
        except Exception as err:  # never let bookkeeping stop the sweep; the driver reconciles at the end
            print(f"warning: could not close the MLflow run of trial {trial.trial_id}: {err}", file=sys.stderr)


def status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, epochs: int):
    from ray.tune import Callback

    class _Callback(Callback):
        def __init__(self):
            self.closer = ChildRunStatusCallback(tracking_uri, experiment_id, parent_run_id, epochs)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.closer.close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  trial {trial.trial_id} failed: {error_summary(trial) or 'see ' + str(trial.path)}", flush=True)
            self.closer.close(trial, "FAILED")

    return _Callback()


def reconcile_runs(client, tracking_uri: str, experiment_id: str, parent_run_id: str, trials: Sequence[Any],
                   epochs: int) -> dict:
    """After fit(): give every child run the status of its trial (KILLED for trials cut off by a stop)."""
    closer = ChildRunStatusCallback(tracking_uri, experiment_id, parent_run_id, epochs)
    runs = child_runs(client, experiment_id, parent_run_id)
    known = {trial.trial_id for trial in trials}
    for trial_id, run in runs.items():
        if trial_id not in known and run.info.status == "RUNNING":
            # Started after the last experiment snapshot of a driver that was then killed: Tune does not know
            # this trial and sampled a new one in its place.
            client.set_tag(run.info.run_id, "lost_trial", "started just before the driver was killed; Tune "
                                                          "re-ran it as a new trial")
            client.set_terminated(run.info.run_id, "KILLED")
    for trial in trials:
        run = runs.get(trial.trial_id)
        if run is None or run.info.status != "RUNNING":
            continue
        if trial.status == "TERMINATED":
            closer.close(trial, "FINISHED")
        elif trial.status == "ERROR":
            closer.close(trial, "FAILED")
        else:
            client.set_tag(run.info.run_id, "interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    return child_runs(client, experiment_id, parent_run_id)


# --------------------------------------------------------------------------------------------------------
# state


@dataclass
class SweepState:
    """``<storage>/<name>/sweep.json``: what --resume needs (written atomically after every change)."""

    path: Path
    name: str
    space: str
    space_file: str
    tasks: dict[str, dict[str, Any]]  # task -> {parent_run_id, finished, rows, best}
    num_samples: int
    scheduler: str
    seed: int
    params_path: str
    best_path: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    started: str = ""
    wall_time_s: float = 0.0

    def save(self) -> None:
        from dtl.io import write_json

        data = asdict(self)
        data.pop("path")
        write_json(self.path, data)

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        try:
            data = json.loads(path.read_text())
            return cls(path=path, **data)
        except (OSError, ValueError, TypeError) as err:
            raise SweepError(f"{path}: cannot read the sweep state ({err}); start a new sweep with another --name")


def latest_sweep(storage: Path, space: str) -> str | None:
    """The most recently updated sweep of ``space`` under ``storage`` (for ``--resume`` without ``--name``)."""
    found = []
    for path in storage.glob(f"*/{STATE_FILE}"):
        try:
            if json.loads(path.read_text()).get("space") == space:
                found.append(path)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime).parent.name if found else None


def find_saved_state(options: SweepOptions, storage: Path, space: SearchSpace) -> SweepState:
    name = options.name or latest_sweep(storage, space.name)
    if not name or not (storage / name / STATE_FILE).is_file():
        what = f"named {name!r}" if name else f"of space {space.name}"
        raise SweepError(f"--resume: no sweep {what} under {storage} (pass the --name and --storage-path it printed)")
    state = SweepState.load(storage / name / STATE_FILE)
    if state.space != space.name:
        raise SweepError(f"--resume: sweep {name} searched space {state.space}, not {space.name}")
    return state


# --------------------------------------------------------------------------------------------------------
# one task


def sweep_task(task: str, state: SweepState, space: SearchSpace, base_config, options: SweepOptions,
               cpus: float, gpus: float, max_concurrent: int, client, experiment_dir: Path) -> TaskOutcome:
    import optuna
    from ray import tune
    from ray.tune.analysis import ExperimentAnalysis
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .trainable import train_trial

    epochs = check_task_config(base_config, task, space, state.scheduler)
    blocks, paper_defaults = backbone_facts(base_config, task)
    resolved_space = space.resolve(blocks)
    start, why_not = resolved_space.start_point(current_settings(base_config, task, space, paper_defaults))
    parent_run_id = open_parent_run(client, state.experiment_id, state, task, resolved_space, base_config, epochs)
    setup = TrialSetup(
        task=task, base_config=base_config.to_dict(), training=dict(space.training),
        seed=base_config.evaluation.seeds[0], threads=max(1, int(cpus)), tracking_uri=state.tracking_uri,
        experiment_id=state.experiment_id, parent_run_id=parent_run_id, sweep_name=state.name,
        space_name=space.name)
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup), {"cpu": cpus, "gpu": gpus})
    task_dir = experiment_dir / task

    resuming = tune.Tuner.can_restore(str(task_dir))
    if resuming:
        # Finished trials stay finished (errored ones too: a NaN or a bad config would fail again);
        # in-flight trials start again and reopen their MLflow child run.
        tuner = tune.Tuner.restore(str(task_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=state.seed, n_startup_trials=max(2, min(10, state.num_samples // 2)))
        searcher = OptunaSearch(space=resolved_space.define_by_run(), metric=METRIC, mode="max", sampler=sampler,
                                points_to_evaluate=[start] if start else None)
        if state.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=epochs,
                                      grace_period=min(space.grace_period, epochs),
                                      reduction_factor=space.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=state.num_samples,
                                        max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname,
                                        reuse_actors=True),  # one process per slot: imports are paid once
            run_config=tune.RunConfig(
                name=task, storage_path=str(experiment_dir), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[status_callback(state.tracking_uri, state.experiment_id, parent_run_id, epochs)]),
        )
    if resuming:
        print(f"[{task}] resuming the Tune experiment in {task_dir}", flush=True)
    else:
        print(f"[{task}] {state.num_samples} trials, {epochs} epochs each, up to {max_concurrent} at a time "
              f"({cpus:g} CPU, {gpus:g} GPU per trial)", flush=True)
        if start:
            print(f"[{task}] first trial: the current configuration ({format_params(start)})", flush=True)
        else:
            print(f"[{task}] the current configuration is not tried first: {why_not}", flush=True)
    grid = tuner.fit()
    trials = ExperimentAnalysis(grid.experiment_path).trials
    runs = reconcile_runs(client, state.tracking_uri, state.experiment_id, parent_run_id, trials, epochs)

    outcome = TaskOutcome(task=task)
    for trial in trials:
        result = trial.last_result or {}
        accuracy = result.get(METRIC)
        epoch = int(result.get(TIME_ATTR, 0) or 0)
        if trial.status == "TERMINATED":
            status = "done" if epoch >= epochs else "stopped early"
        elif trial.status == "ERROR":
            status = "failed"
        else:
            status = "unfinished"
        run = runs.get(trial.trial_id)
        outcome.rows.append(TrialRow(
            task=task, trial_id=trial.trial_id, status=status, epochs=epoch,
            val_accuracy=float(accuracy) if accuracy is not None and math.isfinite(accuracy) else None,
            params=plain(trial.config or {}), error=error_summary(trial) if status == "failed" else None,
            run_id=run.info.run_id if run else None))
    outcome.finished = len(trials) >= state.num_samples and all(r.status != "unfinished" for r in outcome.rows)
    candidates = [r for r in outcome.rows if r.status in ("done", "stopped early") and r.val_accuracy is not None]
    if candidates:
        # A trial ASHA stopped after one epoch is not comparable with one trained to the end.
        completed = [r for r in candidates if r.status == "done"]
        outcome.best = max(completed or candidates, key=lambda r: (r.val_accuracy, r.epochs))

    finished_at = "FINISHED" if outcome.finished else "KILLED"
    if outcome.best and outcome.finished:
        mark_best(client, parent_run_id, outcome)
    counts = {s: sum(r.status == s for r in outcome.rows) for s in ("done", "stopped early", "failed", "unfinished")}
    client.log_batch(parent_run_id, metrics=_metrics({"trials_done": counts["done"],
                                                      "trials_stopped_early": counts["stopped early"],
                                                      "trials_failed": counts["failed"]}))
    client.set_terminated(parent_run_id, finished_at if outcome.best or not outcome.finished else "FAILED")
    return outcome


def _metrics(values: Mapping[str, float]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def mark_best(client, parent_run_id: str, outcome: TaskOutcome) -> None:
    from mlflow.entities import Param

    best = outcome.best
    if best.run_id:
        client.set_tag(best.run_id, "best", "true")
    client.set_tag(parent_run_id, "best_trial_id", best.trial_id)
    if best.run_id:
        client.set_tag(parent_run_id, "best_run_id", best.run_id)
    existing = client.get_run(parent_run_id).data.params
    params = [Param(f"best.{k}", str(v)) for k, v in best.params.items() if f"best.{k}" not in existing]
    if params:
        client.log_batch(parent_run_id, params=params)
    client.log_batch(parent_run_id, metrics=_metrics({f"best_{METRIC}": best.val_accuracy}))


# --------------------------------------------------------------------------------------------------------
# the whole sweep


def prepare_state(options: SweepOptions, space: SearchSpace, tasks: list[str], params_path: Path, best_path: Path,
                  storage: Path) -> SweepState:
    from pipeline.tracking import init_tracking, tracking_uri

    if options.resume:
        state = find_saved_state(options, storage, space)
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
        scheduler=options.scheduler, seed=options.seed, params_path=str(params_path), best_path=str(best_path),
        experiment=options.experiment, experiment_id=experiment_id, tracking_uri=uri,
        started=datetime.now().isoformat(timespec="seconds"))
    state.save()
    return state


def run_sweep(options: SweepOptions, started: float | None = None) -> int:
    """Run (or resume) a sweep; returns the process exit code. ``started``: a ``time.perf_counter()`` taken at
    process start, so the reported wall time includes the imports."""
    quiet_environment()
    started = time.perf_counter() if started is None else started
    space = load_space(options.space)
    if options.num_samples is not None and options.num_samples < 1:
        raise SweepError(f"--num-samples: expected an integer >= 1, got {options.num_samples}")
    if options.scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler: expected one of {', '.join(SCHEDULERS)}, got {options.scheduler!r}")
    if options.cpus_per_trial <= 0 or (options.gpus_per_trial is not None and options.gpus_per_trial < 0):
        raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    storage = Path(options.storage_path).expanduser().resolve()  # Tune needs an absolute storage path

    saved = find_saved_state(options, storage, space) if options.resume else None
    if not options.resume and options.name and (storage / options.name).exists():
        raise SweepError(f"{storage / options.name} exists already: pass --resume to continue that sweep, "
                         "or another --name")
    if saved:  # a resumed sweep keeps its own settings and files
        options.params_path, options.best_path = saved.params_path, saved.best_path
    base_config, params_path, best_path = load_base(options)
    tasks = list(saved.tasks) if saved else list(options.tasks or base_config.data.tasks)
    if len(set(tasks)) != len(tasks):
        raise SweepError(f"--tasks: a task is repeated in {tasks}")
    for task in tasks:
        check_task_config(base_config, task, space, options.scheduler)

    print(space.summary(), flush=True)
    print(f"preparing data under {base_config.data.root} for {', '.join(tasks)}", flush=True)
    from dtl.data import DataError
    from dtl.experiment import ensure_data

    try:
        ensure_data(base_config, tasks)  # here, once: trials never race to generate data
    except (DataError, KeyError, FileExistsError) as err:
        raise SweepError(f"data ({base_config.data.source} at {base_config.data.root}): {err}") from None

    state = prepare_state(options, space, tasks, params_path, best_path, storage)
    earlier_wall_time = state.wall_time_s  # of earlier, interrupted runs of this sweep
    experiment_dir = storage / state.name
    print(f"sweep {state.name}: results in {experiment_dir}; MLflow experiment {state.experiment!r} at "
          f"{state.tracking_uri}", flush=True)

    import ray

    start_ray(options)
    outcomes: list[TaskOutcome] = []
    interrupted = False
    client = mlflow_client(state.tracking_uri)
    current_task: str | None = None
    try:
        total = check_resources(options.cpus_per_trial, options.gpus_per_trial or 0)
        gpus = options.gpus_per_trial if options.gpus_per_trial is not None else (1.0 if total["GPU"] > 0 else 0.0)
        check_resources(options.cpus_per_trial, gpus)
        max_concurrent = options.max_concurrent or default_concurrency(total, options.cpus_per_trial, gpus,
                                                                       state.num_samples)
        for task in tasks:
            entry = state.tasks.setdefault(task, {})
            if entry.get("finished"):
                outcomes.append(_outcome_from_state(task, entry))
                print(f"[{task}] finished in an earlier run: skipped", flush=True)
                continue
            current_task = task
            outcome = sweep_task(task, state, space, base_config, options, options.cpus_per_trial, gpus,
                                 max_concurrent, client, experiment_dir)
            current_task = None
            outcomes.append(outcome)
            entry.update(finished=outcome.finished, rows=[asdict(r) for r in outcome.rows],
                         best=asdict(outcome.best) if outcome.best else None)
            state.wall_time_s = earlier_wall_time + time.perf_counter() - started
            state.save()
            if not outcome.finished:
                interrupted = True
                break
            if outcome.best:
                write_best_entries(state, {task: outcome.best.params})
    except BaseException as err:  # Ctrl-C outside Tune's own handling, or a crash: leave no run RUNNING
        parent_run_id = state.tasks.get(current_task or "", {}).get("parent_run_id")
        if parent_run_id:
            _close_interrupted(client, state.experiment_id, parent_run_id,
                               "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if not isinstance(err, KeyboardInterrupt):
            raise
        interrupted = True
    finally:
        elapsed = time.perf_counter() - started
        state.wall_time_s = earlier_wall_time + elapsed
        state.save()
        ray.shutdown()

    report(state, outcomes, experiment_dir, elapsed)
    if interrupted:
        resume = f"python sweeps/run.py --space {options.space} --resume --name {state.name}"
        if Path(options.storage_path).resolve() != DEFAULT_STORAGE:
            resume += f" --storage-path {storage}"
        print(f"\nThe sweep was interrupted; finished trials are kept. Resume it with:\n  {resume}", flush=True)
        return EXIT_INTERRUPTED
    if not any(o.best for o in outcomes):
        print("\nNo trial finished successfully: nothing was written to the best-configuration file.", flush=True)
        return EXIT_FAILED
    return 0


def _close_interrupted(client, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> None:
    for run in child_runs(client, experiment_id, parent_run_id).values():
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    client.set_terminated(parent_run_id, status)


def _outcome_from_state(task: str, entry: Mapping[str, Any]) -> TaskOutcome:
    rows = [TrialRow(**row) for row in entry.get("rows") or []]
    best = TrialRow(**entry["best"]) if entry.get("best") else None
    return TaskOutcome(task=task, rows=rows, best=best, finished=True)


def write_best_entries(state: SweepState, entries: Mapping[str, Mapping[str, Any]]) -> None:
    from pipeline.params import DEFAULT_BEST_HEADER, write_best

    header = (DEFAULT_BEST_HEADER + f"\nLast written by `python sweeps/run.py --space {state.space}` (sweep {state.name}, "
              f"{datetime.now().isoformat(timespec='seconds')}); `dvc repro` retrains these entries.")
    write_best(state.best_path, {task: plain(values) for task, values in entries.items()}, header,
               params_path=state.params_path)


# --------------------------------------------------------------------------------------------------------
# output


def format_params(params: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={show(v)}" for k, v in params.items())


def report(state: SweepState, outcomes: Sequence[TaskOutcome], experiment_dir: Path, wall_time_s: float) -> None:
    from dtl.io import write_json

    rows = [row for outcome in outcomes for row in outcome.rows]
    header = f"{'task':<14} {'trial':<12} {'status':<14} {'epochs':>6} {'val_acc':>8}  params"
    print(f"\nResults of sweep {state.name} (space {state.space}; objective: val200 accuracy after training on "
          f"train800)\n{header}\n{'-' * len(header)}")
    for row in rows:
        accuracy = f"{row.val_accuracy:.4f}" if row.val_accuracy is not None else "-"
        best = any(o.best is not None and o.best.trial_id == row.trial_id and o.task == row.task for o in outcomes)
        status = row.status + (" *" if best else "")
        print(f"{row.task:<14} {row.trial_id:<12} {status:<14} {row.epochs:>6} {accuracy:>8}  "
              f"{format_params(row.params)}" + (f"  [{row.error}]" if row.error else ""))
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "stopped early", "failed", "unfinished")}
    print(f"\n{len(rows)} trials: {counts['done']} done, {counts['stopped early']} stopped early by ASHA, "
          f"{counts['failed']} failed, {counts['unfinished']} unfinished; wall time {wall_time_s:.0f} s"
          + (f" ({state.wall_time_s:.0f} s with the earlier runs of this sweep)"
             if state.wall_time_s > wall_time_s + 1 else ""))
    best = {o.task: o.best for o in outcomes if o.best and o.finished}
    if best:
        print(f"\nBest configuration per task (* above), written to {state.best_path}:")
        for task, row in best.items():
            print(f"  {task}: val_accuracy {row.val_accuracy:.4f}  {format_params(row.params)}")
        print("Retrain them on train800val200 and test them with:  dvc repro")
    print(f"MLflow: experiment {state.experiment!r} at {state.tracking_uri}  "
          f"(mlflow ui --backend-store-uri {state.tracking_uri})")
    write_json(experiment_dir / RESULTS_FILE, {
        "sweep": state.name, "space": state.space, "wall_time_s": state.wall_time_s,
        "trials": [asdict(r) for r in rows],
        "best": {task: asdict(row) for task, row in best.items()},
    })
