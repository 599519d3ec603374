"""The one MLflow recorder of the toolkit, shared by the DVC stages (``pipeline/``) and the sweeps (``sweeps/``).

Every run is written through ``MlflowClient`` (never the fluent ``mlflow.start_run`` state), so the same code
serves a DVC stage, a sweep driver with one parent run per task and many trial processes writing child runs at
once. What a run gets, in one place: tags (the git commit always), params (flattened, batched, each key once),
finite metrics (``train/loss`` logged as ``train_loss``), the engine's per-epoch curve, dataset inputs (the UI's
Dataset column), artifacts, and a final status: FINISHED, KILLED on Ctrl-C / SIGTERM, FAILED with the error as
the ``error`` tag.

The store is ``MLFLOW_TRACKING_URI`` when set (e.g. a tracking server), else the SQLite file ``mlflow.db`` at
the repository root, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run from the root shows pipeline
runs and sweep trials side by side. A new SQLite store must be created by one process before others write to it
(creating it from several at once corrupts its schema): drivers call :func:`init_tracking` first. MLflow is
imported lazily; the ``dtl`` library never needs it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import subprocess
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dtl.io import REPO_ROOT

from .model_registry import MODEL_RECORD, VERSION_TAGS_RECORD, send_model_record, send_version_tags
from .outbox_hooks import TAG_PARENT, register_record_kind, set_experiment_maker

# tracking.outbox is imported lazily, where it is used: `python -m tracking.outbox` imports this package and then
# runs that file as __main__, so a copy imported here as well would load it twice (and runpy warns of it).

DEFAULT_STORE = REPO_ROOT / "mlflow.db"
TAG_NAME = "mlflow.runName"
TAG_PID, TAG_HOST = "pid", "host"  # of the process that writes the run: a dead one cannot close it
# Model-training experiments: MLflow 3's UI then opens them on their runs, not on its GenAI overview.
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_PARAM_BATCH = 100  # MLflow takes at most 100 params per call
FINISH_WAIT_S = 30.0


UI_PORT = 5000  # where `mlflow ui` listens by default

if not os.isatty(2):  # a log, not a terminal: MLflow's download bars would be lines of carriage returns in it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's INFO lines that every stage would print and none needs: a new SQLite store's schema being created (once
# per store, by design: init_tracking), and a logged model's input example being checked against its signature
# (the toolkit builds both; a mismatch is still raised as an error).
for _name in ("mlflow.store.db.utils", "mlflow.pyfunc"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"


def runs_url(experiment_id: str, run_id: str | None = None, uri: str | None = None) -> str:
    """The MLflow UI's page of the experiment's runs table (or of one run): a tracking server's own address; for
    a local store, where ``mlflow ui`` (:func:`ui_command`) answers. The experiment's own page would open on
    MLflow 3's GenAI overview; the runs table is what the toolkit writes."""
    uri = uri or tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")


