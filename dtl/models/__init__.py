"""Model creation: ``create_model(backbone, method, num_classes, pretrained, **options)``.

Backbone families are registered as (timm model class -> adapter class); a new family is one adapter module
plus one :func:`register_family` call.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import embedded  # noqa: F401  (registers the embedded backbone with timm)
from .adapters import DROP_PATH_SCOPES, BackboneAdapter, CachedInputs
from .backbone import CheckpointError, create_backbone, load_checkpoint
from .baselines import BASELINE_RANK, BaselineModel
from .dtl import DTLModel, PrefixState
from .embedded import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS
from .swin import SwinAdapter
from .vit import VitAdapter

METHODS = ("dtl", "dtl_plus", "linear", "full", "lora", "adapter")

# Options each method accepts on top of the common ones (pretrained, drop_path_rate, img_size).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "dtl": ("rank", "start_block", "extract_start", "beta", "grad_checkpointing"),
    "dtl_plus": ("rank", "start_block", "extract_start", "beta", "kernel_size", "grad_checkpointing"),
    "linear": (),
    "full": (),
    "lora": ("rank",),
    "adapter": ("rank",),
}

_FAMILIES: list[tuple[type[nn.Module], type[BackboneAdapter]]] = [
    (VisionTransformer, VitAdapter),
    (SwinTransformer, SwinAdapter),
]


def register_family(model_class: type[nn.Module], adapter_class: type[BackboneAdapter]) -> None:
    """Teach ``create_model`` a new backbone family."""
    _FAMILIES.insert(0, (model_class, adapter_class))


def adapter_for(backbone: nn.Module) -> BackboneAdapter:
    for model_class, adapter_class in _FAMILIES:
        if isinstance(backbone, model_class):
            return adapter_class(backbone)
    supported = ", ".join(m.__name__ for m, _ in _FAMILIES)
    raise ValueError(f"no DTL adapter for {type(backbone).__name__}; supported families: {supported}")


BACKBONE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_backbone_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``'fp32'``/``'bf16'``/``'fp16'`` (or a torch dtype) -> the dtype, None meaning fp32."""
    if value is None or isinstance(value, torch.dtype):
        if value not in (None, *BACKBONE_DTYPES.values()):
            raise ValueError(f"backbone_dtype must be one of {', '.join(BACKBONE_DTYPES)}, got {value}")
        return value
    if value not in BACKBONE_DTYPES:
        raise ValueError(f"backbone_dtype must be one of {', '.join(BACKBONE_DTYPES)}, got {value!r}")
    return BACKBONE_DTYPES[value]


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
    """Build ``method`` on the timm ``backbone`` with a fresh ``num_classes`` head.

    Methods: ``dtl``, ``dtl_plus`` (DTL with the depthwise conv), ``linear``, ``full``, ``lora``, ``adapter``.
    Options: ``rank`` (CSN rank; LoRA rank; adapter bottleneck), ``start_block`` (M: first block whose
    output gets the side output), ``extract_start`` (first block with a side map), ``beta`` (Swish sharpness),
    ``kernel_size`` (DTL+ conv), ``grad_checkpointing`` (True: recompute blocks after M and the frozen prefix in
    backward, the lowest memory; ``"mlp"``: recompute only the MLP hidden layer of the blocks after M).
    ``backbone_dtype`` (``dtl``/``dtl_plus`` only): store the frozen backbone in ``'bf16'``/``'fp16'`` and run it
    as such, instead of fp32 weights under autocast; the trainable CSN and head stay fp32.
    Defaults are the paper's for the backbone family (ViT: rank 2, M 6, maps on all blocks, k 3;
    Swin: rank 4, M 14, maps from block 4, k 5).

    ``drop_path_rate`` follows timm's stochastic-depth rule (0 at the first block, rising linearly to the rate at
    the last). ``drop_path_scope`` says where it applies: ``"all"`` (every block, as the authors' code builds it)
    or ``"suffix"`` (only the blocks gradients flow through: those after M for DTL, none for the linear probe,
    all for LoRA / adapter / full). With ``"suffix"`` the frozen part stays deterministic in training, so the
    prefix cache (``dtl.cache``) stays exact whatever the rate.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if drop_path_scope not in DROP_PATH_SCOPES:
        raise ValueError(f"drop_path_scope must be one of {', '.join(DROP_PATH_SCOPES)}, got {drop_path_scope!r}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise TypeError(f"method {method!r} does not take option(s) {', '.join(unknown)} (method options: {allowed})")

    dtype = resolve_backbone_dtype(backbone_dtype)
    if dtype not in (None, torch.float32) and method not in ("dtl", "dtl_plus"):
        raise ValueError(f"backbone_dtype={backbone_dtype!r} is supported for dtl and dtl_plus only; method "
                         f"{method!r} keeps fp32 weights (use autocast through the training precision)")

    adapter = adapter_for(create_backbone(backbone, pretrained, img_size=img_size, drop_path_rate=drop_path_rate))
    if method in ("dtl", "dtl_plus"):
        settings = dict(adapter.paper_defaults)
        kernel_size = options.pop("kernel_size", settings.pop("kernel_size"))
        settings.update(options)
        model = DTLModel(adapter, num_classes, kernel_size=kernel_size if method == "dtl_plus" else None,
                         backbone_dtype=dtype, **settings)
    else:
        model = BaselineModel(adapter, num_classes, method, rank=options.get("rank"))
    if drop_path_scope == "suffix":
        adapter.disable_drop_path(model.frozen_blocks)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "BACKBONE_DTYPES", "BASELINE_RANK", "DROP_PATH_SCOPES", "METHODS", "METHOD_OPTIONS", "BackboneAdapter",
    "BaselineModel", "CachedInputs", "CheckpointError", "DTLModel", "PrefixState",
    "EMBEDDED_BACKBONE", "EMBEDDED_WEIGHTS", "SwinAdapter", "VitAdapter", "adapter_for", "create_backbone",
    "create_model", "load_checkpoint", "register_family", "resolve_backbone_dtype", "trainable_parameters",
]
