#!/usr/bin/env python
"""Training-step cost of every method on one backbone: trainable parameters, bytes saved for backward, peak
memory (allocated and, on a GPU, reserved) and images/s, with ratios to full fine-tuning and LoRA. Prints a table
and writes JSON (--out).

    python benchmarks/train_step.py --device cpu --batch-size 4 --out bench.json
    python benchmarks/train_step.py --device cuda --protocol dtl --out bench_gpu_dtl.json       # as the DTL paper
    python benchmarks/train_step.py --device cuda --protocol vpetl --out bench_gpu_vpetl.json   # as V-PETL Bench
    python benchmarks/train_step.py --device cuda --precision bf16 --out bench_gpu_bf16.json    # GPU, bf16 backbone
    python benchmarks/train_step.py --device cpu --img-size 512 --decode-head fpn --num-classes 150 \
        --batch-size 2 --no-timing --out bench_seg512.json                # segmentation, ADE20K's 512 crops

``--protocol`` sets the batch size, autocast and weights' dtype under which published memory figures were
measured: ``dtl`` (the DTL authors' scripts: batch 32, fp16 autocast with a loss scaler, fp32 weights) or
``vpetl`` (V-PETL Bench: batch 64, fp32); flags given beside it win.

Pure torch + timm + dtl (no Ray/MLflow/DVC), so it runs as is on a bare GPU machine. What each figure means is
documented in ``dtl/benchmark.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from dtl.benchmark import (  # noqa: E402
    PROTOCOLS,
    ROWS,
    STEP_PRECISIONS,
    BenchmarkSettings,
    check_targets,
    format_table,
    run_benchmark,
)
from dtl.devices import SetupError, resolve_device  # noqa: E402
from dtl.io import write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                        help="measure as published figures were: dtl (batch 32, fp16 autocast, fp32 weights; bf16 "
                             "on a CPU) or vpetl (batch 64, fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32, or the protocol's")
    parser.add_argument("--precision", choices=STEP_PRECISIONS, default=None,
                        help="fp32: no autocast; bf16/fp16: autocast (default: fp32, or the protocol's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--methods", default=",".join(ROWS),
                        help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--backbone-dtype", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                        help="storage dtype of DTL's frozen backbone; auto (the default without --protocol) = the "
                             "autocast dtype (bf16/fp16 runs), fp32 otherwise. fp32 with --precision bf16 is 'fp32 "
                             "weights + AMP'")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--decode-head", choices=("linear", "fpn"), default=None,
                        help="segmentation rows: every method with this decode head, on label maps of the input's "
                             "size (ADE20K: --img-size 512 --num-classes 150)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method per round (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true",
                        help="only parameters, saved bytes and the peak (estimate on CPU): fast, e.g. for batch 32 on CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = {key: value for key, value in (("batch_size", args.batch_size), ("precision", args.precision),
                                           ("backbone_dtype", args.backbone_dtype)) if value is not None}
    common = dict(backbone=args.backbone, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                  img_size=args.img_size, num_classes=args.num_classes, warmup=args.warmup, steps=args.steps,
                  rounds=args.rounds, threads=args.threads, timing=not args.no_timing, decode_head=args.decode_head)
    try:
        resolve_device(args.device, key="--device")
        if args.protocol:
            settings = BenchmarkSettings.for_protocol(args.protocol, args.device, **common, **given)
        else:
            settings = BenchmarkSettings(device=args.device, **common, **given)
        settings.validate()
    except (ValueError, SetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{settings.backbone}, batch {settings.batch_size}, precision {settings.precision}, "
          f"device {settings.device}, DTL backbone dtype {settings.dtl_backbone_dtype()}"
          + (f", protocol {settings.protocol}" if settings.protocol else ""), flush=True)
    try:
        results = run_benchmark(settings, log=lambda line: print(line, flush=True))
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    first = results[0]
    protocol = f" | protocol {first['protocol']}" if first["protocol"] else ""
    head = f" | {first['img_size']} px, {first['decode_head']} decode head" if first["decode_head"] else ""
    print(f"\n{first['backbone']}{head} | batch {first['batch_size']} | {first['precision']}{protocol} | "
          f"{first['device_name']} ({first['device']}, {first['threads']} threads) | torch {first['torch']} | "
          f"{first['date']}")
    print(format_table(results))
    if first["decode_head"]:
        print(f"(the loss itself keeps {first['loss_saved_bytes'] / 2**20:.1f} MiB for backward in every row: the "
              "log-probabilities at the labels' resolution, not in 'saved MiB')")
    checks = check_targets(results)
    if checks:
        which = "ViT-B/16 at 512 px" if first["decode_head"] else "ViT-B/16 at batch 32"
        print(f"\ntargets (the project's memory and speed targets, set for {which}):")
        for check in checks:
            print(f"  [{'met' if check['met'] else 'NOT met'}] {check['target']}: {check['value']:.3f}")
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
