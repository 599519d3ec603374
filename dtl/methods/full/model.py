"""Full fine-tuning: every backbone weight trains (the memory and accuracy reference of the comparisons)."""
from __future__ import annotations

from ..base import HeadModel, HeadSpec


class FullFineTuning(HeadModel):
    method = "full"

    def _prepare(self) -> None:
        self.family.requires_grad_(True)


def build(family, head: HeadSpec, options, backbone_dtype) -> FullFineTuning:
    return FullFineTuning(family, head)
