"""LoRA (Hu et al., 2022): a low-rank update beside every attention ``qkv`` projection of a transformer.

``qkv(x) + (alpha / r) x A B`` with ``A`` Kaiming-uniform and ``B`` zero, so the model starts equal to the
backbone. Attention with separate ``q_proj``, ``k_proj`` and ``v_proj`` (EVA-02) gets one update on each. LoRA is
*entangled* with the backbone: its gradients flow through every block, the memory cost DTL avoids.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import HeadModel, HeadSpec, call_qkv_as_module


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * x A B with A Kaiming-uniform and B zero (the LoRA paper's init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


class LoRAModel(HeadModel):
    method = "lora"

    def __init__(self, family, head: HeadSpec, rank: int):
        self.rank = rank
        super().__init__(family, head)

    def _prepare(self) -> None:
        for index, block in enumerate(self.family.blocks):
            attn = getattr(block, "attn", None)
            targets = [name for name in ("qkv",) if isinstance(getattr(attn, name, None), nn.Linear)] or [
                name for name in ("q_proj", "k_proj", "v_proj") if isinstance(getattr(attn, name, None), nn.Linear)]
            if not targets:
                raise ValueError(f"method 'lora' needs attention qkv (or q, k and v) projections; block {index} of "
                                 f"this {self.family.name} has none")
            for name in targets:
                setattr(attn, name, LoRALinear(getattr(attn, name), self.rank))
        call_qkv_as_module(self.family.backbone)


def build(family, head: HeadSpec, options, backbone_dtype) -> LoRAModel:
    return LoRAModel(family, head, **options.resolved(family))
