"""BitFit (Ben Zaken et al., 2022): train every bias term of the backbone, nothing else (about 0.10M on ViT-B/16)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import HeadModel
from .registry import Method, MethodOptions, register_method


@dataclass
class BitFitOptions(MethodOptions):
    """No options."""


class BitFitModel(HeadModel):
    method = "bitfit"

    def _prepare(self) -> None:
        for name, param in self.family.named_parameters():
            if name.endswith(".bias") or name == "bias":
                param.requires_grad_(True)


register_method(Method(
    name="bitfit", description="BitFit: every bias of the backbone trains", options=BitFitOptions,
    build=lambda family, num_classes, options, dtype: BitFitModel(family, num_classes)))
