#!/usr/bin/env python
"""Several DTL tasks through one frozen pass (``dtl.MultiTaskModel``) against the same tasks as separate models:
images/s and memory, measured side by side.

    python benchmarks/multitask.py --backbone vit_micro_patch4_32 --out multitask_micro.json
    python benchmarks/multitask.py --out multitask_vitb16.json            # ViT-B/16, batch 32, CPU

The tasks are DTL+ models at the defaults with start blocks spread over the backbone (e.g. M = 2, 4, 6, 8, 10 for
five tasks on 12 blocks) and random side networks and heads (the cost does not depend on what was learnt). Each
variant runs in a fresh process, so its memory is its own: "weights" is the bytes of every parameter and buffer
it holds (one backbone when shared, one per task otherwise), "peak" the process's peak resident memory above what
it held before building the models (CPU; on a GPU the CUDA allocator's peak). The predictions of the two variants
are checked to be equal in the run.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import torch  # noqa: E402

from dtl.devices import SetupError, resolve_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per variant (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--variant", choices=("shared", "separate"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(backbone: str, tasks: int, device: torch.device) -> dict[str, torch.nn.Module]:
    import dtl

    probe = dtl.create_model(backbone, "dtl", num_classes=2)
    blocks = probe.num_blocks
    del probe
    starts = [round((i + 1) * blocks / (tasks + 1)) for i in range(tasks)]
    models = {}
    for i, start in enumerate(starts):
        torch.manual_seed(0)  # the same frozen backbone for every task, as from one checkpoint
        model = dtl.create_model(backbone, "dtl_plus", num_classes=10 + i, start_block=min(start, blocks - 1))
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        models[f"task{i}_M{model.start_block}"] = model.to(device).eval()
    return models


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args: argparse.Namespace) -> dict:
    from dtl import MultiTaskModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    baseline = peak_bytes(device)  # the interpreter, torch and timm: the same for both variants
    models = build(args.backbone, args.tasks, device)
    size = models[next(iter(models))].family.backbone.patch_embed.img_size[0]
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if args.variant == "shared":
        multi = MultiTaskModel(models).eval()
        held = {id(t): t for m in [multi] for t in (*m.parameters(), *m.buffers())}

        def predict():
            return multi(images)
    else:
        held = {id(t): t for m in models.values() for t in (*m.parameters(), *m.buffers())}

        @torch.no_grad()
        def predict():
            return {task: model(images) for task, model in models.items()}
    weights = sum(t.numel() * t.element_size() for t in held.values())
    predict()  # warm-up
    times = []
    for _ in range(args.rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logits = predict()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"variant": args.variant, "weights_bytes": weights, "peak_bytes": peak_bytes(device) - baseline,
            "seconds_per_batch": statistics.median(times),
            "images_per_s": args.batch_size / statistics.median(times),
            "argmax": {task: out.argmax(-1).tolist() for task, out in logits.items()},
            "logits_sum": {task: float(out.double().sum()) for task, out in logits.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    try:
        device = resolve_device(args.device, key="--device")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    passed = ["--backbone", args.backbone, "--tasks", str(args.tasks), "--batch-size", str(args.batch_size),
              "--rounds", str(args.rounds), "--device", args.device,
              *(["--threads", str(args.threads)] if args.threads else [])]
    results = {}
    for variant in ("separate", "shared"):
        output = subprocess.run([sys.executable, __file__, *passed, "--variant", variant], check=True,
                                capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    shared, separate = results["shared"], results["separate"]
    # Exact on a CPU; a GPU may pick other kernels for other batch shapes, so there logits agree to rounding.
    tolerance = 1e-5 if device.type == "cuda" else 0.0
    if shared["argmax"] != separate["argmax"] or any(
            not math.isclose(shared["logits_sum"][t], value, rel_tol=tolerance, abs_tol=tolerance)
            for t, value in separate["logits_sum"].items()):
        print("error: the shared pass predicted differently from the separate models", file=sys.stderr)
        return 1
    from dtl.benchmark import device_name

    rows = [("separate models", separate), ("one MultiTaskModel", shared)]
    print(f"{args.tasks} DTL+ tasks on {args.backbone}, batch {args.batch_size}, {device_name(device)}, "
          f"{time.strftime('%Y-%m-%d')}; predictions equal")
    print("| variant | images/s | / separate | weights (MiB) | peak (MiB) | / separate |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / separate['images_per_s']:.2f}x | "
              f"{r['weights_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{r['peak_bytes'] / separate['peak_bytes']:.2f}x |")
    if args.out:
        from dtl.io import write_json

        write_json(args.out, {"backbone": args.backbone, "tasks": args.tasks, "batch_size": args.batch_size,
                              "device": device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              **{k: {key: v for key, v in r.items() if key not in ("argmax", "logits_sum")}
                                 for k, r in results.items()}})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
