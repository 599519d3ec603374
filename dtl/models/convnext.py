"""DTL on timm's ConvNeXt (any size).

Blocks are numbered across stages (ConvNeXt-T: 3-3-9-3 = 18 blocks). timm runs each stage's downsampling (a
norm and a 2x2 stride-2 conv) at the start of the stage, outside the blocks, so it is the stage transition, as
Swin's patch merging is; every block keeps its stage's width and grid. The side state resets per stage.
"""
from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt

from .family import ConvFamily


class ConvNeXtFamily(ConvFamily):
    """Stem -> [downsample -> blocks]* -> the head's pooling and norm, on channels-last token maps."""
    name = "ConvNeXt"

    def __init__(self, backbone: ConvNeXt):
        if not isinstance(backbone, ConvNeXt):
            raise TypeError(f"ConvNeXtFamily needs a timm ConvNeXt, got {type(backbone).__name__}")
        super().__init__(backbone)

    def _layout(self):
        return [(list(stage.blocks), stage.blocks[-1].conv_dw.out_channels) for stage in self.backbone.stages]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.stem(images).permute(0, 2, 3, 1)

    def enter_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.stages[stage].downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # ConvNeXt's head: global average, then the pretrained norm (the classifier itself is DTL's head).
        backbone = self.backbone
        return backbone.forward_head(backbone.norm_pre(x.permute(0, 3, 1, 2)), pre_logits=True)
