"""DTL on timm's SwinTransformer.

Blocks are numbered globally (Swin-B: 2-2-18-2 = 24 blocks). The side state resets at every stage because the
width changes; DTL+ has one depthwise conv per stage. timm 1.0 runs the patch merging at the START of
stages 1..3 (the authors' code has it at the END of stages 0..2); with the side state reset per stage, both
orders add the side output to the same tensors, so the models agree.
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer

from .family import ChannelsLastFamily


class SwinFamily(ChannelsLastFamily):
    """Stages of blocks on channels-last (B, H, W, C) token grids; no cls token."""
    name = "Swin"

    def __init__(self, backbone: SwinTransformer):
        if not isinstance(backbone, SwinTransformer):
            raise TypeError(f"SwinFamily needs a timm SwinTransformer, got {type(backbone).__name__}")
        super().__init__(backbone)

    def _layout(self):
        return [(list(stage.blocks), stage.blocks[0].dim) for stage in self.backbone.layers]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.patch_embed(images)

    def enter_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.layers[stage].downsample(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # Swin's head: final norm on every token, then the token mean.
        return self.backbone.norm(x).mean(dim=(1, 2))

    def grid_size(self, stage: int) -> tuple[int, int]:
        return tuple(self._blocks[self._stages[stage].first_block].input_resolution)
