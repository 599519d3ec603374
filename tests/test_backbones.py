"""The transformers researchers fine-tune now, on DTL's guarantees: timm's Eva class (EVA-02, DINOv3, Perception
Encoder, the RoPE ViTs), BEiT, and the ViTs with registers (DINOv2), a pre-norm (CLIP) or an attention-pool head
(SigLIP). Random weights at small image sizes: what is checked does not depend on what was learnt."""
from __future__ import annotations

import pytest
import torch

import dtl
from conftest import randomised
from dtl import cache
from dtl.benchmark import saved_bytes_breakdown
from dtl.cache import prepare_prefix_cache
from dtl.models import BeitFamily, CheckpointError, EvaFamily, VitFamily, create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

# (timm name, image size, family, prefix tokens): every family and feature the toolkit claims, smallest first
SMALL = [
    ("eva02_tiny_patch14_224", 28, EvaFamily, 1),  # EVA-02: rotary embedding, SwiGLU, separate q/k/v, fc_norm
    ("vit_small_patch16_dinov3", 32, EvaFamily, 5),  # DINOv3: rotary embedding, 4 registers, layer scale
    ("vit_pe_core_tiny_patch16_384", 32, EvaFamily, 1),  # Perception Encoder: attention-pool head replaced
    ("vit_small_patch14_reg4_dinov2", 28, VitFamily, 5),  # DINOv2: 4 registers
]
BASE = [
    ("vit_base_patch16_rope_mixed_224", 32, EvaFamily, 1),  # a rotary embedding per block (learnt frequencies)
    ("beit_base_patch16_224", 32, BeitFamily, 1),  # relative position bias per block, fc_norm
    ("vit_base_patch16_clip_224", 32, VitFamily, 1),  # CLIP: pre-norm
    ("vit_base_patch16_siglip_224", 32, VitFamily, 0),  # SigLIP: no class token, attention-pool head replaced
]
ALL = SMALL + BASE


def model_for(backbone: str, size: int, method: str = "dtl_plus", seed: int = 0, **options):
    torch.manual_seed(seed)
    return dtl.create_model(backbone, method, num_classes=5, img_size=size, **options)


