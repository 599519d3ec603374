"""Backbones: timm models behind one small interface per family (``BackboneFamily``), and their weights.

Backbone families are registered as (timm model class -> family class, ``registry.py``); a new family is one
module plus one :func:`register_family` call. The PETL methods that wrap a backbone are in ``dtl.methods``.
"""
from __future__ import annotations

from ..config import DROP_PATH_SCOPES
from . import embedded  # noqa: F401  (registers the embedded backbone with timm)
from .backbone import CheckpointError, create_backbone, load_checkpoint
from .beit import BeitFamily
from .convnext import ConvNeXtFamily
from .embedded import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS
from .eva import EvaFamily
from .family import BackboneFamily, CachedInputs, ConvFamily
from .registry import creation_options, family_for, register_family
from .resnet import ResNetFamily
from .swin import SwinFamily
from .vit import VitFamily

__all__ = [
    "DROP_PATH_SCOPES", "BackboneFamily", "BeitFamily", "CachedInputs", "CheckpointError", "ConvFamily",
    "ConvNeXtFamily", "EMBEDDED_BACKBONE", "EMBEDDED_WEIGHTS", "EvaFamily", "ResNetFamily", "SwinFamily",
    "VitFamily", "create_backbone", "creation_options", "family_for", "load_checkpoint", "register_family",
]
