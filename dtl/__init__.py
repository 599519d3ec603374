"""DTL: Disentangled Transfer Learning (Fu, Zhu, Wu; AAAI 2024) on timm backbones.

``import dtl`` imports nothing heavy: the names below load torch and timm when first used, so the experiment
schema (``dtl.config``) parses and validates a params file without them. The DVC pipeline, the Ray Tune sweeps
and MLflow live in ``pipeline/``, ``sweeps/`` and ``tracking/``, so the library runs where those are absent.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it (imported on first access)
_EXPORTS = {
    "METHODS": "methods", "available_methods": "methods", "get_method": "methods", "register_method": "methods",
    "create_model": "methods", "DTLModel": "methods", "trainable_parameters": "methods",
    "EMBEDDED_BACKBONE": "models", "CheckpointError": "models", "register_family": "models",
    "MultiTaskModel": "multitask",
    "TrainedModelError": "trained", "export_trained": "trained", "load_trained": "trained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
