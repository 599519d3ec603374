"""PETL methods, one module each, behind a registry (``dtl.methods.registry``), and ``create_model``.

Every module of this package registers its method when the package is imported (DTL's first, then the others in
name order), so a new method is one new module here and nothing else: its name, options, capabilities and
benchmark rows come from its :class:`~dtl.methods.registry.Method`. ``dtl.methods.available_methods()`` lists
them. Every model keeps its classifier as ``model.head`` and pools the backbone as DTL does, so methods differ only
in what they train.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch
from torch import nn

from ..models import create_backbone, family_for
from ..models.family import DROP_PATH_SCOPES
from .dtl import DTLModel, PrefixState
from .registry import (BACKBONE_DTYPES, Method, MethodOptions, OptionError, all_option_names, available_methods,
                       canonical_name, float_option_names, get_method, method_options, register_method, resolve_dtype)

_INFRASTRUCTURE = {"base", "registry"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

METHODS = available_methods()  # the built-in methods, in registration order


def create_model(
    backbone: str,
    method: str,
    num_classes: int,
    pretrained: bool | str | Path = False,
    *,
    drop_path_rate: float = 0.0,
    drop_path_scope: str = "all",
    img_size: int | None = None,
    backbone_dtype: str | torch.dtype | None = None,
    **options,
) -> nn.Module:
    """Build ``method`` on the timm ``backbone`` with a fresh ``num_classes`` head (``model.head``).

    ``options`` are the method's own (``dtl.methods.get_method(name).options``): for DTL / DTL+ ``rank``,
    ``start_block`` (M: first block whose output gets the side output), ``extract_start`` (first block with a side
    map), ``beta`` (Swish sharpness), ``kernel_size`` (DTL+ conv), ``grad_checkpointing`` (True: recompute blocks
    after M and the frozen prefix in backward, the lowest memory; ``"mlp"``: recompute only the MLP hidden layer
    of the blocks after M); ``rank`` for LoRA and AdaptFormer; the other methods' in their modules. Unset options
    take the method's defaults for the backbone family (DTL on ViT: rank 2, M 6, maps on all blocks, k 3; on
    Swin: rank 4, M 14, maps from block 4, k 5; on ResNet and ConvNeXt: rank 4, M the middle block of the third
    stage, maps from that stage's first block, k 3).

    ``pretrained``: False (random init), True (timm's hub, or the shipped embedded weights), or a local ``.npz`` /
    ``.pth`` / ``.safetensors`` file. ``backbone_dtype`` (methods with that capability: DTL, DTL+): store the
    frozen backbone in ``'bf16'``/``'fp16'`` and run it as such, instead of fp32 weights under autocast; the
    trainable parts stay fp32.

    ``drop_path_rate`` follows timm's stochastic-depth rule (0 at the first block, rising linearly to the rate at
    the last). ``drop_path_scope`` says where it applies: ``"all"`` (every block, as the authors' code builds it)
    or ``"suffix"`` (only the blocks gradients flow through: those after M for DTL, none for the linear probe,
    all for the methods that train inside every block). With ``"suffix"`` the frozen part stays deterministic in
    training, so the prefix cache (``dtl.cache``) stays exact whatever the rate.
    """
    spec = get_method(method)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if drop_path_scope not in DROP_PATH_SCOPES:
        raise ValueError(f"drop_path_scope must be one of {', '.join(DROP_PATH_SCOPES)}, got {drop_path_scope!r}")
    method_options_ = spec.make_options(options)
    dtype = resolve_dtype(backbone_dtype)
    if dtype not in (None, torch.float32) and not spec.low_precision_backbone:
        capable = [name for name in available_methods() if get_method(name).low_precision_backbone]
        raise ValueError(f"backbone_dtype={backbone_dtype!r} is supported for {', '.join(capable)} only; method "
                         f"{spec.name!r} keeps fp32 weights (use autocast through the training precision)")
    family = family_for(create_backbone(backbone, pretrained, img_size=img_size, drop_path_rate=drop_path_rate))
    if spec.families and not isinstance(family, spec.families):
        families = ", ".join(f.name for f in spec.families)
        needs = f" (it needs {spec.needs})" if spec.needs else ""
        raise ValueError(f"method {spec.name!r} is implemented for {families} backbones only{needs}; "
                         f"{backbone} is a {family.name}")
    model = spec.build(family, num_classes, method_options_, dtype)
    if drop_path_scope == "suffix":
        family.disable_drop_path(model.frozen_blocks)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "BACKBONE_DTYPES", "DTLModel", "METHODS", "Method", "MethodOptions", "OptionError", "PrefixState",
    "all_option_names", "available_methods", "canonical_name", "create_model", "float_option_names", "get_method", "method_options",
    "register_method", "resolve_dtype", "trainable_parameters",
]
