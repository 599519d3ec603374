"""What every method's model shares: the backbone (behind its family interface), DTL's pooling and a linear head.

The head is ``model.head`` for every method, so trainable counts can be quoted without it (as the paper does),
and the pooling is the same for all (for ViT: the mean of the patch tokens, then the backbone's pretrained final
norm), so methods differ only in what they train. Subclasses set what trains (``_prepare``) and, if the forward
pass differs, ``features``.

The prefix cache (``dtl.cache``) asks a model four things: ``cache_layout`` (None: it cannot use the cache),
``frozen_blocks`` (the blocks no gradient flows through: what the ``suffix`` drop-path scope leaves
deterministic), ``compute_frozen(images)`` (what the cache stores) and ``cached_names()`` (what the model reads).
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.family import BackboneFamily, CachedInputs


def call_qkv_as_module(backbone: nn.Module) -> None:
    """EVA's and BEiT's attention fold their separate q/v biases into ``F.linear`` on ``qkv.weight``, which skips
    the ``qkv`` module itself: methods that wrap that module (LoRA, SSF) make the attention call it and add the
    biases to its output instead (the same sum)."""
    for module in backbone.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True


def classify(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """The head's logits in fp32, outside any autocast: the argmax and the loss read full-precision logits (bf16
    logits round to 8 bits of mantissa, which changes the top-1 class of some images)."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.to(head.weight.dtype))


class HeadModel(nn.Module):
    """A backbone with a fresh linear head; nothing of the backbone trains unless a subclass says so."""

    method: str = ""
    cache_layout: str | None = None

    def __init__(self, family: BackboneFamily, num_classes: int):
        super().__init__()
        self.family = family
        family.requires_grad_(False)
        self._prepare()
        self.head = nn.Linear(family.num_features, num_classes)

    def _prepare(self) -> None:
        """Change or unfreeze parts of ``self.family`` (called before the head exists)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.family.forward_features(images)

    def forward(self, inputs: torch.Tensor | CachedInputs) -> torch.Tensor:
        if isinstance(inputs, CachedInputs):
            return classify(self.head, inputs["pooled"])
        return classify(self.head, self.features(inputs))

    @property
    def frozen_blocks(self) -> range:
        """Blocks that no gradient flows through (none: the method trains through every block)."""
        return range(0)

    @torch.no_grad()
    def compute_frozen(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.family.forward_features(images)}

    def cached_names(self) -> list[str]:
        return ["pooled"]
