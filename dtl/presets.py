"""The paper's settings as a "paper" preset: DTL's settings for ViT-B/16 and Swin-B, and the authors' per-task
VTAB-1K hyperparameters (docs/design.md).

``FAMILY_DEFAULTS`` is what DTL uses for unset options on the backbones the paper trains; it lives with the
method's other defaults (``dtl.methods.dtl.defaults``, which also scales them to other backbones).
``paper_overrides(family, method)`` returns ``{task: {"lr": ..., "drop_path": ..., ["kernel_size": ...]}}``, the
shape of the ``overrides`` section of an experiment config. ``PAPER_COMMON`` holds the settings shared by all
tasks, and ``PAPER_TRAINING`` the recipe, which is ``TrainConfig``'s defaults: batch 32, 100 cosine + 10 cool-down
epochs, 10 warm-up, weight decay 0.05.
"""
from __future__ import annotations

from .config import TrainConfig
from .methods.dtl.defaults import FAMILY_DEFAULTS

# The ViT DTL+ kernel is set per task (the table below); Swin's is one for all tasks.
PAPER_COMMON = {
    "vit": {k: v for k, v in FAMILY_DEFAULTS["vit"].items() if k != "kernel_size"},
    "swin": dict(FAMILY_DEFAULTS["swin"]),
}
PAPER_TRAINING = {name: getattr(TrainConfig(), name) for name in (
    "epochs", "warmup_epochs", "cooldown_epochs", "batch_size", "weight_decay", "min_lr", "warmup_lr",
    "label_smoothing", "seed")}

# task: (ViT DTL lr, dp), (ViT DTL+ lr, dp, k), (Swin DTL lr, dp), (Swin DTL+ lr, dp)
_TABLE = {
    "cifar": ((0.0003, 0.1), (0.0005, 0.1, 3), (0.001, 0.1), (0.003, 0.0)),
    "caltech101": ((0.001, 0.0), (0.0005, 0.0, 3), (0.001, 0.4), (0.0005, 0.4)),
    "dtd": ((0.0003, 0.1), (0.0003, 0.1, 5), (0.0001, 0.4), (0.0008, 0.1)),
    "oxford_flowers102": ((0.008, 0.2), (0.008, 0.2, 5), (0.001, 0.1), (0.005, 0.1)),
    "oxford_iiit_pet": ((0.0003, 0.1), (0.0003, 0.0, 3), (0.0003, 0.1), (0.0001, 0.3)),
    "svhn": ((0.008, 0.2), (0.005, 0.2, 5), (0.003, 0.4), (0.005, 0.5)),
    "sun397": ((0.0005, 0.1), (0.003, 0.0, 5), (0.0008, 0.2), (0.003, 0.1)),
    "patch_camelyon": ((0.008, 0.1), (0.003, 0.0, 4), (0.003, 0.0), (0.005, 0.0)),
    "eurosat": ((0.008, 0.0), (0.003, 0.1, 3), (0.0008, 0.4), (0.001, 0.3)),
    "resisc45": ((0.008, 0.1), (0.01, 0.1, 3), (0.005, 0.5), (0.003, 0.5)),
    "diabetic_retinopathy": ((0.0001, 0.1), (0.0001, 0.1, 5), (0.0001, 0.5), (0.0003, 0.5)),
    "clevr_count": ((0.001, 0.2), (0.0008, 0.2, 5), (0.0005, 0.4), (0.0005, 0.5)),
    "clevr_dist": ((0.0005, 0.2), (0.001, 0.2, 4), (0.0003, 0.5), (0.0005, 0.5)),
    "dmlab": ((0.0008, 0.2), (0.005, 0.2, 3), (0.003, 0.3), (0.003, 0.4)),
    "kitti": ((0.008, 0.1), (0.008, 0.2, 4), (0.001, 0.5), (0.005, 0.5)),
    "dsprites_loc": ((0.01, 0.0), (0.008, 0.1, 4), (0.008, 0.4), (0.01, 0.5)),
    "dsprites_ori": ((0.008, 0.0), (0.0008, 0.2, 5), (0.0005, 0.3), (0.0008, 0.5)),
    "smallnorb_azi": ((0.003, 0.2), (0.003, 0.2, 5), (0.003, 0.5), (0.003, 0.5)),
    "smallnorb_ele": ((0.001, 0.2), (0.001, 0.1, 5), (0.0008, 0.5), (0.001, 0.5)),
}
_COLUMN = {("vit", "dtl"): 0, ("vit", "dtl_plus"): 1, ("swin", "dtl"): 2, ("swin", "dtl_plus"): 3}


def paper_overrides(family: str, method: str) -> dict[str, dict]:
    """Per-task overrides of the authors' scripts for ``family`` (vit/swin) and ``method`` (dtl/dtl_plus)."""
    if (family, method) not in _COLUMN:
        raise ValueError(f"no paper preset for family={family!r}, method={method!r}: "
                         "expected family vit/swin and method dtl/dtl_plus")
    column = _COLUMN[(family, method)]
    overrides = {}
    for task, row in _TABLE.items():
        values = row[column]
        entry = {"lr": values[0], "drop_path": values[1]}
        if len(values) == 3:
            entry["kernel_size"] = values[2]
        overrides[task] = entry
    return overrides
