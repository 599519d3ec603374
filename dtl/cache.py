"""The prefix feature cache: run the frozen part of a model once per dataset, then train from its outputs.

DTL's blocks 0..M see no trainable parameter, and the linear probe's whole backbone is frozen. With deterministic
inputs (the VTAB protocol has no augmentation) and no drop-path/dropout in that frozen part, its outputs are the
same in every epoch, every seed and every sweep trial that shares the backbone weights and the data split. This
module computes them once, keeps them in memory or on disk, and serves shuffled batches of them to the engine,
which then runs only the trained part (for DTL: blocks M+1..N-1, the CSN and the head).

**One cache for every start block.** For DTL the cache holds every block's input and every stage's output
(:meth:`~dtl.models.BackboneFamily.block_states`, the ``blocks`` layout), not only what one M needs: the key
depends on the backbone, its weights, the image size, the split and the dtype, never on M, the rank or the side
maps, so trials with M = 2 and M = 9 read the same file (each takes the tensors its M needs). The linear probe
caches the pooled features (the ``pooled`` layout, one vector per image).

**Shared by every process of a machine.** On disk an entry is one ``.safetensors`` file, written once (atomically,
under a file lock, so concurrent trials never compute it twice) and then memory-mapped by every reader: the pages
live in the operating system's page cache, so any number of sweep trials on a node share one copy in RAM and a
trial that starts later reads it at once. (A file rather than Ray's object store because the same entries serve
the DVC stages, seeds and later sweeps, which run without Ray and outlive any Ray session.)

The cache is exact up to its storage dtype: fp32 when training in fp32, bf16/fp16 when training under that
autocast or with the backbone stored in it (``backbone_dtype``). It is refused, with the reason, when it
would change the model: a method with no frozen part (LoRA, adapters, full fine-tuning), a stochastic frozen part
(drop-path with ``drop_path_scope: all``), or an augmenting dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import CACHE_MODES
from .devices import EpochOrder, autocast, fp32_matmul, image_loader
from .io import atomic_path, file_lock
from .methods import PrefixState
from .models import CachedInputs

FORMAT_VERSION = 2
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Transform class names that draw random numbers (torchvision v1/v2, timm).
_RANDOM_TRANSFORMS = ("ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
                      "GaussianNoise", "Mixup", "CutMix")
# Features kept in this process, most recently used last (a sweep's trials or a seed loop in one process).
_MEMORY: OrderedDict[str, "FrozenFeatures"] = OrderedDict()
_MEMORY_ENTRIES = 4
_MEMORY_BYTES = 8 << 30  # memory-mapped entries count too, although the page cache can evict them
_LABELS = "labels"


class PrefixCacheError(ValueError):
    """The prefix cache was asked for but cannot be exact for this model or dataset; the message says why."""


# --- the features -------------------------------------------------------------------------------------------
@dataclass
class FrozenFeatures:
    """The frozen part's outputs for a whole dataset, in dataset order: named (N, ...) tensors and the labels.

    With ``pinned``, features kept in host memory for a GPU gather each batch into page-locked memory, so that
    the batch's copy to the GPU runs beside the computation (:func:`place_features`)."""

    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor  # (N,) int64; (N, H, W) label maps for segmentation
    pinned: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), self.labels))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def select(self, names: Sequence[str]) -> "FrozenFeatures":
        """Only the tensors a model reads (a DTL model with start block M reads M + 2 of the N + 1 block states)."""
        missing = [name for name in names if name not in self.tensors]
        if missing:
            raise KeyError(f"the cached features have no {', '.join(missing)} (they hold {', '.join(self.tensors)})")
        return FrozenFeatures({name: self.tensors[name] for name in names}, self.labels, self.pinned)

    def to(self, device: torch.device) -> "FrozenFeatures":
        return FrozenFeatures({k: t.to(device) for k, t in self.tensors.items()}, self.labels.to(device))

    def batch(self, indices: torch.Tensor) -> tuple[CachedInputs, torch.Tensor]:
        indices = indices.to(self.labels.device, non_blocking=True)  # a blocking copy would wait for the GPU
        if not self.pinned:
            return CachedInputs({k: t[indices] for k, t in self.tensors.items()}), self.labels[indices]
        return (CachedInputs({k: _gather_pinned(t, indices) for k, t in self.tensors.items()}),
                _gather_pinned(self.labels, indices))

    def loader(self, batch_size: int, *, shuffle: bool, drop_last: bool,
               generator: torch.Generator | None = None) -> "FeatureBatches":
        return FeatureBatches(self, batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)


