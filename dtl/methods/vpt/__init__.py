"""VPT (Jia et al., 2022): learned prompt tokens inserted after the ViT's class token.

The model is in ``model.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...validation import is_int
from ..registry import Method, MethodOptions, register_method

DEPTHS = ("deep", "shallow")

@dataclass
class VPTOptions(MethodOptions):
    prompt_length: int | None = None  # None: 10
    prompt_depth: str | None = None  # deep | shallow; None: deep

    checks = {"prompt_length": (is_int(1), "an integer >= 1"),
              "prompt_depth": (lambda value: value in DEPTHS, "deep or shallow")}

    def defaults(self, family) -> dict:
        return {"prompt_length": 10, "prompt_depth": "deep"}

# No added_modules: the prompts are a parameter of the model, not a module, so the memory breakdown counts what
# inserting them keeps as the model's own ("other").
register_method(Method(
    name="vpt", description="VPT: learned prompt tokens (deep: at every block; shallow: at the first)",
    options=VPTOptions,
    build=f"{__name__}.model:build",
    families=("ViT",), needs="a token sequence to insert prompt tokens into",
    searchable=("prompt_length", "prompt_depth")))
