"""Full fine-tuning: every backbone weight trains (the memory and accuracy reference of the comparisons)."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method, MethodOptions, register_method


@dataclass
class FullOptions(MethodOptions):
    """No options."""


register_method(Method(
    name="full", description="full fine-tuning: every weight of the backbone trains", options=FullOptions,
    build=f"{__name__}.model:build", benchmark_reference=True))
