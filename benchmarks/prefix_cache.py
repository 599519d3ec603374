#!/usr/bin/env python
"""End-to-end effect of DTL's prefix feature cache on a VTAB-style run: 1000 images x 100 epochs, batch 32.

Trains the same DTL+ model three ways through the real engine (``dtl.engine.train_and_evaluate``) and times
each run from start to finish (cache build or load included, evaluation excluded):

* ``off``: every epoch runs the whole backbone on the images;
* ``cold``: the first run with the cache: computes the prefix once, writes it to disk, trains from it;
* ``warm``: a later run (another seed or sweep trial): reads the prefix from disk, trains from it.

On a CPU the process's CPU time is reported next to the wall time: on a shared machine it is what the run
costs on a core of its own (with ``--threads 1``), and runs in separate processes can then overlap.

    python benchmarks/prefix_cache.py --threads 1 --out prefix_cache_cpu.json                 # embedded, CPU
    python benchmarks/prefix_cache.py --backbone vit_base_patch16_224 --img-size 224 \\
        --device cuda --precision bf16 --out prefix_cache_gpu.json                           # ViT-B/16, GPU

The images are the synthetic ``digits`` task (1000 = train800val200) generated into a temporary folder and
read through ``VTabDataset`` as ``dtl.experiment.run_task`` does (resized to ``--img-size``). Pure torch + timm
+ dtl. Random backbone weights (the cost does not depend on them).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import torch  # noqa: E402

import dtl  # noqa: E402
from dtl import cache  # noqa: E402
from dtl.config import TrainConfig  # noqa: E402
from dtl.devices import SetupError, resolve_device  # noqa: E402
from dtl.engine import train_and_evaluate  # noqa: E402
from dtl.io import write_json  # noqa: E402

RUNS = ("off", "cold", "warm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=dtl.EMBEDDED_BACKBONE)
    parser.add_argument("--method", default="dtl_plus", choices=("dtl", "dtl_plus"))
    parser.add_argument("--img-size", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--backbone-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--task", default="digits", help="synthetic task to generate (1000 training images)")
    parser.add_argument("--workdir", type=Path, default=None, help="data and cache folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        print(f"error: --runs must be a subset of {', '.join(RUNS)}, got {args.runs!r}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, key="--device")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from dtl.data import VTabDataset, generate_synthetic_suite

    with tempfile.TemporaryDirectory(prefix="dtl-prefix-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        generate_synthetic_suite(workdir / "data", tasks=[args.task], num_test=100)
        probe = dtl.create_model(args.backbone, args.method, 10)
        img_size = args.img_size or int(probe.family.backbone.patch_embed.img_size[0])
        del probe
        data = VTabDataset(workdir / "data", args.task, "train800val200", img_size=img_size, preload=True)
        results = []
        for run in runs:
            cache.clear_memory_cache()  # every run starts like a new process
            torch.manual_seed(0)
            model = dtl.create_model(args.backbone, args.method, data.num_classes, img_size=args.img_size,
                                     backbone_dtype=None if args.backbone_dtype == "fp32" else args.backbone_dtype)
            config = TrainConfig(epochs=args.epochs, warmup_epochs=min(10, args.epochs - 1), cooldown_epochs=0,
                                 batch_size=args.batch_size, precision=args.precision, device=args.device,
                                 lr=1e-3, progress=False, prefix_cache="off" if run == "off" else "disk",
                                 prefix_cache_dir=str(workdir / "cache"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            result = train_and_evaluate(model, data, {}, config)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            report = result.cache_report
            row = {
                "run": run, "wall_s": wall, "cpu_s": cpu if device.type == "cpu" else None, "train_s": result.train_time_s, "images_per_s": result.images_per_s,
                "cache_source": report.get("source") or None, "cache_bytes": report.get("bytes", 0),
                "cache_file_bytes": Path(report["path"]).stat().st_size if report.get("path") else 0,
                "cache_dtype": report.get("dtype") or None, "cache_s": report.get("build_s", 0.0),
                "final_train_loss": result.metrics["train/loss"],
                "gpu_peak_allocated_bytes": result.gpu_peak_allocated_bytes,
                "gpu_peak_reserved_bytes": result.gpu_peak_reserved_bytes, "gpu_cache_bytes": result.gpu_cache_bytes,
                "backbone": args.backbone, "method": args.method, "img_size": img_size, "epochs": args.epochs,
                "batch_size": args.batch_size, "num_images": len(data), "precision": result.precision,
                "backbone_dtype": args.backbone_dtype, "device": result.device, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
            results.append(row)
            print(f"{run:>4}: {wall:8.1f} s end to end, {cpu:8.1f} s CPU ({row['cache_s']:.1f} s cache, {result.train_time_s:.1f} s "
                  f"training at {result.images_per_s:.0f} img/s), final train loss {row['final_train_loss']:.4f}",
                  flush=True)

    base = next((r for r in results if r["run"] == "off"), None)
    print(f"\n{args.backbone} {args.method}, {len(data)} images x {args.epochs} epochs, batch {args.batch_size}, "
          f"{results[0]['precision']}, {results[0]['device']}")
    gpu = results[0]["gpu_peak_allocated_bytes"] is not None
    print(f"{'run':>4}  {'wall s':>8}  {'speed-up':>8}  {'CPU s':>8}  {'speed-up':>8}  {'cache MiB':>9}  "
          f"{'cache s':>7}  {'train img/s':>11}" + (f"  {'GPU peak MiB':>12}  {'on GPU MiB':>10}" if gpu else ""))
    for row in results:
        row["speedup_vs_off"] = base["wall_s"] / row["wall_s"] if base else None
        row["cpu_speedup_vs_off"] = base["cpu_s"] / row["cpu_s"] if base and row["cpu_s"] else None
        cells = [f"{value:.2f}x" if value else "-" for value in (row["speedup_vs_off"], row["cpu_speedup_vs_off"])]
        # on a GPU: the training peak (the cache kept on the GPU left out) and the cache's bytes there
        memory = (f"  {row['gpu_peak_allocated_bytes'] / 2**20:12.0f}  {row['gpu_cache_bytes'] / 2**20:10.0f}"
                  if gpu else "")
        print(f"{row['run']:>4}  {row['wall_s']:8.1f}  {cells[0]:>8}  {row['cpu_s'] or 0:8.1f}  {cells[1]:>8}  "
              f"{row['cache_bytes'] / 2**20:9.1f}  {row['cache_s']:7.1f}  {row['images_per_s']:11.0f}{memory}")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