def ui_command(uri: str | None = None) -> str | None:
    """The command that serves the MLflow UI of a local store (None for a tracking server: it serves its own)."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {UI_PORT} --workers 1"


def where_to_look(experiment_id: str, run_id: str | None = None, uri: str | None = None) -> str:
    """:func:`runs_url`, with the command to run first for a local store."""
    command = ui_command(uri)
    url = runs_url(experiment_id, run_id, uri)
    return url if command is None else f"{url} (serve it with `{command}`)"


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient  # MLflow, an extra, loads on first use

    return MlflowClient(uri or tracking_uri())


def init_tracking(experiment: str, uri: str | None = None) -> str:
    """Create the store's schema and the experiment if needed (call once, before workers write); its id. While
    the server is unreachable: a stand-in id that the outbox resolves by name once it answers."""
    from .outbox import EXPERIMENT_BY_NAME, is_transient, outbox_for  # lazily: see the note at the top

    try:
        return _init_experiment(experiment, uri)
    except Exception as err:
        if not is_transient(err):
            raise
        outbox_for(uri or tracking_uri()).note_outage(err)
        return EXPERIMENT_BY_NAME + experiment


def _init_experiment(experiment: str, uri: str | None) -> str:
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found:
        if found.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            mlflow_client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return found.experiment_id
    # MLflow's default artifact root is ./mlruns under the *current* directory; keep artifacts next to a SQLite
    # store instead, so a test's temporary store does not write into the repository.
    return mlflow_client.create_experiment(experiment, artifact_location=default_artifact_location(experiment, uri),
                                           tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})


def default_artifact_location(experiment: str, uri: str | None = None) -> str | None:
    """``<folder of the SQLite file>/mlruns/<experiment>`` for a local SQLite store; None (the server's choice,
    e.g. its ``--default-artifact-root``) otherwise."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):])
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.parent / "mlruns" / folder).resolve().as_uri()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"rank": 2}} -> {"model.rank": 2}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def finite_metrics(values: Mapping[str, Any], step: int = 0):
    """MLflow metrics of the finite numbers in ``values`` (``a/b`` -> ``a_b``; None, NaN, text, flags skipped)."""
    from mlflow.entities import Metric  # MLflow, an extra, loads on first use

    now = int(time.time() * 1000)
    return [Metric(k.replace("/", "_"), float(v), now, step) for k, v in flatten(values).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def list_digest(path: str | Path) -> str:
    """A short digest of a list file, or of a folder's file names and sizes (what a dataset input is identified
    by)."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted(path.iterdir()):
        digest.update(f"{file.name}:{file.stat().st_size}|".encode())
    return digest.hexdigest()


class Run:
    """One MLflow run. Its writes go through the process's outbox (:mod:`tracking.outbox`): they never wait for
    the store, survive its outages, and are safe from many processes at once."""

    def __init__(self, run_id: str, uri: str | None = None, outbox: str | Path | None = None):
        from .outbox import outbox_for  # lazily: see the note at the top

        self.run_id = run_id  # a provisional ``pending-...`` id while the store was unreachable at creation
        self.uri = uri or tracking_uri()
        self.outbox = outbox_for(self.uri, outbox)
        self.closed = False

    @property
    def client(self):
        return client(self.uri)

    # --- opening ----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, experiment_id: str, name: str, tags: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None, parent: "Run | str | None" = None,
               uri: str | None = None, outbox: str | Path | None = None) -> "Run":
        """A new run, created at once when the store answers, else as soon as it does (a provisional id meanwhile)."""
        # lazily: see the note at the top
        from .outbox import EXPERIMENT_BY_NAME, PENDING, is_transient, new_pending_id

        commit = git_commit()
        all_tags = {"git_commit": commit or "uncommitted", **{k: str(v) for k, v in (tags or {}).items()},
                    TAG_NAME: name, TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
        parent_id = parent.run_id if isinstance(parent, Run) else parent
        run = cls(new_pending_id(), uri, outbox)
        parent_known = run.outbox.known(parent_id) if parent_id else ""  # None: queued for creation itself
        if not (run.outbox.unreachable or parent_known is None or experiment_id.startswith(EXPERIMENT_BY_NAME)):
            try:
                created = run.client.create_run(experiment_id, tags={
                    **all_tags, **({TAG_PARENT: parent_known} if parent_id else {})})
                run.run_id = created.info.run_id
            except Exception as err:
                if not is_transient(err):
                    raise
                run.outbox.note_outage(err)
        if run.run_id.startswith(PENDING):
            run.outbox.put({"op": "create", "run": run.run_id, "experiment_id": experiment_id, "tags": all_tags,
                            "parent": parent_id, "time": _now_ms()})
        if params:
            run.log_params(params)
        return run

    @classmethod
    def reopen(cls, run_id: str, uri: str | None = None, outbox: str | Path | None = None) -> "Run":
        """Mark a run RUNNING again (a restarted trial continues its own run)."""
        run = cls(run_id, uri, outbox)
        run.outbox.put({"op": "status", "run": run_id, "status": "RUNNING"})
        return run

    @classmethod
    def find(cls, experiment_id: str, uri: str | None = None, **tags: str):
        """The newest run of ``experiment_id`` with these tags (``parent=`` matches the parent run id), or None
        (also while the store is unreachable)."""
        from .outbox import is_transient, outbox_for  # lazily: see the note at the top

        parent = tags.pop("parent", None)
        box = outbox_for(uri or tracking_uri())
        if parent:
            parent = box.known(parent)
            if parent is None:  # a parent not created yet has no children yet
                return None
        conditions = [f"tags.`{TAG_PARENT}` = '{parent}'"] if parent else []
        conditions += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        try:
            found = client(uri).search_runs([experiment_id], filter_string=" and ".join(conditions), max_results=1,
                                            order_by=["attributes.start_time DESC"])
        except Exception as err:
            if not is_transient(err):
                raise
            box.note_outage(err)
            return None
        return found[0] if found else None

    def exists(self) -> bool:
        """False only when the store says there is no such run (an unreachable store cannot tell: True)."""
        from mlflow.exceptions import MlflowException  # MLflow, an extra, loads on first use

        run_id = self.outbox.known(self.run_id)
        if run_id is None:
            return True  # queued for creation
        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            return err.error_code != "RESOURCE_DOES_NOT_EXIST"
        return True

    # --- writing ----------------------------------------------------------------------------------------------
    def log_params(self, values: Mapping[str, Any]) -> None:
        """Flattened params; one logged before keeps its value (a reopened run)."""
        new = [[k, "null" if v is None else str(v)[:6000]] for k, v in flatten(values).items()]
        for start in range(0, len(new), _PARAM_BATCH):
            self.outbox.put({"op": "params", "run": self.run_id, "params": new[start:start + _PARAM_BATCH]})

    def log_metrics(self, values: Mapping[str, Any], step: int = 0) -> None:
        metrics = [[m.key, m.value, m.timestamp, m.step] for m in finite_metrics(values, step)]
        if metrics:
            self.outbox.put({"op": "batch", "run": self.run_id, "metrics": metrics})

    def log_epoch(self, end) -> None:
        """An engine epoch-end hook (``dtl.engine.EpochEnd``): the epoch's metrics at step = epoch."""
        self.log_metrics({k: v for k, v in end.metrics.items() if k != "epoch"}, step=end.epoch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self.outbox.put({"op": "batch", "run": self.run_id,
                             "tags": [[key, str(value)[:5000]] for key, value in tags.items()]})

    def log_dataset(self, name: str, list_file: str | Path, context: str) -> None:
        """A dataset input (the UI's Dataset column): ``name`` (e.g. ``digits/train800``), the list file (or the
        images folder) as its source and digest, ``context`` train / validation / test."""
        self.outbox.put({"op": "inputs", "run": self.run_id, "name": name, "digest": list_digest(list_file),
                         "source": str(Path(list_file).resolve()), "context": context})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.exists():
            self.outbox.put({"op": "artifact", "run": self.run_id, "path": str(self.outbox.keep_copy(path)),
                             "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED", error: str | None = None, wait: float = FINISH_WAIT_S) -> None:
        """End the run; then wait up to ``wait`` s for this process's records to reach the store, so a run
        is complete when its stage or trial ends (no wait while the store is unreachable)."""
        if self.closed:
            return
        if error:
            self.set_tags({"error": error[:5000]})
        self.outbox.put({"op": "terminate", "run": self.run_id, "status": status, "time": _now_ms()})
        self.closed = True
        if wait and not self.outbox.unreachable:
            self.outbox.flush(wait)


def _now_ms() -> int:
    return int(time.time() * 1000)


def close_orphaned_runs(experiment_id: str, uri: str | None = None, **tags: str) -> int:
    """Close the RUNNING runs with these tags whose writing process on this host is gone (killed with SIGKILL,
    its machine rebooted): KILLED, with a tag saying so. Returns how many."""
    import psutil  # an extra like MLflow, loaded on first use

    from .outbox import is_transient, outbox_for  # lazily: see the note at the top

    conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    conditions += ["attributes.status = 'RUNNING'", f"tags.`{TAG_HOST}` = '{socket.gethostname()}'"]
    try:
        found = client(uri).search_runs([experiment_id], filter_string=" and ".join(conditions), max_results=1000)
    except Exception as err:  # an unreachable store: the next stage closes them
        if not is_transient(err):
            raise
        outbox_for(uri or tracking_uri()).note_outage(err)
        return 0
    closed = 0
    for run in found:
        pid = int(run.data.tags.get(TAG_PID, "0") or 0)
        if pid and psutil.pid_exists(pid) and pid != os.getpid():
            continue  # still being written
        Run(run.info.run_id, uri).finish("KILLED", error=f"its process (pid {pid}) died without closing the run")
        closed += 1
    return closed


@contextmanager
def recorded(run: Run, leave_open: tuple[type[BaseException], ...] = ()) -> Iterator[Run]:
    """Close ``run`` with its outcome: FINISHED, KILLED on Ctrl-C, FAILED (with the error as a tag) on an
    exception; exceptions in ``leave_open`` (a sweep trial's stop signal) leave the status to whoever caught them."""
    try:
        yield run
    except leave_open:
        raise
    except KeyboardInterrupt:
        run.finish("KILLED", error="interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as err:
        run.finish("FAILED", error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
        raise
    else:
        run.finish("FINISHED")


@contextmanager
def tracked_run(experiment_id: str, name: str, tags: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None, *, parent: "Run | str | None" = None,
                datasets: Iterable[tuple[str, str | Path, str]] = (), orphans: Mapping[str, str] | None = None,
                reopen: str | None = None, uri: str | None = None,
                leave_open: tuple[type[BaseException], ...] = ()) -> Iterator[Run]:
    """One pipeline stage's or sweep trial's MLflow run, from creation to its final status.

    The runs tagged ``orphans`` (e.g. ``{"dvc_stage": "train@cifar"}``) that a killed process left RUNNING are
    closed KILLED first; then a new run ``name`` of ``experiment_id`` with ``tags`` and ``params`` (a child of
    ``parent``), or the run ``reopen`` marked RUNNING again (a restarted trial keeps its run); its ``datasets``
    inputs (``(name, list file, context)``); closed as :func:`recorded` closes it (FINISHED, KILLED on Ctrl-C,
    FAILED with the error as a tag)."""
    if orphans:
        close_orphaned_runs(experiment_id, uri, **orphans)
    run = (Run.reopen(reopen, uri) if reopen else
           Run.create(experiment_id, name, tags, params, parent=parent, uri=uri))
    with recorded(run, leave_open):
        for dataset in datasets:
            run.log_dataset(*dataset)
        yield run


# What the outbox sends for the rest of the package without importing it: experiments named by records written
# during an outage, and the model registry's records.
set_experiment_maker(init_tracking)
register_record_kind(MODEL_RECORD, send_model_record)
register_record_kind(VERSION_TAGS_RECORD, send_version_tags)

__all__ = ["DEFAULT_STORE", "Run", "TAG_HOST", "TAG_NAME", "TAG_PARENT", "TAG_PID", "client", "close_orphaned_runs",
           "default_artifact_location", "finite_metrics", "flatten", "git_commit", "init_tracking", "list_digest",
           "recorded", "tracked_run", "tracking_uri"]
