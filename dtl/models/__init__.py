"""Backbones: timm models behind one small interface per family (``BackboneAdapter``), and their weights.

Backbone families are registered as (timm model class -> adapter class); a new family is one adapter module
plus one :func:`register_family` call. The PETL methods that wrap a backbone are in ``dtl.methods``.
"""
from __future__ import annotations

from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import embedded  # noqa: F401  (registers the embedded backbone with timm)
from .adapters import DROP_PATH_SCOPES, BackboneAdapter, CachedInputs, ConvAdapter
from .backbone import CheckpointError, create_backbone, load_checkpoint
from .convnext import ConvNeXtAdapter
from .embedded import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS
from .resnet import ResNetAdapter
from .swin import SwinAdapter
from .vit import VitAdapter

_FAMILIES: list[tuple[type[nn.Module], type[BackboneAdapter]]] = [
    (VisionTransformer, VitAdapter),
    (SwinTransformer, SwinAdapter),
    (ConvNeXt, ConvNeXtAdapter),
    (ResNet, ResNetAdapter),
]


def register_family(model_class: type[nn.Module], adapter_class: type[BackboneAdapter]) -> None:
    """Teach ``dtl.create_model`` a new backbone family."""
    _FAMILIES.insert(0, (model_class, adapter_class))


def adapter_for(backbone: nn.Module) -> BackboneAdapter:
    for model_class, adapter_class in _FAMILIES:
        if isinstance(backbone, model_class):
            return adapter_class(backbone)
    supported = ", ".join(m.__name__ for m, _ in _FAMILIES)
    raise ValueError(f"no DTL adapter for {type(backbone).__name__}; supported families: {supported}")


__all__ = [
    "DROP_PATH_SCOPES", "BackboneAdapter", "CachedInputs", "CheckpointError", "ConvAdapter", "ConvNeXtAdapter",
    "EMBEDDED_BACKBONE", "EMBEDDED_WEIGHTS", "ResNetAdapter", "SwinAdapter", "VitAdapter", "adapter_for", "create_backbone", "load_checkpoint", "register_family",
]