def images(size: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone, size, family, prefix", ALL)
def test_the_family_runs_the_backbone_as_timm_does_and_pools_the_patch_tokens(backbone, size, family, prefix):
    model = model_for(backbone, size, "dtl").eval()
    assert isinstance(model.family, family) and model.family.num_prefix_tokens == prefix
    assert getattr(model.family.backbone, "attn_pool", None) is None  # SigLIP's and PE's: DTL's head instead
    x = images(size)
    with torch.no_grad():
        ours = model.family.embed(x)
        for block in range(len(model.family.blocks)):
            ours = model.family.run_block(block, ours)
        # timm's own forward_features ends with its final token norm (an identity where it norms after pooling)
        torch.testing.assert_close(model.family.backbone.norm(ours), model.family.backbone.forward_features(x))
        # DTL's head: the mean of the patch tokens (registers and class token left out), then the pretrained norm
        expected = model.family.final_norm(ours[:, prefix:].mean(dim=1))
        torch.testing.assert_close(model.family.forward_features(x), expected)


@pytest.mark.parametrize("backbone, size, family, prefix", ALL)
@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_an_untrained_model_equals_the_frozen_backbone_plus_head(backbone, size, family, prefix, method):
    model = model_for(backbone, size, method).train()
    x = images(size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.family.forward_features(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone, size, family, prefix", SMALL + [pytest.param(*b, marks=pytest.mark.slow)
                                                                   for b in BASE])
def test_only_the_side_network_and_head_learn_and_blocks_up_to_m_keep_nothing(backbone, size, family, prefix):
    model = randomised(model_for(backbone, size, "dtl_plus"))
    x = images(size)
    kept = saved_bytes_breakdown(model, lambda: model(x))
    assert all(sum(kept.get(str(b), {}).values()) == 0 for b in range(model.start_block + 1))
    assert all(sum(kept[str(b)].values()) > 0 for b in range(model.start_block + 1, len(model.family.blocks)))
    model(x).logsumexp(dim=1).sum().backward()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {
        "side_maps", "side_convs", "head"}
    assert all(p.grad is None for p in model.family.parameters())


class Images(torch.utils.data.TensorDataset):
    def cache_fingerprint(self) -> str:  # what the disk cache keys a dataset by
        return "backbone-test-images"


@pytest.mark.parametrize("backbone, size, family, prefix", SMALL[:3] + [BASE[1]])
def test_one_prefix_cache_serves_two_start_blocks_exactly(tmp_path, backbone, size, family, prefix):
    x, labels = images(size, 6), torch.tensor([0, 1, 2, 3, 4, 0])
    data = Images(x, labels)
    cache.clear_memory_cache()
    reports = {}
    for start_block in (3, 8):
        model = randomised(model_for(backbone, size, "dtl_plus", start_block=start_block))
        reference = model(x)
        torch.nn.functional.cross_entropy(reference, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        features, reports[start_block] = prepare_prefix_cache(model, data, mode="disk", cache_dir=tmp_path)
        cache.clear_memory_cache()
        inputs, _ = features.batch(torch.arange(len(data)))
        logits = model(inputs)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        for name, grad in grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                       msg=name)
    assert reports[3].source == "built" and reports[8].source == "disk" and reports[3].path == reports[8].path


@pytest.mark.parametrize("backbone, size", [("eva02_tiny_patch14_224", 28), ("vit_small_patch16_dinov3", 32),
                                            pytest.param("beit_base_patch16_224", 32, marks=pytest.mark.slow)])
def test_lora_wraps_every_attention_projection_and_the_block_rewriting_methods_are_refused(backbone, size):
    model = model_for(backbone, size, "lora").eval()
    plain = model_for(backbone, size, "linear").eval()
    x = images(size)
    with torch.no_grad():  # LoRA's up-projection starts at zero: the backbone's features, exactly
        torch.testing.assert_close(model.features(x), plain.features(x))
    lora = {n.rsplit(".", 2)[0] for n, p in model.named_parameters() if "lora_" in n}
    separate = hasattr(model.family.blocks[0].attn, "q_proj") and model.family.blocks[0].attn.q_proj is not None
    assert len(lora) == len(model.family.blocks) * (3 if separate else 1)  # EVA-02: q, k and v apart
    model.train()(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    for method, needs in (("adaptformer", "MLP branch"), ("vpt", "token sequence")):
        with pytest.raises(ValueError) as error:
            model_for(backbone, size, method)
        assert "\n" not in str(error.value) and needs in str(error.value)


def test_a_backbone_is_built_with_the_keywords_its_class_takes():
    # A RoPE ViT is timm's Eva: ViT-only keywords (global_pool='', fc_norm) must not reach it
    assert isinstance(dtl.create_model("vit_small_patch16_rope_224", "dtl", 3, img_size=32).family, EvaFamily)
    # a setting a model's class cannot take is one line naming both, never a TypeError from inside timm
    with pytest.raises(ValueError) as error:
        create_backbone("vgg11", drop_path_rate=0.1)
    assert str(error.value) == "backbone 'vgg11' (VGG) takes no drop_path_rate: set model.drop_path: 0"


@pytest.mark.parametrize("backbone, size, suffix", [("eva02_tiny_patch14_224", 28, ".safetensors"),
                                                    pytest.param("beit_base_patch16_224", 32, ".pth",
                                                                 marks=pytest.mark.slow)])
def test_a_local_checkpoint_of_the_family_loads_and_a_foreign_one_is_one_line(tmp_path, backbone, size, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = create_backbone(backbone, img_size=size)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = dtl.create_model(backbone, "dtl_plus", 5, pretrained=str(path), img_size=size)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.family.backbone.state_dict()[name], tensor, msg=name)
    foreign = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("vit_small_patch16_dinov3", img_size=32).state_dict()
               .items()}, str(foreign))
    with pytest.raises(CheckpointError) as error:
        dtl.create_model(backbone, "dtl_plus", 5, pretrained=str(foreign), img_size=size)
    message = str(error.value)
    assert "\n" not in message and "weights missing (e.g." in message and "unexpected weights (e.g." in message
