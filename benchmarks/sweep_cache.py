#!/usr/bin/env python
"""What the shared prefix cache saves a whole sweep: the default sweep run twice, with the cache and without.

Runs ``python sweeps/run.py --space <space>`` (default: the shipped ``dtl_plus`` space on the embedded default)
once with ``training.prefix_cache: auto`` (every trial of a task reads one memory-mapped cache of all block
inputs, built by the first trial that needs it) and once with ``off`` (every trial runs the whole backbone every
epoch), one after the other on the same data, each with a fresh cache folder, MLflow store and result folder
(so the first run's cache build is part of its cost). Reports per run: wall time, CPU-seconds of the whole
machine (``psutil.cpu_times``; run it on an otherwise idle machine), the CPU-seconds the trials spent in training
(their own ``cpu_time_s``), trials done / stopped early, and each task's winner.

    python benchmarks/sweep_cache.py --out benchmarks/results/sweep_cache_cpu.json      # ~50 min on 2 cores

Both runs start from ``--best`` (default ``sweeps/best.yaml``). After a sweep has written winners there, the
sweep they start would not be the default one: pass the committed file instead
(``git show HEAD:sweeps/best.yaml > /tmp/best.yaml`` and ``--best /tmp/best.yaml``). Nothing of the repository
is changed: the params file, the best-configuration file and every output are temporary copies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

from dtl.io import write_json  # noqa: E402

MODES = ("auto", "off")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="dtl_plus")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--best", type=Path, default=REPO / "sweeps" / "best.yaml",
                        help="earlier winners the sweep starts from (default: sweeps/best.yaml; the default sweep "
                             "starts from the committed file, whose entries are empty)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials per task (default: the space's)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of auto, off")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def machine_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + getattr(times, "nice", 0.0)


def run_once(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    folder = workdir / f"cache_{mode}"
    folder.mkdir(parents=True)
    raw = yaml.safe_load(args.params.read_text())
    root = Path(raw["data"]["root"])
    raw["data"]["root"] = str(root if root.is_absolute() else REPO / root)
    raw["training"]["prefix_cache"] = mode
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    best = folder / "best.yaml"
    best.write_text(args.best.read_text())
    command = [sys.executable, str(REPO / "sweeps" / "run.py"), "--space", args.space, "--params", str(params),
               "--best-path", str(best), "--storage-path", str(folder / "results"), "--name", f"cache-{mode}"]
    if args.num_samples:
        command += ["--num-samples", str(args.num_samples)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "DTL_CACHE_DIR": str(folder / "prefix"), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb", dir="/tmp")}
    print(f"[{mode}] {' '.join(command)}", flush=True)
    cpu, wall = machine_cpu_seconds(), time.perf_counter()
    with open(folder / "sweep.log", "w") as log:
        code = subprocess.call(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    wall, cpu = time.perf_counter() - wall, machine_cpu_seconds() - cpu
    if code != 0:
        raise SystemExit(f"[{mode}] the sweep exited {code}; see {folder / 'sweep.log'}")
    results = json.loads((folder / "results" / f"cache-{mode}" / "results.json").read_text())
    rows = [row for task in results["tasks"].values() for row in task["rows"]]
    row = {
        "prefix_cache": mode, "wall_s": wall, "machine_cpu_s": cpu,
        "trial_cpu_s": sum(r["cost"].get("cpu_time_s", 0.0) for r in rows),
        "trials": len(rows), "done": sum(r["status"] == "done" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "winners": {task: {"val_accuracy": outcome["rows"][[r["trial_id"] for r in outcome["rows"]].index(
            outcome["decision"]["winner"])]["val_accuracy"], "replaced": outcome["decision"]["replaced"]}
            for task, outcome in results["tasks"].items() if outcome["decision"] and outcome["decision"]["winner"]},
        "log": str(folder / "sweep.log"),
    }
    print(f"[{mode}] wall {wall:.0f} s, machine CPU {cpu:.0f} s, trials' training CPU {row['trial_cpu_s']:.0f} s, "
          f"{row['done']} done / {row['stopped_early']} stopped early / {row['failed']} failed", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        print(f"error: --modes: expected some of {', '.join(MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2
    for flag, path in (("--params", args.params), ("--best", args.best)):
        if not path.is_file():
            print(f"error: {flag}: {path} not found", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep_cache_"))
    rows = [run_once(mode, args, workdir) for mode in modes]
    print("\n| prefix cache | wall s | machine CPU s | trials' training CPU s | trials (done / stopped early) |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['prefix_cache']} | {row['wall_s']:.0f} | {row['machine_cpu_s']:.0f} | {row['trial_cpu_s']:.0f} "
              f"| {row['trials']} ({row['done']} / {row['stopped_early']}) |")
    if len(rows) == 2:
        print(f"\nshared cache: {rows[1]['machine_cpu_s'] / rows[0]['machine_cpu_s']:.2f}x fewer machine CPU-seconds, "
              f"{rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x less wall time")
    if args.out:
        write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "cpu": psutil.cpu_count(), "space": args.space,
                              "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
