"""Full fine-tuning: every backbone weight trains (the memory and accuracy reference of the comparisons)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import HeadModel
from .registry import Method, MethodOptions, register_method


@dataclass
class FullOptions(MethodOptions):
    """No options."""


class FullFineTuning(HeadModel):
    method = "full"

    def _prepare(self) -> None:
        self.family.requires_grad_(True)


register_method(Method(
    name="full", description="full fine-tuning: every weight of the backbone trains",
    options=FullOptions, build=lambda family, num_classes, options, dtype: FullFineTuning(family, num_classes)))
