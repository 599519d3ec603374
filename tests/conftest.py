"""Fixtures and helpers shared by several test modules (helpers: ``from conftest import randomised``)."""
from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is fastest, and spares a shared machine oversubscribed OpenMP threads.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero trainable parameters (the CSN starts at zero), so every one of them gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith("head"):
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.2)
    return model.train()


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("8m")``: a tmpfs of that size at ``tmp_path/small-disk`` (the test is skipped where it cannot
    be mounted), unmounted when the test ends."""
    mount = tmp_path / "small-disk"

    def make(size: str):
        mount.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        return mount

    yield make
    if mount.is_mount():
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
