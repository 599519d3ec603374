"""What DTL needs to know about a backbone family, behind one small interface.

A new family (ConvNeXt, EVA, ...) is one subclass of :class:`BackboneAdapter`: it says how to embed an
image into tokens, which blocks exist (numbered globally) and in which stage each lies, what happens when a
stage starts (e.g. Swin's patch merging), how tokens map to a 2-D grid (for DTL+'s conv) and how the final
tokens are pooled into one feature vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    first_block: int
    last_block: int  # inclusive
    dim: int


class BackboneAdapter(nn.Module):
    """A frozen backbone seen as: embed -> [enter_stage -> blocks]* -> pool."""

    #: defaults of the paper for this family: first block with a side map, start block M, rank, DTL+ kernel
    paper_defaults: dict = {}

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    # --- structure -------------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def stages(self) -> list[StageInfo]:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        return self.stages[-1].dim

    def stage_of(self, block: int) -> int:
        for index, stage in enumerate(self.stages):
            if stage.first_block <= block <= stage.last_block:
                return index
        raise IndexError(f"block {block} is outside 0..{len(self.blocks) - 1}")

    # --- computation -----------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def enter_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Transition into ``stage`` (identity unless the family changes resolution/width between stages)."""
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens -> ((B, C, H, W) grid, the tokens that are not on the grid or None)."""
        raise NotImplementedError

    def from_grid(self, grid: torch.Tensor, extra: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[block](x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The plain frozen backbone: what DTL must reproduce exactly at initialisation."""
        x = self.embed(images)
        for stage_index, stage in enumerate(self.stages):
            x = self.enter_stage(stage_index, x)
            for block in range(stage.first_block, stage.last_block + 1):
                x = self.run_block(block, x)
        return self.pool(x)
