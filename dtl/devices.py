"""Where a run computes and in what precision: the device, the autocast dtype, TF32, the data loaders that feed a
GPU, the GPU's memory peaks and its random generator.

The rules (docs/design.md, "Running on GPUs"):

* ``device: auto`` is the first visible GPU, else the CPU; ``cuda:N`` must name a visible GPU.
* ``precision: auto`` is fp32 on a CPU; on a GPU, bf16 autocast where the GPU computes bf16 natively (compute
  capability 8.0 and later: A100, H100, L4, RTX 30xx and later), else fp16 autocast with a loss scaler (V100,
  T4), since older GPUs only emulate bf16.
* On a GPU, fp32 matrix products use TF32 tensor cores (``torch.set_float32_matmul_precision("high")``) while a run
  trains or evaluates, as timm's training script sets them.
* Memory: the CUDA allocator's peaks of training and of evaluation are measured apart, from after the model and
  any prefix cache are placed, and the cache's bytes on the GPU are reported as their own figure, not as training
  memory.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class SetupError(ValueError):
    """A run cannot start with these settings on this machine or data (no CUDA device, a batch larger than the
    split...); the message names the setting and what to do."""


def resolve_device(name: str = "auto", key: str = "training.device") -> torch.device:
    """The device ``name`` means here (``auto``: the first visible GPU, else the CPU). A GPU that is not there
    raises :class:`SetupError` naming ``key`` and the GPUs this process sees."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise SetupError(f"{key} is {name!r} but no CUDA device is available here: use 'auto' (the GPU when there is "
                         "one, else the CPU) or 'cpu'")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        # Ray and job schedulers narrow CUDA_VISIBLE_DEVICES to the GPUs they give a process: say so.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        narrowed = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise SetupError(f"{key} is {name!r} but this process sees {count} CUDA device{'s' if count != 1 else ''}"
                         f"{narrowed}: use cuda:0{f'..cuda:{count - 1}' if count > 1 else ''} or 'auto'")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0 and later; ROCm GPUs say so themselves)."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast a run uses: ``auto`` is fp32 on a CPU, bf16 on a GPU that computes it natively, else fp16."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise SetupError("training.precision 'fp16' needs a CUDA device (use bf16 or fp32 on CPU)")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        warnings.warn(f"training.precision bf16: {torch.cuda.get_device_name(device)} (compute capability "
                      f"{major}.{minor}) only emulates bf16, which is slow; precision 'auto' uses fp16 with a loss "
                      "scaler on this GPU", stacklevel=2)
    return precision


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def fp32_matmul(device: torch.device) -> Iterator[None]:
    """On a GPU, fp32 matrix products run on TF32 tensor cores (fp32's range, a 10-bit mantissa; about 1e-3
    relative error) inside the block, and torch's previous setting comes back after it. A CPU is left as it is."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class EpochOrder(RandomSampler):
    """A new order of the items each epoch, drawn from ``generator`` exactly as ``DataLoader(shuffle=True,
    generator=generator)`` without workers draws it (one 64-bit draw that loader takes for its workers' seed, then
    the permutation): the batches stay those of that loader however many workers load them. The loader's own
    draw comes from a generator of its own, so its workers can live across epochs, and a resumed run (this
    generator's state restored) draws the batches an uninterrupted run draws."""

    def __iter__(self) -> Iterator[int]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        yield from super().__iter__()


def image_loader(data: Dataset, batch_size: int, device: torch.device, num_workers: int = 0, *,
                 order: torch.Generator | None = None, drop_last: bool = False, persistent: bool = True,
                 seed: int = 0) -> DataLoader:
    """Batches of ``data`` for ``device``: shuffled by ``order`` each epoch (:class:`EpochOrder`; None: in
    dataset order), in page-locked memory on a GPU (so the copy overlaps the computation), loaded by
    ``num_workers`` processes that stay alive between epochs when ``persistent`` (an epoch does not wait for
    them to start again). ``seed`` seeds the workers of a shuffled loader. A dataset with a ``collate`` function
    (items of different sizes) batches its items with it."""
    return DataLoader(
        data, batch_size=batch_size, sampler=EpochOrder(data, generator=order) if order is not None else None,
        drop_last=drop_last, num_workers=num_workers, persistent_workers=persistent and num_workers > 0,
        pin_memory=device.type == "cuda", collate_fn=getattr(data, "collate", None),
        # Without a generator a loader draws its workers' seed from torch's default generator (that of dropout and
        # drop-path), as evaluation loaders always have; a shuffled loader has its own.
        generator=torch.Generator().manual_seed(seed) if order is not None else None)


class GpuMemory:
    """The CUDA allocator's peaks (allocated and reserved) of training and of evaluation, each measured from its
    own start (``measure``), less ``resident_bytes``: the prefix cache kept on the GPU, which is reported on
    its own. Nothing is measured on other devices (the peaks stay 0)."""

    def __init__(self, device: torch.device, resident_bytes: int = 0):
        self.device, self.resident_bytes = device, resident_bytes
        self.train_allocated = self.train_reserved = self.eval_allocated = 0

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        """``phase``: ``train`` or ``eval``."""
        if not self.active:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        allocated = torch.cuda.max_memory_allocated(self.device) - self.resident_bytes
        if phase == "train":
            reserved = torch.cuda.max_memory_reserved(self.device) - self.resident_bytes
            self.train_allocated = max(self.train_allocated, allocated)
            self.train_reserved = max(self.train_reserved, reserved)
        else:
            self.eval_allocated = max(self.eval_allocated, allocated)


def device_rng_state(device: torch.device) -> list[torch.Tensor]:
    """The state of the random generator of the GPU a run trains on (dropout and drop-path draw from it); [] off
    a GPU. One generator, not every visible GPU's: a checkpoint must resume on a node with fewer GPUs."""
    if device.type != "cuda":
        return []
    return [torch.cuda.get_rng_state(device)]


def restore_device_rng(states: Sequence[torch.Tensor], device: torch.device) -> None:
    """Put a :func:`device_rng_state` back on ``device`` (the GPU a resumed run trains on, whatever GPU saved it).
    Checkpoints of earlier versions hold every visible GPU's state: the one of ``device``'s index is used when it
    exists, else the first. A run resumed on a CPU has no GPU generator to restore."""
    if device.type != "cuda" or not states:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    state = states[index] if len(states) > 1 and index < len(states) else states[0]
    torch.cuda.set_rng_state(state, device)


__all__ = [
    "EpochOrder", "GpuMemory", "SetupError", "autocast", "device_rng_state", "fp32_matmul", "image_loader",
    "native_bf16", "resolve_device", "resolve_precision", "restore_device_rng",
]
