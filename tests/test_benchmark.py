"""Measuring saved-for-backward bytes, the lean DTL forward (what it keeps), checkpointing, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

import dtl
from conftest import randomised
from dtl.benchmark import BenchmarkSettings, check_targets, format_table, run_benchmark, saved_tensor_bytes

MICRO = "vit_micro_patch4_32"
pytestmark = pytest.mark.usefixtures("one_thread")


def saved(model: nn.Module, inputs) -> int:
    return saved_tensor_bytes(model, lambda: model(inputs))


# --- the measurement itself ---------------------------------------------------------------------------------------
def test_weights_saved_by_reference_are_not_counted():
    frozen = nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    assert saved(frozen, x) == 0  # only the weight is kept (for the input gradient): no extra memory
    trainable = nn.Linear(64, 64)
    assert saved(trainable, x) == 8 * 64 * 4  # the input, for the weight gradient
    assert saved(trainable, torch.randn(8, 64)) == 8 * 64 * 4


def test_a_storage_saved_twice_counts_once():
    x = torch.randn(1000, requires_grad=True)
    assert saved_tensor_bytes(nn.Module(), lambda: (x.sin() + x.cos()).sum()) == 1000 * 4


def test_counting_a_forward_frees_its_graph():
    """A counted forward that is never backpropagated must not keep its activations alive (the memory breakdown
    counts nine models in one process)."""
    import gc
    import weakref

    model = dtl.create_model(MICRO, "full", num_classes=10, pretrained=False)
    kept = []
    model.family.backbone.blocks[0].mlp.act.register_forward_hook(lambda m, a, out: kept.append(weakref.ref(out)))
    assert saved(model, torch.randn(4, 3, 32, 32)) > 0
    gc.collect()
    assert kept and kept[0]() is None  # the GELU output fc2 saved is gone with the graph


def test_frozen_vit_block_keeps_no_linear_inputs():
    """What a frozen block after M keeps: its input, q/k/v, the attention output, the MLP residual input and the
    GELU input (10 token tensors), and none of the inputs of its four linear layers (4 more + LN outputs)."""
    torch.manual_seed(0)
    block = Block(dim=96, num_heads=3).requires_grad_(False)
    x = torch.randn(4, 65, 96, requires_grad=True)
    unit = 4 * 65 * 96 * 4
    kept = saved(block, x) / unit
    assert 10.0 <= kept < 10.5, kept  # + LayerNorm statistics and the attention's log-sum-exp
    assert block.attn.fused_attn  # torch SDPA, not an explicit (T x T) attention matrix
    trainable = Block(dim=96, num_heads=3)
    assert saved(trainable, x) / unit > 16  # the same block with trainable weights keeps the linear inputs too


def test_saved_bytes_order_dtl_plus_below_lora_below_full():
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    figures = {method: saved(dtl.create_model(MICRO, method, 10).train(), images)
               for method in ("full", "lora", "dtl", "dtl_plus")}
    checkpointed = saved(dtl.create_model(MICRO, "dtl_plus", 10, grad_checkpointing=True).train(), images)
    assert checkpointed < figures["dtl_plus"] < figures["lora"] < figures["full"]
    # The ratios hold at this size too (they are set for ViT-B/16 at batch 32).
    assert figures["dtl_plus"] <= 0.35 * figures["full"] and figures["dtl_plus"] <= 0.45 * figures["lora"]
    assert checkpointed <= 0.05 * figures["full"]
    # The side state h is recomputed from the rank-r codes: DTL+'s conv keeps nothing extra over DTL.
    assert figures["dtl_plus"] == figures["dtl"]


def test_bf16_backbone_halves_what_dtl_keeps():
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    fp32 = saved(dtl.create_model(MICRO, "dtl_plus", 10).train(), images)
    low = dtl.create_model(MICRO, "dtl_plus", 10, backbone_dtype="bf16").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = saved(low, images)
    assert bf16 <= 0.55 * fp32


# --- checkpointing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [True, "mlp"])
@pytest.mark.parametrize("backbone_dtype,autocast,drop_path", [(None, False, 0.0), (None, False, 0.1),
                                                               (None, True, 0.0), ("bf16", True, 0.0)])
def test_checkpointing_gives_the_plain_gradients(checkpointing, backbone_dtype, autocast, drop_path):
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    results = []
    for mode in (False, checkpointing):
        torch.manual_seed(0)
        model = dtl.create_model(MICRO, "dtl_plus", 5, drop_path_rate=drop_path, backbone_dtype=backbone_dtype,
                                 grad_checkpointing=mode)
        randomised(model)
        torch.manual_seed(1)  # the same drop-path draws in both runs; checkpointing replays them in backward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kept = saved(model, images)
            torch.manual_seed(1)
            logits = model(images)
        nn.functional.cross_entropy(logits.float(), labels).backward()
        results.append((kept, logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_kept, plain_logits, plain), (kept, ckpt_logits, ckpt) = results
    assert kept < (0.2 if checkpointing is True else 0.7) * plain_kept
    assert torch.equal(plain_logits, ckpt_logits)
    assert set(plain) == set(ckpt) and all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unknown_checkpointing_mode_is_an_error():
    with pytest.raises(ValueError, match="model.grad_checkpointing: expected false, true or \"mlp\", got 'all'"):
        dtl.create_model(MICRO, "dtl", 5, grad_checkpointing="all")


def test_checkpointing_is_off_in_evaluation():
    model = dtl.create_model(MICRO, "dtl_plus", 5, grad_checkpointing=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        evaluated = model(images)
    model.grad_checkpointing = False
    with torch.no_grad():
        assert torch.equal(model(images), evaluated)


# --- the harness and its CLI ------------------------------------------------------------------------------------
def test_run_benchmark_reports_every_figure_and_ratio():
    settings = BenchmarkSettings(backbone=MICRO, batch_size=2, device="cpu", warmup=0, steps=1, rounds=1,
                                 methods=("full", "lora", "dtl_plus", "dtl_plus_ckpt", "dtl_plus_cached"))
    results = run_benchmark(settings, log=lambda line: None)
    by_name = {r["method"]: r for r in results}
    assert list(by_name) == list(settings.methods)
    for result in results:
        for key in ("trainable_params", "saved_bytes", "peak_bytes", "images_per_s", "backbone", "batch_size",
                    "precision", "device", "saved_bytes_vs_full", "images_per_s_vs_lora"):
            assert result[key] is not None, (result["method"], key)
        assert result["peak_kind"] == "cpu_estimate" and result["peak_bytes"] > result["saved_bytes"]
    assert by_name["full"]["saved_bytes_vs_full"] == 1.0 and by_name["lora"]["images_per_s_vs_lora"] == 1.0
    assert by_name["dtl_plus_cached"]["prefix_s_per_batch"] > 0
    assert by_name["dtl_plus"]["trainable_params"] == by_name["dtl_plus_cached"]["trainable_params"]
    assert by_name["full"]["trainable_params"] > 1_000_000
    names = [check["target"] for check in check_targets(results)]
    assert "dtl_plus saved_bytes <= 0.45x lora" in names and len(names) == 11  # CPU: + CPU-time ratios, no peaks
    assert all(r["images_per_cpu_s"] > 0 for r in results)
    table = format_table(results)
    assert table.splitlines()[0].startswith("method") and "dtl_plus_cached" in table


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "bench.json"
    code = cli.main(["--device", "cpu", "--backbone", MICRO, "--batch-size", "2", "--methods", "full,lora,dtl_plus",
                     "--warmup", "0", "--steps", "1", "--rounds", "1", "--precision", "bf16", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "saved MiB" in printed and "dtl_plus" in printed
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["full", "lora", "dtl_plus"]
    assert {r["backbone_dtype"] for r in results} == {"fp32", "bf16"}  # DTL's backbone follows bf16 (auto)
    assert all(r["precision"] == "bf16" and r["batch_size"] == 2 for r in results)

    assert cli.main(["--methods", "full,nope", "--device", "cpu"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert cli.main(["--precision", "fp16", "--device", "cpu", "--backbone", MICRO, "--methods", "full"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


# --- the memory breakdown -------------------------------------------------------------------------------------------
def test_the_memory_breakdown_sums_to_the_train_step_benchmarks_saved_bytes():
    """benchmarks/memory_breakdown.py: each method's bytes by block and kind add up to train_step.py's saved bytes,
    and DTL's blocks 0..M keep nothing."""
    import subprocess
    import sys
    from pathlib import Path

    methods = list(dtl.available_methods())
    reference = {r["method"]: r["saved_bytes"] for r in run_benchmark(BenchmarkSettings(
        backbone=MICRO, batch_size=2, methods=tuple(methods), device="cpu", timing=False), log=lambda line: None)}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_breakdown.py"
    out = Path(__import__("tempfile").mkdtemp()) / "breakdown.json"
    subprocess.run([sys.executable, str(script), "--backbone", MICRO, "--batch-size", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    results = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(methods)
    for method, result in results.items():
        by_block = sum(sum(kinds.values()) for kinds in result["by_block"].values())
        assert by_block == sum(result["by_kind"].values()) == result["saved_bytes"] == reference[method], method
    for method in ("dtl", "dtl_plus"):
        start = results[method]["start_block"]
        kept = {int(b): sum(k.values()) for b, k in results[method]["by_block"].items() if b.isdigit()}
        assert all(kept.get(b, 0) == 0 for b in range(start + 1)) and all(kept[b] > 0 for b in range(start + 1, 12))
        assert results[method]["by_kind"]["side network"] > 0
    assert results["full"]["by_kind"]["side network"] == 0 and results["adaptformer"]["by_kind"]["adapter"] > 0
    assert results["linear"]["saved_bytes"] == results["linear"]["by_kind"]["head"]
