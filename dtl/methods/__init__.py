"""PETL methods, one sub-package each, behind a registry (``dtl.methods.registry``), and ``create_model``.

Every sub-package registers its method when this package is imported (DTL's first, then the others in name
order), so a new method is one new sub-package here and nothing else: its ``__init__`` declares the options
dataclass and the :class:`~dtl.methods.registry.Method` record (name, capabilities, benchmark rows) without
importing torch, and its ``model.py`` builds the model. Importing this package therefore imports no torch;
``create_model`` and the model classes load torch when they are first used. ``dtl.methods.available_methods()``
lists the methods. Every model ends in ``model.head`` (a classifier on the backbone pooled as DTL pools it, or a
segmentation decode head: ``heads.py``), so methods differ only in what they train.
"""
from __future__ import annotations

import importlib
import pkgutil

from .registry import (
    BACKBONE_DTYPES,
    Method,
    MethodOptions,
    OptionError,
    all_option_names,
    available_methods,
    canonical_name,
    float_option_names,
    get_method,
    method_options,
    register_method,
)

_INFRASTRUCTURE = {"base", "factory", "heads", "registry"}
importlib.import_module(f"{__name__}.dtl")  # DTL and DTL+ first: the rows and option keys start with them
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

METHODS = available_methods()  # the built-in methods, in registration order

# The parts that need torch, imported when first used (``from dtl.methods import create_model`` works as before).
_LAZY = {"create_model": "factory", "resolve_dtype": "factory", "trainable_parameters": "factory",
         "DTLModel": "dtl.model", "PrefixState": "dtl.model"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONE_DTYPES", "DTLModel", "METHODS", "Method", "MethodOptions", "OptionError", "PrefixState",
    "all_option_names", "available_methods", "canonical_name", "create_model", "float_option_names", "get_method", "method_options",
    "register_method", "resolve_dtype", "trainable_parameters",
]
