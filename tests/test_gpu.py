"""What only a real GPU can show: the CUDA training step against the CPU's, the prefix cache on the GPU and in
pinned host memory, checkpoints between a GPU and a CPU, fp16 and bf16 training, no host sync per step, and a
trial's share of GPU memory.

``pytest -m gpu`` runs these on the first visible GPU (``python benchmarks/gpu_acceptance.py`` runs them first);
without a GPU they are skipped. Tolerances are stated where they are used: fp32 training on a GPU uses TF32
matrix products (about 1e-3 relative error), and non-deterministic kernels may flip a prediction or two.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dtl
from conftest import quadrant_task, randomised
from dtl.config import TrainConfig
from dtl.devices import fp32_matmul, resolve_precision
from dtl.engine import TrainingState, train_and_evaluate

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent
MICRO = "vit_micro_patch4_32"
GPU = torch.device("cuda")


def micro(method: str = "dtl_plus", seed: int = 0) -> torch.nn.Module:
    """The same micro model every call; its side network non-zero, so every trainable parameter gets a gradient."""
    torch.manual_seed(seed)
    return randomised(dtl.create_model(MICRO, method, num_classes=4), seed)


def config(**settings) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "warmup_epochs": 0, "cooldown_epochs": 0, "batch_size": 16, "lr": 3e-3,
                          "progress": False, **settings})


@pytest.mark.parametrize("method", ["dtl_plus", "lora", "full"])
def test_a_cuda_training_step_equals_the_cpu_step(method):
    """fp32: the loss within 1e-3 (relative), all trainable gradients together within 1e-2 (relative norm) and
    each gradient of some size within 5e-2 of the CPU's; an epoch's training loss within 1e-2. The GPU runs fp32
    matrix products in TF32, as training there does."""
    images, labels = quadrant_task(16).tensors

    def step(device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
        model = micro(method).to(device).train()
        with fp32_matmul(device):
            loss = torch.nn.functional.cross_entropy(model(images.to(device)).float(), labels.to(device))
            loss.backward()
        return loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}

    cpu_loss, cpu_grads = step(torch.device("cpu"))
    gpu_loss, gpu_grads = step(GPU)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    every = torch.cat([g.flatten() for g in cpu_grads.values()])
    assert (torch.cat([gpu_grads[n].flatten() for n in cpu_grads]) - every).norm() < 1e-2 * every.norm()
    largest = max(g.norm() for g in cpu_grads.values())
    for name, grad in cpu_grads.items():
        if grad.norm() >= 1e-2 * largest:  # near-zero gradients are all rounding
            assert (gpu_grads[name] - grad).norm() < 5e-2 * grad.norm(), name
    trained = {device: train_and_evaluate(micro(method), quadrant_task(32), {}, config(device=device, precision="fp32",
                                                                                   epochs=1)).metrics["train/loss"]
               for device in ("cpu", "cuda")}
    assert trained["cuda"] == pytest.approx(trained["cpu"], rel=1e-2)


def test_cached_and_uncached_training_agree_and_the_cache_is_not_training_memory(monkeypatch):
    """On the GPU in its native autocast: training from the prefix cache (kept on the GPU, or in pinned host
    memory when the GPU has no room) predicts the val images as training from images does, up to
    max(2 images, 0.5 %); the cache on the GPU is reported on its own and the training peak leaves it out."""
    import dtl.cache

    train, val = quadrant_task(256), quadrant_task(64, seed=1)
    settings = dict(device="cuda", eval_every=1, epochs=4)
    images = train_and_evaluate(micro(), train, {"val": val}, config(**settings, prefix_cache="off"))
    dtl.cache.clear_memory_cache()
    on_gpu = train_and_evaluate(micro(), train, {"val": val}, config(**settings, prefix_cache="memory"))
    dtl.cache.clear_memory_cache()
    monkeypatch.setattr(dtl.cache, "gpu_memory_left", lambda device: 0)  # no room: pinned host memory
    in_host = train_and_evaluate(micro(), train, {"val": val}, config(**settings, prefix_cache="memory"))

    assert images.precision == resolve_precision("auto", GPU)
    for run in (on_gpu, in_host):
        flips = int((run.per_image["val"] != images.per_image["val"]).sum())
        assert flips <= max(2, int(0.005 * len(val))), flips
    # the same batches through the same kernels: placement alone must change nothing
    assert torch.equal(in_host.per_image["val"], on_gpu.per_image["val"])
    assert in_host.metrics["train/loss"] == pytest.approx(on_gpu.metrics["train/loss"], rel=1e-6)
    assert on_gpu.gpu_cache_bytes > 0 and in_host.gpu_cache_bytes == 0
    # counted as training memory, the cache would add its own size to the peak of the run that keeps it there
    assert abs(on_gpu.gpu_peak_allocated_bytes - in_host.gpu_peak_allocated_bytes) < 0.5 * on_gpu.gpu_cache_bytes


def test_a_checkpoint_saved_on_the_gpu_resumes_on_the_cpu_and_on_a_node_with_fewer_gpus(tmp_path):
    class Stop(Exception):
        pass

    def save_and_stop(end):
        if end.epoch == 1:
            end.state().save(tmp_path / "state.pt")
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(micro(), quadrant_task(32), {}, config(device="cuda", epochs=4), [save_and_stop])
    state = TrainingState.load(tmp_path / "state.pt")  # onto the CPU, whatever it was saved from
    assert state.epochs_done == 2 and len(state.cuda_rng) == 1
    on_cpu = train_and_evaluate(micro(), quadrant_task(32), {}, config(device="cpu", epochs=4), resume_from=state)
    assert len(on_cpu.history) == 4 and torch.isfinite(torch.tensor(on_cpu.metrics["train/loss"]))
    # a checkpoint of an earlier version, from a node with more GPUs: one generator state per GPU there
    more = TrainingState(**{**state.__dict__, "cuda_rng": [state.cuda_rng[0]] * (torch.cuda.device_count() + 1)})
    on_gpu = train_and_evaluate(micro(), quadrant_task(32), {}, config(device="cuda", epochs=4), resume_from=more)
    assert len(on_gpu.history) == 4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fp16_and_bf16_both_train(precision):
    result = train_and_evaluate(micro(), quadrant_task(96), {"val": quadrant_task(64, seed=1)},
                                config(device="cuda", precision=precision, epochs=6))
    losses = [h["train/loss"] for h in result.history]
    assert result.precision == precision and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert result.metrics["val/accuracy"] > 0.4  # chance is 0.25


@pytest.mark.parametrize("prefix_cache", ["off", "memory"])
def test_no_host_sync_per_training_step(prefix_cache):
    """CUDA's sync debug mode warns at every operation that makes the host wait for the GPU: an epoch of 8 steps
    must warn no more often than an epoch of 2."""
    import dtl.cache

    def syncs(images: int) -> int:
        dtl.cache.clear_memory_cache()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_and_evaluate(micro(), quadrant_task(images), {},
                                   config(device="cuda", epochs=1, prefix_cache=prefix_cache))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(16)  # warm-up: CUDA's and the kernels' first-use work
    assert syncs(128) == syncs(32)


def test_a_trials_share_of_the_gpu_caps_its_memory():
    """In a process of its own (the cap lasts for the process): with a quarter of the GPU, the prefix cache's
    room is within that quarter and an allocation past it fails."""
    script = """
import torch
from dtl.cache import gpu_memory_left
torch.cuda.set_per_process_memory_fraction(0.25)
total = torch.cuda.get_device_properties(0).total_memory
assert gpu_memory_left(torch.device("cuda")) <= 0.25 * total
try:
    torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
except torch.cuda.OutOfMemoryError:
    print("capped")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "capped"


def test_precision_auto_follows_the_gpus_bf16_support():
    major, _ = torch.cuda.get_device_capability(GPU)
    assert resolve_precision("auto", GPU) == ("bf16" if major >= 8 else "fp16")
