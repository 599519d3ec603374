"""The embedded backbones: small networks that run everywhere, pretrained on generated scenes.

Nothing can be downloaded at run time on the machines this project targets, so the toolkit ships its own
small backbones, registered with timm (``timm.create_model(name, pretrained=True)`` and
``dtl.create_model(name, ...)`` both work once ``dtl`` is imported). Their weights live in ``dtl/weights/``,
produced by ``tools/pretrain_embedded.py`` (the record of each run is the ``.json`` beside the weights).

* ``vit_micro_patch4_32`` (the default) keeps ViT-B/16's structure (12 blocks, so the paper's start block
  M = 6 carries over) at 32 px with 4 px patches (an 8 x 8 token grid) and width 96.
* ``convnext_micro_32`` is a ConvNeXt with ConvNeXt-T's stage pattern shortened to 2-2-6-2 blocks (12, as the
  ViT) and widths 24-48-96-192. Its stem is a 1 x 1 patch, so the four stages see 32, 16, 8 and 4 px grids:
  the last stage still fits DTL+'s kernel of 5.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED_BACKBONE = "vit_micro_patch4_32"
EMBEDDED_CNN = "convnext_micro_32"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.safetensors"
EMBEDDED_ARCH = dict(img_size=32, patch_size=4, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0)
EMBEDDED_CNN_ARCH = dict(depths=(2, 2, 6, 2), dims=(24, 48, 96, 192), patch_size=1, ls_init_value=None)
#: every embedded backbone -> its shipped weights file
EMBEDDED_MODELS = {EMBEDDED_BACKBONE: EMBEDDED_WEIGHTS, EMBEDDED_CNN: WEIGHTS_DIR / f"{EMBEDDED_CNN}.safetensors"}


def _cfg(name: str, first_conv: str) -> dict:
    return dict(file=str(EMBEDDED_MODELS[name]), num_classes=0, input_size=(3, 32, 32), crop_pct=1.0,
                interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv=first_conv,
                classifier="head" if name == EMBEDDED_BACKBONE else "head.fc", license="mit")


default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_BACKBONE}.synthetic": _cfg(EMBEDDED_BACKBONE, "patch_embed.proj"),
    f"{EMBEDDED_CNN}.synthetic": _cfg(EMBEDDED_CNN, "stem.0"),
})


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 at 32 px: 12 blocks, width 96, 3 heads (1.3M parameters)."""
    model_args = dict(EMBEDDED_ARCH, **kwargs)
    return build_model_with_cfg(
        VisionTransformer,
        EMBEDDED_BACKBONE,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **model_args,
    )


@register_model
def convnext_micro_32(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Micro at 32 px: 2-2-6-2 blocks, widths 24-48-96-192, a 1 x 1 stem (1.2M parameters)."""
    model_args = dict(EMBEDDED_CNN_ARCH, **kwargs)
    return build_model_with_cfg(
        ConvNeXt,
        EMBEDDED_CNN,
        pretrained,
        pretrained_filter_fn=convnext_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **model_args,
    )
