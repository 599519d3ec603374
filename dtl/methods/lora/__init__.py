"""LoRA (Hu et al., 2022): a low-rank update beside every attention ``qkv`` projection of a transformer (ViT, EVA,
BEiT).

The model is in ``model.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...validation import is_int
from ..registry import AddedModules, Method, MethodOptions, register_method

DEFAULT_RANK = 8  # the usual comparison setting

@dataclass
class LoRAOptions(MethodOptions):
    rank: int | None = None  # None: 8

    checks = {"rank": (is_int(1), "an integer >= 1")}

    def defaults(self, family) -> dict:
        return {"rank": DEFAULT_RANK}

register_method(Method(
    name="lora", description="LoRA: a low-rank update of every attention qkv projection", options=LoRAOptions,
    build=f"{__name__}.model:build",
    families=("ViT", "Eva", "BEiT"), needs="the attention qkv projections of transformer blocks",
    searchable=("rank",), benchmark_reference=True,
    # counted as attention all the same: the updates sit inside the attention projections they wrap
    added_modules=AddedModules("adapter", ("lora_",))))
