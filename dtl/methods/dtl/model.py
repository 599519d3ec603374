"""DTL and DTL+ (Fu, Zhu, Wu, AAAI 2024): a frozen backbone plus the Compact Side Network, for any backbone family.

Registered as ``dtl`` and ``dtl_plus`` (DTL+ adds the depthwise convolution ``g``); docs/design.md gives the math.

The forward pass is split in two so the frozen prefix can be cached (see ``dtl.cache``):

* :meth:`DTLModel.forward_prefix` runs the embedding and blocks 0..M without autograd and returns the
  block inputs the side maps of M's stage read, plus block M's output. None of it depends on a trainable
  parameter, so nothing of it is kept for backward.
* :meth:`DTLModel.forward_suffix` adds the side output after block M and runs blocks M+1..N-1 and the head.

A decode head (segmentation) reads the outputs of several blocks: those from M on carry the side output (added
to each add-back block's output before the head reads it), those before M are the frozen backbone's, taken from
the prefix as it runs without autograd (or from the cache). Only the head keeps anything of them for backward.

The prefix cache stores :meth:`BackboneFamily.block_states` (every block's input, whatever M), so one cache
serves models with any start block: :meth:`DTLModel.state_from_cache` picks the tensors this model's M reads.

Memory (what is kept for backward): the frozen blocks after M carry no weight gradients, so their linear
layers keep no inputs (autograd saves a matmul input only for the weight gradient). The side state h itself is
never kept: each add-back block's side output g(theta(h_i)) is recomputed in backward from the rank-r codes
x_j A_j (a (B, T, r) tensor per map; cheap elementwise and rank-r work). What remains is the prefix side
inputs x_j (needed for the gradients of the down-projections A_j) and the activations of the frozen blocks
after M. ``grad_checkpointing=True`` cuts that to the images plus one tensor per block after M by recomputing
the blocks after M and the frozen prefix in backward; ``grad_checkpointing="mlp"`` recomputes only the MLP hidden
layer (fc1 + GELU, 4 of the ~10 token tensors a frozen ViT block keeps) for one extra fc1 matmul per block.
``backbone_dtype`` (e.g. bf16) stores the frozen backbone in low precision and runs it as such (no autocast
copies of its weights); the CSN and the head stay fp32.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block as VitBlock
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ...models.family import BackboneFamily, CachedInputs, block_input_name
from ...models.side_network import DepthwiseGridConv, LowRankMap, SharpSwish
from ..base import HeadModel
from ..heads import HeadSpec, apply_head, head_inputs
from . import DTLOptions
from .defaults import PAPER_BETA

CHECKPOINTING = (False, True, "mlp")


class PrefixState(NamedTuple):
    """What the trainable part needs from the frozen prefix (all tensors are batch-first)."""

    side_inputs: tuple[torch.Tensor, ...]  # inputs of the mapped blocks of M's stage up to M, in block order
    block_output: torch.Tensor  # Block_M(x_M), before the side output is added
    head_outputs: tuple[torch.Tensor, ...] = ()  # outputs of the blocks before M that the head reads (dense heads)


class DTLModel(HeadModel):
    """Frozen backbone + Compact Side Network (DTL; DTL+ when ``kernel_size`` is set) + a head (a classifier on
    the pooled features, or a decode head on feature maps: ``dtl.methods.heads``).

    On :class:`HeadModel`: ``_prepare`` adds the side network; the backbone runs as a frozen prefix and a suffix
    that adds the side output (``block_outputs``), and ``forward`` also takes a :class:`PrefixState`; the prefix
    cache stores the frozen backbone's block states (``cache_layout = "blocks"``)."""

    def __init__(
        self,
        family: BackboneFamily,
        head: HeadSpec,
        *,
        rank: int,
        start_block: int,
        extract_start: int = 0,
        beta: float = PAPER_BETA,
        kernel_size: int | None = None,
        grad_checkpointing: bool | str = False,
        backbone_dtype: torch.dtype | None = None,
    ):
        num_blocks = len(family.blocks)
        if not 0 <= start_block < num_blocks:
            raise ValueError(f"start_block must be in 0..{num_blocks - 1} for this backbone, got {start_block}")
        if not 0 <= extract_start < num_blocks:
            raise ValueError(f"extract_start must be in 0..{num_blocks - 1} for this backbone, got {extract_start}")
        start_stage = family.stage_of(start_block)
        first_useful = family.stages[start_stage].first_block
        if extract_start < first_useful:
            # The side state resets at each stage, so maps in stages before M's would feed no add-back block.
            raise ValueError(
                f"extract_start={extract_start} puts side maps on blocks {extract_start}..{first_useful - 1}, "
                f"which lie in stages before start_block={start_block}'s stage and would feed nothing; "
                f"use extract_start >= {first_useful}"
            )
        if not (isinstance(grad_checkpointing, bool) or grad_checkpointing == "mlp"):
            raise ValueError(f"grad_checkpointing must be one of {', '.join(map(repr, CHECKPOINTING))}, "
                             f"got {grad_checkpointing!r}")
        if kernel_size is not None:
            smallest = min(min(family.grid_size(stage)) for stage in range(start_stage, len(family.stages)))
            # With 'same' padding a kernel of 2n - 1 already reaches every position of an n-wide grid from any
            # other; taps beyond that only ever see padding.
            if kernel_size > 2 * smallest - 1:
                raise ValueError(f"kernel_size={kernel_size} is too large for the smallest token grid it runs over "
                                 f"({smallest} x {smallest} tokens: taps beyond {2 * smallest - 1} only see padding); "
                                 f"use at most {2 * smallest - 1} (the paper: 3, 4 or 5)")
        # What _prepare builds the side network from, so set before HeadModel's init calls it.
        self.method = "dtl" if kernel_size is None else "dtl_plus"
        self.start_block = start_block
        self.extract_start = extract_start
        self.rank = rank
        self.beta = beta
        self.kernel_size = kernel_size
        self.grad_checkpointing = grad_checkpointing
        self.num_blocks = num_blocks
        self._block_stage = [family.stage_of(b) for b in range(num_blocks)]
        super().__init__(family, head)
        if backbone_dtype is not None:
            family.to(backbone_dtype)  # floating-point tensors only; the CSN and the head stay fp32

    def _prepare(self) -> None:
        """The Compact Side Network: a rank-r map on every block from ``extract_start``, the sharp Swish and
        (DTL+) one depthwise convolution per stage from M's on."""
        family = self.family
        self.side_maps = nn.ModuleDict({
            str(b): LowRankMap(family.block_input_dim(b), self.rank, family.stages[self._block_stage[b]].dim)
            for b in range(self.extract_start, self.num_blocks)
        })
        self.side_activation = SharpSwish(self.beta)
        self.side_convs = nn.ModuleDict()
        if self.kernel_size is not None:
            for stage in range(self._block_stage[self.start_block], len(family.stages)):
                self.side_convs[str(stage)] = DepthwiseGridConv(family.stages[stage].dim, self.kernel_size)

    # --- the two halves ---------------------------------------------------------------------------------
    @property
    def prefix_map_blocks(self) -> list[int]:
        """Blocks <= M whose inputs the side maps read (they are all in M's stage)."""
        return [b for b in range(self.extract_start, self.start_block + 1)]

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The dtype the frozen backbone is stored (and run) in."""
        return next(self.family.parameters()).dtype

    def _frozen_context(self, x: torch.Tensor):
        """A low-precision backbone runs as stored: autocast would only add fp32 LayerNorm copies."""
        if self.backbone_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(x.device.type, enabled=False)
        return nullcontext()

    @torch.no_grad()
    def forward_prefix(self, images: torch.Tensor) -> PrefixState:
        family, M = self.family, self.start_block
        mapped, read = set(self.prefix_map_blocks), set(self.head_blocks)
        side_inputs, head_outputs = [], []
        with self._frozen_context(images):
            x = family.embed(images.to(self.backbone_dtype))
            for stage_index, stage in enumerate(family.stages):
                if stage.first_block > M:
                    break
                x = family.enter_stage(stage_index, x)
                for block in range(stage.first_block, min(stage.last_block, M) + 1):
                    if block in mapped:
                        side_inputs.append(x)
                    x = family.run_block(block, x)
                    if block in read and block < M:
                        head_outputs.append(x)
        return PrefixState(tuple(side_inputs), x, tuple(head_outputs))

    def forward_suffix(self, state: PrefixState) -> torch.Tensor:
        """Logits from a prefix state (computed now or read from the prefix cache, in any float dtype)."""
        return apply_head(self.head, self._head_inputs(self._suffix_outputs(state)))

    def forward(self, inputs: torch.Tensor | PrefixState | CachedInputs) -> torch.Tensor:
        """Logits from images, from a :class:`PrefixState`, or from a batch of the prefix cache."""
        if isinstance(inputs, CachedInputs):
            inputs = self.state_from_cache(inputs)
        if isinstance(inputs, PrefixState):
            return self.forward_suffix(inputs)
        return super().forward(inputs)

    def block_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of :attr:`head_blocks`, those from M on with the side output added."""
        if self.grad_checkpointing is True and torch.is_grad_enabled() and self.prefix_map_blocks:
            # Lowest memory: keep only the images; the frozen prefix (and the prefix side inputs that the
            # down-projection gradients need) is recomputed in backward.
            block_output, *rest = checkpoint(self._prefix_codes, images, use_reentrant=False)
            read = len(self.prefix_head_blocks)
            return self._run_suffix(block_output, rest[read:], tuple(rest[:read]))
        return self._suffix_outputs(self.forward_prefix(images))

    def features(self, images: torch.Tensor):
        return self._head_inputs(self.block_outputs(images))

    def _head_inputs(self, outputs: list[torch.Tensor]):
        with self._frozen_context(outputs[-1]):
            return head_inputs(self.family, self.head, outputs)

    def _suffix_outputs(self, state: PrefixState) -> list[torch.Tensor]:
        codes = [self._code(block, x) for block, x in zip(self.prefix_map_blocks, state.side_inputs)]
        return self._run_suffix(state.block_output, codes, state.head_outputs)

    def _prefix_codes(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.forward_prefix(images)
        return (state.block_output, *state.head_outputs,
                *[self._code(block, x) for block, x in zip(self.prefix_map_blocks, state.side_inputs)])

    @property
    def prefix_head_blocks(self) -> list[int]:
        """The blocks before M whose (frozen) outputs the head reads."""
        return [block for block in self.head_blocks if block < self.start_block]

    def _run_suffix(self, x: torch.Tensor, codes: list[torch.Tensor],
                    head_outputs: tuple[torch.Tensor, ...] = ()) -> list[torch.Tensor]:
        """Blocks M+1..N-1, from block M's output, the rank-r codes of M's stage so far and the outputs of the
        blocks before M that the head reads: the outputs of :attr:`head_blocks`, in the backbone's dtype."""
        family, M, dtype = self.family, self.start_block, self.backbone_dtype
        coded_blocks = list(self.prefix_map_blocks)
        read = set(self.head_blocks)
        outputs = dict(zip(self.prefix_head_blocks, head_outputs))
        if codes:
            x = x + self._side_step(self._block_stage[M], coded_blocks, codes)
        if M in read:
            outputs[M] = x
        for block in range(M + 1, self.num_blocks):
            stage = self._block_stage[block]
            x = x.to(dtype)
            if block == family.stages[stage].first_block:
                with self._frozen_context(x):
                    x = family.enter_stage(stage, x)
                codes, coded_blocks = [], []  # the width changes: each stage has its own side state
            if str(block) in self.side_maps:
                codes = [*codes, self._code(block, x)]
                coded_blocks = [*coded_blocks, block]
            x = self._run_block(block, x)
            if codes:
                x = x + self._side_step(stage, coded_blocks, codes)
            if block in read:
                outputs[block] = x
        return [outputs[block].to(dtype) for block in self.head_blocks]

    def _run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        with self._frozen_context(x):
            if self.grad_checkpointing is True and torch.is_grad_enabled():
                return checkpoint(self.family.run_block, block, x, use_reentrant=False)
            module = self.family.blocks[block]
            if self.grad_checkpointing == "mlp" and torch.is_grad_enabled() and _mlp_is_recomputable(module):
                x = x + module.drop_path1(module.ls1(module.attn(module.norm1(x))))
                return x + module.drop_path2(module.ls2(_RecomputedMlp.apply(x, module)))
            return self.family.run_block(block, x)

    @staticmethod
    def _side_cast(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Inputs of the fp32 trainable layers: autocast casts them itself; without it, match the weight."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)

    def _code(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """z_b = x_b A_b, the (B, T, r) code of block b's side map (on the grid of block b's output)."""
        down = self.side_maps[str(block)].down
        return self.family.resample_code(block, down(self._side_cast(x, down.weight)))

    def _side_step(self, stage: int, blocks: list[int], codes: list[torch.Tensor]) -> torch.Tensor:
        """g(theta(h)) with h = sum_j z_j C_j, recomputed in backward so that h is never kept."""
        function = partial(self._side_from_codes, stage, tuple(blocks))
        if torch.is_grad_enabled():
            return checkpoint(function, *codes, use_reentrant=False, preserve_rng_state=False)
        return function(*codes)

    def _side_from_codes(self, stage: int, blocks: tuple[int, ...], *codes: torch.Tensor) -> torch.Tensor:
        # sum_j z_j C_j as ONE matmul over the concatenated codes: (B, T, sum r) x (sum r, d)
        up = torch.cat([self.side_maps[str(b)].up.weight for b in blocks], dim=1)
        z = torch.cat(codes, dim=-1)
        return self.side_output(F.linear(self._side_cast(z, up), up), stage)

    def side_output(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        """g(theta(h)): the sharp Swish, then (DTL+) the stage's depthwise conv over the token grid."""
        out = self.side_activation(h)
        conv = self.side_convs[str(stage)] if str(stage) in self.side_convs else None
        if conv is not None:
            out = self._side_cast(out, conv.conv.weight)
            grid, extra = self.family.to_grid(out)
            out = self.family.from_grid(conv(grid), extra, out)
        return out

    # --- the prefix cache -----------------------------------------------------------------------------------
    cache_layout = "blocks"  # what dtl.cache stores for this model: every block's input (see BackboneFamily)

    @property
    def frozen_blocks(self) -> range:
        """Blocks 0..M: their inputs depend on no trainable parameter, so the prefix cache can serve them."""
        return range(self.start_block + 1)

    @torch.no_grad()
    def compute_frozen(self, images: torch.Tensor, last_block: int | None = None) -> dict[str, torch.Tensor]:
        """What the prefix cache stores for ``images``: the frozen backbone's block states, independent of M
        (``last_block``: only those up to that block, e.g. the largest M of several tasks sharing the pass)."""
        with self._frozen_context(images):
            return self.family.block_states(images.to(self.backbone_dtype), last_block)

    def cached_names(self) -> list[str]:
        """The block states this model reads: the inputs of the mapped blocks up to M, block M's output and the
        outputs of the blocks before M that the head reads."""
        output_name = self.family.block_output_name
        return [*map(block_input_name, self.prefix_map_blocks), output_name(self.start_block),
                *map(output_name, self.prefix_head_blocks)]

    def state_from_cache(self, inputs: CachedInputs) -> PrefixState:
        maps = len(self.prefix_map_blocks)
        names = self.cached_names()
        return PrefixState(tuple(inputs[name] for name in names[:maps]), inputs[names[maps]],
                           tuple(inputs[name] for name in names[maps + 1:]))


def _mlp_is_recomputable(block: nn.Module) -> bool:
    """A timm ViT block whose MLP branch is norm2 -> fc1 -> act -> fc2 with no dropout or inner norm."""
    if not isinstance(block, VitBlock):
        return False
    mlp = block.mlp
    plain = all(isinstance(getattr(mlp, name, None), (nn.Identity, nn.Dropout)) for name in ("drop1", "norm", "drop2"))
    return plain and all(not isinstance(getattr(mlp, n), nn.Dropout) or getattr(mlp, n).p == 0 for n in ("drop1", "drop2"))


class _RecomputedMlp(torch.autograd.Function):
    """``block.mlp(block.norm2(x))`` of a FROZEN ViT block that keeps only ``x`` for backward.

    Backward recomputes norm2 -> fc1 -> act with autograd (one extra fc1 matmul), multiplies the incoming
    gradient by fc2's weight (the input gradient of a frozen linear layer) and backpropagates it to ``x``. The
    autocast state of the forward pass is replayed, so the gradients equal the plain block's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        device = x.device.type
        ctx.block = block
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        return block.mlp(block.norm2(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        mlp = ctx.block.mlp
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            inputs = x.detach().requires_grad_(True)
            hidden = mlp.act(mlp.fc1(ctx.block.norm2(inputs)))
        grad_hidden = torch.matmul(grad.to(hidden.dtype), mlp.fc2.weight.to(hidden.dtype))
        torch.autograd.backward(hidden, grad_hidden)
        return inputs.grad, None


def build(family, head: HeadSpec, options: DTLOptions, backbone_dtype) -> DTLModel:
    settings = options.resolved(family)
    return DTLModel(family, head, kernel_size=settings.pop("kernel_size", None), backbone_dtype=backbone_dtype,
                    **settings)
