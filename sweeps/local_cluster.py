"""A multi-node Ray cluster and an MLflow tracking server on one machine, on loopback: try a cluster sweep anywhere.

    python -m sweeps.local_cluster --workers 3 --cpus-per-worker 1            # prints the addresses, Ctrl-C stops
    python sweeps/run.py --space dtl_plus --address <ray address> ...         # with MLFLOW_TRACKING_URI=<server>

The cluster is Ray's own ``ray.cluster_utils.Cluster``: a head node (no CPUs by default, as on many real
clusters, so trials run on the workers only) and ``--workers`` worker nodes, each a separate raylet with its own
CPUs and, if asked, GPUs. On a machine with GPUs each worker node owns its own of them (``--gpus-per-worker``
whole GPUs, in the order of ``CUDA_VISIBLE_DEVICES``, else all the machine's), as separate machines would: Ray
numbers every node's GPUs from 0, so without that every node would put its trials on the machine's first GPU.
On a machine without GPUs (or with ``CUDA_VISIBLE_DEVICES`` empty) they are logical: Ray schedules GPUs as
names, so a CPU machine can test how fractional GPUs pack trials, and each trial then trains on the CPU and says
so. The tracking server is ``mlflow server`` with its own SQLite store and artifact folder, bound to 127.0.0.1,
which every trial logs to over HTTP as on a real cluster. :class:`LocalCluster` starts both and stops exactly what it started (never ``ray stop``, which stops
every Ray of the machine); the slow cluster tests and ``benchmarks/sweep_cluster.py`` use it.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .cluster import quiet_environment


def free_port() -> int:
    """An ephemeral port (32768+), which never collides with Ray's worker port range (10002-19999)."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def visible_gpus() -> list[str]:
    """This machine's GPUs that the cluster may hand out: those of ``CUDA_VISIBLE_DEVICES`` when it is set."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch  # counts through NVML, without starting CUDA in this process

    return [str(index) for index in range(torch.cuda.device_count())]


def node_gpus(workers: int, gpus_per_worker: float, machine_gpus: list[str]) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker node: ``gpus_per_worker`` GPUs of ``machine_gpus`` each, none
    shared. On a machine without GPUs (or with its GPUs hidden) the nodes' GPUs are logical: names that no GPU
    answers to, so that Ray can hand them out and a trial holding one sees no device (CUDA shows no GPU after a
    name it does not know) and trains on the CPU. None: the nodes have no GPU."""
    if gpus_per_worker <= 0:
        return [None] * workers
    if not machine_gpus:
        return [",".join(f"logical{k}" for k in range(math.ceil(gpus_per_worker)))] * workers
    needed = workers * gpus_per_worker
    if gpus_per_worker != int(gpus_per_worker) or needed > len(machine_gpus):
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g} x --workers {workers}: every worker node needs whole "
                         f"GPUs of its own, {needed:g} in all, and this machine has {len(machine_gpus)} "
                         f"({', '.join(machine_gpus)}); use fewer workers or GPUs per worker (--gpus-per-trial "
                         "packs several trials on one GPU)")
    count = int(gpus_per_worker)
    return [",".join(machine_gpus[i * count:(i + 1) * count]) for i in range(workers)]


@contextmanager
def cuda_visible_devices(visible: str | None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` of this process while a node starts (None: as it is): Ray checks a node's GPUs
    against this process's variable, and the node's processes inherit it."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


class LocalCluster:
    """``with LocalCluster(workers=3) as cluster:`` -> ``cluster.address``, ``cluster.tracking_uri``,
    ``cluster.remove_worker()``; everything stops on exit."""

    def __init__(self, workers: int = 3, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 head_cpus: float = 0, mlflow: bool = True, folder: str | Path | None = None):
        self.workers, self.cpus_per_worker, self.gpus_per_worker = workers, cpus_per_worker, gpus_per_worker
        self.head_cpus, self.with_mlflow = head_cpus, mlflow
        # Ray's socket paths must stay short: a dedicated temporary folder outside long test paths.
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="dtlc", dir="/tmp"))
        self.cluster = None
        self.server: subprocess.Popen | None = None
        self.tracking_uri: str | None = None

    @property
    def address(self) -> str:
        return self.cluster.address

    def __enter__(self) -> "LocalCluster":
        quiet_environment("127.0.0.1")  # loopback nodes, and the same RAY_AUTH_MODE as the driver that joins
        # Ray is imported after quiet_environment, which sets what Ray reads when imported
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # Ray's test cluster records its address in the default temporary folder (not the head's temp_dir) and
        # fails when that folder does not exist yet, as on a machine that never ran Ray.
        Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
        gpus = node_gpus(self.workers, self.gpus_per_worker, visible_gpus())
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": self.head_cpus, "num_gpus": 0, "temp_dir": str(self.folder / "ray"),
                "include_dashboard": False})
            for visible in gpus:
                with cuda_visible_devices(visible):
                    self.cluster.add_node(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)
            self.cluster.wait_for_nodes()
            if self.with_mlflow:
                self._start_mlflow()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_mlflow(self, port: int | None = None) -> None:
        port = port or free_port()
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--default-artifact-root", str(self.folder / "mlartifacts")]
        # Its own process group: it spawns workers, and stopping the group stops them all.
        with open(self.folder / "mlflow.log", "a") as log:  # the server writes to its own copy of the descriptor
            self.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.tracking_uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {self.folder / 'mlflow.log'}")
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"mlflow server did not answer on {self.tracking_uri} within 120 s")

    def worker_nodes(self) -> list:
        return list(self.cluster.worker_nodes) if self.cluster else []

    def remove_worker(self, node=None) -> None:
        """Take a worker node away (its trial processes die), as a lost spot instance would."""
        self.cluster.remove_node(node or self.worker_nodes()[0], allow_graceful=False)

    def stop_tracking(self) -> None:
        """Stop the tracking server (an outage); :meth:`start_tracking` brings it back on the same port and store."""
        if self.server is not None and self.server.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.server.pid, sig)
                    self.server.wait(timeout=15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        self.server = None

    def start_tracking(self) -> None:
        self._start_mlflow(int(self.tracking_uri.rsplit(":", 1)[1]))

    def close(self) -> None:
        self.stop_tracking()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.local_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0,
                        help="GPUs per worker node: whole GPUs of this machine, each node its own; logical GPUs on a "
                             "machine without GPUs")
    parser.add_argument("--head-cpus", type=float, default=0)
    parser.add_argument("--no-mlflow", action="store_true", help="do not start a tracking server")
    args = parser.parse_args(argv)
    try:
        node_gpus(args.workers, args.gpus_per_worker, visible_gpus())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with LocalCluster(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.head_cpus,
                      mlflow=not args.no_mlflow) as cluster:
        print(f"Ray cluster: {cluster.address} (head {args.head_cpus:g} CPU, {args.workers} workers x "
              f"{args.cpus_per_worker:g} CPU / {args.gpus_per_worker:g} GPU)")
        if cluster.tracking_uri:
            print(f"MLflow tracking server: {cluster.tracking_uri}")
        print("Run a sweep against it:\n"
              f"  MLFLOW_TRACKING_URI={cluster.tracking_uri or '<your store>'} python sweeps/run.py --space dtl_plus "
              f"--address {cluster.address}\nCtrl-C stops the cluster and the server.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
