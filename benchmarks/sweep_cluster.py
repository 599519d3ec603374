#!/usr/bin/env python
"""How busy a sweep keeps a cluster: all tasks' trials at once (one Tuner) against one task after another.

Starts a simulated cluster on this machine (``sweeps.local_cluster``: a head without CPUs, ``--workers`` worker
nodes of one CPU each, an MLflow tracking server over HTTP), then runs the same sweep twice against it:

* ``all-at-once``: ``python sweeps/run.py --address ...`` over every task (what the sweeps do);
* ``task-by-task``: one ``sweeps/run.py --tasks <task>`` after another (each task's Tuner idles slots while its
  last trials finish).

Utilisation = busy slot-seconds / available slot-seconds, where a trial is busy from the start to the end of its
MLflow run and the slots are available from the first trial's start to the last trial's end, within each Tuner
and over the whole sweep.

    python benchmarks/sweep_cluster.py --out benchmarks/results/sweep_cluster_cpu.json     # ~10 min on 2 cores

Uses a small setting (the micro ViT, random weights, ``--epochs`` epochs of train800, no early stopping)
so that the figure measures scheduling, not the models. Writes only to a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

from dtl.io import write_json  # noqa: E402

TASKS = ("dsprites_loc", "digits", "patterns")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="worker nodes of one CPU each")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--num-samples", type=int, default=4, help="trials per task")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def sweep_files(folder: Path, tasks: list[str], epochs: int, num_samples: int) -> tuple[Path, Path, Path]:
    raw = {
        "data": {"source": "synthetic", "root": str(folder / "data"), "tasks": tasks, "image_size": 32,
                 "num_test": 50},
        "model": {"backbone": "vit_micro_patch4_32", "checkpoint": False, "method": "dtl_plus",
                  "drop_path_scope": "suffix"},
        "training": {"epochs": epochs, "warmup_epochs": 0, "cooldown_epochs": 0, "lr": 0.003, "progress": False},
        "evaluation": {"protocol": "final", "seeds": [42]},
        "overrides": {task: {} for task in tasks},
    }
    space = {"method": "dtl_plus", "num_samples": num_samples,
             "params": {"rank": {"type": "int", "low": 1, "high": 8, "log": True},
                        "start_block": {"type": "int", "low": 0, "high": "last_block"},
                        "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}}
    params, space_file, best = folder / "params.yaml", folder / "space.yaml", folder / "best.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    best.write_text("".join(f"{task}: {{}}\n" for task in tasks))
    return params, space_file, best


def run_sweep(name: str, tasks: list[str], files, cluster, folder: Path) -> float:
    params, space, best = files
    command = [sys.executable, str(REPO / "sweeps" / "run.py"), "--space", str(space), "--params", str(params),
               "--best-path", str(best), "--storage-path", str(folder / "results"), "--name", name,
               "--address", cluster.address, "--scheduler", "fifo", "--tasks", *tasks]
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster.tracking_uri, "PYTHONPATH": str(REPO),
           "DTL_CACHE_DIR": str(folder / "prefix_cache")}
    started = time.perf_counter()
    with open(folder / f"{name}.log", "w") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if code != 0:
        raise SystemExit(f"sweep {name} exited {code}; see {folder / f'{name}.log'}")
    return time.perf_counter() - started


def trial_windows(client, name: str) -> list[tuple[float, float]]:
    experiment = client.get_experiment_by_name("dtl-sweeps")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{name}'", max_results=1000)
    return [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs
            if "mlflow.parentRunId" in r.data.tags and r.info.end_time]


def utilisation(windows: list[list[tuple[float, float]]], slots: int) -> dict:
    """Busy / available slot-seconds, the slots counted from the first trial's start to the last trial's end,
    within each Tuner (what the scheduling itself leaves idle) and over the whole sweep (the gaps between one
    task's Tuner and the next included)."""
    busy = sum(end - start for tuner in windows for start, end in tuner)
    within = slots * sum(max(e for _, e in tuner) - min(s for s, _ in tuner) for tuner in windows)
    overall = slots * (max(e for tuner in windows for _, e in tuner) - min(s for tuner in windows for s, _ in tuner))
    return {"busy_slot_s": busy, "available_slot_s": within, "utilisation": busy / within,
            "available_slot_s_overall": overall, "utilisation_overall": busy / overall,
            "trials": sum(len(tuner) for tuner in windows)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow.tracking import MlflowClient

    from dtl.config import ExperimentConfig
    from sweeps.local_cluster import LocalCluster

    folder = Path(tempfile.mkdtemp(prefix="sweep_cluster_"))
    files = sweep_files(folder, args.tasks, args.epochs, args.num_samples)
    ExperimentConfig.from_dict(yaml.safe_load(files[0].read_text())).protocol.ensure_data()
    rows = []
    with LocalCluster(workers=args.workers, cpus_per_worker=1, folder=folder / "cluster") as cluster:
        client = MlflowClient(cluster.tracking_uri)
        wall = run_sweep("all-at-once", args.tasks, files, cluster, folder)
        rows.append({"mode": "all-at-once", "wall_s": wall,
                     **utilisation([trial_windows(client, "all-at-once")], args.workers)})
        wall, windows = 0.0, []
        for task in args.tasks:
            wall += run_sweep(f"task-{task}", [task], files, cluster, folder)
            windows.append(trial_windows(client, f"task-{task}"))
        rows.append({"mode": "task-by-task", "wall_s": wall, **utilisation(windows, args.workers)})
    print(f"\n{len(args.tasks)} tasks x {args.num_samples} trials on {args.workers} one-CPU worker nodes "
          f"(head: 0 CPU), {args.epochs} epochs per trial\n")
    print("| mode | trials | busy slot-s | available slot-s (within Tuners) | utilisation | available slot-s "
          "(whole sweep) | utilisation | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['trials']} | {row['busy_slot_s']:.0f} | {row['available_slot_s']:.0f} "
              f"| {row['utilisation']:.0%} | {row['available_slot_s_overall']:.0f} | {row['utilisation_overall']:.0%} "
              f"| {row['wall_s']:.0f} |")
    if args.out:
        write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "workers": args.workers, "tasks": args.tasks,
                              "num_samples": args.num_samples, "epochs": args.epochs, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
