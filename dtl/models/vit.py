"""DTL on timm's VisionTransformer (any size, image or patch size; DeiT-3, CLIP, SigLIP, DINOv2 included)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from .family import TokenFamily


class VitFamily(TokenFamily):
    """timm's ViT: register tokens (DINOv2) count among the prefix tokens, a pre-norm (CLIP) is part of the
    embedding, and an attention-pool head (SigLIP) is replaced by DTL's."""

    name = "ViT"

    @classmethod
    def creation_options(cls, skeleton) -> dict:
        # Keep the pretrained final `norm`: DTL applies it after the patch-token mean itself. timm's
        # global_pool='avg' would swap it for a new, untrained fc_norm, and 'map' would add an attention pool DTL
        # does not use.
        return {"global_pool": "", "fc_norm": False}

    def __init__(self, backbone: VisionTransformer):
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"VitFamily needs a timm VisionTransformer, got {type(backbone).__name__}")
        super().__init__(backbone)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def final_norm(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(features)
