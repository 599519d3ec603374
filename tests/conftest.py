"""Fixtures and helpers shared by several test modules (helpers: ``from conftest import randomised``).

The suite never touches a GPU unless asked: without ``-m gpu`` every GPU is hidden (``CUDA_VISIBLE_DEVICES`` is
emptied before any test can start CUDA, so the processes the tests start see none either), and ``training.device:
auto`` trains on the CPU, in fp32, as on a machine without one. ``pytest -m gpu`` runs the tests marked ``gpu``
on the GPU; where there is none they are skipped, with the reason.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
from torch import nn


def selects_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m`` asks for the ``gpu`` tests (``gpu``, ``gpu and not slow``; not ``not gpu``)."""
    return re.search(r"(?<!not )\bgpu\b", markexpr or "") is not None


def pytest_configure(config) -> None:
    if not selects_gpu_tests(config.option.markexpr):
        # Importing torch starts nothing of CUDA; the first query of the devices reads this variable.
        assert not torch.cuda.is_initialized(), "CUDA was started before the tests could hide the GPU"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        hidden = "" if selects_gpu_tests(item.config.option.markexpr) else " (the suite hides GPUs without -m gpu)"
        pytest.skip(f"needs a CUDA GPU; none is visible here{hidden}")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is fastest, and spares a shared machine oversubscribed OpenMP threads.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quadrant_task(n: int, seed: int = 0):
    """4 classes: which image quadrant is bright (32 px). Learnable in a few epochs, chance = 0.25."""
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 3, 32, 32, generator=generator) * 0.3
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 1.5
    return TensorDataset(images, labels)


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
