"""What one training step of each method costs: memory kept for backward, peak memory, images per second.

All methods run in ONE process on the SAME batch, so their figures compare. Per method (a "row"):

* ``trainable_params``.
* ``saved_bytes``: the bytes autograd keeps for backward during one training forward pass, seen through
  ``torch.autograd.graph.saved_tensors_hooks``. Each storage is counted once (a tensor saved by two ops is one
  buffer), and tensors sharing storage with a parameter or buffer are left out: frozen weights saved by
  reference cost no extra memory (they are not copies). A weight copy made by
  autocast is a new buffer and counts. Works on any device.
* ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` over warm training steps of this method alone
  (weights, gradients, optimizer state, the batch, activations and every transient buffer), measured with no
  other row's model on the GPU; ``peak_reserved_bytes`` is ``torch.cuda.max_memory_reserved`` of the same steps
  (what the caching allocator held: the figure ``nvidia-smi`` comes closer to). On CPU there is no allocator
  peak to read, so ``peak_bytes`` is the estimate parameters + gradients + AdamW state + ``saved_bytes`` + the
  batch (``peak_kind`` says which) and ``peak_reserved_bytes`` is None.
* ``images_per_s``: batch size / median step time (forward, backward, AdamW step). Steps of all methods are
  interleaved in rounds after a warm-up, so that load from other processes hits every method alike.
* ``images_per_cpu_s`` (CPU only): the same from the process's CPU time (``time.process_time``), which other
  processes on a shared machine do not inflate; with ``threads=1`` it is the throughput of one dedicated core.

``protocol`` names the settings of published memory figures that a run reproduces (:data:`PROTOCOLS`), so rows
can stand beside them like for like. On a GPU, fp32 matrix products use TF32 as training does
(``dtl.devices.fp32_matmul``).

With ``decode_head`` (``linear`` or ``fpn``) every row is a segmentation model: the labels are label maps of the
input's size, the loss is ``dtl.objectives.Segmentation``'s (the logits resized to the labels), and
``loss_saved_bytes`` says what that loss itself keeps for backward (the full-resolution log-probabilities: the same
for every row, and not part of ``saved_bytes``, which counts the model's forward as for classification).

Every row is a registered method at its defaults, then the variants each method's registry record declares
(``Method.benchmark_variants``: DTL+'s gradient checkpointing, and training from cached prefix states, whose one-off
prefix pass is reported separately as ``prefix_s_per_batch``). The ratios, the targets and the kinds of the memory
breakdown come from the records too (``benchmark_reference``, ``benchmark_targets``, ``added_modules``).
"""
from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from .cache import storage_dtype
from .devices import autocast, fp32_matmul, resolve_device
from .engine import SavedTensorBytes, parameter_groups
from .methods import (
    BACKBONE_DTYPES,
    DTLModel,
    PrefixState,
    available_methods,
    create_model,
    get_method,
    trainable_parameters,
)
from .methods.registry import AddedModules
from .objectives import Classification, Segmentation


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: a method with options, trained from images or from cached prefix states."""

    method: str
    options: dict = field(default_factory=dict)
    cached: bool = False


def registry_rows() -> dict[str, RowSpec]:
    """One row per registered method with its default options, then each method's declared benchmark variants
    (for DTL+: gradient checkpointing, MLP-only recomputation, training from the prefix cache)."""
    rows: dict[str, RowSpec] = {}
    for name in available_methods():
        rows[name] = RowSpec(name)
    for name in available_methods():
        for row, options in get_method(name).benchmark_variants.items():
            options = dict(options)
            rows[row] = RowSpec(name, options, cached=bool(options.pop("cached", False)))
    return rows


ROWS: dict[str, RowSpec] = registry_rows()
# What a training step of the benchmark runs in: fp32 (no autocast) or bf16/fp16 autocast (no "auto" here).
STEP_PRECISIONS = ("fp32", "bf16", "fp16")
_LOW_PRECISION = {"bf16": "bf16", "fp16": "fp16"}

# The rows every row's figures are divided by (``<figure>_vs_<row>``), in registration order.
REFERENCE_ROWS = tuple(name for name in available_methods() if get_method(name).benchmark_reference)
# The project's targets (dtl.methods.registry.BenchmarkTargets): ratio bounds at ViT-B/16, 224 px, batch 32 and
# in segmentation at 512 px, (row, figure, reference row, bound, "max"/"min"); GPU peak bounds in bytes, bf16.
RATIO_TARGETS = tuple(target for name in available_methods() for target in get_method(name).benchmark_targets.ratios)
SEGMENTATION_TARGETS = tuple(target for name in available_methods()
                             for target in get_method(name).benchmark_targets.segmentation)
PEAK_TARGETS = tuple(target for name in available_methods() for target in get_method(name).benchmark_targets.peaks)
# The settings under which published training-memory figures were measured (batch size, autocast, storage dtype
# of the frozen weights): ``dtl``, the DTL authors' VTAB-1K scripts (batch 32, torch.cuda.amp: fp16 autocast with
# a loss scaler, fp32 weights, ``torch.cuda.max_memory_allocated``); ``vpetl``, V-PETL Bench (batch 64, fp32).
# A CPU has no fp16 autocast: there the dtl protocol autocasts to bf16 instead.
PROTOCOLS = {
    "dtl": {"batch_size": 32, "precision": "fp16", "backbone_dtype": "fp32"},
    "vpetl": {"batch_size": 64, "precision": "fp32", "backbone_dtype": "fp32"},
}


@dataclass
class BenchmarkSettings:
    backbone: str = "vit_base_patch16_224"
    batch_size: int = 32
    precision: str = "fp32"  # fp32: no autocast; bf16/fp16: autocast (fp16 with a GradScaler)
    device: str = "auto"
    methods: Sequence[str] = tuple(ROWS)
    backbone_dtype: str = "auto"  # DTL rows: auto = the autocast dtype under bf16/fp16, else fp32
    img_size: int | None = None
    num_classes: int = 100
    warmup: int = 2  # untimed steps per method before the timed rounds
    steps: int | None = None  # timed steps per method per round; None: 2 on CPU, 10 on CUDA
    rounds: int = 3
    threads: int | None = None  # torch.set_num_threads (CPU); None leaves torch's default
    timing: bool = True  # False: parameters, saved bytes and the CPU peak estimate only (fast)
    seed: int = 0
    protocol: str | None = None  # the PROTOCOLS entry these settings follow (recorded with the results)
    decode_head: str | None = None  # linear | fpn: segmentation models and label maps (dtl.methods.heads)

    @classmethod
    def for_protocol(cls, protocol: str, device: str = "auto", **settings) -> "BenchmarkSettings":
        """The settings of ``protocol`` (:data:`PROTOCOLS`) on ``device``; ``settings`` set the rest."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        values = dict(PROTOCOLS[protocol])
        if values["precision"] == "fp16" and resolve_device(device, key="device").type != "cuda":
            values["precision"] = "bf16"
        return cls(device=device, protocol=protocol, **{**values, **settings})

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in ROWS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
        if self.precision not in STEP_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(STEP_PRECISIONS)}, got {self.precision!r}")
        if self.backbone_dtype != "auto" and self.backbone_dtype not in BACKBONE_DTYPES:
            raise ValueError(f"backbone_dtype must be auto or one of {', '.join(BACKBONE_DTYPES)}, "
                             f"got {self.backbone_dtype!r}")
        if self.batch_size < 1 or self.warmup < 0 or (self.steps is not None and self.steps < 1) or self.rounds < 1:
            raise ValueError("batch_size, steps and rounds must be >= 1 and warmup >= 0")

    def dtl_backbone_dtype(self) -> str:
        if self.backbone_dtype != "auto":
            return self.backbone_dtype
        return _LOW_PRECISION.get(self.precision, "fp32")


