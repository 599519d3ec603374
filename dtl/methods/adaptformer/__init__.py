"""AdaptFormer (Chen et al., 2022): a bottleneck adapter in parallel with every MLP of a ViT.

The model is in ``model.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...validation import is_int
from ..registry import AddedModules, Method, MethodOptions, register_method

DEFAULT_BOTTLENECK = 8

@dataclass
class AdaptFormerOptions(MethodOptions):
    rank: int | None = None  # the bottleneck width; None: 8

    checks = {"rank": (is_int(1), "an integer >= 1")}

    def defaults(self, family) -> dict:
        return {"rank": DEFAULT_BOTTLENECK}

register_method(Method(
    name="adaptformer", description="AdaptFormer: a bottleneck adapter beside every MLP", options=AdaptFormerOptions,
    build=f"{__name__}.model:build",
    families=("ViT",), needs="the MLP branch of transformer blocks", searchable=("rank",),
    added_modules=AddedModules("adapter", ("adapter_",))),
    aliases={"adapter": "the AdaptFormer method was renamed; use 'adaptformer'"})
