"""DTL on convolutional backbones (timm ResNet and ConvNeXt): the guarantees DTL has on ViT, on small random CNNs."""
from __future__ import annotations

import pytest
import torch

import dtl
from conftest import randomised
from dtl import cache
from dtl.benchmark import saved_tensor_bytes
from dtl.cache import prepare_prefix_cache
from dtl.models import CachedInputs, ConvNeXtFamily, ResNetFamily, create_backbone, family_for

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64  # grids 16-8-4-2: every stage fits DTL+'s kernel of 3
CNNS = ["resnet18", "resnet26", "convnext_atto"]  # basic blocks, bottleneck blocks, ConvNeXt


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


class Images(torch.utils.data.TensorDataset):
    def cache_fingerprint(self) -> str:  # what the disk cache keys a dataset by
        return "cnn-test-images"


def model_for(backbone: str, method: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return dtl.create_model(backbone, method, num_classes=5, img_size=SIZE, **options)


def test_families_number_blocks_across_stages_with_the_widths_and_grids_of_timm():
    resnet = family_for(create_backbone("resnet26", img_size=SIZE))
    assert isinstance(resnet, ResNetFamily) and len(resnet.blocks) == 8
    assert [(s.first_block, s.last_block, s.dim) for s in resnet.stages] == [
        (0, 1, 256), (2, 3, 512), (4, 5, 1024), (6, 7, 2048)]
    # the first block of stages 1..3 halves the grid and reads the previous stage's width
    assert [resnet.block_stride(b) for b in range(8)] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert [resnet.block_input_dim(b) for b in (0, 1, 2, 3)] == [64, 256, 256, 512]
    assert [resnet.grid_size(s) for s in range(4)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    convnext = family_for(create_backbone("convnext_atto", img_size=SIZE))
    assert isinstance(convnext, ConvNeXtFamily)
    assert [(s.first_block, s.last_block, s.dim) for s in convnext.stages] == [
        (0, 1, 40), (2, 3, 80), (4, 9, 160), (10, 11, 320)]
    # the defaults put M in the middle of the third stage; side maps start at that stage's first block
    model = model_for("convnext_atto", "dtl_plus")
    assert (model.start_block, model.extract_start, model.rank, model.kernel_size) == (7, 4, 4, 3)


@pytest.mark.parametrize("backbone", CNNS)
@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_an_untrained_model_equals_its_backbone_plus_head_in_train_mode(backbone, method):
    model = model_for(backbone, method).train()
    x = images()
    with torch.no_grad():
        expected = model.head(model.family.backbone.forward_head(model.family.backbone.forward_features(x),
                                                                   pre_logits=True))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # batch norms do not train, so they ran on their running statistics and left them as they were
    for module in model.family.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert not module.training and int(module.num_batches_tracked) == 0


@pytest.mark.parametrize("backbone", CNNS)
def test_only_the_side_network_and_the_head_get_gradients(backbone):
    model = randomised(model_for(backbone, "dtl_plus"))
    frozen = {n: p.detach().clone() for n, p in model.family.named_parameters()}
    model(images()).logsumexp(dim=1).sum().backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"side_maps", "side_convs", "head"}
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.family.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.family.named_parameters())


def test_a_resnet_first_block_map_projects_from_the_wider_grid():
    # M = 2 is the first block of stage 1: its map reads the 256-wide 16 x 16 input, adds to the 512-wide 8 x 8 output
    model = randomised(model_for("resnet26", "dtl", start_block=2))
    side_map = model.side_maps["2"]
    assert side_map.down.in_features == 256 and side_map.up.out_features == 512
    x = images()
    state = model.forward_prefix(x)
    assert state.side_inputs[0].shape == (4, 16, 16, 256) and state.block_output.shape == (4, 8, 8, 512)
    code = model._code(2, state.side_inputs[0])
    assert code.shape == (4, 8, 8, model.rank)
    # the code is the mean of the 2 x 2 window of the full-resolution code
    full = side_map.down(state.side_inputs[0])
    torch.testing.assert_close(code[:, 0, 0], full[:, :2, :2].mean(dim=(1, 2)))
    model(x).sum().backward()
    assert side_map.down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone, early, late", [("resnet26", 2, 6), ("convnext_atto", 2, 10)])
def test_blocks_up_to_m_keep_nothing_for_backward(backbone, early, late):
    x = images(2)
    model = model_for(backbone, "dtl")
    state = model.forward_prefix(x)
    assert not state.block_output.requires_grad and not any(t.requires_grad for t in state.side_inputs)

    def kept(m: torch.nn.Module) -> int:
        return saved_tensor_bytes(m, lambda: m(x))

    per_m = {m: kept(model_for(backbone, "dtl", start_block=m)) for m in (early, late)}
    full = kept(model_for(backbone, "full"))
    assert per_m[late] < per_m[early] < full


@pytest.mark.parametrize("backbone, start_blocks", [("resnet26", (2, 5)), ("convnext_atto", (4, 7))])
def test_one_prefix_cache_serves_two_start_blocks_exactly(tmp_path, backbone, start_blocks):
    x = images(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    data = Images(x, labels)
    cache.clear_memory_cache()
    reports = {}
    for start_block in start_blocks:
        model = randomised(model_for(backbone, "dtl_plus", start_block=start_block))
        reference = model(x)
        torch.nn.functional.cross_entropy(reference, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        features, reports[start_block] = prepare_prefix_cache(model, data, mode="disk", cache_dir=tmp_path)
        cache.clear_memory_cache()
        inputs, cached_labels = features.batch(torch.arange(len(data)))
        assert isinstance(inputs, CachedInputs) and torch.equal(cached_labels, labels)
        logits = model(inputs)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        for name, grad in grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                       msg=name)
    first, second = start_blocks
    assert reports[first].source == "built" and reports[second].source == "disk"
    assert reports[first].path == reports[second].path


@pytest.mark.parametrize("method, needs", [("lora", "attention qkv"), ("vpt", "token sequence"),
                                           ("adaptformer", "MLP branch")])
def test_baselines_that_need_a_transformer_are_refused_in_one_line(method, needs):
    with pytest.raises(ValueError) as error:
        model_for("convnext_atto", method)
    message = str(error.value)
    assert "\n" not in message and needs in message and "ConvNeXt" in message and "ViT" in message


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("method", ["bitfit", "ssf", "linear", "full"])
def test_the_family_independent_baselines_train_on_cnns(backbone, method):
    model = model_for(backbone, method).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    if method == "linear":
        assert not trainable
    elif method == "bitfit":
        assert trainable and all(n.endswith(".bias") for n in trainable)
    elif method == "ssf":
        assert trainable and all(n.endswith(("ssf_scale", "ssf_shift")) for n in trainable)
    with torch.no_grad():
        plain = model_for(backbone, "linear").eval()
        if method != "ssf":  # SSF starts near, not at, the identity (gamma ~ N(1, 0.02))
            torch.testing.assert_close(model.eval()(images()), plain(images()), rtol=1e-4, atol=1e-4)
    model.train()(images()).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_a_kernel_the_smallest_grid_cannot_use_is_refused():
    # resnet18 at 64 px ends on a 2 x 2 grid: a kernel of 3 reaches all of it, 5 only adds taps on the padding
    model_for("resnet18", "dtl_plus", kernel_size=3)
    with pytest.raises(ValueError, match=r"use at most 3"):
        model_for("resnet18", "dtl_plus", kernel_size=5)
