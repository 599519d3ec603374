"""What every method's model shares: the backbone (behind its family interface), and a head that reads it the
same way for every method (``dtl.methods.heads``).

The head is ``model.head`` for every method, so trainable counts can be quoted without it (as the paper does).
A classifier reads the pooled features (for ViT: the mean of the patch tokens, then the backbone's pretrained
final norm), a decode head reads feature maps of some blocks; either way the methods differ only in what they
train. Subclasses set what trains or what they add beside the backbone (``_prepare``) and, if the forward pass
differs, ``block_outputs`` (DTL also ``features`` and ``forward``: its frozen prefix and its suffix run apart).

The prefix cache (``dtl.cache``) asks a model four things: ``cache_layout`` (None: it cannot use the cache),
``frozen_blocks`` (the blocks no gradient flows through: what the ``suffix`` drop-path scope leaves
deterministic), ``compute_frozen(images)`` (what the cache stores) and ``cached_names()`` (what the model reads);
``forward`` takes a batch of those (``CachedInputs``). ``prefix_randomness()`` names what would make the frozen
part's outputs change between epochs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.family import BackboneFamily, CachedInputs
from .heads import DecodeHead, HeadSpec, apply_head, classify, head_blocks, head_inputs

__all__ = ["HeadModel", "HeadSpec", "call_qkv_as_module", "classify"]


def call_qkv_as_module(backbone: nn.Module) -> None:
    """EVA's and BEiT's attention fold their separate q/v biases into ``F.linear`` on ``qkv.weight``, which skips
    the ``qkv`` module itself: methods that wrap that module (LoRA, SSF) make the attention call it and add the
    biases to its output instead (the same sum)."""
    for module in backbone.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True


class HeadModel(nn.Module):
    """A backbone with a fresh head (``head``: what it outputs); nothing of the backbone trains unless a subclass
    says so."""

    method: str = ""
    cache_layout: str | None = None

    def __init__(self, family: BackboneFamily, head: HeadSpec):
        super().__init__()
        self.family = family
        family.requires_grad_(False)
        self._prepare()
        self.head = head.build(family)

    def _prepare(self) -> None:
        """Change or unfreeze parts of ``self.family``, or add trainable modules beside it (called before the head
        exists, after the backbone is frozen)."""

    @property
    def head_blocks(self) -> list[int]:
        """The blocks whose outputs the head reads."""
        return head_blocks(self.family, self.head)

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The outputs (tokens) of :attr:`head_blocks`, as this method runs the backbone."""
        return self.family.forward_blocks(images, self.head_blocks)

    def features(self, images: torch.Tensor):
        """What the head reads: the pooled features, or a decode head's feature maps."""
        return head_inputs(self.family, self.head, self.block_outputs(images))

    def forward(self, inputs: torch.Tensor | CachedInputs) -> torch.Tensor:
        if isinstance(inputs, CachedInputs):
            features = [inputs[name] for name in self.cached_names()]
            return apply_head(self.head, features if isinstance(self.head, DecodeHead) else features[0])
        return apply_head(self.head, self.features(inputs))

    @property
    def frozen_blocks(self) -> range:
        """Blocks that no gradient flows through (none: the method trains through every block)."""
        return range(0)

    @property
    def prefix_is_deterministic(self) -> bool:
        """True when the frozen part gives the same output for the same image in train mode: no drop-path, dropout
        or patch dropout in the embedding or :attr:`frozen_blocks` (what the prefix cache needs)."""
        return not self.prefix_randomness()

    def prefix_randomness(self) -> list[str]:
        """Names of the stochastic modules (rate > 0) that the frozen part runs, e.g. ``blocks.3.drop_path1``."""
        return self.family.stochastic_modules(self.frozen_blocks)

    @torch.no_grad()
    def compute_frozen(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        family = self.family
        features = head_inputs(family, self.head, family.forward_blocks(images, self.head_blocks))
        return dict(zip(self.cached_names(), features if isinstance(self.head, DecodeHead) else [features]))

    def cached_names(self) -> list[str]:
        if isinstance(self.head, DecodeHead):
            return [f"map.{block}" for block in self.head.blocks]
        return ["pooled"]
