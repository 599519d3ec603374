"""What DTL needs to know about a backbone family, behind one small interface.

A new family is one subclass of :class:`BackboneFamily`: it says how to embed an image into tokens, which
blocks exist (numbered globally) and in which stage each lies, what happens when a stage starts (e.g. Swin's
patch merging, ConvNeXt's downsampling), how tokens map to a 2-D grid (for DTL+'s conv) and how the final
tokens are pooled into one feature vector. Convolutional families (:class:`ConvFamily`) see the feature map
at each spatial position as a token: their tokens are channels-last ``(B, H, W, C)`` maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class StageInfo:
    first_block: int
    last_block: int  # inclusive
    dim: int


class BackboneFamily(nn.Module):
    """A frozen backbone seen as: embed -> [enter_stage -> blocks]* -> pool."""

    #: how messages name the family
    name: str = ""
    #: whether the blocks are convolutions over feature maps (a CNN) rather than transformer blocks
    convolutional: bool = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @classmethod
    def creation_options(cls, skeleton: nn.Module) -> dict:
        """Keywords to build the backbone with, given ``skeleton``, the model timm builds by default (on the
        meta device); ``dtl.models.create_backbone`` passes those its class takes."""
        return {}

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

    def block_input_dim(self, block: int) -> int:
        """Width of ``block``'s input (the stage's width, unless the block itself changes it, as ResNet's first
        block of a stage does)."""
        return self.stages[self.stage_of(block)].dim

    def resample_code(self, block: int, code: torch.Tensor) -> torch.Tensor:
        """A rank-r side code read from ``block``'s input, brought to the token grid of the block's output (the
        identity unless the block downsamples, as ResNet's first block of a stage does)."""
        return code

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
        """The plain frozen backbone's pooled features: what DTL must reproduce exactly at initialisation."""
        return self.pool(self.forward_blocks(images, [len(self.blocks) - 1])[0])

    def forward_blocks(self, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """The plain frozen backbone's outputs of ``blocks`` (tokens, in the order given): what a head reads."""
        outputs, last, wanted = {}, max(blocks), set(blocks)
        x = self.embed(images)
        for stage_index, stage in enumerate(self.stages):
            if stage.first_block > last:
                break
            x = self.enter_stage(stage_index, x)
            for block in range(stage.first_block, min(stage.last_block, last) + 1):
                x = self.run_block(block, x)
                if block in wanted:
                    outputs[block] = x
        return [outputs[block] for block in blocks]

    # --- dense prediction ----------------------------------------------------------------------------------
    def dense_levels(self) -> list[tuple[int, float]]:
        """``(block, scale)`` of each feature map a multi-level dense head reads, finest first: the block whose
        output it is, and how much to resize that output to reach the pyramid's strides of 4, 8, 16 and 32
        pixels (1: it has that stride already)."""
        raise NotImplementedError

    def dense_map(self, x: torch.Tensor) -> torch.Tensor:
        """A block's output tokens as a ``(B, C, H, W)`` feature map (extra tokens left out)."""
        return self.to_grid(x)[0]

    def block_output_dim(self, block: int) -> int:
        return self.stages[self.stage_of(block)].dim

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

    def train(self, mode: bool = True) -> "BackboneFamily":
        """Batch norms with nothing trainable stay in eval mode: their running statistics are part of the frozen
        backbone (batch statistics would make a frozen block depend on the batch and drift its buffers)."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def disable_drop_path(self, blocks: range | list[int]) -> None:
        """Turn stochastic depth off in ``blocks`` (the ``suffix`` drop-path scope: the blocks a cached or frozen
        part runs must be deterministic; the others keep timm's rate)."""
        for block in blocks:
            for module in self.blocks[block].modules():
                if getattr(module, "drop_prob", None):
                    module.drop_prob = 0.0


class TokenFamily(BackboneFamily):
    """Transformers of one stage of blocks over ``(B, T, C)`` tokens: ``num_prefix_tokens`` tokens (class,
    registers) first, then the patch tokens of a fixed grid (ViT and its relatives: EVA, DINOv3, BEiT...).
    Subclasses give :meth:`embed` and the final norms of :meth:`pool`; the head is DTL's: the mean of the patch
    tokens, then the backbone's pretrained final norm."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self._stages = [StageInfo(0, len(backbone.blocks) - 1, backbone.embed_dim)]
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.grid_size_ = tuple(backbone.patch_embed.grid_size)

    @property
    def blocks(self):
        return self.backbone.blocks

    @property
    def stages(self):
        return self._stages

    def final_norm(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's pretrained norm of the pooled features."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # DTL's head: the mean of the patch tokens (prefix tokens left out), THEN the pretrained final norm.
        return self.final_norm(x[:, self.num_prefix_tokens:].mean(dim=1))

    def grid_size(self, stage: int) -> tuple[int, int]:
        return self.grid_size_

    def dense_levels(self) -> list[tuple[int, float]]:
        # One stride (the patch size) at every depth: the simple feature pyramid of ViTDet (Li et al., 2022)
        # resizes four evenly spaced blocks' outputs by 4, 2, 1 and 1/2 (strides 4 to 32 for 16-pixel patches).
        depth = len(self.blocks)
        blocks = sorted({max(0, depth * quarter // 4 - 1) for quarter in (1, 2, 3, 4)})
        scales = (4.0, 2.0, 1.0, 0.5)[-len(blocks):]
        return list(zip(blocks, scales))

    def to_grid(self, x: torch.Tensor):
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        B, _, C = patches.shape
        grid = patches.transpose(1, 2).reshape(B, C, *self.grid_size_)
        return grid, prefix

    def from_grid(self, grid: torch.Tensor, extra, like: torch.Tensor) -> torch.Tensor:
        patches = grid.flatten(2).transpose(1, 2)
        return torch.cat([extra, patches], dim=1) if extra is not None and extra.shape[1] else patches


class ChannelsLastFamily(BackboneFamily):
    """Families whose tokens are a channels-last ``(B, H, W, C)`` grid with no extra tokens, in stages of blocks
    (Swin, the CNNs). Subclasses give ``_layout()``: each stage's blocks and width."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self._blocks: list[nn.Module] = []
        self._stages: list[StageInfo] = []
        for blocks, dim in self._layout():
            first = len(self._blocks)
            self._blocks.extend(blocks)
            self._stages.append(StageInfo(first, len(self._blocks) - 1, dim))

    def _layout(self) -> list[tuple[list[nn.Module], int]]:
        raise NotImplementedError

    @property
    def blocks(self):
        return self._blocks

    @property
    def stages(self):
        return self._stages

    def to_grid(self, x: torch.Tensor):
        return x.permute(0, 3, 1, 2), None

    def dense_levels(self) -> list[tuple[int, float]]:
        # Each stage's output has its own stride already (4, 8, 16, 32 for Swin, ResNet and ConvNeXt).
        return [(stage.last_block, 1.0) for stage in self.stages]

    def from_grid(self, grid: torch.Tensor, extra, like: torch.Tensor) -> torch.Tensor:
        return grid.permute(0, 2, 3, 1)


class ConvFamily(ChannelsLastFamily):
    """A CNN seen as DTL sees it: every spatial position of a feature map is a token, kept channels-last between
    blocks so that side maps are linear maps over channels; the blocks themselves run on the channels-first view
    (a permute, no copy: convolutions take channels-last memory as it is).

    Subclasses give ``_layout()``, :meth:`embed`, :meth:`enter_stage` if needed, and :meth:`pool`. The token grid
    of every block is measured once, by one image at the backbone's nominal size (``pretrained_cfg
    input_size``) through the network in eval mode.
    """

    convolutional = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self._input_grids, self._output_grids = self._measure_grids()

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[block](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def grid_size(self, stage: int) -> tuple[int, int]:
        return self._output_grids[self.stages[stage].last_block]

    def block_stride(self, block: int) -> int:
        """How much ``block`` shrinks the grid (2 for a downsampling block, else 1) at the nominal size."""
        (h_in, _), (h_out, _) = self._input_grids[block], self._output_grids[block]
        return max(1, round(h_in / h_out))

    def resample_code(self, block: int, code: torch.Tensor) -> torch.Tensor:
        stride = self.block_stride(block)
        if stride == 1:
            return code
        # The mean over each output position's input window; ceil_mode matches the padded strided convolutions.
        pooled = F.avg_pool2d(code.permute(0, 3, 1, 2), stride, stride, ceil_mode=True)
        return pooled.permute(0, 2, 3, 1)

    @torch.no_grad()
    def _measure_grids(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        size = int((getattr(self.backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
        weight = next(self.backbone.parameters())
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            inputs, outputs = [], []
            x = self.embed(torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device))
            for stage_index, stage in enumerate(self.stages):
                x = self.enter_stage(stage_index, x)
                for block in range(stage.first_block, stage.last_block + 1):
                    inputs.append(tuple(x.shape[1:3]))
                    x = self.run_block(block, x)
                    outputs.append(tuple(x.shape[1:3]))
        finally:
            self.backbone.train(was_training)
        return inputs, outputs


def block_input_name(block: int) -> str:
    return f"block_input.{block}"


def stage_output_name(stage: int) -> str:
    return f"stage_output.{stage}"


class CachedInputs(dict):
    """A batch of frozen-backbone outputs (name -> (B, ...) tensor) read from the prefix cache instead of images;
    models that can train from the cache accept it in ``forward``."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CachedInputs":
        return CachedInputs({name: t.to(device, non_blocking=non_blocking) for name, t in self.items()})
