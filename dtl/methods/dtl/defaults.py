"""DTL's defaults per backbone, torch-free (the experiment schema resolves unset options through them).

The paper published settings for ViT-B/16 and Swin-B only (:data:`FAMILY_DEFAULTS`). Other backbones take the
toolkit's choice, made from what their family says of the backbone (its blocks, its stages, whether the blocks are
convolutions): a transformer the ViT-B/16 setting scaled to its depth (:func:`transformer_defaults`), a CNN M in
the middle of its third stage (:func:`convolutional_defaults`). Side maps start at the first block of M's stage
unless ``extract_start`` is set (``DTLOptions.resolved``).
"""
from __future__ import annotations

from collections.abc import Sequence

#: beta, the sharpness of the Swish theta(u) = u * sigmoid(beta * u): the paper's value, on every backbone
PAPER_BETA = 100.0

FAMILY_DEFAULTS = {
    "vit": dict(rank=2, extract_start=0, start_block=6, beta=PAPER_BETA, kernel_size=3),
    "swin": dict(rank=4, extract_start=4, start_block=14, beta=PAPER_BETA, kernel_size=5),
}
#: Blocks per stage of Swin-S, -B and -L: where the paper's Swin-B setting (M = 14, maps from block 4) fits
SWIN_B_STAGE_DEPTHS = (2, 2, 18, 2)
CONVOLUTIONAL_RANK = 4
CONVOLUTIONAL_KERNEL_SIZE = 3


def transformer_defaults(depth: int) -> dict:
    """DTL's defaults for a transformer of ``depth`` blocks (ViT, EVA-02, DINOv3, Perception Encoder, BEiT, a
    Swin shallower than Swin-B...): the paper's ViT-B/16 setting (rank 2, side maps on every block, the paper's
    beta, DTL+ kernel 3) with the start block M at half the depth, as the paper's M = 6 is of ViT-B's 12 blocks.
    For other depths than the paper's the scaling is the toolkit's choice (a sweep's space follows the depth)."""
    return {**FAMILY_DEFAULTS["vit"], "start_block": depth // 2}


def convolutional_defaults(stages: Sequence) -> dict:
    """DTL's defaults for a CNN of ``stages`` (``StageInfo``s), the toolkit's choice: M in the middle of the third
    stage, as the paper's Swin-B default (block 14 of its 18-block third stage) is, so the high-resolution stages
    that keep most activations stay frozen."""
    third = stages[min(2, len(stages) - 1)]
    middle = third.first_block + (third.last_block - third.first_block + 1) // 2
    return dict(start_block=middle, rank=CONVOLUTIONAL_RANK, kernel_size=CONVOLUTIONAL_KERNEL_SIZE)


def backbone_defaults(family) -> dict:
    """The start block M, rank and DTL+ kernel for the backbone behind ``family`` (a ``BackboneFamily``)."""
    if family.convolutional:
        return convolutional_defaults(family.stages)
    depths = tuple(stage.last_block - stage.first_block + 1 for stage in family.stages)
    if depths == SWIN_B_STAGE_DEPTHS:
        return FAMILY_DEFAULTS["swin"]
    return transformer_defaults(len(family.blocks))
