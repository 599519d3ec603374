"""The linear probe: the whole backbone frozen, only the head trains (from cached pooled features when it can)."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method, MethodOptions, register_method


@dataclass
class LinearOptions(MethodOptions):
    """No options: the probe trains the head only."""


register_method(Method(
    name="linear", description="linear probe: a trained head on the frozen backbone's pooled features", options=LinearOptions,
    build=f"{__name__}.model:build"))
