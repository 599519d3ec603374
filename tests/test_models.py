"""DTL's math, parameter counts, frozen weights and the memory property, checked against the spec."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import dtl
from dtl.methods import DTLModel

MICRO = "vit_micro_patch4_32"


def randomise_side_network(model: DTLModel, seed: int = 0) -> None:
    """Fresh CSN up-projections are zero (the model equals the backbone); give them values to test the math."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith("head"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def reference_dtl_forward(model: DTLModel, images: torch.Tensor) -> torch.Tensor:
    """docs/design.md section 1 written out literally for a ViT, independent of DTLModel's prefix/suffix split."""
    vit = model.family.backbone
    beta = model.side_activation.beta
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    h = torch.zeros_like(x)
    for i, block in enumerate(vit.blocks):
        if i >= model.extract_start:
            maps = model.side_maps[str(i)]
            h = h + x @ maps.down.weight.T @ maps.up.weight.T  # h_i includes block i's own input
        out = block(x)
        if i >= model.start_block:
            side = h * torch.sigmoid(beta * h)
            if model.kernel_size is not None:
                cls, patches = side[:, :1], side[:, 1:]
                grid_h, grid_w = vit.patch_embed.grid_size
                grid = patches.transpose(1, 2).reshape(side.shape[0], -1, grid_h, grid_w)
                conv = model.side_convs["0"].conv
                grid = nn.functional.conv2d(grid, conv.weight, padding="same", groups=grid.shape[1])
                side = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
            out = out + side
        x = out
    features = vit.norm(x[:, 1:].mean(dim=1))
    return model.head(features)


@pytest.mark.parametrize("method,expected", [("dtl", 36_864), ("dtl_plus", 43_776)])
def test_vit_b16_parameter_counts_match_the_paper(method, expected):
    model = dtl.create_model("vit_base_patch16_224", method, num_classes=100, rank=2, start_block=6)
    head = 768 * 100 + 100
    assert dtl.trainable_parameters(model) == expected + head
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")) == expected


def test_acceptance_parameter_count_dtl_plus_k3():
    model = dtl.create_model("vit_base_patch16_224", "dtl_plus", num_classes=100, rank=2, start_block=6, kernel_size=3)
    assert dtl.trainable_parameters(model) == 120_676


@pytest.mark.parametrize("method,expected", [("lora", 294_912), ("adaptformer", 156_768), ("linear", 0),
                                             ("full", 85_798_656)])
def test_baseline_parameter_counts(method, expected):
    # LoRA r=8 on qkv: 0.29M (paper table); AdaptFormer bottleneck 8: 0.16M; full: ViT-B/16 without head.
    model = dtl.create_model("vit_base_patch16_224", method, num_classes=100)
    assert dtl.trainable_parameters(model) - (768 * 100 + 100) == expected


def test_swin_b_dtl_plus_parameter_count():
    # Maps rank 4 on blocks 4..23 (18 blocks at 512, 2 at 1024) + one k=5 depthwise conv per stage with adds.
    model = dtl.create_model("swin_base_patch4_window7_224", "dtl_plus", num_classes=10)
    side = 18 * (512 * 4 * 2) + 2 * (1024 * 4 * 2) + 512 * 25 + 1024 * 25
    assert dtl.trainable_parameters(model) == side + 1024 * 10 + 10


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_dtl_at_init_equals_frozen_backbone_plus_head(method):
    torch.manual_seed(0)
    model = dtl.create_model(MICRO, method, num_classes=7).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.head(model.family.forward_features(images))
        # forward_features must itself be the timm backbone: patch-mean, then the pretrained final norm.
        vit = model.family.backbone
        tokens = vit.forward_features(images)  # ends with vit.norm per token
        assert torch.allclose(vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(
            vit.patch_embed(images)))))[:, 1:].mean(1)), model.family.forward_features(images))
        assert tokens.shape == (3, 65, 96)
        assert torch.equal(model(images), expected)


def test_swin_dtl_at_init_equals_frozen_backbone():
    torch.manual_seed(0)
    model = dtl.create_model("swin_tiny_patch4_window7_224", "dtl_plus", num_classes=5, start_block=6,
                             extract_start=4).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        swin = model.family.backbone
        features = swin.forward_head(swin.forward_features(images), pre_logits=True)
        assert torch.allclose(model(images), model.head(features), atol=1e-5)


