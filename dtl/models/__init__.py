"""Backbones: timm models behind one small interface per family (``BackboneFamily``), and their weights.

Backbone families are registered as (timm model class -> family class); a new family is one module
plus one :func:`register_family` call. The PETL methods that wrap a backbone are in ``dtl.methods``.
"""
from __future__ import annotations

from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import DROP_PATH_SCOPES
from . import embedded  # noqa: F401  (registers the embedded backbone with timm)
from .backbone import CheckpointError, create_backbone, load_checkpoint
from .convnext import ConvNeXtFamily
from .embedded import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS
from .family import BackboneFamily, CachedInputs, ConvFamily
from .resnet import ResNetFamily
from .swin import SwinFamily
from .vit import VitFamily

_FAMILIES: list[tuple[type[nn.Module], type[BackboneFamily]]] = [
    (VisionTransformer, VitFamily),
    (SwinTransformer, SwinFamily),
    (ConvNeXt, ConvNeXtFamily),
    (ResNet, ResNetFamily),
]


def register_family(model_class: type[nn.Module], family_class: type[BackboneFamily]) -> None:
    """Teach ``dtl.create_model`` a new backbone family."""
    _FAMILIES.insert(0, (model_class, family_class))


def family_for(backbone: nn.Module) -> BackboneFamily:
    for model_class, family_class in _FAMILIES:
        if isinstance(backbone, model_class):
            return family_class(backbone)
    supported = ", ".join(m.__name__ for m, _ in _FAMILIES)
    raise ValueError(f"no DTL backbone family for {type(backbone).__name__}; supported families: {supported}")


__all__ = [
    "DROP_PATH_SCOPES", "BackboneFamily", "CachedInputs", "CheckpointError", "ConvFamily", "ConvNeXtFamily",
    "EMBEDDED_BACKBONE", "EMBEDDED_WEIGHTS", "ResNetFamily", "SwinFamily", "VitFamily", "create_backbone",
    "family_for", "load_checkpoint", "register_family",
]
