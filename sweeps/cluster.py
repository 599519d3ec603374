"""Ray for a sweep: quiet settings, a private instance or a joined cluster, and what the cluster can hold."""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping

from .state import SweepError

# Ray's switch between a one-machine instance and a cluster node. Off, every node, the GCS and the driver
# advertise and bind 127.0.0.1; on (Ray's default on Linux), a node takes the machine's network address even
# when it only ever talks to itself.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379``, ``[::1]:6379`` (or the bare hosts)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def quiet_environment(address: str | None = None) -> None:
    """Loopback only for a private instance (``address`` None or "local") or a cluster joined on a loopback
    address (e.g. the one of :mod:`sweeps.local_cluster`), and :func:`ray_settings`; call it before Ray starts."""
    if address in (None, "local") or is_loopback(address):
        os.environ.setdefault(RAY_CLUSTER_SWITCH, "0")
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and os.environ[RAY_CLUSTER_SWITCH] == "0":
            constants.ENABLE_RAY_CLUSTER = False  # Ray, imported already, read the switch at its import
    ray_settings()


def ray_settings() -> None:
    """Settings Ray reads when imported or started, set when the ``sweeps`` package is imported (before any of
    its modules imports Ray): our own progress view instead of Tune's tables, frequent experiment snapshots
    (little lost after a kill), token authentication for `ray start` clusters."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # `ray start` clusters use token authentication; Ray reads this before `ray.init`, so set it first
    # (a driver without it retries ~20 s, then fails). RAY_AUTH_MODE=disabled in the environment still wins.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # after a kill, at most ~1 s of progress is lost
    # Between ASHA's rungs a trial reports a checkpoint now and then (--checkpoint-every);
    # those reports carry training figures only, which Tune's strict check would reject.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "30")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per run otherwise
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    # A resumed trial reports steps Optuna saw before the stop; its warning about that is noise.
    warnings.filterwarnings("ignore", message="The reported value is ignored")


def start_ray(address: str | None) -> None:
    import ray  # here, not above: quiet_environment runs first, so that a private instance stays on loopback

    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SweepError(f"--address {address}: could not join the Ray cluster ({err}). Start it with "
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
    import ray  # here, not above: quiet_environment runs first, so that a private instance stays on loopback

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus_per_trial]
    if not fits:
        sizes = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "none"
        raise SweepError(f"no Ray node can hold a trial of --cpus-per-trial {cpus_per_trial:g} and --gpus-per-trial "
                         f"{gpus_per_trial:g} (nodes: {sizes}); lower them or add nodes")
    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}


def default_concurrency(total: Mapping[str, float], cpus: float, gpus: float, num_trials: int) -> int:
    """As many trials at once as the cluster holds (at most ``num_trials``)."""
    slots = math.floor(total["CPU"] / cpus) if cpus > 0 else num_trials
    if gpus > 0:
        slots = min(slots, math.floor(total["GPU"] / gpus + 1e-9))
    return max(1, min(slots, num_trials))
