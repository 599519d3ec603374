#!/usr/bin/env python
"""Where the bytes kept for backward go: every method's training forward split by block and by kind (attention,
MLP, norms, side network, adapter modules, head, embedding), as a table, a stacked bar plot and JSON.

    python benchmarks/memory_breakdown.py --out breakdown.json --plot breakdown.png                # ViT-B/16, b32, fp32
    python benchmarks/memory_breakdown.py --precision bf16 --out breakdown_bf16.json --plot breakdown_bf16.png

Each storage autograd keeps is counted once, as ``benchmarks/train_step.py`` counts it (frozen weights saved by
reference are not copies and cost nothing), and is charged to the innermost module running when it was first
kept. A method's total is checked against ``dtl.benchmark.saved_tensor_bytes`` (the train-step benchmark's
``saved_bytes``) in the same run: the script fails if they differ. DTL's side-state updates and add-backs run in
the model's own forward, outside any submodule: they are its "side network" bytes, outside the blocks. Only
parameters and forward passes are needed, so it runs on a CPU (no timing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import torch  # noqa: E402

from dtl.benchmark import (  # noqa: E402
    BREAKDOWN_KINDS,
    BenchmarkSettings,
    _Row,
    device_name,
    saved_bytes_breakdown,
    saved_tensor_bytes,
)
from dtl.devices import SetupError, resolve_device  # noqa: E402
from dtl.io import write_json  # noqa: E402
from dtl.methods import available_methods  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32: no autocast; bf16: autocast, DTL's frozen backbone stored in bf16 (default: "
                             "%(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help="comma-separated methods at their defaults (default: all)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the stacked bar plot (PNG) here")
    return parser.parse_args(argv)


def measure(settings: BenchmarkSettings, method: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    from dtl.benchmark import ROWS

    row = _Row(method, ROWS[method], settings, images.device, images, labels)
    table = saved_bytes_breakdown(row.model, row.forward)
    total = sum(sum(kinds.values()) for kinds in table.values())
    reference = saved_tensor_bytes(row.model, row.forward)
    if total != reference:
        raise SystemExit(f"error: {method}: the breakdown sums to {total} bytes, the train-step count is {reference}")
    by_kind = {kind: sum(kinds.get(kind, 0) for kinds in table.values()) for kind in BREAKDOWN_KINDS}
    return {"method": method, "saved_bytes": total, "by_kind": by_kind, "by_block": table,
            "start_block": getattr(row.model, "start_block", None)}


def format_table(results: list[dict]) -> str:
    kinds = [k for k in BREAKDOWN_KINDS if any(r["by_kind"][k] for r in results)]
    header = ["method", "total MiB", *kinds, "blocks keeping nothing"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        blocks = sorted((int(b) for b in r["by_block"] if b.isdigit()))
        count = r["num_blocks"]
        empty = [b for b in range(count) if b not in blocks or not sum(r["by_block"][str(b)].values())]
        spans = f"0..{empty[-1]}" if empty and empty == list(range(len(empty))) else (
            ",".join(map(str, empty)) if empty else "none")
        lines.append("| " + " | ".join([r["method"], f"{r['saved_bytes'] / 2**20:.1f}",
                                        *[f"{r['by_kind'][k] / 2**20:.1f}" for k in kinds], spans]) + " |")
    return "\n".join(lines)


def block_table(results: list[dict]) -> str:
    count = results[0]["num_blocks"]
    header = ["method", *map(str, range(count)), "outside"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        cells = [f"{sum(r['by_block'].get(str(b), {}).values()) / 2**20:.0f}" for b in range(count)]
        cells.append(f"{sum(r['by_block'].get('outside blocks', {}).values()) / 2**20:.0f}")
        lines.append("| " + " | ".join([r["method"], *cells]) + " |")
    return "\n".join(lines)


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtl.io import atomic_path

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    names = [r["method"] for r in results]
    bottom = [0.0] * len(results)
    for kind in BREAKDOWN_KINDS:
        values = [r["by_kind"][kind] / 2**30 for r in results]
        if any(values):
            left.bar(names, values, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("kept for backward per batch (GiB)")
    left.set_title("by kind")
    left.legend(fontsize=8)
    left.tick_params(axis="x", rotation=30)
    count = results[0]["num_blocks"]
    for r in results:
        right.plot(range(count), [sum(r["by_block"].get(str(b), {}).values()) / 2**20 for b in range(count)],
                   marker=".", label=r["method"])
    right.set_xlabel("block")
    right.set_ylabel("kept for backward (MiB)")
    right.set_title("by block")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    settings = BenchmarkSettings(backbone=args.backbone, batch_size=args.batch_size, precision=args.precision,
                                 device=args.device, methods=methods, img_size=args.img_size, timing=False)
    try:
        settings.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, key="--device")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import timm

    probe = timm.create_model(args.backbone, pretrained=False, num_classes=0,
                              **({"img_size": args.img_size} if args.img_size else {}))
    img_size = args.img_size or int(probe.default_cfg.get("input_size", (3, 224, 224))[-1])
    num_blocks = len(getattr(probe, "blocks", [])) or None
    del probe
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, settings.num_classes, (args.batch_size,), generator=generator).to(device)
    results = []
    for method in methods:
        started = time.perf_counter()
        result = measure(settings, method, images, labels)
        result["num_blocks"] = num_blocks or 1 + max((int(b) for b in result["by_block"] if b.isdigit()), default=0)
        results.append(result)
        print(f"  {method}: {result['saved_bytes'] / 2**20:.1f} MiB kept for backward "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    title = (f"{args.backbone}, batch {args.batch_size}, {args.precision}, {device_name(device)}, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"\n{title}\n\nby kind (MiB per batch):\n{format_table(results)}\n\nby block (MiB):\n{block_table(results)}")
    if args.out:
        write_json(args.out, [{**r, "backbone": args.backbone, "batch_size": args.batch_size,
                               "precision": args.precision, "device": device_name(device),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")} for r in results])
        print(f"\nwrote {args.out}")
    if args.plot:
        plot(results, title, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
