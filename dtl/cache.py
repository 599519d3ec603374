"""The prefix feature cache: run DTL's frozen prefix once per dataset, then train from its outputs.

DTL's blocks 0..M see no trainable parameter, so with deterministic inputs (the VTAB protocol has no
augmentation) and no drop-path/dropout in those blocks, the prefix outputs ``x_0..x_M`` and ``Block_M(x_M)``
(a :class:`~dtl.models.PrefixState`) are the same in every epoch and in every sweep trial that shares the
backbone weights, M, the side-map blocks and the data split. This module computes them once, keeps them in
memory or on disk (one ``.safetensors`` file per key, written atomically, a file lock against duplicate work),
and serves shuffled batches of them to the engine, which then runs only blocks M+1..N-1, the CSN and the head.

The cache is exact up to its storage dtype: fp32 when training in fp32, bf16/fp16 when training under that
autocast or with the backbone stored in it (``backbone_dtype``). It is refused, with the reason, when it
would change the model: a method other than DTL/DTL+, a stochastic prefix, or an augmenting dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .models import DTLModel, PrefixState

CACHE_MODES = ("auto", "memory", "disk", "off")
FORMAT_VERSION = 1
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Transform class names that draw random numbers (torchvision v1/v2, timm).
_RANDOM_TRANSFORMS = ("ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
                      "GaussianNoise", "Mixup", "CutMix")
# Prefix features kept in this process, most recently used last (a sweep or a seed loop in one process).
_MEMORY: OrderedDict[str, "PrefixFeatures"] = OrderedDict()
_MEMORY_ENTRIES = 4
_MEMORY_BYTES = 8 << 30


class PrefixCacheError(ValueError):
    """The prefix cache was asked for but cannot be exact for this model or dataset; the message says why."""


# --- the features -------------------------------------------------------------------------------------------
@dataclass
class PrefixFeatures:
    """The prefix outputs of a whole dataset: ``side_inputs[i]`` and ``block_output`` are (N, ...) tensors."""

    side_inputs: tuple[torch.Tensor, ...]
    block_output: torch.Tensor
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = (*self.side_inputs, self.block_output, self.labels)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def dtype(self) -> torch.dtype:
        return self.block_output.dtype

    def to(self, device: torch.device) -> "PrefixFeatures":
        return PrefixFeatures(tuple(t.to(device) for t in self.side_inputs), self.block_output.to(device),
                              self.labels.to(device))

    def batch(self, indices: torch.Tensor) -> tuple[PrefixState, torch.Tensor]:
        indices = indices.to(self.labels.device)
        return (PrefixState(tuple(t[indices] for t in self.side_inputs), self.block_output[indices]),
                self.labels[indices])

    def loader(self, batch_size: int, *, shuffle: bool, drop_last: bool,
               generator: torch.Generator | None = None) -> "PrefixBatches":
        return PrefixBatches(self, batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {f"side_input.{i}": t for i, t in enumerate(self.side_inputs)}
        return {**named, "block_output": self.block_output, "labels": self.labels}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PrefixFeatures":
        count = sum(1 for name in tensors if name.startswith("side_input."))
        return cls(tuple(tensors[f"side_input.{i}"] for i in range(count)), tensors["block_output"], tensors["labels"])


class PrefixBatches:
    """Batches of cached prefix states, drawn exactly as ``DataLoader(dataset, batch_size, shuffle, drop_last,
    generator=...)`` draws image batches: the same generator gives the same batches, cached or not."""

    def __init__(self, features: PrefixFeatures, batch_size: int, *, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None):
        self.features = features
        # A DataLoader over the indices consumes the generator exactly like the image DataLoader would.
        self._indices = DataLoader(range(len(features)), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                   generator=generator)

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[tuple[PrefixState, torch.Tensor]]:
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
    if not isinstance(model, DTLModel):
        method = getattr(model, "method", type(model).__name__)
        return (f"the prefix cache needs a DTL model (method dtl or dtl_plus), not {method!r}: other methods train "
                "parameters inside every block, so no prefix is frozen")
    randomness = model.prefix_randomness()
    if randomness:
        return (f"the frozen prefix (embedding and blocks 0..{model.start_block}) is stochastic: "
                f"{', '.join(randomness[:4])}{' ...' if len(randomness) > 4 else ''}; its outputs change every "
                "epoch. Set model.drop_path: 0 (timm's rule puts drop-path > 0 on blocks 1.. whenever the rate "
                "is > 0), or set training.prefix_cache: off")
    if dataset is not None:
        augmentation = dataset_augmentation(dataset)
        if augmentation:
            return (f"the training data is augmented ({augmentation}), so the prefix inputs change every epoch; "
                    "the VTAB protocol uses no augmentation. Turn augmentation off or set training.prefix_cache: off")
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


def model_fingerprint(model: DTLModel) -> str:
    """The frozen backbone's weights (hashed) plus the structure of the prefix: what its outputs depend on."""
    digest = hashlib.blake2b(digest_size=16)
    backbone = model.adapter.backbone
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)
    digest.update(f"{name}|{type(model.adapter).__name__}|M={model.start_block}|"
                  f"maps={model.prefix_map_blocks}".encode())
    for key, tensor in sorted(model.adapter.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{key}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def storage_dtype(model: DTLModel, precision: str) -> torch.dtype:
    """The dtype the prefix computes in, so storing in it loses nothing but the autocast's fp32 residual."""
    if model.backbone_dtype != torch.float32:
        return model.backbone_dtype
    return _AUTOCAST_DTYPES.get(precision, torch.float32)


def cache_key(model: DTLModel, dataset: Dataset, precision: str) -> str | None:
    data = dataset_fingerprint(dataset)
    if data is None:
        return None
    identity = dict(format=FORMAT_VERSION, data=data, model=model_fingerprint(model), precision=precision,
                    backbone_dtype=str(model.backbone_dtype), storage=str(storage_dtype(model, precision)))
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    """``$DTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dtl/prefix``, else ``~/.cache/dtl/prefix``."""
    if os.environ.get("DTL_CACHE_DIR"):
        return Path(os.environ["DTL_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dtl" / "prefix"


# --- computing, storing, loading --------------------------------------------------------------------------------
@torch.no_grad()
def compute_prefix_features(
    model: DTLModel,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> PrefixFeatures:
    """Run ``model.forward_prefix`` over ``dataset`` (in order) and keep the outputs on the CPU in ``dtype``."""
    device = torch.device(device)
    dtype = dtype or storage_dtype(model, precision)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    side: list[torch.Tensor] = []
    block_output = labels = None
    start = 0
    autocast_dtype = _AUTOCAST_DTYPES.get(precision)
    try:
        for images, batch_labels in tqdm(loader, desc="prefix cache", unit="batch", disable=not progress,
                                         file=sys.stderr, dynamic_ncols=True):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                state = model.forward_prefix(images.to(device, non_blocking=True))
            stop = start + images.shape[0]
            if block_output is None:
                count = len(dataset)
                side = [torch.empty((count, *t.shape[1:]), dtype=dtype) for t in state.side_inputs]
                block_output = torch.empty((count, *state.block_output.shape[1:]), dtype=dtype)
                labels = torch.empty(count, dtype=torch.int64)
            for target, value in zip(side, state.side_inputs):
                target[start:stop] = value.to("cpu", dtype)
            block_output[start:stop] = state.block_output.to("cpu", dtype)
            labels[start:stop] = torch.as_tensor(batch_labels, dtype=torch.int64)
            start = stop
    finally:
        model.train(was_training)
    if block_output is None:
        raise ValueError("cannot build a prefix cache of an empty dataset")
    return PrefixFeatures(tuple(side), block_output, labels)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (sweep trials) while one of them builds a cache entry."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename still keeps the file whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_features(path: Path, expected_count: int, expected_side: int, dtype: torch.dtype) -> PrefixFeatures | None:
    """The features stored at ``path`` if they are whole and fit (else None, with a warning)."""
    from safetensors.torch import load_file

    try:
        features = PrefixFeatures.from_tensors(load_file(str(path)))
    except Exception as err:  # a truncated or foreign file: rebuild it
        warnings.warn(f"prefix cache file {path} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        return None
    if len(features) != expected_count or len(features.side_inputs) != expected_side or features.dtype != dtype:
        warnings.warn(f"prefix cache file {path} does not fit this run (samples {len(features)} vs {expected_count}, "
                      f"side inputs {len(features.side_inputs)} vs {expected_side}, dtype {features.dtype} vs "
                      f"{dtype}); rebuilding it")
        return None
    return features


def save_features(path: Path, features: PrefixFeatures, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from .io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in features.tensors().items()}, str(tmp), metadata=metadata)


@dataclass
class CacheReport:
    """What the cache did in a run: ``mode`` off/memory/disk, where the features came from, their size."""

    mode: str = "off"
    source: str = ""  # built | disk | memory
    reason: str = ""  # why the cache is off (auto) or why disk fell back to memory
    notice: bool = False  # worth telling the user: a DTL run that could not use the cache or the disk
    key: str | None = None
    path: str | None = None
    num_samples: int = 0
    bytes: int = 0
    dtype: str = ""
    build_s: float = 0.0  # seconds spent computing (or loading) the features

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
) -> tuple[PrefixFeatures | None, CacheReport]:
    """Get the prefix features of ``dataset`` for ``model`` according to ``mode``.

    ``off``: none. ``memory``: computed once per process (reused by later runs in it with the same key).
    ``disk``: read from / written to ``cache_dir`` (default :func:`default_cache_dir`), shared by processes.
    ``auto``: disk when the dataset identifies itself and the disk has room, else memory; and no cache (with the
    reason in the report) when it would not be exact. ``memory``/``disk`` raise :class:`PrefixCacheError` then.
    """
    if mode not in CACHE_MODES:
        raise PrefixCacheError(f"prefix cache mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "off":
        return None, CacheReport(reason="training.prefix_cache is off")
    refusal = cache_refusal(model, dataset)
    if refusal:
        if mode == "auto":
            return None, CacheReport(reason=refusal, notice=isinstance(model, DTLModel))
        raise PrefixCacheError(f"training.prefix_cache: {mode} is not possible: {refusal}")

    device = torch.device(device)
    dtype = storage_dtype(model, precision)
    started = time.perf_counter()
    key = cache_key(model, dataset, precision)
    report = CacheReport(mode="memory" if mode == "memory" else "disk", key=key, dtype=str(dtype).replace("torch.", ""))
    if key is None:
        if mode == "disk":
            raise PrefixCacheError(
                f"training.prefix_cache: disk needs a dataset that identifies itself (a VTabDataset, or a "
                f"cache_fingerprint() method); {type(dataset).__name__} does not. Use memory instead")
        report.mode, report.reason = "memory", "the dataset has no fingerprint, so the cache lives in memory only"

    def build() -> PrefixFeatures:
        report.source = "built"
        return compute_prefix_features(model, dataset, device=device, precision=precision, dtype=dtype,
                                       batch_size=batch_size, num_workers=num_workers, progress=progress)

    features = _MEMORY.get(key) if key is not None else None
    if features is not None:
        _MEMORY.move_to_end(key)
        report.source = "memory"
    elif report.mode == "disk":
        directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        path = directory / f"{key}.safetensors"
        report.path = str(path)
        try:
            with _file_lock(directory / f"{key}.lock"):
                if path.is_file():
                    features = load_features(path, len(dataset), len(model.prefix_map_blocks), dtype)
                    report.source = "disk" if features is not None else ""
                if features is None:
                    features = build()
                    if _disk_has_room(directory, features.nbytes):
                        save_features(path, features, _metadata(model, dataset, features))
                    else:
                        report.mode, report.path, report.notice = "memory", None, True
                        report.reason = f"not enough free disk space in {directory} for {features.nbytes / 2**20:.0f} MiB"
        except OSError as err:
            if mode == "disk":
                raise PrefixCacheError(f"training.prefix_cache: disk: cannot use {directory}: {err}") from err
            report.mode, report.path, report.notice = "memory", None, True
            report.reason = f"cache folder {directory} unusable ({err})"
            features = features if features is not None else build()
    else:
        features = build()

    if key is not None:
        _MEMORY[key] = features
        while len(_MEMORY) > 1 and (len(_MEMORY) > _MEMORY_ENTRIES
                                    or sum(f.nbytes for f in _MEMORY.values()) > _MEMORY_BYTES):
            _MEMORY.popitem(last=False)
    report.num_samples, report.bytes = len(features), features.nbytes
    report.build_s = time.perf_counter() - started
    return features, report


def place_features(features: PrefixFeatures, device: torch.device) -> PrefixFeatures:
    """On a GPU, keep the features there when they take under a quarter of the free memory (no per-batch copy)."""
    if device.type != "cuda":
        return features
    free, _ = torch.cuda.mem_get_info(device)
    if features.nbytes < free // 4:
        return features.to(device)
    return PrefixFeatures(tuple(t.pin_memory() for t in features.side_inputs), features.block_output.pin_memory(),
                          features.labels)


def clear_memory_cache() -> None:
    """Forget the prefix features kept in this process."""
    _MEMORY.clear()


def _disk_has_room(directory: Path, nbytes: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(directory).free > 2 * nbytes + (1 << 30)


def _metadata(model: DTLModel, dataset: Dataset, features: PrefixFeatures) -> dict[str, str]:
    backbone = model.adapter.backbone
    return {
        "format": str(FORMAT_VERSION),
        "backbone": str((getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)),
        "start_block": str(model.start_block),
        "side_map_blocks": json.dumps(model.prefix_map_blocks),
        "dataset": repr(dataset),
        "num_samples": str(len(features)),
        "dtype": str(features.dtype),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_device(inputs, device: torch.device):
    """Move a batch's inputs (an image tensor or a :class:`PrefixState`) to ``device``."""
    if isinstance(inputs, PrefixState):
        return PrefixState(tuple(t.to(device, non_blocking=True) for t in inputs.side_inputs),
                           inputs.block_output.to(device, non_blocking=True))
    return inputs.to(device, non_blocking=True)


__all__ = [
    "CACHE_MODES", "CacheReport", "PrefixBatches", "PrefixCacheError", "PrefixFeatures", "cache_key", "cache_refusal",
    "clear_memory_cache", "compute_prefix_features", "dataset_augmentation", "dataset_fingerprint",
    "default_cache_dir", "model_fingerprint", "place_features", "prepare_prefix_cache", "storage_dtype", "to_device",
]
