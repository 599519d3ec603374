#!/usr/bin/env python
"""One command that settles the CUDA path on a GPU machine, in a few minutes:

1. ``tests``: ``pytest -m gpu`` (tests/test_gpu.py): the CUDA training step against the CPU's, the prefix cache on
   the GPU and in pinned host memory against training from images, checkpoints between a GPU and a CPU or a node
   with fewer GPUs, fp16 and bf16 training, no host sync per step, a trial's share of GPU memory;
2. ``train_step``: every method's training step on ViT-B/16 under the two published protocols
   (``--protocol dtl``: batch 32, fp16 autocast; ``--protocol vpetl``: batch 64, fp32): trainable parameters,
   bytes kept for backward, peak allocated and reserved memory, images/s;
3. ``prefix_cache``: DTL+ on ViT-B/16, 1000 images, trained from images, from a new cache and from a cache on disk;
4. ``multitask``: five DTL+ tasks through one frozen pass against five separate models;
5. ``sweep``: four trials at 0.5 GPU each on one GPU: two in flight at once, each capped at half the GPU's memory
   (needs Ray, Optuna and MLflow; skipped, and says so, where they are not installed).

    python benchmarks/gpu_acceptance.py --out gpu_acceptance.json       # on a GPU machine (torch + timm suffice)
    python benchmarks/gpu_acceptance.py --device cpu --quick            # the same sequence on a CPU, small

Writes one JSON (``--out``) and a Markdown block ready for BENCHMARKS.md (``--markdown``, default beside the
JSON), naming the device and the date; prints the Markdown. ``--quick`` uses the embedded micro ViT and few steps
(on a CPU: about two minutes); ``--skip`` leaves parts out. Exit status 0 when no part failed (skipped parts do
not fail), 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

import torch  # noqa: E402
import yaml  # noqa: E402

from dtl.benchmark import device_name  # noqa: E402
from dtl.devices import SetupError, resolve_device  # noqa: E402
from dtl.io import write_json, write_text  # noqa: E402

PARTS = ("tests", "train_step", "prefix_cache", "multitask", "sweep")
BENCHMARKS = REPO / "benchmarks"
MICRO = "vit_micro_patch4_32"
VIT_B = "vit_base_patch16_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the embedded micro ViT, a few methods and steps: the sequence in a few minutes on a CPU")
    parser.add_argument("--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
                        help=f"parts to leave out ({', '.join(PARTS)})")
    parser.add_argument("--out", type=Path, default=Path("gpu_acceptance.json"),
                        help="the JSON with every figure (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="the Markdown block for BENCHMARKS.md (default: the JSON's path with .md)")
    return parser.parse_args(argv)


class Acceptance:
    """Runs the parts in order, each in its own process (so one's GPU memory never counts in another's), and
    keeps what each measured."""

    def __init__(self, device: str, quick: bool, scratch: Path):
        self.device, self.quick, self.scratch = device, quick, scratch
        self.parts: dict[str, dict] = {}

    def command(self, name: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """A child process with the repository importable; its output is kept in the scratch folder."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        print(f"\n== {name}: {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        (self.scratch / f"{name}.log").write_text(done.stdout + done.stderr)
        tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
        print("\n".join(tail), flush=True)
        return done

    def run(self, name: str, part) -> None:
        started = time.perf_counter()
        try:
            record = part()
        except subprocess.TimeoutExpired as err:
            record = {"status": "failed", "reason": f"did not finish within {err.timeout:.0f} s"}
        except Exception as err:  # one part's failure is a finding; the others still run
            record = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
        record["seconds"] = round(time.perf_counter() - started, 1)
        self.parts[name] = record
        print(f"-- {name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""),
              flush=True)

    # --- the parts ------------------------------------------------------------------------------------------
    def tests(self) -> dict:
        if importlib.util.find_spec("pytest") is None:
            return {"status": "skipped", "reason": "pytest is not installed here"}
        report = self.scratch / "tests.xml"
        done = self.command("tests", ["-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                                      "-p", "no:cacheprovider", f"--junitxml={report}"], timeout=600)
        if not report.exists():
            return {"status": "failed", "reason": f"pytest exited {done.returncode} without a report"}
        cases = ElementTree.parse(report).getroot().iter("testcase")
        outcome: dict[str, list] = {"passed": [], "failed": [], "skipped": []}
        for case in cases:
            name = case.get("name")
            if case.find("failure") is not None or case.find("error") is not None:
                outcome["failed"].append(name)
            elif case.find("skipped") is not None:
                outcome["skipped"].append(f"{name}: {case.find('skipped').get('message', '')}")
            else:
                outcome["passed"].append(name)
        status = "failed" if outcome["failed"] or done.returncode not in (0, 5) else (
            "skipped" if not outcome["passed"] else "passed")
        reasons = sorted({line.split(": ", 1)[1] for line in outcome["skipped"]})
        return {"status": status, "reason": "; ".join(reasons) if status == "skipped" else "", **outcome}

    def train_step(self) -> dict:
        results = {}
        for protocol in ("dtl", "vpetl"):
            out = self.scratch / f"train_step_{protocol}.json"
            args = [str(BENCHMARKS / "train_step.py"), "--protocol", protocol, "--device", self.device,
                    "--out", str(out)]
            if self.quick:
                args += ["--backbone", MICRO, "--methods", "full,lora,dtl,dtl_plus,dtl_plus_cached", "--warmup", "1",
                         "--steps", "1", "--rounds", "1"]
            done = self.command(f"train_step_{protocol}", args, timeout=900)
            if done.returncode != 0:
                return {"status": "failed", "reason": f"train_step.py --protocol {protocol} exited {done.returncode}"}
            results[protocol] = json.loads(out.read_text())
        return {"status": "passed", "results": results}

    def prefix_cache(self) -> dict:
        out = self.scratch / "prefix_cache.json"
        args = [str(BENCHMARKS / "prefix_cache.py"), "--device", self.device, "--workdir", str(self.scratch / "pc"),
                "--out", str(out)]
        args += ["--epochs", "1"] if self.quick else ["--backbone", VIT_B, "--img-size", "224", "--epochs", "10"]
        done = self.command("prefix_cache", args, timeout=900)
        if done.returncode != 0:
            return {"status": "failed", "reason": f"prefix_cache.py exited {done.returncode}"}
        rows = json.loads(out.read_text())
        losses = {row["run"]: row["final_train_loss"] for row in rows}
        # The cache changes cost, not training: the runs end at the same loss (exactly on a CPU in fp32; under
        # autocast the cache stores the prefix's outputs in the autocast dtype, so to 1 % there).
        agree = max(losses.values()) - min(losses.values()) <= 1e-2 * max(abs(v) for v in losses.values())
        return {"status": "passed" if agree else "failed", "results": rows,
                "reason": "" if agree else f"final training losses differ: {losses}"}

    def multitask(self) -> dict:
        out = self.scratch / "multitask.json"
        args = [str(BENCHMARKS / "multitask.py"), "--device", self.device, "--out", str(out)]
        args += ["--backbone", MICRO, "--tasks", "3"] if self.quick else ["--backbone", VIT_B]
        done = self.command("multitask", args, timeout=900)
        if done.returncode != 0:  # it checks that both variants predict alike
            return {"status": "failed", "reason": f"multitask.py exited {done.returncode}"}
        return {"status": "passed", "results": json.loads(out.read_text())}

    def sweep(self) -> dict:
        missing = [m for m in ("ray", "optuna", "mlflow") if importlib.util.find_spec(m) is None]
        if missing:
            return {"status": "skipped", "reason": f"needs {', '.join(missing)} (the sweeps' packages), not "
                                                   "installed here"}
        return fractional_sweep(self, resolve_device(self.device).type == "cuda")


def fractional_sweep(acceptance: Acceptance, on_gpu: bool) -> dict:
    """Four trials at ``--gpus-per-trial 0.5``: on a GPU, Ray's private instance sees the machine's GPUs; on a
    CPU, a one-node cluster of this machine with one logical GPU stands in (the trials then train on the CPU, and
    the memory cap cannot be checked)."""
    folder = acceptance.scratch / "sweep"
    folder.mkdir()
    params = {
        "data": {"source": "synthetic", "root": str(folder / "data"), "tasks": ["digits"],
                 "image_size": 32 if on_gpu else 16, "num_test": 50},
        "model": {"backbone": MICRO, "checkpoint": False, "method": "dtl_plus", "drop_path_scope": "suffix"},
        "training": {"epochs": 3, "warmup_epochs": 0, "cooldown_epochs": 0, "lr": 0.003, "progress": False},
        "evaluation": {"protocol": "final", "seeds": [42]},
        "overrides": {"digits": {}},
    }
    space = {"method": "dtl_plus", "num_samples": 4,
             "params": {"rank": {"type": "int", "low": 1, "high": 8, "log": True},
                        "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}}
    for name, data in (("params.yaml", params), ("space.yaml", space), ("best.yaml", {"digits": {}})):
        (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    args = [str(REPO / "sweeps" / "run.py"), "--space", str(folder / "space.yaml"), "--params",
            str(folder / "params.yaml"), "--best-path", str(folder / "best.yaml"), "--storage-path",
            str(folder / "results"), "--name", "gpu-acceptance", "--scheduler", "fifo", "--gpus-per-trial", "0.5",
            "--cpus-per-trial", "1", "--max-concurrent", "2"]
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    os.environ["DTL_CACHE_DIR"] = str(folder / "prefix_cache")
    if on_gpu:
        done = acceptance.command("sweep", args, timeout=900)
    else:
        from sweeps.local_cluster import LocalCluster  # Ray: installed with the sweeps only

        with LocalCluster(workers=1, cpus_per_worker=2, gpus_per_worker=1, mlflow=False) as cluster:
            done = acceptance.command("sweep", [*args, "--address", cluster.address], timeout=900)
    if done.returncode != 0:
        return {"status": "failed", "reason": f"sweeps/run.py exited {done.returncode}"}
    return check_sweep_trials(tracking, on_gpu)


def check_sweep_trials(tracking: str, on_gpu: bool) -> dict:
    """Every trial finished with half a GPU (capped at half its memory on a GPU), and two ran at once."""
    from mlflow.tracking import MlflowClient  # installed with the sweeps only

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("dtl-sweeps")
    runs = [r for r in client.search_runs([experiment.experiment_id], "tags.sweep = 'gpu-acceptance'")
            if "mlflow.parentRunId" in r.data.tags]
    windows = sorted((r.info.start_time, r.info.end_time or 0) for r in runs)
    in_flight = max(sum(1 for s, e in windows if s <= start < e) for start, _ in windows) if windows else 0
    trials = [{"status": r.info.status, **{k: r.data.tags.get(k) for k in ("gpu_share", "gpu_memory_fraction",
                                                                            "cuda_visible_devices", "device")},
               "gpu_peak_allocated_bytes": r.data.metrics.get("gpu_peak_allocated_bytes")} for r in runs]
    problems = []
    if len(runs) != 4 or any(t["status"] != "FINISHED" for t in trials):
        problems.append(f"expected 4 finished trials, got {[t['status'] for t in trials]}")
    if any(t["gpu_share"] != "0.5" for t in trials):
        problems.append("a trial did not get half a GPU")
    if in_flight < 2:
        problems.append(f"at most {in_flight} trial(s) ran at once, expected 2")
    if on_gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        if any(t["gpu_memory_fraction"] != "0.5" for t in trials):
            problems.append("a trial was not capped at half the GPU's memory")
        if any((t["gpu_peak_allocated_bytes"] or 0) > 0.5 * total for t in trials):
            problems.append("a trial's peak passed half the GPU's memory")
    return {"status": "failed" if problems else "passed", "reason": "; ".join(problems), "in_flight": in_flight,
            "trials": trials, "memory_cap_checked": on_gpu}


# --- the report ---------------------------------------------------------------------------------------------------
def markdown(summary: dict) -> str:
    report = _load_report_module()
    lines = [f"### GPU acceptance: {summary['device_name']} ({summary['device']}), {summary['date']}", "",
             f"`python benchmarks/gpu_acceptance.py {' '.join(summary['argv'])}`; torch {summary['torch']}, "
             f"CUDA {summary['cuda'] or '-'}, {summary['platform']}" + (" (quick: the embedded micro ViT)"
                                                                          if summary["quick"] else ""), "",
             "| part | status | seconds | note |", "|---|---|---:|---|"]
    for name, part in summary["parts"].items():
        note = part.get("reason") or ""
        if name == "tests" and part["status"] != "skipped":
            note = f"{len(part['passed'])} passed, {len(part['failed'])} failed, {len(part['skipped'])} skipped"
        if name == "sweep" and part["status"] == "passed":
            note = f"{len(part['trials'])} trials, {part['in_flight']} in flight at once" + (
                ", each capped at half the GPU's memory" if part["memory_cap_checked"] else "")
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.0f} | {note} |")
    for protocol, rows in summary["parts"].get("train_step", {}).get("results", {}).items():
        lines += ["", f"Training step, protocol `{protocol}`:", "", report.train_step_table(rows)]
    if summary["parts"].get("prefix_cache", {}).get("results"):
        lines += ["", "Prefix cache:", "", report.prefix_cache_table(summary["parts"]["prefix_cache"]["results"])]
    multitask = summary["parts"].get("multitask", {}).get("results")
    if multitask:
        separate, shared = multitask["separate"], multitask["shared"]
        lines += ["", f"Multi-task ({multitask['tasks']} DTL+ tasks on {multitask['backbone']}, batch "
                      f"{multitask['batch_size']}; predictions equal):", "",
                  "| variant | images/s | / separate | weights (MiB) | peak (MiB) |", "|---|---:|---:|---:|---:|"]
        for name, row in (("separate models", separate), ("one MultiTaskModel", shared)):
            lines.append(f"| {name} | {row['images_per_s']:.1f} | {row['images_per_s'] / separate['images_per_s']:.2f}x "
                         f"| {row['weights_bytes'] / 2**20:.1f} | {row['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("benchmark_report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device, key="--device")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as scratch:
        acceptance = Acceptance(args.device, args.quick, Path(scratch))
        for name in PARTS:
            if name in args.skip:
                acceptance.parts[name] = {"status": "skipped", "reason": "--skip", "seconds": 0.0}
            else:
                acceptance.run(name, getattr(acceptance, name))
    summary = {"device": str(device), "device_name": device_name(device), "date": started, "quick": args.quick,
               "argv": list(argv if argv is not None else sys.argv[1:]), "torch": torch.__version__,
               "cuda": torch.version.cuda if device.type == "cuda" else None, "platform": platform.platform(),
               "parts": acceptance.parts}
    text = markdown(summary)
    write_json(args.out, summary)
    write_text(args.markdown or args.out.with_suffix(".md"), text)
    print("\n" + text + f"\nwrote {args.out} and {args.markdown or args.out.with_suffix('.md')}")
    return 1 if any(part["status"] == "failed" for part in acceptance.parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
