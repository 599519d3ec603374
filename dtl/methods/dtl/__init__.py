"""DTL and DTL+ (Fu, Zhu, Wu, AAAI 2024): a frozen backbone plus the Compact Side Network, for any backbone family.

The model is in ``model.py``; this module holds what the experiment schema reads (options, capabilities)
and imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...validation import is_int, is_number
from ..registry import AddedModules, BenchmarkTargets, Method, MethodOptions, register_method
from .defaults import PAPER_BETA, backbone_defaults


@dataclass
class DTLOptions(MethodOptions):
    rank: int | None = None  # CSN rank r; None: the family's paper default (ViT 2, Swin 4, CNNs 4)
    start_block: int | None = None  # M, the first block whose output gets the side output; None: ViT 6, Swin 14,
    # CNNs the middle block of the third stage
    extract_start: int | None = None  # first block with a side map; None: the first block of M's stage
    beta: float | None = None  # sharpness of the Swish; None: PAPER_BETA
    grad_checkpointing: bool | str | None = None  # True: recompute blocks after M (least memory); "mlp"; False

    checks = {
        "rank": (is_int(1), "an integer >= 1"),
        "start_block": (is_int(0), "an integer >= 0"),
        "extract_start": (is_int(0), "an integer >= 0"),
        "beta": (is_number(0, above=True), "a number > 0"),
        "grad_checkpointing": (lambda v: isinstance(v, bool) or v == "mlp", 'false, true or "mlp"'),
    }

    def defaults(self, family) -> dict:
        backbone = backbone_defaults(family)
        return {"rank": backbone["rank"], "start_block": backbone["start_block"], "beta": PAPER_BETA,
                "grad_checkpointing": False}

    def resolved(self, family) -> dict:
        settings = super().resolved(family)
        start_block = settings["start_block"]
        if self.extract_start is None:
            # Side maps on every block of M's stage up to M (the side state resets per stage, so maps in earlier
            # stages would feed nothing): ViT's 0 and Swin-B's 4 at the paper's M.
            inside = 0 <= start_block < len(family.blocks)
            settings["extract_start"] = family.stages[family.stage_of(start_block)].first_block if inside else 0
        return settings


@dataclass
class DTLPlusOptions(DTLOptions):
    kernel_size: int | None = None  # the depthwise conv's kernel; None: ViT 3, Swin 5, CNNs 3

    checks = {**DTLOptions.checks, "kernel_size": (is_int(1), "an integer >= 1")}

    def defaults(self, family) -> dict:
        return {**super().defaults(family), "kernel_size": backbone_defaults(family)["kernel_size"]}


_SEARCHABLE = ("rank", "start_block", "extract_start", "beta")
# The side maps and convolutions are modules; the side-state updates and add-backs run in the model's own forward,
# outside any submodule, so its bytes there are the side network's too.
_SIDE_NETWORK = AddedModules("side network", ("side_",), own_forward=True)
register_method(Method(
    name="dtl", description="DTL: the Compact Side Network on a frozen backbone", options=DTLOptions,
    build=f"{__name__}.model:build", low_precision_backbone=True, searchable=_SEARCHABLE,
    added_modules=_SIDE_NETWORK))
# Benchmark rows beyond the plain method: dtl_plus_mlp recomputes the MLP hidden layer of the blocks after M in
# backward, dtl_plus_ckpt the blocks after M and the prefix, and dtl_plus_cached trains from cached prefix states
# (only blocks M+1..N-1, the CSN and the head run; the one-off prefix pass is reported as prefix_s_per_batch).
register_method(Method(
    name="dtl_plus", description="DTL+: DTL with a depthwise convolution on the side output", options=DTLPlusOptions,
    build=f"{__name__}.model:build", low_precision_backbone=True, searchable=(*_SEARCHABLE, "kernel_size"),
    benchmark_variants={"dtl_plus_mlp": {"grad_checkpointing": "mlp"}, "dtl_plus_ckpt": {"grad_checkpointing": True},
                        "dtl_plus_cached": {"cached": True}},
    benchmark_targets=BenchmarkTargets(
        ratios=(("dtl_plus", "saved_bytes", "full", 0.35, "max"),
                ("dtl_plus", "saved_bytes", "lora", 0.45, "max"),
                ("dtl_plus_ckpt", "saved_bytes", "full", 0.05, "max"),
                ("dtl_plus", "images_per_s", "full", 2.0, "min"),
                ("dtl_plus", "images_per_s", "lora", 1.3, "min"),
                ("dtl_plus_cached", "images_per_s", "full", 3.3, "min"),
                ("dtl_plus_cached", "images_per_s", "lora", 2.2, "min")),
        segmentation=(("dtl_plus", "saved_bytes", "full", 0.35, "max"),),
        peaks=(("dtl_plus", 0.8e9), ("dtl_plus_mlp", 0.8e9), ("dtl_plus_ckpt", 0.5e9))),
    added_modules=_SIDE_NETWORK))
