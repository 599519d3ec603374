"""The embedded default backbone: a small ViT that runs everywhere, pretrained on generated scenes.

Nothing can be downloaded at run time on the machines this project targets, so the toolkit ships its own
small backbone. ``vit_micro_patch4_32`` keeps ViT-B/16's structure (12 blocks, so the paper's start block
M = 6 carries over) at 32 px with 4 px patches (an 8 x 8 token grid) and width 96. Its pretrained weights
live next to this file in ``dtl/weights/`` and are produced by ``tools/pretrain_embedded.py`` (the record of that
run is ``dtl/weights/vit_micro_patch4_32.json``).

The model is registered with timm, so ``timm.create_model('vit_micro_patch4_32', pretrained=True)`` and
``dtl.create_model('vit_micro_patch4_32', ...)`` both work once ``dtl`` is imported.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED_BACKBONE = "vit_micro_patch4_32"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_BACKBONE}.safetensors"
EMBEDDED_ARCH = dict(img_size=32, patch_size=4, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0)

default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_BACKBONE}.synthetic": dict(
        file=str(EMBEDDED_WEIGHTS),
        num_classes=0,
        input_size=(3, 32, 32),
        crop_pct=1.0,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv="patch_embed.proj",
        classifier="head",
        license="mit",
    ),
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
