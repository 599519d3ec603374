"""The linear probe: the whole backbone frozen, only the head trains (from cached pooled features when it can)."""
from __future__ import annotations

import torch

from ..base import HeadModel


class LinearProbe(HeadModel):
    method = "linear"
    cache_layout = "pooled"  # the backbone is frozen end to end: its pooled features are the same every epoch

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.compute_frozen(images)["pooled"]

    @property
    def frozen_blocks(self) -> range:
        return range(len(self.family.blocks))


def build(family, num_classes: int, options, backbone_dtype) -> LinearProbe:
    return LinearProbe(family, num_classes)
