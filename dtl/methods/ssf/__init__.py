"""SSF (Lian et al., 2022): a learned scale and shift after every linear layer, normalisation and convolution
of the backbone (about 0.21M on ViT-B/16, the published count).

The model is in ``model.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method, MethodOptions, register_method


@dataclass
class SSFOptions(MethodOptions):
    """No options."""


# No added_modules: each scale and shift wraps a backbone module under that module's name, so the memory breakdown
# counts it as the module it follows.
register_method(Method(
    name="ssf", description="SSF: a learned scale and shift after every linear layer and norm", options=SSFOptions,
    build=f"{__name__}.model:build"))
