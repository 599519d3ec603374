"""Fixtures and helpers shared by several test modules (helpers: ``from conftest import randomised``)."""
from __future__ import annotations

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
