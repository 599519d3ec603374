"""DTL on timm's Eva class: EVA-02, DINOv3, Meta's Perception Encoder and the RoPE ViTs.

Their blocks read like a ViT's, with rotary position embeddings inside attention (applied to the patch tokens,
not to the class and register tokens), and some with SwiGLU MLPs and layer scale. A side network that reads block
inputs and adds to block outputs fits them unchanged; what the family adds is the rotary embedding each block
needs: built once for the token grid (and again only when the model moves to another device or dtype) and handed
to every block the family runs. Perception Encoder's attention-pool head is replaced by DTL's head, as SigLIP's is.
"""
from __future__ import annotations

import torch
from timm.models.eva import Eva

from .family import TokenFamily


class EvaFamily(TokenFamily):
    name = "Eva"

    def __init__(self, backbone: Eva):
        if not isinstance(backbone, Eva):
            raise TypeError(f"EvaFamily needs a timm Eva, got {type(backbone).__name__}")
        super().__init__(backbone)
        self._rope: dict[tuple, torch.Tensor | None] = {}

    @classmethod
    def creation_options(cls, skeleton) -> dict:
        # An attention-pool head (Perception Encoder) is replaced by DTL's: not built at all. Pooling by the mean
        # or the class token decides which final norm is pretrained (fc_norm or norm), so those stay as they are.
        return {"global_pool": ""} if getattr(skeleton, "attn_pool", None) is not None else {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        eva = self.backbone
        x, _ = eva._pos_embed(eva.patch_embed(images))  # the rotary embedding comes from rotary_embedding()
        return eva.norm_pre(x)

    def rotary_embedding(self, block: int, x: torch.Tensor) -> torch.Tensor | None:
        """The rotary embedding ``block`` applies to the patch tokens of ``x`` (None: the model has none)."""
        rope = self.backbone.rope
        if rope is None:
            return None
        key = (x.device, self.grid_size_)
        if key not in self._rope:
            self._rope[key] = rope.get_embed(shape=self.grid_size_).to(x.device)
        embedding = self._rope[key]
        return embedding[block] if getattr(self.backbone, "rope_mixed", False) else embedding  # per-depth: mixed

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[block](x, rope=self.rotary_embedding(block, x))

    def final_norm(self, features: torch.Tensor) -> torch.Tensor:
        # Exactly one of them is a pretrained norm: `fc_norm` for models that pool by the mean (EVA-02), `norm`
        # for the others; the other is an identity.
        return self.backbone.fc_norm(self.backbone.norm(features))

    def _apply(self, fn, recurse: bool = True):
        self._rope.clear()  # moved or cast: the embedding is built again from the moved rotary module
        return super()._apply(fn, recurse)
