"""The method registry: one contract every registered method keeps, and the three baselines added through it."""
from __future__ import annotations

import warnings

import pytest
import torch

import dtl
from dtl.io import load_trainable, save_trainable
from dtl.methods import available_methods, get_method
from dtl.models import create_backbone, family_for

MICRO = "vit_micro_patch4_32"
VIT_B_HEAD = 768 * 100 + 100
pytestmark = pytest.mark.usefixtures("one_thread")


def trainable_without_head(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))


@pytest.mark.parametrize("backbone, size", [(MICRO, 32), ("resnet18", 64), ("convnext_atto", 64),
                                            ("eva02_tiny_patch14_224", 28), ("vit_small_patch14_reg4_dinov2", 28)])
@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_keeps_the_contract(tmp_path, method, backbone, size):
    spec = get_method(method)
    if not spec.supports(family_for(create_backbone(backbone, img_size=size))):  # e.g. LoRA on a CNN: one line
        with pytest.raises(ValueError, match=f"method '{method}' is implemented for ViT(, [A-Za-z]+)* backbones only"
                           ) as error:
            dtl.create_model(backbone, method, num_classes=5, img_size=size)
        assert "\n" not in str(error.value)
        return
    torch.manual_seed(0)
    model = dtl.create_model(backbone, method, num_classes=5, img_size=size)
    frozen = {n: p.detach().clone() for n, p in model.family.named_parameters() if not p.requires_grad}
    assert model.head.out_features == 5 and model.head.weight.requires_grad  # every method keeps model.head
    images, labels = torch.randn(3, 3, size, size), torch.tensor([0, 1, 4])
    logits = model.train()(images)
    assert logits.shape == (3, 5)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad or not param.requires_grad, name
        if not param.requires_grad:
            assert param.grad is None, f"{method}: frozen {name} got a gradient"
    expected = {"linear": 0, "full": sum(p.numel() for p in model.family.parameters())}.get(method)
    count = trainable_without_head(model)
    assert count == expected if expected is not None else count > 0
    # the saved trainable weights rebuild the trained model exactly (frozen backbone from the same seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    save_trainable(model, tmp_path / "weights.safetensors")
    torch.manual_seed(0)
    rebuilt = dtl.create_model(backbone, method, num_classes=5, img_size=size)
    load_trainable(rebuilt, tmp_path / "weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), model.eval()(images))
    assert all(torch.equal(p, frozen[n]) for n, p in rebuilt.family.named_parameters() if n in frozen)
    assert set(spec.searchable) <= set(spec.options.names())


@pytest.mark.parametrize("method, expected", [
    ("bitfit", 102_912),  # every bias: 12 x (2304 + 768 + 3072 + 768 + 2 x 768 norms) + patch embed + final norm
    ("ssf", 205_824),  # scale + shift after 12 x (qkv, proj, fc1, fc2, 2 norms) + patch embed + final norm
    ("vpt", 12 * 10 * 768),  # 10 deep prompts per block
])
def test_the_three_baselines_train_the_published_parameter_counts_on_vit_b16(method, expected):
    model = dtl.create_model("vit_base_patch16_224", method, num_classes=100)
    assert trainable_without_head(model) == expected and dtl.trainable_parameters(model) == expected + VIT_B_HEAD
    assert round(expected / 1e6, 2) == {"bitfit": 0.10, "ssf": 0.21, "vpt": 0.09}[method]
    backbone = [n for n, p in model.family.named_parameters() if p.requires_grad]
    if method == "bitfit":
        assert backbone and all(n.endswith("bias") for n in backbone)
    elif method == "ssf":
        assert backbone and all(n.endswith(("ssf_scale", "ssf_shift")) for n in backbone)
    else:
        assert not backbone  # VPT trains its prompts and the head only


def test_vpt_prompts_are_left_out_of_the_pooled_mean_and_shallow_prompts_feed_the_first_block_only():
    torch.manual_seed(0)
    deep = dtl.create_model(MICRO, "vpt", num_classes=3, prompt_length=4)
    shallow = dtl.create_model(MICRO, "vpt", num_classes=3, prompt_length=4, prompt_depth="shallow")
    assert deep.prompts.shape == (12, 4, 96) and shallow.prompts.shape == (1, 4, 96)
    images = torch.randn(2, 3, 32, 32)
    seen = []
    hook = deep.family.backbone.norm.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    deep.eval()(images)
    hook.remove()
    assert seen == [(2, 96)]  # the final norm sees the mean of the 64 patch tokens only
    tokens = []
    hooks = [block.register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[1]))
             for block in deep.family.blocks]
    deep(images)
    for hook in hooks:
        hook.remove()
    assert tokens == [1 + 4 + 64] * 12
    with pytest.raises(ValueError, match="model.prompt_depth: expected deep or shallow"):
        dtl.create_model(MICRO, "vpt", num_classes=3, prompt_depth="middle")
    with pytest.raises(ValueError, match="vpt.*ViT backbones only"):
        dtl.create_model("swin_tiny_patch4_window7_224", "vpt", num_classes=3)


def test_the_old_adapter_name_still_works_with_a_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dtl.create_model(MICRO, "adapter", num_classes=3)
    assert type(model).__name__ == "AdaptFormerModel"
    assert any(issubclass(w.category, DeprecationWarning) and "use 'adaptformer'" in str(w.message) for w in caught)


def test_the_registry_drives_config_keys_benchmark_rows_and_sweep_checks():
    from dtl.benchmark import ROWS
    from dtl.config import OVERRIDE_KEYS, ConfigError, ExperimentConfig
    from dtl.methods import Method, MethodOptions, register_method
    from dtl.methods.registry import _METHODS

    assert {"prompt_length", "prompt_depth", "rank", "kernel_size"} <= set(OVERRIDE_KEYS)  # from the options
    assert set(available_methods()) | {"dtl_plus_mlp", "dtl_plus_ckpt", "dtl_plus_cached"} == set(ROWS)
    config = ExperimentConfig.from_dict({"model": {"method": "vpt", "prompt_length": 20}})
    assert config.model.model_options() == {"prompt_length": 20}
    with pytest.raises(ConfigError, match="model.prompt_length: expected null or an integer >= 1, got 0"):
        ExperimentConfig.from_dict({"model": {"method": "vpt", "prompt_length": 0}})
    with pytest.raises(ConfigError, match="model.method: expected one of dtl, dtl_plus, "):
        ExperimentConfig.from_dict({"model": {"method": "prompt"}})
    with pytest.raises(TypeError, match="options must default to None"):
        from dataclasses import dataclass

        @dataclass
        class Bad(MethodOptions):
            size: int = 3

        register_method(Method(name="bad", description="", options=Bad, build=lambda *a: None))
    assert "bad" not in _METHODS
