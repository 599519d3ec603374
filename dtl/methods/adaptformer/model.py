"""AdaptFormer (Chen et al., 2022): a bottleneck adapter in parallel with every MLP of a ViT.

``x + MLP(LN(x)) + s * up(relu(down(x)))`` with the up-projection zero-initialised (the model starts equal to the
backbone) and ``s = 0.1``. Registered as ``adaptformer``; the older name ``adapter`` still works, with a
deprecation warning.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..base import HeadModel, HeadSpec


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


class AdaptFormerModel(HeadModel):
    method = "adaptformer"

    def __init__(self, family, head: HeadSpec, rank: int):
        self.bottleneck = rank
        super().__init__(family, head)

    def _prepare(self) -> None:
        blocks = self.family.blocks
        for index, block in enumerate(blocks):
            if not isinstance(block, Block):
                raise ValueError("method 'adaptformer' is implemented for ViT backbones only")
            blocks[index] = ParallelAdapterBlock(block, self.bottleneck)


def build(family, head: HeadSpec, options, backbone_dtype) -> AdaptFormerModel:
    return AdaptFormerModel(family, head, **options.resolved(family))
