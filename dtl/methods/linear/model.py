"""The linear probe: the whole backbone frozen, only the head trains (from cached features when it can: the pooled
features of a classifier, the feature maps of a decode head)."""
from __future__ import annotations

import torch

from ..base import HeadModel, HeadSpec
from ..heads import DecodeHead


class LinearProbe(HeadModel):
    method = "linear"

    @property
    def cache_layout(self) -> str:
        # The backbone is frozen end to end: what the head reads is the same every epoch.
        return "maps" if isinstance(self.head, DecodeHead) else "pooled"

    def features(self, images: torch.Tensor):
        with torch.no_grad():  # nothing before the head trains: no graph through the backbone
            return super().features(images)

    @property
    def frozen_blocks(self) -> range:
        return range(len(self.family.blocks))


def build(family, head: HeadSpec, options, backbone_dtype) -> LinearProbe:
    return LinearProbe(family, head)
