#!/usr/bin/env python
"""Training-step cost of every method on one backbone: trainable parameters, bytes saved for backward, peak
memory and images/s, with ratios to full fine-tuning and LoRA. Prints a table and writes JSON (--out).

    python benchmarks/train_step.py --device cpu --batch-size 4 --out bench.json
    python benchmarks/train_step.py --device cuda --precision bf16 --out bench_gpu_bf16.json   # GPU, bf16 backbone
    python benchmarks/train_step.py --device cuda --precision bf16 --backbone-dtype fp32 --out bench_gpu_amp.json

Pure torch + timm + dtl (no Ray/MLflow/DVC), so it runs as is on a bare GPU machine. What each figure means is
documented in ``dtl/benchmark.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from dtl.benchmark import PRECISIONS, ROWS, BenchmarkSettings, check_targets, format_table, run_benchmark  # noqa: E402
from dtl.io import write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32: no autocast; bf16/fp16: autocast (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--methods", default=",".join(ROWS),
                        help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--backbone-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="storage dtype of DTL's frozen backbone; auto = the autocast dtype (bf16/fp16 runs), "
                             "fp32 otherwise. fp32 with --precision bf16 is 'fp32 weights + AMP'")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--num-classes", type=int, default=100)
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
    settings = BenchmarkSettings(
        backbone=args.backbone, batch_size=args.batch_size, precision=args.precision, device=args.device,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), backbone_dtype=args.backbone_dtype,
        img_size=args.img_size, num_classes=args.num_classes, warmup=args.warmup, steps=args.steps,
        rounds=args.rounds, threads=args.threads, timing=not args.no_timing,
    )
    try:
        settings.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{settings.backbone}, batch {settings.batch_size}, precision {settings.precision}, "
          f"device {settings.device}, DTL backbone dtype {settings.dtl_backbone_dtype()}", flush=True)
    try:
        results = run_benchmark(settings, log=lambda line: print(line, flush=True))
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    first = results[0]
    print(f"\n{first['backbone']} | batch {first['batch_size']} | {first['precision']} | {first['device_name']} "
          f"({first['device']}, {first['threads']} threads) | torch {first['torch']} | {first['date']}")
    print(format_table(results))
    checks = check_targets(results)
    if checks:
        print("\ntargets (the project's memory and speed targets, set for ViT-B/16 at batch 32):")
        for check in checks:
            print(f"  [{'met' if check['met'] else 'NOT met'}] {check['target']}: {check['value']:.3f}")
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
