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

DROP_PATH_SCOPES = ("all", "suffix")


@dataclass(frozen=True)
class StageInfo:
    first_block: int
    last_block: int  # inclusive
    dim: int


class BackboneAdapter(nn.Module):
    """A frozen backbone seen as: embed -> [enter_stage -> blocks]* -> pool."""

    #: how messages name the family
    family: str = ""
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

    def grid_size(self, stage: int) -> tuple[int, int]:
        """(H, W) of the token grid in ``stage`` (what DTL+'s convolution runs over)."""
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

    def block_states(self, images: torch.Tensor, last_block: int | None = None) -> dict[str, torch.Tensor]:
        """Every block's input (``block_input.<b>``) and every stage's output (``stage_output.<s>``, before the next
        stage's transition): all that a DTL model with any start block reads from the frozen backbone. With
        ``last_block``, only up to that block's output (:meth:`block_output_name`): what start blocks up to it read."""
        states = {}
        x = self.embed(images)
        for stage_index, stage in enumerate(self.stages):
            x = self.enter_stage(stage_index, x)
            for block in range(stage.first_block, stage.last_block + 1):
                states[block_input_name(block)] = x
                x = self.run_block(block, x)
                if block == last_block:
                    states[self.block_output_name(block)] = x
                    return states
            states[stage_output_name(stage_index)] = x
        return states

    def block_output_name(self, block: int) -> str:
        """The :meth:`block_states` entry holding ``Block_b(x_b)``: the next block's input within a stage, else the
        stage's output."""
        stage = self.stages[self.stage_of(block)]
        return stage_output_name(self.stage_of(block)) if block == stage.last_block else block_input_name(block + 1)

    def stochastic_modules(self, blocks: range | list[int]) -> list[str]:
        """Names of the modules that draw random numbers in train mode (drop-path, dropout, patch dropout with a
        rate > 0) in the embedding and in ``blocks``: what makes those parts' outputs change between epochs."""
        skipped = {id(m) for block in range(len(self.blocks)) if block not in blocks
                   for m in self.blocks[block].modules()}
        found = []
        for name, module in self.backbone.named_modules():
            if id(module) in skipped:
                continue
            rate = getattr(module, "drop_prob", None)  # timm DropPath
            if rate is None and isinstance(module, nn.modules.dropout._DropoutNd):
                rate = module.p
            if rate is None and type(module).__name__ == "PatchDropout":
                rate = getattr(module, "prob", None)
            if rate:
                found.append(f"{name} ({type(module).__name__} {rate:g})")
        return found

    def disable_drop_path(self, blocks: range | list[int]) -> None:
        """Turn stochastic depth off in ``blocks`` (the ``suffix`` drop-path scope: the blocks a cached or frozen
        part runs must be deterministic; the others keep timm's rate)."""
        for block in blocks:
            for module in self.blocks[block].modules():
                if getattr(module, "drop_prob", None):
                    module.drop_prob = 0.0


def block_input_name(block: int) -> str:
    return f"block_input.{block}"


def stage_output_name(stage: int) -> str:
    return f"stage_output.{stage}"


class CachedInputs(dict):
    """A batch of frozen-backbone outputs (name -> (B, ...) tensor) read from the prefix cache instead of images;
    models that can train from the cache accept it in ``forward``."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CachedInputs":
        return CachedInputs({name: t.to(device, non_blocking=non_blocking) for name, t in self.items()})