@pytest.mark.parametrize("method,start_block", [("dtl", 6), ("dtl_plus", 6), ("dtl_plus", 0), ("dtl", 11)])
def test_dtl_forward_matches_the_written_out_math(method, start_block):
    torch.manual_seed(1)
    model = dtl.create_model(MICRO, method, num_classes=4, start_block=start_block, beta=7.0).eval()
    randomise_side_network(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, reference = model(images), reference_dtl_forward(model, images)
        plain = model.head(model.family.forward_features(images))
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the side network really changes the output


def test_no_gradient_reaches_frozen_weights():
    torch.manual_seed(0)
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    randomise_side_network(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, param in model.named_parameters():
        if name.startswith("family."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_side_maps_train_from_zero_up_projection():
    # At init the up-projections are zero: they get gradients, the down-projections none yet (as in LoRA).
    model = dtl.create_model(MICRO, "dtl", num_classes=4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(m.up.weight.grad.abs().sum() > 0 for m in model.side_maps.values())


def saved_bytes(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(bytes saved for backward, number of saved tensors), not counting frozen weights saved by reference."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total, count = 0, 0

    def pack(tensor):
        nonlocal total, count
        if tensor.untyped_storage().data_ptr() not in storages:
            total += tensor.numel() * tensor.element_size()
            count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum().backward()
    return total, count


def test_frozen_prefix_keeps_no_activations_for_backward():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    model = dtl.create_model(MICRO, "dtl", num_classes=4, start_block=6)
    state = model.forward_prefix(images)
    assert not state.block_output.requires_grad and all(not t.requires_grad for t in state.side_inputs)

    # Saved bytes fall as M moves later: only blocks after M keep activations.
    per_m = {m: saved_bytes(dtl.create_model(MICRO, "dtl", num_classes=4, start_block=m), images)[0]
             for m in (2, 6, 10)}
    assert per_m[2] > per_m[6] > per_m[10]
    full = saved_bytes(dtl.create_model(MICRO, "full", num_classes=4), images)[0]
    assert per_m[6] < 0.6 * full


def test_grad_checkpointing_gives_the_same_gradients_with_fewer_saved_bytes():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    plain = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    randomise_side_network(plain)
    ckpt = dtl.create_model(MICRO, "dtl_plus", num_classes=4, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    plain(images).sum().backward()
    ckpt(images).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert saved_bytes(ckpt, images)[0] < 0.5 * saved_bytes(plain, images)[0]


@pytest.mark.parametrize("backbone, start_block", [(MICRO, 6), ("swin_tiny_patch4_window7_224", 5)])
def test_suffix_drop_path_scope_changes_nothing_in_blocks_up_to_m(backbone, start_block):
    def drop_rates(model):
        return [max((getattr(m, "drop_prob", 0.0) for m in block.modules()), default=0.0)
                for block in model.family.blocks]

    kwargs = dict(num_classes=3, drop_path_rate=0.2, start_block=start_block)
    torch.manual_seed(0)
    everywhere = dtl.create_model(backbone, "dtl", **kwargs)
    torch.manual_seed(0)
    suffix = dtl.create_model(backbone, "dtl", drop_path_scope="suffix", **kwargs)
    rates, expected = drop_rates(suffix), drop_rates(everywhere)
    assert all(rate > 0 for rate in expected[1:])  # timm's rule: 0 at block 0, rising to 0.2 at the last
    assert rates[:start_block + 1] == [0.0] * (start_block + 1)  # blocks 0..M: none
    assert rates[start_block + 1:] == expected[start_block + 1:]  # blocks after M: timm's rates, unchanged
    assert suffix.prefix_is_deterministic and not everywhere.prefix_is_deterministic

    size = suffix.family.backbone.patch_embed.img_size[0]
    images = torch.randn(2, 3, size, size)
    suffix.train()
    first, again = suffix.forward_prefix(images), suffix.forward_prefix(images)
    with torch.no_grad():
        suffix.eval()
        reference = suffix.forward_prefix(images)
    for a, b, c in zip((*first.side_inputs, first.block_output), (*again.side_inputs, again.block_output),
                       (*reference.side_inputs, reference.block_output)):
        assert torch.equal(a, b) and torch.equal(a, c)  # the prefix trains exactly as it is cached
    # a scope of "suffix" is the same for LoRA (every block is trained through) and means none for the probe
    for method, kept in (("lora", True), ("linear", False)):
        if backbone == MICRO:
            torch.manual_seed(0)
            model = dtl.create_model(backbone, method, num_classes=3, drop_path_rate=0.2, drop_path_scope="suffix")
            assert drop_rates(model) == (expected if kept else [0.0] * len(expected)), method
    with pytest.raises(ValueError, match="drop_path_scope must be one of all, suffix"):
        dtl.create_model(MICRO, "dtl", num_classes=3, drop_path_scope="prefix")


def test_lora_and_adaptformer_start_equal_to_the_backbone_and_train_only_their_parameters():
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)  # the same seed gives the same random backbone
    linear = dtl.create_model(MICRO, "linear", num_classes=3).eval()
    for method in ("lora", "adaptformer"):
        torch.manual_seed(0)
        model = dtl.create_model(MICRO, method, num_classes=3).eval()
        model.head.load_state_dict(linear.head.state_dict())
        with torch.no_grad():
            assert torch.allclose(model(images), linear(images), atol=1e-5), method
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        marker = "lora_" if method == "lora" else "adapter_"
        assert names and all(marker in n or n.startswith("head.") for n in names), method


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'prompt'"):
        dtl.create_model(MICRO, "prompt", num_classes=3)
    with pytest.raises(TypeError, match="does not take option.*kernel_size"):
        dtl.create_model(MICRO, "dtl", num_classes=3, kernel_size=3)
    with pytest.raises(ValueError, match="start_block must be in 0..11"):
        dtl.create_model(MICRO, "dtl", num_classes=3, start_block=12)
    with pytest.raises(ValueError, match="unknown backbone 'vit_nonexistent'"):
        dtl.create_model("vit_nonexistent", "dtl", num_classes=3)
    with pytest.raises(ValueError, match="use extract_start >= 4"):
        dtl.create_model("swin_tiny_patch4_window7_224", "dtl", num_classes=3, start_block=6, extract_start=0)
    with pytest.raises(ValueError, match="ViT, Eva, BEiT backbones only"):
        dtl.create_model("swin_tiny_patch4_window7_224", "lora", num_classes=3)
    assert {"dtl", "dtl_plus", "linear", "full", "lora", "adaptformer"} <= set(dtl.available_methods())


def test_import_dtl_pulls_in_no_orchestration_library():
    code = ("import sys, dtl, dtl.config, dtl.experiment, dtl.engine, dtl.presets, dtl.io\n"
            "bad = [m for m in ('ray', 'optuna', 'mlflow', 'dvc') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
