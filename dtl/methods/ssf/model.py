"""SSF (Lian et al., 2022): a learned scale and shift after every linear layer, normalisation and convolution
of the backbone (about 0.21M on ViT-B/16, the published count).

``y = module(x) * gamma + beta`` per output channel, with ``gamma ~ N(1, 0.02)`` and ``beta ~ N(0, 0.02)`` as in the
authors' code. Works on any family: it wraps the ``nn.Linear``, ``nn.LayerNorm`` (timm's channels-first
``LayerNorm2d`` included), ``nn.Conv2d`` and ``nn.BatchNorm2d`` modules it finds.
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from ..base import HeadModel, HeadSpec, call_qkv_as_module

WRAPPED = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.BatchNorm2d)
CHANNELS_FIRST = (nn.Conv2d, nn.BatchNorm2d, LayerNorm2d)  # (B, C, H, W) outputs: scale along dim 1


class ScaleShift(nn.Module):
    """A frozen module followed by a trainable per-channel scale and shift (channels last, or dim 1 for a conv
    or a 2-D norm)."""

    def __init__(self, module: nn.Module, channels: int):
        super().__init__()
        self.module = module
        self.ssf_scale = nn.Parameter(torch.empty(channels).normal_(1.0, 0.02))
        self.ssf_shift = nn.Parameter(torch.empty(channels).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(self.module, CHANNELS_FIRST):
            return out * self.ssf_scale[:, None, None] + self.ssf_shift[:, None, None]
        return out * self.ssf_scale + self.ssf_shift


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return module.normalized_shape[-1]


class SSFModel(HeadModel):
    method = "ssf"

    def _prepare(self) -> None:
        targets = [(name, module) for name, module in self.family.backbone.named_modules()
                   if isinstance(module, WRAPPED)]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = self.family.backbone.get_submodule(parent_name) if parent_name else self.family.backbone
            setattr(parent, child, ScaleShift(module, _channels(module)))
        call_qkv_as_module(self.family.backbone)


def build(family, head: HeadSpec, options, backbone_dtype) -> SSFModel:
    return SSFModel(family, head)
