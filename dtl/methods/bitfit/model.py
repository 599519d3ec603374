"""BitFit (Ben Zaken et al., 2022): train every bias term of the backbone, nothing else (about 0.10M on ViT-B/16)."""
from __future__ import annotations

from ..base import HeadModel, HeadSpec


class BitFitModel(HeadModel):
    method = "bitfit"

    def _prepare(self) -> None:
        for name, param in self.family.named_parameters():
            if name.endswith(".bias") or name == "bias":
                param.requires_grad_(True)


def build(family, head: HeadSpec, options, backbone_dtype) -> BitFitModel:
    return BitFitModel(family, head)
