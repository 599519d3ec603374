"""Loading local checkpoints in every supported format, and the errors for missing or mismatched files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dtl
from dtl.models import CheckpointError, create_backbone

MICRO = "vit_micro_patch4_32"


def export_original_vit_npz(model, path) -> None:
    """Write a timm ViT in the layout of the original ``ViT-B_16.npz`` release (the inverse of timm's loader)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[mha + f"{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
            out[mha + f"{name}/bias"] = bias.reshape(heads, dim // heads)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(123)
    return create_backbone(MICRO).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped", "npz"])
def test_local_checkpoint_round_trips(tmp_path, source, fmt):
    if fmt == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    elif fmt == "pth":
        path = tmp_path / "vit.pth"
        # a classification checkpoint: its 1000-class head must be dropped, not loaded into our new head
        torch.save({**source.state_dict(), "head.weight": torch.zeros(1000, 96), "head.bias": torch.zeros(1000)}, path)
    elif fmt == "pth_wrapped":
        path = tmp_path / "vit.pt"
        torch.save({"model": source.state_dict(), "epoch": 3}, path)
    else:
        path = tmp_path / "ViT-micro.npz"
        export_original_vit_npz(source, path)
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=5, pretrained=str(path))
    loaded = model.family.backbone.state_dict()
    for key, value in source.state_dict().items():
        assert torch.allclose(loaded[key], value, atol=1e-6), key
    assert model.head.out_features == 5


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=str(tmp_path / "nope.pth"))


def test_unsupported_checkpoint_type(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type '.h5'"):
        dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=str(path))


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    other = create_backbone("vit_tiny_patch16_224", img_size=32)  # width 192, patch 16
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="does not fit VisionTransformer.*shape mismatches"):
        dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=str(path))


def test_checkpoint_with_missing_weights_is_refused(tmp_path, source):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match="weights missing .*blocks.11"):
        dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=str(path))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not read checkpoint .*broken.pth"):
        dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=str(path))


def test_offline_hub_gives_advice(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="pass its path instead"):
        dtl.create_model("vit_tiny_patch16_224", "dtl", num_classes=3, pretrained=True, img_size=32)
