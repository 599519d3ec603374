"""DTL on timm's Beit (BEiT and BEiT v2): a ViT whose attention adds a relative position bias per block (or one
shared by all blocks), so the family hands every block the shared bias when the model has one."""
from __future__ import annotations

import torch
from timm.models.beit import Beit

from .family import TokenFamily


class BeitFamily(TokenFamily):
    name = "BEiT"

    def __init__(self, backbone: Beit):
        if not isinstance(backbone, Beit):
            raise TypeError(f"BeitFamily needs a timm Beit, got {type(backbone).__name__}")
        super().__init__(backbone)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        beit = self.backbone
        x = beit.patch_embed(images)
        x = torch.cat((beit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if beit.pos_embed is not None:
            x = x + beit.pos_embed
        return beit.pos_drop(x)

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        shared = self.backbone.rel_pos_bias
        return self.blocks[block](x, shared_rel_pos_bias=shared() if shared is not None else None)

    def final_norm(self, features: torch.Tensor) -> torch.Tensor:
        # `fc_norm` for BEiT's mean pooling, `norm` otherwise; the other is an identity.
        return self.backbone.fc_norm(self.backbone.norm(features))
