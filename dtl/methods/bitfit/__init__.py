"""BitFit (Ben Zaken et al., 2022): train every bias term of the backbone, nothing else (about 0.10M on ViT-B/16)."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method, MethodOptions, register_method


@dataclass
class BitFitOptions(MethodOptions):
    """No options."""


register_method(Method(
    name="bitfit", description="BitFit: every bias of the backbone trains", options=BitFitOptions,
    build=f"{__name__}.model:build"))
