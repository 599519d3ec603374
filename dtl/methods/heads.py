"""The heads every method's model ends in: a linear classifier on pooled features, or a decode head that maps
feature maps of the backbone to per-pixel class scores (semantic segmentation).

* ``None`` (classification): ``nn.Linear`` on the pooled features (the mean of the patch tokens, then the
  backbone's pretrained final norm; each family's own pooling for Swin and the CNNs).
* ``linear``: BatchNorm and a 1 x 1 convolution on the last block's feature map: the standard probe of frozen
  features for segmentation.
* ``fpn``: a light multi-level head. It reads four feature maps (:meth:`BackboneFamily.dense_levels`): for
  one-stage transformers four evenly spaced blocks, resized by 4, 2, 1 and 1/2 (ViTDet's simple feature
  pyramid); for Swin and the CNNs the outputs of their four stages. A feature pyramid network (1 x 1 lateral
  convolutions to ``channels``, a quarter of the deepest features' width between 32 and 256; a top-down pathway;
  one 3 x 3 convolution per level) then sums every level at the finest one, as Semantic FPN does, and a 1 x 1
  convolution classifies each position.

A decode head returns logits at its finest feature map's stride (4 pixels for the multi-level head, the patch
size or 32 pixels for ``linear``); what reads them (the loss, the scores, prediction) resizes them bilinearly to
the labels' size. Every head trains with the method's trainable parameters; a method's frozen blocks stay frozen
whatever the head reads from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import ConvNormAct
from torch import nn
from torch.nn import functional as F

from ..config import DECODE_HEADS


def classify(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The output layer's logits in fp32, outside any autocast: the argmax and the loss read full-precision
    logits (bf16 logits round to 8 bits of mantissa, which changes the top-1 class of some inputs)."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.to(head.weight.dtype))


class DecodeHead(nn.Module):
    """Feature maps of ``blocks`` (the family's block indices, finest first) -> per-position logits."""

    blocks: list[int]

    def inputs(self, family, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block outputs (tokens) -> the ``(B, C, H, W)`` feature maps this head reads."""
        return [family.dense_map(x) for x in outputs]

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # A backbone stored in bf16 outside autocast hands over bf16 maps; the head's weights are fp32.
        weight = self.classifier.weight
        return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


class LinearDecodeHead(DecodeHead):
    def __init__(self, family, num_classes: int):
        super().__init__()
        self.blocks = [len(family.blocks) - 1]
        dim = family.block_output_dim(self.blocks[0])
        self.norm = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return classify(self.classifier, self.norm(self._cast(features[-1])))


def _resize(dim: int, scale: float) -> tuple[nn.Module, int]:
    """ViTDet's resizing of one feature map (transposed convolutions up, max-pooling down) and its new width."""
    if scale == 4:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.BatchNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)), dim // 4
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if scale == 1:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, ceil_mode=True), dim
    raise ValueError(f"no resizing by {scale} (expected 4, 2, 1 or 0.5)")


class PyramidDecodeHead(DecodeHead):
    def __init__(self, family, num_classes: int, channels: int | None = None, dropout: float = 0.1):
        super().__init__()
        levels = family.dense_levels()
        self.blocks = [block for block, _ in levels]
        # A quarter of the deepest features' width, 32 to 256 (ViT-B/16: 192): light next to the backbone.
        channels = channels or min(256, max(32, family.block_output_dim(self.blocks[-1]) // 4))
        resized = [_resize(family.block_output_dim(block), scale) for block, scale in levels]
        self.resize = nn.ModuleList(module for module, _ in resized)
        self.lateral = nn.ModuleList(ConvNormAct(dim, channels, 1) for _, dim in resized)
        self.smooth = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in resized)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = [lateral(resize(self._cast(x))) for x, resize, lateral in zip(features, self.resize, self.lateral)]
        for level in reversed(range(len(maps) - 1)):  # top-down: each level gets the coarser one's context
            maps[level] = maps[level] + _resized_to(maps[level + 1], maps[level])
        finest = maps[0]
        fused = sum(_resized_to(smooth(x), finest) for x, smooth in zip(maps, self.smooth))
        return classify(self.classifier, self.dropout(fused))


def _resized_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class HeadSpec:
    """The head a model ends in: ``num_classes`` outputs, from a linear classifier (``decode_head`` None) or a
    decode head. Models build it (:meth:`build`) after their own parameters, so that a classifier draws its
    initial weights from the same random stream whatever the head's kind."""

    num_classes: int
    decode_head: str | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.decode_head not in (None, *DECODE_HEADS):
            raise ValueError(f"decode_head must be one of {', '.join(DECODE_HEADS)}, got {self.decode_head!r}")

    @property
    def dense(self) -> bool:
        return self.decode_head is not None

    def build(self, family) -> nn.Module:
        if self.decode_head == "linear":
            return LinearDecodeHead(family, self.num_classes)
        if self.decode_head == "fpn":
            return PyramidDecodeHead(family, self.num_classes)
        return nn.Linear(family.num_features, self.num_classes)


def head_blocks(family, head: nn.Module) -> list[int]:
    """The blocks whose outputs ``head`` reads (a classifier: the last block's, pooled)."""
    return list(head.blocks) if isinstance(head, DecodeHead) else [len(family.blocks) - 1]


def head_inputs(family, head: nn.Module, outputs: list[torch.Tensor]):
    """The outputs of :func:`head_blocks` -> what ``head`` takes (pooled features, or feature maps)."""
    return head.inputs(family, outputs) if isinstance(head, DecodeHead) else family.pool(outputs[-1])


def apply_head(head: nn.Module, inputs) -> torch.Tensor:
    return head(inputs) if isinstance(head, DecodeHead) else classify(head, inputs)
