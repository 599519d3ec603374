"""MLflow writes that never hold up training: a journal per process and a thread that sends it.

Every write of a :class:`tracking.Run` (params, metrics, tags, dataset inputs, artifacts, status) is appended
to its process's journal, a JSON-lines file in the outbox folder, and sent by a background thread in order. The
caller never waits for the tracking server. While the server is unreachable the thread retries every few
seconds for as long as the process lives, and the process prints one warning line; once the server answers,
the delayed records land in their order and the journal is removed.

A process that ends or is killed before its journal is sent (a trial stopped by its scheduler, a stage that
ended during an outage) leaves the journal in the folder. The next process writing to that folder sends it
(a sweep's driver does so at its end, waiting for the server), and so does, by hand::

    python -m tracking.outbox replay [FOLDER] [--wait SECONDS]

A run created while the server is down gets a provisional id (``pending-<hex>``), usable like a run id in later
writes, as another run's parent too. Once the run exists its real id is kept under the folder's ``ids/``, so
every process resolves it. The folder is ``$DTL_TRACKING_OUTBOX``, else ``~/.cache/dtl/mlflow-outbox``; a sweep
keeps its own under its results folder. Writes to the same store from many processes stay safe: each journal
has one writer (it holds a lock on it while it lives) and is replayed only once that lock is free.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .outbox_hooks import HOOKS, TAG_PARENT

OUTBOX_ENV = "DTL_TRACKING_OUTBOX"
PENDING = "pending-"
EXPERIMENT_BY_NAME = "name:"  # an experiment id not known yet: created or looked up by name when sent
RETRY_S = (1, 2, 5, 10)  # waits between attempts while the server is unreachable (the last one repeats)
EXIT_WAIT_S = 10.0  # how long a process that ends waits for its journal to be sent before leaving it behind
# An op the server keeps refusing although it answers (not an outage): dropped after this many attempts.
REFUSED_ATTEMPTS = 5
# MLflow's own client retries (7, backing off to ~2 min) would hold each write, and the reads that check a run
# at a trial's start, for minutes per outage: the outbox retries instead, reads give up quickly.
CLIENT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def default_folder() -> Path:
    return Path(os.environ.get(OUTBOX_ENV) or Path.home() / ".cache" / "dtl" / "mlflow-outbox").expanduser()


def configure_client() -> None:
    for key, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(key, value)


def is_transient(err: BaseException) -> bool:
    """An outage (connection refused, timeout, 5xx, a locked SQLite file), not a refused request."""
    from mlflow.exceptions import MlflowException  # MLflow, an extra, loads on first use

    if isinstance(err, MlflowException):
        return err.error_code in TRANSIENT_CODES
    return isinstance(err, Exception)


def new_pending_id() -> str:
    return PENDING + uuid.uuid4().hex


class Unresolved(Exception):
    """An op names a provisional id that no process has created yet."""


class Sender:
    """Sends journal ops to one store; knows the real ids of provisional ones (``ids/`` of the folder)."""

    def __init__(self, uri: str, folder: Path):
        from mlflow.tracking import MlflowClient  # MLflow, an extra, loads on first use

        self.uri, self.folder = uri, folder
        self.client = MlflowClient(uri)
        self.ids: dict[str, str] = {}
        self.experiments: dict[str, str] = {}

    def resolve(self, run: str | None) -> str | None:
        if not run or not run.startswith(PENDING):
            return run
        if run not in self.ids:
            path = self.folder / "ids" / run
            if not path.exists():
                raise Unresolved(run)
            self.ids[run] = path.read_text().strip()
        return self.ids[run]

    def experiment(self, experiment_id: str) -> str:
        if not experiment_id.startswith(EXPERIMENT_BY_NAME):
            return experiment_id
        if experiment_id not in self.experiments:
            if HOOKS.make_experiment is None:
                raise RuntimeError("no experiment maker is registered (tracking.outbox_hooks): import tracking")
            self.experiments[experiment_id] = HOOKS.make_experiment(experiment_id[len(EXPERIMENT_BY_NAME):],
                                                                    self.uri)
        return self.experiments[experiment_id]

    def send(self, op: dict[str, Any]) -> None:
        # MLflow, an extra, loads on first use
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        kind = op["op"]
        if kind == "create":
            tags = dict(op["tags"])
            if op.get("parent"):
                tags[TAG_PARENT] = self.resolve(op["parent"])
            run_id = self.client.create_run(self.experiment(op["experiment_id"]), start_time=op["time"],
                                            tags=tags).info.run_id
            remember(self.folder, op["run"], run_id)
            self.ids[op["run"]] = run_id
            return
        run_id = self.resolve(op.get("run"))
        if kind == "batch":
            self.client.log_batch(run_id, metrics=[Metric(*m) for m in op.get("metrics", ())],
                                  tags=[RunTag(k, v) for k, v in op.get("tags", ())])
        elif kind == "params":
            try:
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"]])
            except MlflowException as err:
                if err.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                # Some were logged before (a reopened run, or a batch whose answer was lost): one at a time,
                # the known ones keep their value.
                for key, value in op["params"]:
                    try:
                        self.client.log_param(run_id, key, value)
                    except MlflowException as one:
                        if one.error_code != "INVALID_PARAMETER_VALUE":
                            raise
        elif kind == "inputs":
            dataset = Dataset(name=op["name"], digest=op["digest"], source_type="local", source=op["source"])
            self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", op["context"])])])
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), op.get("artifact_path"))
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), op.get("artifact_path"))
            self.discard(path)
        elif kind == "status":
            self.client.update_run(run_id, status=op["status"])
        elif kind == "terminate":
            self.client.set_terminated(run_id, op["status"], end_time=op["time"])
        elif kind in HOOKS.record_senders:  # a kind another module of the package registered
            HOOKS.record_senders[kind](self.client, run_id, op)
            if "path" in op:
                self.discard(Path(op["path"]))
        else:
            raise ValueError(f"unknown outbox op {kind!r}")


    def discard(self, path: Path) -> None:
        """Remove the outbox's own copy of an artifact once it is sent."""
        files = self.folder.resolve() / "files"
        if files in path.resolve().parents:
            shutil.rmtree(files / path.resolve().relative_to(files).parts[0], ignore_errors=True)