def _gather_pinned(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[indices]`` written straight into page-locked memory (torch's pinned-memory pool reuses the
    buffers once their copy to the GPU is done): a ``non_blocking`` copy from it does not wait."""
    out = torch.empty((len(indices), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
    return torch.index_select(tensor, 0, indices, out=out)


class FeatureBatches:
    """Batches of cached features, drawn exactly as ``DataLoader(dataset, batch_size, shuffle, drop_last,
    generator=...)`` (and :func:`dtl.devices.image_loader` with that generator as ``order``) draws image batches:
    the same generator gives the same batches, cached or not."""

    def __init__(self, features: FrozenFeatures, batch_size: int, *, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None):
        self.features = features
        # A DataLoader over the indices consumes the generator exactly like the image DataLoader would.
        # Indices for features on a GPU come in page-locked memory: their copy there does not wait.
        self._indices = DataLoader(range(len(features)), batch_size=batch_size, drop_last=drop_last,
                                   sampler=EpochOrder(range(len(features)), generator=generator) if shuffle else None,
                                   generator=torch.Generator() if shuffle else None,
                                   pin_memory=features.device.type == "cuda")

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[tuple[CachedInputs, torch.Tensor]]:
        for indices in self._indices:
            yield self.features.batch(indices)


# --- when the cache is exact ------------------------------------------------------------------------------------
def dataset_augmentation(dataset: Dataset) -> str | None:
    """A description of the random augmentation ``dataset`` applies, or None when its items are deterministic.

    Datasets may say so themselves with an ``augment`` attribute; otherwise torchvision/timm transform objects
    among the dataset's attributes are searched for random ones (``Random*``, ``ColorJitter``, ``RandAugment``...).
    """
    flag = getattr(dataset, "augment", None)
    if flag:
        return f"{type(dataset).__name__}.augment is {flag!r}"
    for name, value in vars(dataset).items() if hasattr(dataset, "__dict__") else ():
        found = _random_transform(value)
        if found:
            return f"{type(dataset).__name__}.{name.lstrip('_')} contains the random transform {found}"
    return None


def _random_transform(value, depth: int = 0) -> str | None:
    if depth > 4 or value is None or isinstance(value, (str, bytes, int, float, torch.Tensor, Path)):
        return None
    name = type(value).__name__
    if name.startswith("Random") or name in _RANDOM_TRANSFORMS:
        return name
    children = getattr(value, "transforms", None)
    if isinstance(children, (list, tuple, nn.ModuleList)):
        for child in children:
            found = _random_transform(child, depth + 1)
            if found:
                return found
    return None


def cache_refusal(model: nn.Module, dataset: Dataset | None = None) -> str | None:
    """Why the prefix cache would not be exact for ``model`` trained on ``dataset`` (None: it would be)."""
    if getattr(model, "cache_layout", None) is None:
        method = getattr(model, "method", type(model).__name__)
        return (f"the prefix cache needs a model with a frozen part (dtl, dtl_plus or linear), not {method!r}: "
                "its other methods train parameters inside every block")
    frozen = model.frozen_blocks
    randomness = model.family.stochastic_modules(frozen)
    if randomness:
        part = f"embedding and blocks 0..{frozen[-1]}" if len(frozen) else "embedding"
        return (f"the frozen part ({part}) is stochastic: {', '.join(randomness[:4])}"
                f"{' ...' if len(randomness) > 4 else ''}; its outputs change every epoch. Set "
                "model.drop_path_scope: suffix (stochastic depth only where gradients flow), or model.drop_path: 0, "
                "or training.prefix_cache: off")
    if dataset is not None:
        augmentation = dataset_augmentation(dataset)
        if augmentation:
            return (f"the training data is augmented ({augmentation}), so the frozen inputs change every epoch; "
                    "the VTAB-1K protocol has no augmentation, the few-shot recipe has. Turn augmentation off or set "
                    "training.prefix_cache: off")
    return None


# --- identity ---------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset) -> str | None:
    """A string that changes whenever the items of ``dataset`` may change, or None if it cannot tell.

    Datasets can provide ``cache_fingerprint()``. VTAB-style datasets (``list_file``, ``samples``, ``img_size``)
    are identified by the list file's path and content, the image size, the transform and every image's size and
    modification time. Anything else is unknown (the cache then lives in memory only, for one run).
    """
    custom = getattr(dataset, "cache_fingerprint", None)
    if callable(custom):
        return str(custom())
    list_file, samples = getattr(dataset, "list_file", None), getattr(dataset, "samples", None)
    if list_file is None or samples is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    try:
        list_file = Path(list_file).resolve()
        digest.update(f"{type(dataset).__module__}.{type(dataset).__qualname__}|{list_file}|".encode())
        digest.update(list_file.read_bytes())
        digest.update(f"|img_size={getattr(dataset, 'img_size', None)}".encode())
        for attr in ("transform", "_geometry", "_to_float"):
            if hasattr(dataset, attr):
                digest.update(f"|{attr}={getattr(dataset, attr)!r}".encode())
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"|{path}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except (OSError, TypeError, ValueError):
        return None
    return digest.hexdigest()


def backbone_fingerprint(model: nn.Module) -> str:
    """The frozen backbone's architecture and weights (hashed): all that the cached features depend on."""
    digest = hashlib.blake2b(digest_size=16)
    backbone = model.family.backbone
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)
    digest.update(f"{name}|{type(model.family).__name__}".encode())
    for key, tensor in sorted(model.family.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{key}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def storage_dtype(model: nn.Module, precision: str) -> torch.dtype:
    """The dtype the frozen part computes in, so storing in it loses nothing but the autocast's fp32 residual."""
    backbone_dtype = next(model.family.parameters()).dtype
    if backbone_dtype != torch.float32:
        return backbone_dtype
    return _AUTOCAST_DTYPES.get(precision, torch.float32)


def cache_key(model: nn.Module, dataset: Dataset, precision: str) -> str | None:
    """The entry's name: the same for every model that reads the same frozen features, whatever its start block,
    rank or side maps (None when the dataset cannot identify itself)."""
    data = dataset_fingerprint(dataset)
    if data is None:
        return None
    identity = dict(format=FORMAT_VERSION, layout=model.cache_layout, data=data, backbone=backbone_fingerprint(model),
                    precision=precision, storage=str(storage_dtype(model, precision)))
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    """``$DTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dtl/prefix``, else ``~/.cache/dtl/prefix``."""
    if os.environ.get("DTL_CACHE_DIR"):
        return Path(os.environ["DTL_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dtl" / "prefix"


# --- computing, storing, loading --------------------------------------------------------------------------------
@torch.no_grad()
def compute_frozen_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> FrozenFeatures:
    """Run ``model.compute_frozen`` over ``dataset`` (in order, eval mode) and keep the outputs on the CPU."""
    device = torch.device(device)
    dtype = dtype or storage_dtype(model, precision)
    was_training = model.training
    model.eval()
    loader = image_loader(dataset, batch_size, device, num_workers, persistent=False)
    tensors: dict[str, torch.Tensor] = {}
    labels = None
    start = 0
    try:
        for images, batch_labels in tqdm(loader, desc="prefix cache", unit="batch",  # on a terminal only
                                         disable=None if progress else True, file=sys.stderr, dynamic_ncols=True):
            with fp32_matmul(device), autocast(device, precision):
                outputs = model.compute_frozen(images.to(device, non_blocking=True))
            stop = start + images.shape[0]
            if labels is None:
                count = len(dataset)
                tensors = {k: torch.empty((count, *t.shape[1:]), dtype=dtype) for k, t in outputs.items()}
                labels = torch.empty((count, *torch.as_tensor(batch_labels).shape[1:]), dtype=torch.int64)
            for name, value in outputs.items():
                tensors[name][start:stop] = value.to("cpu", dtype)
            labels[start:stop] = torch.as_tensor(batch_labels, dtype=torch.int64)
            start = stop
    finally:
        model.train(was_training)
    if labels is None:
        raise ValueError("cannot build a prefix cache of an empty dataset")
    return FrozenFeatures(tensors, labels)


def load_features(path: Path, expected_count: int, dtype: torch.dtype) -> FrozenFeatures | None:
    """The features stored at ``path``, memory-mapped, if they are whole and fit (else None, with a warning)."""
    try:
        with safe_open(str(path), framework="pt") as handle:  # tensors are views of a read-only mmap of the file
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        labels = tensors.pop(_LABELS)
        features = FrozenFeatures(tensors, labels)
    except Exception as err:  # a truncated or foreign file: rebuild it
        warnings.warn(f"prefix cache file {path} is unreadable ({type(err).__name__}: {err}); rebuilding it",
                      stacklevel=2)
        return None
    if not tensors or len(features) != expected_count or features.dtype != dtype:
        warnings.warn(f"prefix cache file {path} does not fit this run (samples {len(features)} vs {expected_count}, "
                      f"dtype {features.dtype if tensors else None} vs {dtype}); rebuilding it", stacklevel=2)
        return None
    return features


def save_features(path: Path, features: FrozenFeatures, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        tensors = {**{k: v.contiguous() for k, v in features.tensors.items()}, _LABELS: features.labels}
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)  # looked up here: tests stub it


@dataclass
class CacheReport:
    """What the cache did in a run: ``mode`` off/memory/disk, where the features came from, their size."""

    mode: str = "off"
    source: str = ""  # built | disk | memory
    reason: str = ""  # why the cache is off (auto) or why disk fell back to memory
    notice: bool = False  # worth telling the user: a run that could have used the cache or the disk but did not
    key: str | None = None
    layout: str | None = None  # blocks (DTL: every block's input) | pooled, maps (linear probe: what its head reads)
    path: str | None = None
    num_samples: int = 0
    bytes: int = 0  # the whole entry (what every trial of a task shares)
    read_bytes: int = 0  # the part this model reads
    dtype: str = ""
    build_s: float = 0.0  # seconds spent computing (or opening) the features

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_prefix_cache(
    model: nn.Module,
    dataset: Dataset,
    *,
    mode: str = "auto",
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[FrozenFeatures | None, CacheReport]:
    """Get the cached features of ``dataset`` that ``model`` reads, according to ``mode``.

    ``off``: none. ``memory``: computed once per process (reused by later runs in it with the same key).
    ``disk``: read from / written to ``cache_dir`` (default :func:`default_cache_dir`), shared by processes.
    ``auto``: disk when the dataset identifies itself and the disk has room, else memory; and no cache (with the
    reason in the report) when it would not be exact. ``memory``/``disk`` raise :class:`PrefixCacheError` then.
    The returned features hold only the tensors ``model.cached_names()`` lists.
    """
    if mode not in CACHE_MODES:
        raise PrefixCacheError(f"prefix cache mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "off":
        return None, CacheReport(reason="training.prefix_cache is off")
    refusal = cache_refusal(model, dataset)
    if refusal:
        if mode == "auto":
            # an augmenting recipe (few-shot) never could use it: nothing to tell
            could = getattr(model, "cache_layout", None) is not None and dataset_augmentation(dataset) is None
            return None, CacheReport(reason=refusal, notice=could)
        raise PrefixCacheError(f"training.prefix_cache: {mode} is not possible: {refusal}")

    device = torch.device(device)
    dtype = storage_dtype(model, precision)
    started = time.perf_counter()
    key = cache_key(model, dataset, precision)
    report = CacheReport(mode="memory" if mode == "memory" else "disk", key=key, layout=model.cache_layout,
                         dtype=str(dtype).replace("torch.", ""))
    if key is None:
        if mode == "disk":
            raise PrefixCacheError(
                f"training.prefix_cache: disk needs a dataset that identifies itself (a VTabDataset, or a "
                f"cache_fingerprint() method); {type(dataset).__name__} does not. Use memory instead")
        report.mode, report.reason = "memory", "the dataset has no fingerprint, so the cache lives in memory only"

    def build() -> FrozenFeatures:
        report.source = "built"
        return compute_frozen_features(model, dataset, device=device, precision=precision, dtype=dtype,
                                       batch_size=batch_size, num_workers=num_workers, progress=progress)

    features = _MEMORY.get(key) if key is not None else None
    if features is not None:
        _MEMORY.move_to_end(key)
        report.source = "memory"
    elif report.mode == "disk":
        features = _disk_entry(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), key, mode,
                               report, build, model, dataset, dtype)
    else:
        features = build()

    if key is not None:
        _MEMORY[key] = features
        while len(_MEMORY) > 1 and (len(_MEMORY) > _MEMORY_ENTRIES
                                    or sum(f.nbytes for f in _MEMORY.values()) > _MEMORY_BYTES):
            _MEMORY.popitem(last=False)
    selected = features.select(model.cached_names())
    report.num_samples, report.bytes, report.read_bytes = len(features), features.nbytes, selected.nbytes
    report.build_s = time.perf_counter() - started
    return selected, report


def _disk_entry(directory: Path, key: str, mode: str, report: CacheReport, build, model: nn.Module,
                dataset: Dataset, dtype: torch.dtype) -> FrozenFeatures:
    """Read the entry from ``directory``, or build and write it (once, under a lock shared by every process). A
    folder that cannot be used (read-only, full mid-write) leaves no partial file and falls back to memory; with
    ``mode == "disk"`` it is an error instead."""
    path = directory / f"{key}.safetensors"
    report.path = str(path)
    features = built = None
    try:
        with file_lock(directory / f"{key}.lock"):
            if path.is_file():
                features = load_features(path, len(dataset), dtype)
                report.source = "disk" if features is not None else ""
            if features is None:
                built = build()
                if not _disk_has_room(directory, built.nbytes):
                    report.mode, report.path, report.notice = "memory", None, True
                    report.reason = f"not enough free disk space in {directory} for {built.nbytes / 2**20:.0f} MiB"
                    return built
                save_features(path, built, _metadata(model, dataset, built))  # atomic: a failed write leaves no file
                features = load_features(path, len(dataset), dtype)  # readers share the mapped pages
    except OSError as err:
        needed = f"; the entry needs {built.nbytes / 2**20:.0f} MiB" if built is not None else ""
        if mode == "disk":
            raise PrefixCacheError(f"training.prefix_cache: disk: cannot use {path}: {err.strerror or err}"
                                   f"{needed}") from err
        report.mode, report.path, report.notice = "memory", None, True
        report.reason = f"cannot write {path} ({err.strerror or err}{needed})"
    if features is not None:
        return features
    return built if built is not None else build()


def place_features(features: FrozenFeatures, device: torch.device) -> FrozenFeatures:
    """On a GPU, keep the features there when they take under a quarter of the memory this process may still use
    (no copy per batch; the engine reports their bytes apart from training memory). Else they stay where they are,
    memory-mapped or in RAM, never copied whole, and each batch is gathered into page-locked memory."""
    if device.type != "cuda":
        return features
    if features.nbytes < gpu_memory_left(device) // 4:
        return features.to(device)
    return FrozenFeatures(features.tensors, features.labels, pinned=True)


def gpu_memory_left(device: torch.device) -> int:
    """Free GPU memory, within the process's cap when one is set (a sweep trial's share of a GPU:
    ``torch.cuda.set_per_process_memory_fraction``)."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    if fraction < 1.0:
        free = min(free, int(fraction * total) - torch.cuda.memory_reserved(device))
    return max(free, 0)


def clear_memory_cache() -> None:
    """Forget the prefix features kept in this process."""
    _MEMORY.clear()


def _disk_has_room(directory: Path, nbytes: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(directory).free > 2 * nbytes + (1 << 30)


def _metadata(model: nn.Module, dataset: Dataset, features: FrozenFeatures) -> dict[str, str]:
    backbone = model.family.backbone
    return {
        "format": str(FORMAT_VERSION),
        "layout": str(model.cache_layout),
        "backbone": str((getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)),
        "dataset": repr(dataset),
        "num_samples": str(len(features)),
        "dtype": str(features.dtype),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_device(inputs, device: torch.device):
    """Move a batch's inputs (an image tensor, a :class:`PrefixState` or cached features) to ``device``."""
    if isinstance(inputs, PrefixState):
        return PrefixState(tuple(t.to(device, non_blocking=True) for t in inputs.side_inputs),
                           inputs.block_output.to(device, non_blocking=True))
    return inputs.to(device, non_blocking=True)


__all__ = [
    "CACHE_MODES", "CacheReport", "CachedInputs", "FeatureBatches", "FrozenFeatures", "PrefixCacheError",
    "backbone_fingerprint", "cache_key", "cache_refusal", "clear_memory_cache", "compute_frozen_features",
    "dataset_augmentation", "dataset_fingerprint", "default_cache_dir", "place_features", "prepare_prefix_cache",
    "storage_dtype", "to_device",
]
