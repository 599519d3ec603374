"""The backbone families by timm model class: which family module a model goes through, and the keywords it is
built with. A new family is one module with a ``BackboneFamily`` subclass plus one :func:`register_family` call."""
from __future__ import annotations

from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .beit import BeitFamily
from .convnext import ConvNeXtFamily
from .eva import EvaFamily
from .family import BackboneFamily
from .resnet import ResNetFamily
from .swin import SwinFamily
from .vit import VitFamily

_FAMILIES: list[tuple[type[nn.Module], type[BackboneFamily]]] = [
    (VisionTransformer, VitFamily),
    (Eva, EvaFamily),
    (Beit, BeitFamily),
    (SwinTransformer, SwinFamily),
    (ConvNeXt, ConvNeXtFamily),
    (ResNet, ResNetFamily),
]


def register_family(model_class: type[nn.Module], family_class: type[BackboneFamily]) -> None:
    """Teach ``dtl.create_model`` a new backbone family."""
    _FAMILIES.insert(0, (model_class, family_class))


def family_class(model_class: type[nn.Module]) -> type[BackboneFamily] | None:
    return next((family for cls, family in _FAMILIES if issubclass(model_class, cls)), None)


def family_for(backbone: nn.Module) -> BackboneFamily:
    found = family_class(type(backbone))
    if found is None:
        supported = ", ".join(m.__name__ for m, _ in _FAMILIES)
        raise ValueError(f"no DTL backbone family for {type(backbone).__name__}; supported families: {supported}")
    return found(backbone)


def creation_options(skeleton: nn.Module) -> dict:
    """The keywords the family of ``skeleton`` (a model built with timm's defaults) builds it with."""
    found = family_class(type(skeleton))
    return found.creation_options(skeleton) if found is not None else {}
