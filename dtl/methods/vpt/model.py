"""VPT (Jia et al., 2022): learned prompt tokens inserted after the ViT's class token.

``prompt_depth: deep`` (the default) gives every block its own ``prompt_length`` tokens, replacing the previous
block's output at those positions; ``shallow`` prepends one set before the first block only. Trainable: ``L x d``
(shallow) or ``N x L x d`` (deep) parameters plus the head: 92,160 for ViT-B/16 with 10 deep prompts. The head
reads the patch tokens as every method's does; the prompt tokens are left out (of the mean, of the feature maps).
Prompts start uniform in +-sqrt(6 / (3 p^2 + d)) for patch size p, as in the authors' code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...models.vit import VitFamily
from ..base import HeadModel, HeadSpec


class VPTModel(HeadModel):
    method = "vpt"

    def __init__(self, family: VitFamily, head: HeadSpec, prompt_length: int, prompt_depth: str):
        self.prompt_length, self.deep = prompt_length, prompt_depth == "deep"
        super().__init__(family, head)

    def _prepare(self) -> None:
        vit = self.family.backbone
        patch = vit.patch_embed.patch_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + vit.embed_dim))
        layers = len(self.family.blocks) if self.deep else 1
        self.prompts = nn.Parameter(torch.empty(layers, self.prompt_length, vit.embed_dim).uniform_(-bound, bound))

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        family, length = self.family, self.prompt_length
        first = family.num_prefix_tokens  # prompts go right after the class (and register) tokens
        wanted, outputs = set(self.head_blocks), {}
        x = family.embed(images)
        for block in range(len(family.blocks)):
            if block == 0 or self.deep:
                prompts = self.prompts[block if self.deep else 0].expand(x.shape[0], -1, -1).to(x.dtype)
                rest = x[:, first + (length if block else 0):]
                x = torch.cat([x[:, :first], prompts, rest], dim=1)
            x = family.run_block(block, x)
            if block in wanted:  # what the head reads leaves the prompt tokens out
                outputs[block] = torch.cat([x[:, :first], x[:, first + length:]], dim=1)
        return [outputs[block] for block in self.head_blocks]


def build(family, head: HeadSpec, options, backbone_dtype) -> VPTModel:
    return VPTModel(family, head, **options.resolved(family))
