"""The methods DTL is compared with, in the same harness and with the same head and pooling.

* ``linear``: frozen backbone, train the head only (from cached pooled features when ``dtl.cache`` can).
* ``full``: train everything.
* ``lora``: low-rank updates on every attention ``qkv`` projection (ViT), B zero-initialised.
* ``adapter``: AdaptFormer's parallel bottleneck adapter beside every MLP (ViT), up-projection zero-initialised.

LoRA and adapters are *entangled* with the backbone: their gradients flow through every block, which is
exactly the memory cost DTL avoids.
"""
from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .adapters import BackboneAdapter, CachedInputs


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


class ParallelAdapterBlock(nn.Module):
    """A timm ViT block with AdaptFormer's adapter beside its MLP: x + MLP(LN(x)) + s * up(relu(down(x)))."""

    def __init__(self, block: Block, bottleneck: int, scale: float = 0.1):
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.block = block
        self.adapter_down = nn.Linear(dim, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        adapted = self.adapter_up(torch.relu(self.adapter_down(x))) * self.scale
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + adapted


BASELINE_RANK = 8  # LoRA rank and adapter bottleneck when none is given (the usual comparison setting)


class BaselineModel(nn.Module):
    """Backbone + DTL's pooling + linear head, with the parameters of ``method`` trainable."""

    def __init__(self, adapter: BackboneAdapter, num_classes: int, method: str, *, rank: int | None = None):
        super().__init__()
        self.adapter = adapter
        self.method = method
        blocks = adapter.blocks
        if method in ("lora", "adapter") and not all(isinstance(b, Block) for b in blocks):
            raise ValueError(f"method {method!r} is implemented for ViT backbones only")
        adapter.requires_grad_(method == "full")
        if method == "lora":
            for block in blocks:
                block.attn.qkv = LoRALinear(block.attn.qkv, rank or BASELINE_RANK)
        elif method == "adapter":
            for index in range(len(blocks)):
                blocks[index] = ParallelAdapterBlock(blocks[index], rank or BASELINE_RANK)
        elif method not in ("linear", "full"):
            raise ValueError(f"unknown baseline method {method!r}")
        self.head = nn.Linear(adapter.num_features, num_classes)

    def forward(self, inputs: torch.Tensor | CachedInputs) -> torch.Tensor:
        if isinstance(inputs, CachedInputs):
            return self.head(inputs["pooled"])
        if self.method == "linear":
            return self.head(self.compute_frozen(inputs)["pooled"])
        return self.head(self.adapter.forward_features(inputs))

    # --- the prefix cache (the linear probe: the whole backbone is frozen, so its pooled features are cached) ----
    @property
    def cache_layout(self) -> str | None:
        return "pooled" if self.method == "linear" else None

    @property
    def frozen_blocks(self) -> range:
        """The blocks no gradient flows through: all of them for the linear probe, none for the other methods."""
        return range(len(self.adapter.blocks) if self.method == "linear" else 0)

    @torch.no_grad()
    def compute_frozen(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.adapter.forward_features(images)}

    def cached_names(self) -> list[str]:
        return ["pooled"]
