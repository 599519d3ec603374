"""The prefix feature cache: cached training equals uncached training, and it refuses when it would not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

import dtl
from conftest import randomised
from dtl import cache
from dtl.cache import PrefixCacheError, compute_frozen_features, prepare_prefix_cache
from dtl.config import ConfigError, ExperimentConfig, TrainConfig
from dtl.engine import train_and_evaluate
from dtl.methods import DTLModel

MICRO = "vit_micro_patch4_32"
pytestmark = pytest.mark.usefixtures("one_thread")


def dtl_plus(seed: int = 0, **options) -> DTLModel:
    """A DTL+ model whose side network is not zero, so every CSN parameter gets a gradient."""
    torch.manual_seed(seed)
    return randomised(dtl.create_model(MICRO, "dtl_plus", num_classes=5, **options), seed)


def images_and_labels(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def logits_and_grads(model: torch.nn.Module, inputs, labels, precision: str = "fp32"):
    model.zero_grad(set_to_none=True)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(inputs)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), grads


@pytest.fixture(autouse=True)
def fresh_memory_cache():
    cache.clear_memory_cache()
    yield
    cache.clear_memory_cache()


# --- equivalence ------------------------------------------------------------------------------------------------
def test_cached_path_gives_the_same_logits_and_gradients_fp32():
    model = dtl_plus()
    images, labels = images_and_labels()
    reference_logits, reference_grads = logits_and_grads(model, images, labels)

    features = compute_frozen_features(model, TensorDataset(images, labels), batch_size=4)  # two batches
    # every block's input x_0..x_11 and the final tokens, whatever M; the model reads x_0..x_6 and x_7 (M = 6)
    assert features.dtype == torch.float32 and len(features.tensors) == 13
    assert model.cached_names() == [f"block_input.{b}" for b in range(8)]
    state, cached_labels = features.select(model.cached_names()).batch(torch.arange(len(images)))
    assert torch.equal(cached_labels, labels)
    logits, grads = logits_and_grads(model, state, labels)

    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(reference_grads) and len(grads) == 12 + 12 + 1 + 2  # down/up x 12, conv, head
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_cache_matches_the_fp32_weights_amp_path_within_bf16_tolerance():
    model = dtl_plus()
    images, labels = images_and_labels()
    reference_logits, reference_grads = logits_and_grads(model, images, labels, "bf16")

    features = compute_frozen_features(model, TensorDataset(images, labels), precision="bf16")
    assert features.dtype == torch.bfloat16  # stored as the autocast computes: half the bytes of fp32
    logits, grads = logits_and_grads(model, features.batch(torch.arange(len(images)))[0], labels, "bf16")

    torch.testing.assert_close(logits, reference_logits, rtol=0.05, atol=0.05)
    for name in grads:
        scale = reference_grads[name].abs().max().item() + 1e-6
        assert (grads[name] - reference_grads[name]).abs().max().item() <= 0.1 * scale, name


def test_bf16_backbone_cache_is_exact():
    model = dtl_plus(backbone_dtype="bf16")
    assert next(model.family.parameters()).dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    images, labels = images_and_labels()
    reference_logits, reference_grads = logits_and_grads(model, images, labels, "bf16")
    features = compute_frozen_features(model, TensorDataset(images, labels), precision="bf16")
    logits, grads = logits_and_grads(model, features.batch(torch.arange(len(images)))[0], labels, "bf16")
    torch.testing.assert_close(logits, reference_logits, rtol=1e-3, atol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-2, atol=1e-4, msg=name)


def test_bf16_backbone_stays_close_to_fp32_without_autocast():
    images, labels = images_and_labels()
    full_precision = dtl_plus()
    low_precision = dtl_plus(backbone_dtype="bf16")
    low_precision.load_state_dict(full_precision.state_dict())  # the same weights, rounded to bf16
    expected, _ = logits_and_grads(full_precision, images, labels)
    logits, grads = logits_and_grads(low_precision, images, labels)  # no autocast: CSN fp32, backbone bf16
    assert all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


def test_batches_are_drawn_exactly_like_the_image_dataloader():
    features = cache.FrozenFeatures({"x": torch.arange(20.0)[:, None]}, torch.arange(20))
    cached = features.loader(6, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    images = DataLoader(TensorDataset(torch.arange(20)), batch_size=6, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # two epochs: the generator advances alike
        drawn = [labels.tolist() for _, labels in cached]
        expected = [batch.tolist() for (batch,) in images]
        assert drawn == expected and len(drawn) == 3


def test_training_from_the_cache_equals_training_from_images():
    images, labels = images_and_labels(n=48, seed=2)
    data = TensorDataset(images, labels)
    config = dict(epochs=2, warmup_epochs=1, cooldown_epochs=0, batch_size=16, eval_batch_size=32, lr=1e-2,
                  eval_every=1, progress=False)
    uncached, cached = dtl_plus(), dtl_plus()
    plain = train_and_evaluate(uncached, data, {"val": data}, TrainConfig(**config, prefix_cache="off"))
    fast = train_and_evaluate(cached, data, {"val": data}, TrainConfig(**config, prefix_cache="memory"))

    assert plain.cache_report["mode"] == "off"
    assert fast.cache_report["mode"] == "memory" and fast.cache_report["num_samples"] == 48
    # the entry holds x_0..x_11 and the final tokens (fp32) and the labels; M = 6 reads x_0..x_7
    assert fast.cache_report["bytes"] == 48 * (13 * 65 * 96 * 4 + 8)
    assert fast.cache_report["read_bytes"] == 48 * (8 * 65 * 96 * 4 + 8) and fast.cache_report["layout"] == "blocks"
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert fast.metrics[key] == pytest.approx(plain.metrics[key], rel=1e-4, abs=1e-5), key
    for (name, a), (_, b) in zip(uncached.named_parameters(), cached.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


# --- refusals ---------------------------------------------------------------------------------------------------
def test_drop_path_in_the_prefix_is_refused_with_the_reason():
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=5, drop_path_rate=0.1)
    assert not model.prefix_is_deterministic
    data = TensorDataset(*images_and_labels())
    with pytest.raises(PrefixCacheError, match=r"stochastic.*drop_path.*model\.drop_path: 0"):
        prepare_prefix_cache(model, data, mode="memory")
    features, report = prepare_prefix_cache(model, data, mode="auto")
    assert features is None and report.mode == "off" and "DropPath" in report.reason


def test_dropout_in_the_embedding_is_refused_too():
    model = dtl.create_model(MICRO, "dtl", num_classes=5)
    model.family.backbone.pos_drop.p = 0.1
    assert model.prefix_randomness() == ["pos_drop (Dropout 0.1)"]
    with pytest.raises(PrefixCacheError, match="pos_drop"):
        prepare_prefix_cache(model, TensorDataset(*images_and_labels()), mode="disk")


def test_drop_path_only_after_the_prefix_is_allowed():
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=5)
    for block in model.family.blocks[7:]:
        block.drop_path1.drop_prob = 0.1  # blocks after M may be stochastic: they are not cached
    assert model.prefix_is_deterministic
    assert cache.cache_refusal(model) is None


@pytest.mark.parametrize("method", ["lora", "full", "adaptformer"])
def test_methods_without_a_frozen_part_are_refused(method):
    model = dtl.create_model(MICRO, method, num_classes=5)
    with pytest.raises(PrefixCacheError, match=f"needs a model with a frozen part.*not '{method}'"):
        prepare_prefix_cache(model, TensorDataset(*images_and_labels()), mode="memory")
    assert prepare_prefix_cache(model, TensorDataset(*images_and_labels()), mode="auto")[0] is None


class AugmentedDataset(TensorDataset):
    def __init__(self, *tensors, transform=None, augment=None):
        super().__init__(*tensors)
        self.transform, self.augment = transform, augment


@pytest.mark.parametrize("transform,augment,needle", [
    (v2.Compose([v2.RandomResizedCrop(32), v2.Normalize([0.5] * 3, [0.5] * 3)]), None, "RandomResizedCrop"),
    (v2.ColorJitter(0.4), None, "ColorJitter"),
    (None, True, "augment is True"),
])
def test_augmented_data_is_refused(transform, augment, needle):
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=5)
    data = AugmentedDataset(*images_and_labels(), transform=transform, augment=augment)
    with pytest.raises(PrefixCacheError, match=f"augmented.*{needle}"):
        prepare_prefix_cache(model, data, mode="memory")
    deterministic = AugmentedDataset(*images_and_labels(), transform=v2.Compose([v2.CenterCrop(32)]))
    assert cache.dataset_augmentation(deterministic) is None


def test_engine_refuses_an_explicit_cache_it_cannot_honour():
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=5, drop_path_rate=0.2)
    data = TensorDataset(*images_and_labels(n=8))
    with pytest.raises(PrefixCacheError, match="training.prefix_cache: memory is not possible"):
        train_and_evaluate(model, data, {}, TrainConfig(epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=4,
                                                        progress=False, prefix_cache="memory"))


def test_config_validates_the_new_keys():
    with pytest.raises(ConfigError, match="training.prefix_cache: expected one of auto, memory, disk, off"):
        ExperimentConfig.from_dict({"training": {"prefix_cache": "always"}})
    with pytest.raises(ConfigError, match="model.backbone_dtype: expected fp32 for method 'lora'"):
        ExperimentConfig.from_dict({"model": {"method": "lora", "backbone_dtype": "bf16"}})
    config = ExperimentConfig.from_dict({"model": {"backbone_dtype": "bf16"}, "overrides": {"digits": {"prefix_cache": "off"}}})
    assert config.for_task("digits").training.prefix_cache == "off"
    with pytest.raises(ConfigError, match="unknown key.*prefix_cache_dir"):  # machine-specific: not per task
        ExperimentConfig.from_dict({"overrides": {"digits": {"prefix_cache_dir": "/tmp"}}})


# --- the disk cache ---------------------------------------------------------------------------------------------
def write_task(root, n: int = 10, task: str = "toy"):
    folder = root / task
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png {i % 5}")
    (folder / "train800.txt").write_text("\n".join(lines) + "\n")
    (folder / "meta.json").write_text('{"num_classes": 5}')
    return folder


def test_disk_cache_is_written_once_and_reused(tmp_path):
    from dtl.data import VTabDataset

    folder = write_task(tmp_path / "data")
    data = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    model = dtl_plus()
    built, report = prepare_prefix_cache(model, data, mode="auto", cache_dir=tmp_path / "cache")
    assert report.mode == "disk" and report.source == "built"
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{report.key}.safetensors"]
    assert files[0].stat().st_size >= report.bytes > report.read_bytes == built.nbytes

    cache.clear_memory_cache()  # a new process (another sweep trial): it reads the file
    again = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    loaded, report2 = prepare_prefix_cache(dtl_plus(), again, mode="disk", cache_dir=tmp_path / "cache")
    assert report2.source == "disk" and report2.key == report.key
    for a, b in zip(loaded.tensors.values(), built.tensors.values()):
        assert torch.equal(a, b)

    # Another start block, rank or kernel reads the same entry; other weights or other data give another key.
    assert cache.cache_key(dtl_plus(start_block=5, rank=4, kernel_size=5), data, "fp32") == report.key
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.head.weight.add_(1.0)
        retrained.side_maps["3"].up.weight.add_(1.0)
    assert cache.cache_key(retrained, data, "fp32") == report.key  # trainable parts are not part of the key
    other = dtl.create_model(MICRO, "dtl_plus", num_classes=5)
    assert cache.cache_key(other, data, "fp32") != report.key  # another random backbone
    assert cache.cache_key(model, data, "bf16") != report.key
    (folder / "train800.txt").write_text("".join(f"images/{i}.png {(i + 1) % 5}\n" for i in range(10)))
    relabelled = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    assert cache.cache_key(model, relabelled, "fp32") != report.key


def test_a_corrupt_cache_file_is_rebuilt(tmp_path):
    from dtl.data import VTabDataset

    write_task(tmp_path / "data", n=4)
    data = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    model = dtl_plus()
    _, report = prepare_prefix_cache(model, data, mode="disk", cache_dir=tmp_path / "cache")
    with open(report.path, "r+b") as handle:
        handle.truncate(100)
    cache.clear_memory_cache()
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        features, report2 = prepare_prefix_cache(model, data, mode="disk", cache_dir=tmp_path / "cache")
    assert report2.source == "built" and len(features) == 4


def test_a_disk_that_fills_mid_write_leaves_no_file_and_falls_back_to_memory(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from dtl.data import VTabDataset

    write_task(tmp_path / "data", n=4)
    data = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    builds = []
    real_compute = cache.compute_frozen_features

    def counted(*args, **kwargs):
        builds.append(1)
        return real_compute(*args, **kwargs)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half an entry lands on disk, then the disk is full
            handle.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "compute_frozen_features", counted)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    folder = tmp_path / "cache"
    features, report = prepare_prefix_cache(dtl_plus(), data, mode="auto", cache_dir=folder)
    assert report.mode == "memory" and report.notice and len(features) == 4 and len(builds) == 1  # built once
    assert "No space left on device" in report.reason and str(folder) in report.reason and "MiB" in report.reason
    assert not list(folder.glob("*.safetensors*")) and not list(folder.glob(".*.tmp"))  # nothing partial left
    cache.clear_memory_cache()
    with pytest.raises(PrefixCacheError, match=r"disk: cannot use .*\.safetensors: No space left on device; "
                                               r"the entry needs \d+ MiB"):
        prepare_prefix_cache(dtl_plus(), data, mode="disk", cache_dir=folder)


def _build_entry(data_root: str, cache_dir: str, marker: str) -> None:
    """One process (a sweep trial) that needs the cache entry; it records whether it computed it."""
    import torch as torch_

    from dtl import cache as cache_
    from dtl.data import VTabDataset

    torch_.set_num_threads(1)
    real = cache_.compute_frozen_features

    def counted(*args, **kwargs):
        with open(marker, "a") as handle:
            handle.write("built\n")
        return real(*args, **kwargs)

    cache_.compute_frozen_features = counted
    data = VTabDataset(data_root, "toy", "train800", img_size=32)
    cache_.prepare_prefix_cache(dtl_plus(), data, mode="disk", cache_dir=cache_dir)


def test_two_processes_building_one_entry_compute_it_once(tmp_path):
    import multiprocessing

    write_task(tmp_path / "data", n=8)
    marker = tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as two trials of a sweep
    workers = [context.Process(target=_build_entry, args=(str(tmp_path / "data"), str(tmp_path / "cache"),
                                                          str(marker))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert marker.read_text() == "built\n"  # the second waited on the lock, then read the first one's file
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_disk_mode_needs_a_dataset_that_identifies_itself(tmp_path):
    with pytest.raises(PrefixCacheError, match="disk needs a dataset that identifies itself.*TensorDataset"):
        prepare_prefix_cache(dtl_plus(), TensorDataset(*images_and_labels()), mode="disk", cache_dir=tmp_path)
    features, report = prepare_prefix_cache(dtl_plus(), TensorDataset(*images_and_labels()), mode="auto")
    assert report.mode == "memory" and "no fingerprint" in report.reason and len(features) == 6


def test_a_later_run_in_the_same_process_reuses_the_memory_cache():
    data = TensorDataset(*images_and_labels())

    class Fingerprinted(TensorDataset):
        def cache_fingerprint(self):
            return "toy-v1"

    data = Fingerprinted(*data.tensors)
    first, report = prepare_prefix_cache(dtl_plus(), data, mode="memory")
    second, report2 = prepare_prefix_cache(copy.deepcopy(dtl_plus()), data, mode="memory")
    assert report.source == "built" and report2.source == "memory"
    assert all(second.tensors[name] is first.tensors[name] for name in first.tensors)  # not computed again


# --- one cache for every start block, and for the linear probe ---------------------------------------------------
def test_one_cache_serves_two_start_blocks_with_the_uncached_logits_and_gradients(tmp_path):
    from dtl.data import VTabDataset

    write_task(tmp_path / "data", n=6)
    data = VTabDataset(tmp_path / "data", "toy", "train800", img_size=32)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    reports = {}
    for start_block in (3, 8):  # the same random backbone (seed 0), two start blocks and ranks
        model = dtl_plus(start_block=start_block, rank=2 if start_block == 3 else 5)
        reference_logits, reference_grads = logits_and_grads(model, images, labels)
        features, reports[start_block] = prepare_prefix_cache(model, data, mode="disk", cache_dir=tmp_path / "cache")
        cache.clear_memory_cache()  # as in another trial's process: the second model reads the file
        inputs, cached_labels = features.batch(torch.arange(len(data)))
        assert set(inputs) == set(model.cached_names()) and torch.equal(cached_labels, labels)
        logits, grads = logits_and_grads(model, inputs, labels)
        torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
        for name in reference_grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert reports[3].source == "built" and reports[8].source == "disk"
    assert reports[3].key == reports[8].key and reports[3].path == reports[8].path
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert reports[8].read_bytes > reports[3].read_bytes  # M = 8 reads x_0..x_9, M = 3 reads x_0..x_4


def test_the_linear_probe_trains_from_cached_pooled_features_as_from_images():
    images, labels = images_and_labels(n=40, seed=4)
    data = TensorDataset(images, labels)
    config = dict(epochs=2, warmup_epochs=0, cooldown_epochs=0, batch_size=8, eval_batch_size=16, lr=1e-2,
                  eval_every=1, progress=False)
    runs = {}
    for mode in ("off", "memory"):
        torch.manual_seed(0)
        model = dtl.create_model(MICRO, "linear", num_classes=5)
        runs[mode] = (model, train_and_evaluate(model, data, {"val": data}, TrainConfig(**config, prefix_cache=mode)))
    fast = runs["memory"][1]
    assert fast.cache_report["layout"] == "pooled" and fast.cache_report["bytes"] == 40 * (96 * 4 + 8)
    for key in ("train/loss", "val/accuracy", "val/loss"):
        assert fast.metrics[key] == pytest.approx(runs["off"][1].metrics[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(runs["memory"][0].head.weight, runs["off"][0].head.weight, rtol=1e-5, atol=1e-6)


def test_drop_path_keeps_the_cache_with_the_suffix_scope():
    data = TensorDataset(*images_and_labels())
    torch.manual_seed(0)
    everywhere = dtl.create_model(MICRO, "dtl_plus", num_classes=5, drop_path_rate=0.2)
    torch.manual_seed(0)
    suffix = dtl.create_model(MICRO, "dtl_plus", num_classes=5, drop_path_rate=0.2, drop_path_scope="suffix")
    assert cache.cache_refusal(everywhere) and cache.cache_refusal(suffix) is None
    _, report = prepare_prefix_cache(suffix, data, mode="memory")
    assert report.mode == "memory" and report.key == cache.cache_key(everywhere, data, "fp32") is None
    linear = dtl.create_model(MICRO, "linear", num_classes=5, drop_path_rate=0.2, drop_path_scope="suffix")
    assert cache.cache_refusal(linear) is None  # the probe trains no block: no stochastic depth at all