# --- measurements ---------------------------------------------------------------------------------------------
def saved_tensor_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the buffers autograd keeps for backward while ``forward()`` runs (each storage once; storages of
    ``model``'s parameters and buffers excluded). The graph is freed before returning."""
    with SavedTensorBytes(model) as counter:
        output = forward()
    del output
    return counter.nbytes


class SavedBytesByModule(SavedTensorBytes):
    """:class:`SavedTensorBytes` that also remembers which module was running (the innermost one) when autograd
    first kept each storage, so the bytes split by module; the total is the same count."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._owner: dict[int, str] = {}
        self._stack = [""]
        self._modules = list(model.named_modules())
        self._handles: list = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._owner.setdefault(tensor.untyped_storage().data_ptr(), self._stack[-1])
        return super()._pack(tensor)

    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pointer, size in self._storages.items():
            out[self._owner[pointer]] = out.get(self._owner[pointer], 0) + size
        return out

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self._stack.append(name)
        return hook

    def _leave(self, module, args, output) -> None:  # a hook that returned a value would replace the output
        self._stack.pop()

    def __enter__(self) -> "SavedBytesByModule":
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# What a module's bytes count as, by fragments of its name checked in this order: the backbone's head, attention
# and MLP, then the modules the model's method adds (its registry record's ``added_modules``), then the backbone's
# norms and embedding. Bytes kept outside every submodule are the added modules' when the record says the model's
# own forward runs them.
_ADDED_KINDS = tuple(dict.fromkeys(get_method(name).added_modules.kind for name in available_methods()
                                   if get_method(name).added_modules))
BREAKDOWN_KINDS = ("attention", "mlp", "norm", *_ADDED_KINDS, "head", "embedding", "other")
_BACKBONE_KINDS_FIRST = (("head", ("head", "fc_norm")), ("attention", ("attn",)), ("mlp", ("mlp",)))
_BACKBONE_KINDS_LAST = (("norm", ("norm",)), ("embedding", ("patch_embed", "pos_")))


def added_modules(model: nn.Module) -> AddedModules | None:
    """What the registry says of the modules ``model``'s method adds (None: a model of no registered method)."""
    method = getattr(model, "method", "")
    return get_method(method).added_modules if method in available_methods() else None


def module_kind(name: str, model: nn.Module) -> str:
    added = added_modules(model)
    if not name:
        return added.kind if added and added.own_forward else "other"
    parts = name.split(".")
    rules = (*_BACKBONE_KINDS_FIRST, *([(added.kind, added.names)] if added else []), *_BACKBONE_KINDS_LAST)
    for kind, needles in rules:
        if any(needle in part for part in parts for needle in needles):
            return kind
    return "other"


def saved_bytes_breakdown(model: nn.Module, forward: Callable[[], torch.Tensor]) -> dict[str, dict[str, int]]:
    """The bytes kept for backward during ``forward()`` by block (``"0"``, ``"1"``..., ``"outside blocks"``) and,
    within each, by kind (:data:`BREAKDOWN_KINDS`). The sum equals :func:`saved_tensor_bytes`."""
    names = {id(module): name for name, module in model.named_modules()}
    family = getattr(model, "family", None)
    prefixes = [names[id(block)] for block in getattr(family, "blocks", [])]
    with SavedBytesByModule(model) as counter:
        output = forward()
    del output
    table: dict[str, dict[str, int]] = {}
    for name, size in counter.by_module().items():
        block = next((str(i) for i, prefix in enumerate(prefixes) if name == prefix or name.startswith(prefix + ".")),
                     "outside blocks")
        kinds = table.setdefault(block, {})
        kind = module_kind(name, model)
        kinds[kind] = kinds.get(kind, 0) + size
    return table


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_peak_estimate(model: nn.Module, saved_bytes: int, input_bytes: int) -> int:
    """Parameters and buffers + gradients + AdamW's two moments + saved activations + the batch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    return weights + tensor_bytes(trainable) + 2 * tensor_bytes(trainable) + saved_bytes + input_bytes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one row ----------------------------------------------------------------------------------------------------
class _Row:
    """A model, its batch and optimizer, and a ``step()`` that trains it once."""

    def __init__(self, name: str, spec: RowSpec, settings: BenchmarkSettings, device: torch.device,
                 images: torch.Tensor, labels: torch.Tensor):
        self.name, self.spec, self.device, self.precision = name, spec, device, settings.precision
        self.timing = settings.timing
        options = dict(spec.options)
        dtype = settings.dtl_backbone_dtype() if get_method(spec.method).low_precision_backbone else "fp32"
        self.backbone_dtype = dtype
        self.model = create_model(settings.backbone, spec.method, settings.num_classes, img_size=settings.img_size,
                                  backbone_dtype=None if dtype == "fp32" else dtype, decode_head=settings.decode_head,
                                  **options).to(device).train()
        self.labels = labels
        self.inputs: torch.Tensor | PrefixState = images.clone()  # each row's own batch counts in its peak
        self.prefix_s_per_batch: float | None = None
        if spec.cached:
            if not isinstance(self.model, DTLModel):
                raise ValueError(f"row {name}: cached training needs a DTL method, got {spec.method}")
            self.inputs, self.prefix_s_per_batch = self._cached_state(images)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, 0.05), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        self.objective = benchmark_objective(settings)

    def _cached_state(self, images: torch.Tensor) -> tuple[PrefixState, float]:
        """The batch as the prefix cache stores it (dtl.cache.storage_dtype), and the prefix's time per batch."""
        dtype = storage_dtype(self.model, self.precision)
        times = []
        for _ in range(3 if self.timing else 1):
            _synchronize(self.device)
            start = time.perf_counter()
            with torch.no_grad(), autocast(self.device, self.precision):
                state = self.model.forward_prefix(images)
            _synchronize(self.device)
            times.append(time.perf_counter() - start)
        state = PrefixState(*(tuple(t.to(dtype) for t in part) if isinstance(part, tuple) else part.to(dtype)
                              for part in state))
        return state, statistics.median(times)

    def forward(self) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model(self.inputs)

    def step(self) -> None:
        with autocast(self.device, self.precision):
            loss = self.objective.loss(self.model(self.inputs), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @property
    def input_bytes(self) -> int:
        if isinstance(self.inputs, PrefixState):
            state = self.inputs
            return tensor_bytes((*state.side_inputs, state.block_output, *state.head_outputs))
        return tensor_bytes([self.inputs])


# --- the benchmark ----------------------------------------------------------------------------------------------
def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Measure every row of ``settings.methods``; returns one JSON-ready dict per row (settings included).

    Memory is measured row by row, each with no other row's model on the device; the timing rounds then run
    every row side by side in one loop over the same batches, so every ratio in the table comes from one run
    (split up, the steps would drift apart)."""
    settings.validate()
    device = resolve_device(settings.device, key="device")
    if settings.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    steps = settings.steps or (10 if device.type == "cuda" else 2)
    probe = timm.create_model(settings.backbone, pretrained=False, num_classes=0,
                              **({"img_size": settings.img_size} if settings.img_size else {}))
    img_size = settings.img_size or int(probe.default_cfg.get("input_size", (3, 224, 224))[-1])
    patch_embed = getattr(probe, "patch_embed", None)
    if getattr(patch_embed, "img_size", None):
        img_size = int(patch_embed.img_size[0])
    del probe
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.randn(settings.batch_size, 3, img_size, img_size, generator=generator).to(device)
    label_shape = (settings.batch_size, img_size, img_size) if settings.decode_head else (settings.batch_size,)
    labels = torch.randint(0, settings.num_classes, label_shape, generator=generator).to(device)

    with fp32_matmul(device):
        run_settings = {
            "backbone": settings.backbone, "batch_size": settings.batch_size, "img_size": img_size,
            "precision": settings.precision, "protocol": settings.protocol, "device": str(device),
            "device_name": device_name(device), "dtl_backbone_dtype": settings.dtl_backbone_dtype(),
            "threads": torch.get_num_threads(), "warmup": settings.warmup, "steps": steps, "rounds": settings.rounds,
            "tf32_matmul": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
            "decode_head": settings.decode_head, "num_classes": settings.num_classes,
            "loss_saved_bytes": loss_saved_bytes(settings, labels),
            "torch": torch.__version__, "timm": timm.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        results = {}
        for name in settings.methods:
            results[name] = _measure_memory(name, settings, device, images, labels)
            log(f"  {name}: {results[name]['trainable_params']:,} trainable, saved "
                f"{results[name]['saved_bytes'] / 2**20:.1f} MiB, peak {results[name]['peak_bytes'] / 2**20:.0f} MiB "
                f"({results[name]['peak_kind']})")
        if settings.timing:
            _time_rows(settings, device, images, labels, steps, results, log)
    add_ratios(results)
    return [{**result, **run_settings} for result in results.values()]


def benchmark_objective(settings: BenchmarkSettings):
    return Segmentation(settings.num_classes) if settings.decode_head else Classification()


def loss_saved_bytes(settings: BenchmarkSettings, labels: torch.Tensor) -> int:
    """What the loss alone keeps for backward: the same for every row. A decode head's logits are resized to the
    labels first, and the bilinear resize keeps nothing, so logits at the labels' size stand for any head's."""
    shape = (labels.shape[0], settings.num_classes, *labels.shape[1:])
    logits = torch.zeros(shape, device=labels.device, requires_grad=True)
    with SavedTensorBytes(nn.Identity()) as counter:
        loss = benchmark_objective(settings).loss(logits, labels)
    del loss
    return counter.nbytes


def _measure_memory(name: str, settings: BenchmarkSettings, device: torch.device, images: torch.Tensor,
                    labels: torch.Tensor) -> dict:
    """One row's parameters, bytes kept for backward and peak memory, measured with its model alone on the
    device (freed again before the next row)."""
    spec = ROWS[name]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _synchronize(device)
        before = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    row = _Row(name, spec, settings, device, images, labels)
    peak_reserved = None
    if device.type == "cuda":
        # From here on: this row's weights and batch (allocated above), then its gradients, optimizer state,
        # activations and transients; not the cached row's one-off prefix pass.
        gc.collect()
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(settings.warmup, 2)):
            row.step()
        _synchronize(device)
        peak, peak_kind = torch.cuda.max_memory_allocated(device) - before[0], "cuda_max_allocated"
        peak_reserved = torch.cuda.max_memory_reserved(device) - before[1]
    saved = saved_tensor_bytes(row.model, row.forward)
    if device.type != "cuda":
        peak, peak_kind = cpu_peak_estimate(row.model, saved, row.input_bytes), "cpu_estimate"
    result = {
        "method": name, "base_method": spec.method, "options": dict(spec.options), "cached": spec.cached,
        "backbone_dtype": row.backbone_dtype, "trainable_params": trainable_parameters(row.model),
        "saved_bytes": saved, "peak_bytes": peak, "peak_kind": peak_kind, "peak_reserved_bytes": peak_reserved,
        "images_per_s": None, "step_time_s": None, "step_times_s": [],
        "images_per_cpu_s": None, "cpu_step_times_s": [],
        "prefix_s_per_batch": row.prefix_s_per_batch,
    }
    del row
    return result


def _time_rows(settings: BenchmarkSettings, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
               steps: int, results: dict[str, dict], log: Callable[[str], None]) -> None:
    """Every row's training steps, interleaved over ``settings.rounds`` rounds after a warm-up, so that load from
    other processes hits every row alike; the median step time gives images/s."""
    rows = {name: _Row(name, ROWS[name], settings, device, images, labels) for name in results}
    for name, row in rows.items():
        if row.prefix_s_per_batch is not None:
            results[name]["prefix_s_per_batch"] = row.prefix_s_per_batch
        for _ in range(settings.warmup):
            row.step()
    _synchronize(device)
    for round_index in range(settings.rounds):
        for name, row in rows.items():
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                row.step()
            _synchronize(device)
            results[name]["step_times_s"].append((time.perf_counter() - start) / steps)
            results[name]["cpu_step_times_s"].append((time.process_time() - cpu_start) / steps)
        log(f"  round {round_index + 1}/{settings.rounds}: " + ", ".join(
            f"{n} {settings.batch_size / results[n]['step_times_s'][-1]:.1f}" for n in rows) + " img/s")
    for name in rows:
        step_time = statistics.median(results[name]["step_times_s"])
        results[name]["step_time_s"] = step_time
        results[name]["images_per_s"] = settings.batch_size / step_time
        if device.type == "cpu":
            results[name]["images_per_cpu_s"] = settings.batch_size / statistics.median(
                results[name]["cpu_step_times_s"])


def add_ratios(results: dict[str, dict]) -> None:
    """``<figure>_vs_<reference>``: each row's figure divided by each of :data:`REFERENCE_ROWS`' (when both exist)."""
    for reference in REFERENCE_ROWS:
        base = results.get(reference)
        for result in results.values():
            for figure in ("trainable_params", "saved_bytes", "peak_bytes", "peak_reserved_bytes", "images_per_s",
                           "images_per_cpu_s"):
                value, ref = result.get(figure), (base or {}).get(figure)
                result[f"{figure}_vs_{reference}"] = value / ref if value is not None and ref else None


def format_table(results: list[dict]) -> str:
    """A plain-text table of the rows (MiB, img/s and the ratios to each of :data:`REFERENCE_ROWS`)."""
    def ratios(r: dict, figure: str) -> tuple[str, ...]:
        return tuple(f"{value:.3f}" if value is not None else "-"
                     for value in (r.get(f"{figure}_vs_{reference}") for reference in REFERENCE_ROWS))

    cpu = any(r.get("images_per_cpu_s") for r in results)
    reserved = any(r.get("peak_reserved_bytes") is not None for r in results)
    peak = "peak MiB" if results[0]["peak_kind"] == "cuda_max_allocated" else "peak est. MiB"
    versus = tuple(f"x {reference}" for reference in REFERENCE_ROWS)
    header = ("method", "trainable", "saved MiB", *versus, peak, *versus) + (
        ("reserved MiB",) if reserved else ()) + ("img/s", *versus) + (
        ("img/cpu-s", *versus) if cpu else ())
    lines = [header]
    for r in results:
        lines.append((
            r["method"], f"{r['trainable_params']:,}",
            f"{r['saved_bytes'] / 2**20:.1f}", *ratios(r, "saved_bytes"),
            f"{r['peak_bytes'] / 2**20:.0f}", *ratios(r, "peak_bytes"),
        ) + ((f"{r['peak_reserved_bytes'] / 2**20:.0f}",) if reserved else ()) + (
            f"{r['images_per_s']:.3g}" if r.get("images_per_s") else "-", *ratios(r, "images_per_s"),
        ) + ((f"{r['images_per_cpu_s']:.3g}" if r.get("images_per_cpu_s") else "-",
              *ratios(r, "images_per_cpu_s")) if cpu else ()))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def check_targets(results: list[dict]) -> list[dict]:
    """The ratio targets (and, on CUDA, the peak-memory targets) that these results can check."""
    by_name = {r["method"]: r for r in results}
    checks = []
    segmentation = bool(results and results[0].get("decode_head"))
    targets = list(SEGMENTATION_TARGETS if segmentation else RATIO_TARGETS)
    targets += [(row, "images_per_cpu_s", ref, bound, kind) for row, figure, ref, bound, kind in targets
                if figure == "images_per_s"]
    for row, figure, reference, bound, kind in targets:
        value = (by_name.get(row) or {}).get(f"{figure}_vs_{reference}")
        if value is None:
            continue
        met = value <= bound if kind == "max" else value >= bound
        checks.append(dict(target=f"{row} {figure} {'<=' if kind == 'max' else '>='} {bound}x {reference}",
                           value=value, met=met))
    for row, bound in () if segmentation else PEAK_TARGETS:
        result = by_name.get(row)
        if result and result["peak_kind"] == "cuda_max_allocated":
            checks.append(dict(target=f"{row} peak memory <= {bound / 1e9:.1f} GB ({result['precision']})",
                               value=result["peak_bytes"] / 1e9, met=result["peak_bytes"] <= bound))
    return checks


__all__ = [
    "PROTOCOLS", "ROWS", "BenchmarkSettings", "RowSpec", "add_ratios", "check_targets", "cpu_peak_estimate", "format_table",
    "run_benchmark", "saved_tensor_bytes",
]
