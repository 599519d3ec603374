"""DTL on timm's VisionTransformer (any size, image size or patch size)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from ..presets import FAMILY_DEFAULTS
from .family import BackboneFamily, StageInfo


class VitFamily(BackboneFamily):
    """One stage of N blocks on (B, T, C) tokens; prefix tokens (cls, registers) come first."""
    name = "ViT"
    paper_defaults = FAMILY_DEFAULTS["vit"]

    def __init__(self, backbone: VisionTransformer):
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"VitFamily needs a timm VisionTransformer, got {type(backbone).__name__}")
        super().__init__(backbone)
        self._stages = [StageInfo(0, len(backbone.blocks) - 1, backbone.embed_dim)]
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.grid_size_ = tuple(backbone.patch_embed.grid_size)

    @property
    def blocks(self):
        return self.backbone.blocks

    @property
    def stages(self):
        return self._stages

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # DTL's head: mean of the patch tokens, THEN the pretrained final norm (not timm's fc_norm).
        return self.backbone.norm(x[:, self.num_prefix_tokens:].mean(dim=1))

    def grid_size(self, stage: int) -> tuple[int, int]:
        return self.grid_size_

    def to_grid(self, x: torch.Tensor):
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        B, _, C = patches.shape
        grid = patches.transpose(1, 2).reshape(B, C, *self.grid_size_)
        return grid, prefix

    def from_grid(self, grid: torch.Tensor, extra, like: torch.Tensor) -> torch.Tensor:
        patches = grid.flatten(2).transpose(1, 2)
        return torch.cat([extra, patches], dim=1) if extra is not None and extra.shape[1] else patches
