"""``create_model``: a registered method built on a timm backbone (the part of ``dtl.methods`` that needs torch)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import DROP_PATH_SCOPES
from ..models import create_backbone, family_for
from .heads import HeadSpec
from .registry import BACKBONE_DTYPES, available_methods, get_method

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``'fp32'``/``'bf16'``/``'fp16'`` (or a torch dtype) -> the dtype, None meaning fp32."""
    if value is None or isinstance(value, torch.dtype):
        if value not in (None, *_TORCH_DTYPES.values()):
            raise ValueError(f"backbone_dtype must be one of {', '.join(BACKBONE_DTYPES)}, got {value}")
        return value
    if value not in _TORCH_DTYPES:
        raise ValueError(f"backbone_dtype must be one of {', '.join(BACKBONE_DTYPES)}, got {value!r}")
    return _TORCH_DTYPES[value]


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
    decode_head: str | None = None,
    **options,
) -> nn.Module:
    """Build ``method`` on the timm ``backbone`` with a fresh ``num_classes`` head (``model.head``): a linear
    classifier on the pooled features, or with ``decode_head`` (``"linear"`` or ``"fpn"``, see
    ``dtl.methods.heads``) a segmentation head whose logits are per-position class scores.

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
    head = HeadSpec(num_classes, decode_head)
    if drop_path_scope not in DROP_PATH_SCOPES:
        raise ValueError(f"drop_path_scope must be one of {', '.join(DROP_PATH_SCOPES)}, got {drop_path_scope!r}")
    method_options_ = spec.make_options(options)
    dtype = resolve_dtype(backbone_dtype)
    if dtype not in (None, torch.float32) and not spec.low_precision_backbone:
        capable = [name for name in available_methods() if get_method(name).low_precision_backbone]
        raise ValueError(f"backbone_dtype={backbone_dtype!r} is supported for {', '.join(capable)} only; method "
                         f"{spec.name!r} keeps fp32 weights (use autocast through the training precision)")
    family = family_for(create_backbone(backbone, pretrained, img_size=img_size, drop_path_rate=drop_path_rate))
    if not spec.supports(family):
        families = ", ".join(spec.families)
        needs = f" (it needs {spec.needs})" if spec.needs else ""
        raise ValueError(f"method {spec.name!r} is implemented for {families} backbones only{needs}; "
                         f"{backbone} is a {family.name}")
    model = spec.builder()(family, head, method_options_, dtype)
    if drop_path_scope == "suffix":
        family.disable_drop_path(model.frozen_blocks)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