def remember(folder: Path, pending: str, run_id: str) -> None:
    ids = folder / "ids"
    ids.mkdir(parents=True, exist_ok=True)
    partial = ids / f".{pending}.{os.getpid()}"
    partial.write_text(run_id)
    partial.replace(ids / pending)


class Journal:
    """One process's journal file: a header line, ops (``seq``) and acknowledgements (``ack``)."""

    def __init__(self, folder: Path, uri: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.handle = open(self.path, "a", encoding="utf-8")
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while this process lives
        self.write({"uri": uri, "pid": os.getpid(), "host": socket.gethostname()})

    def write(self, entry: dict[str, Any]) -> None:
        self.handle.write(json.dumps(entry) + "\n")
        self.handle.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


class Outbox:
    """The journal and sender thread of this process for one store (see the module docstring)."""

    def __init__(self, uri: str, folder: Path):
        configure_client()
        self.uri, self.folder = uri, folder
        self.queue: deque[dict[str, Any]] = deque()
        self.changed = threading.Condition()
        self.journal: Journal | None = None
        self.thread: threading.Thread | None = None
        self.seq = 0
        self.outage_since: float | None = None  # the first failure of the current outage
        self.last_failure = 0.0
        self.delayed = 0

    # --- the caller's side ------------------------------------------------------------------------------------
    def put(self, op: dict[str, Any]) -> None:
        with self.changed:
            if self.journal is None:
                self.journal = Journal(self.folder, self.uri)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
                self.thread.start()
            self.seq += 1
            op = {"seq": self.seq, **op}
            self.journal.write(op)
            self.queue.append(op)
            self.changed.notify_all()

    def keep_copy(self, path: Path) -> Path:
        """A copy of an artifact in the outbox (the original may be gone by the time it is sent)."""
        target = self.folder / "files" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return target

    @property
    def unreachable(self) -> bool:
        """In an outage: records wait in the queue, or the store failed a moment ago."""
        if self.outage_since is None:
            return False
        return bool(self.queue) or time.monotonic() - self.last_failure < RETRY_S[-1]

    def known(self, run_id: str) -> str | None:
        """The store's id of ``run_id`` (itself unless provisional); None while it waits to be created."""
        if not run_id.startswith(PENDING):
            return run_id
        path = self.folder / "ids" / run_id
        return path.read_text().strip() if path.exists() else None

    def note_outage(self, err: BaseException) -> None:
        """A failure seen outside the sender (a read, a creation tried at once): one warning per outage."""
        with self.changed:
            self._outage(err)

    def pending(self) -> int:
        with self.changed:
            return len(self.queue)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every op to be sent; True when none is left."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    # --- the sender thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        sender = Sender(self.uri, self.folder)
        attempt = refused = 0
        while True:
            with self.changed:
                while not self.queue:
                    self.changed.wait()
                op = self.queue[0]
            try:
                sender.send(op)
            except Unresolved:
                replay_orphans(self.folder)  # its creator died before sending it: send that journal first
                time.sleep(RETRY_S[-1])
                continue
            except Exception as err:
                if is_transient(err):
                    with self.changed:
                        self._outage(err)
                    time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                    attempt += 1
                    continue
                refused += 1
                if refused < REFUSED_ATTEMPTS:
                    time.sleep(RETRY_S[0])
                    continue
                print(f"warning: MLflow at {self.uri} refused a {op['op']} record ({err}); dropped it",
                      file=sys.stderr, flush=True)
            attempt = refused = 0
            self._sent(op)

    def _outage(self, err: BaseException) -> None:
        self.last_failure = time.monotonic()
        if self.outage_since is None:
            self.outage_since = self.last_failure
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            print(f"warning: MLflow at {self.uri} is unreachable ({reason}); its records are delayed, kept in "
                  f"{self.folder} and sent when it answers again; training goes on", file=sys.stderr, flush=True)

    def _sent(self, op: dict[str, Any]) -> None:
        with self.changed:
            self.journal.write({"ack": op["seq"]})
            self.queue.popleft()
            if self.outage_since is not None:
                self.delayed += 1
            if not self.queue:
                if self.outage_since is not None:
                    print(f"MLflow at {self.uri} answers again: {self.delayed} delayed records sent after "
                          f"{time.monotonic() - self.outage_since:.0f} s", file=sys.stderr, flush=True)
                    self.outage_since, self.delayed = None, 0
                # Everything sent: the next op starts a new journal, so a long run's file stays small.
                self.journal.remove()
                self.journal = None
            self.changed.notify_all()


# --------------------------------------------------------------------------------------------------------------
# the process's outboxes, and journals left behind

_OUTBOXES: dict[tuple[str, Path], Outbox] = {}
_LOCK = threading.Lock()


def outbox_for(uri: str, folder: str | Path | None = None) -> Outbox:
    folder = Path(folder or default_folder()).expanduser().resolve()
    with _LOCK:
        if not _OUTBOXES:
            atexit.register(flush_all, EXIT_WAIT_S)
        key = (uri, folder)
        if key not in _OUTBOXES:
            _OUTBOXES[key] = Outbox(uri, folder)
        return _OUTBOXES[key]


def flush_all(timeout: float, quiet: bool = False) -> bool:
    """Wait up to ``timeout`` s for this process's records; say where those not sent are kept."""
    done = True
    deadline = time.monotonic() + timeout
    for outbox in list(_OUTBOXES.values()):
        if outbox.flush(max(0.0, deadline - time.monotonic())):
            continue
        done = False
        if not quiet:
                print(f"MLflow at {outbox.uri}: {outbox.pending()} records not sent yet, kept in {outbox.folder}; the "
                  f"next run writing there sends them, or: python -m tracking.outbox replay {outbox.folder}",
                  file=sys.stderr, flush=True)
    return done


def replay_orphans(folder: Path) -> tuple[int, int]:
    """Send the journals in ``folder`` that no live process owns; (journals sent, journals left: not sent, or
    still held by another live process that sends them itself)."""
    sent = left = 0
    own = f"{socket.gethostname()}-{os.getpid()}-"  # this process's journals: its sender thread has them
    for path in sorted(folder.glob("*.jsonl")):
        if path.name.startswith(own):
            continue
        try:
            handle = open(path, "r+", encoding="utf-8")
        except FileNotFoundError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive and sends it itself
                left += 1
                continue
            if not path.exists():
                continue  # sent and removed meanwhile
            if replay_journal(path, handle):
                path.unlink(missing_ok=True)
                sent += 1
            else:
                left += 1
    return sent, left


def replay_journal(path: Path, handle) -> bool:
    """Send what a journal holds that was not acknowledged, acknowledging as it goes; True when all is sent."""
    lines = [json.loads(line) for line in handle.read().splitlines() if line.strip()]
    if not lines:
        return True
    header, entries = lines[0], lines[1:]
    acked = {entry["ack"] for entry in entries if "ack" in entry}
    sender = Sender(header["uri"], path.parent)
    for op in entries:
        if "seq" not in op or op["seq"] in acked:
            continue
        try:
            sender.send(op)
        except Unresolved:
            return False
        except Exception as err:
            if is_transient(err):
                return False
            print(f"warning: {path.name}: MLflow at {header['uri']} refused a {op['op']} record ({err}); "
                  "dropped it", file=sys.stderr, flush=True)
        handle.write(json.dumps({"ack": op["seq"]}) + "\n")
        handle.flush()
    return True


def replay(folder: str | Path | None = None, wait: float = 0.0, quiet: bool = False) -> int:
    """Send every journal left in ``folder``, retrying for up to ``wait`` s while the server is unreachable;
    returns how many are left."""
    folder = Path(folder or default_folder()).expanduser().resolve()
    if not folder.is_dir():
        return 0
    configure_client()
    deadline = time.monotonic() + wait
    announced = False
    while True:
        # Journals may name each other's runs (a trial's run as its driver's record): repeat while that helps.
        sent, left = replay_orphans(folder)
        while sent and left:
            sent, left = replay_orphans(folder)
        if not left or time.monotonic() >= deadline:
            break
        if not announced and not quiet:
            print(f"MLflow unreachable: waiting up to {wait:.0f} s to send {left} delayed journals from {folder} "
                  f"(Ctrl-C stops waiting; they stay there: python -m tracking.outbox replay {folder})",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(min(RETRY_S[-1], max(0.0, deadline - time.monotonic())))
    if left and not quiet:
        print(f"MLflow: {left} journals not sent yet, kept in {folder}; send them later with: "
              f"python -m tracking.outbox replay {folder}", file=sys.stderr, flush=True)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracking.outbox",
                                     description="Send MLflow records that were delayed while the server was down.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("replay", help="send the journals left in an outbox folder")
    command.add_argument("folder", nargs="?", default=None,
                         help=f"the outbox folder (default: ${OUTBOX_ENV} or ~/.cache/dtl/mlflow-outbox; a sweep's "
                              "is <storage>/<sweep>/mlflow-outbox)")
    command.add_argument("--wait", type=float, default=0.0, help="seconds to keep retrying while unreachable")
    args = parser.parse_args(argv)
    folder = Path(args.folder or default_folder()).expanduser()
    if args.folder and not folder.is_dir():
        print(f"{folder}: no such outbox folder", file=sys.stderr)
        return 2
    left = replay(folder, args.wait)
    if not left:
        print(f"{folder}: every delayed record is sent")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
