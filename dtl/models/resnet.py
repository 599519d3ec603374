"""DTL on timm's ResNet (basic and bottleneck blocks, any depth or stem).

Blocks are numbered across the four stages (ResNet-50: 3-4-6-3 = 16 blocks). Unlike ViT, Swin and ConvNeXt, a
ResNet changes width and resolution INSIDE the first block of a stage (its strided conv and projection
shortcut), so that block's input has the previous stage's width and twice its grid. Its side map is the one
place where the maps differ: the down-projection reads the wider-grid input (its own input width), and the
rank-r code is averaged over each output position's 2 x 2 window before the up-projection to the stage's
width. Every other block's map is the usual one. The side state resets per stage. Batch norms stay in eval
mode wherever they do not train (see ``BackboneFamily.train``).
"""
from __future__ import annotations

import torch
from timm.models.resnet import ResNet

from .family import ConvFamily


class ResNetFamily(ConvFamily):
    """Stem (conv, norm, act, max-pool) -> layer1..layer4 -> global average, on channels-last token maps."""
    name = "ResNet"

    def __init__(self, backbone: ResNet):
        if not isinstance(backbone, ResNet):
            raise TypeError(f"ResNetFamily needs a timm ResNet, got {type(backbone).__name__}")
        super().__init__(backbone)

    def _layout(self):
        layers = [self.backbone.layer1, self.backbone.layer2, self.backbone.layer3, self.backbone.layer4]
        return [(list(layer), _out_channels(layer[-1])) for layer in layers]

    def block_input_dim(self, block: int) -> int:
        return self.blocks[block].conv1.in_channels

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        r = self.backbone
        return r.maxpool(r.act1(r.bn1(r.conv1(images)))).permute(0, 2, 3, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(x.permute(0, 3, 1, 2), pre_logits=True)


def _out_channels(block) -> int:
    last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2  # bottleneck / basic block
    return last_norm.num_features
