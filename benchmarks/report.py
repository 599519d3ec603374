#!/usr/bin/env python
"""Render benchmark JSON (from train_step.py or prefix_cache.py) as the Markdown tables of BENCHMARKS.md.

    python benchmarks/report.py benchmarks/results/train_step_vitb16_b4_fp32_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 2**20


def _ratio(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if value else "-"


def train_step_table(results: list[dict]) -> str:
    cpu = any(r.get("images_per_cpu_s") for r in results)
    timed = any(r.get("images_per_s") for r in results)
    reserved = any(r.get("peak_reserved_bytes") is not None for r in results)
    header = ["method", "trainable", "saved MiB", "x full", "x LoRA", f"peak MiB ({_peak_kind(results)})", "x full",
              "x LoRA"]
    if reserved:
        header += ["reserved MiB", "x full"]
    if timed:
        header += ["img/s (wall)", "x full", "x LoRA"]
    if cpu:
        header += ["img/s (CPU time)", "x full", "x LoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [f"`{r['method']}`", f"{r['trainable_params']:,}", f"{r['saved_bytes'] / MIB:.1f}",
                 _ratio(r.get("saved_bytes_vs_full")), _ratio(r.get("saved_bytes_vs_lora")),
                 f"{r['peak_bytes'] / MIB:.0f}", _ratio(r.get("peak_bytes_vs_full")), _ratio(r.get("peak_bytes_vs_lora"))]
        if reserved:
            cells += [f"{r['peak_reserved_bytes'] / MIB:.0f}", _ratio(r.get("peak_reserved_bytes_vs_full"))]
        if timed:
            cells += [_number(r.get("images_per_s")), _ratio(r.get("images_per_s_vs_full")),
                      _ratio(r.get("images_per_s_vs_lora"))]
        if cpu:
            cells += [_number(r.get("images_per_cpu_s")), _ratio(r.get("images_per_cpu_s_vs_full")),
                      _ratio(r.get("images_per_cpu_s_vs_lora"))]
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0]
    lines.append("")
    protocol = f" (protocol {first['protocol']})" if first.get("protocol") else ""
    lines.append(f"{first['backbone']}, {first['img_size']} px, batch {first['batch_size']}, {first['precision']}{protocol}, "
                 f"DTL backbone {first['dtl_backbone_dtype']}; {first['device_name']} ({first['device']}, "
                 f"{first['threads']} thread(s)); torch {first['torch']}, timm {first['timm']}; {first['date']}")
    return "\n".join(lines)


def _peak_kind(results: list[dict]) -> str:
    return "CUDA max allocated" if results[0]["peak_kind"] == "cuda_max_allocated" else "CPU estimate"


def prefix_cache_table(results: list[dict]) -> str:
    gpu = any(r.get("gpu_peak_allocated_bytes") is not None for r in results)
    header = ["run", "wall s", "CPU s", "cache MiB", "cache s", "training img/s", "final train loss"]
    if gpu:
        header += ["GPU peak allocated MiB (training)", "GPU cache MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["run"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}" if r.get("cpu_s") else "-",
                 f"{r['cache_bytes'] / MIB:.1f}", f"{r['cache_s']:.2f}", f"{r['images_per_s']:.0f}",
                 f"{r['final_train_loss']:.4f}"]
        if gpu:
            cells += [f"{r['gpu_peak_allocated_bytes'] / MIB:.0f}", f"{(r.get('gpu_cache_bytes') or 0) / MIB:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0]
    lines.append("")
    lines.append(f"{first['backbone']} {first['method']}, {first['num_images']} images x {first['epochs']} epochs, "
                 f"batch {first['batch_size']}, {first['precision']}, {first['device']}, {first['threads']} thread(s); "
                 f"torch {first['torch']}; {first['date']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        results = json.loads(path.read_text())
        if not isinstance(results, list) or not results:
            print(f"error: {path}: expected a non-empty JSON list of results", file=sys.stderr)
            return 2
        table = prefix_cache_table(results) if "run" in results[0] else train_step_table(results)
        print(f"<!-- {path} -->\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
