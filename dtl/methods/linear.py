"""The linear probe: the whole backbone frozen, only the head trains (from cached pooled features when it can)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import HeadModel
from .registry import Method, MethodOptions, register_method


@dataclass
class LinearOptions(MethodOptions):
    """No options: the probe trains the head only."""


class LinearProbe(HeadModel):
    method = "linear"
    cache_layout = "pooled"  # the backbone is frozen end to end: its pooled features are the same every epoch

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.compute_frozen(images)["pooled"]

    @property
    def frozen_blocks(self) -> range:
        return range(len(self.family.blocks))


register_method(Method(
    name="linear", description="linear probe: a trained head on the frozen backbone's pooled features",
    options=LinearOptions, build=lambda family, num_classes, options, dtype: LinearProbe(family, num_classes)))
