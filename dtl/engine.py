"""The training engine: train one model on one dataset and evaluate it, reporting through one epoch-end hook.

The engine knows nothing of DVC, Ray Tune or MLflow: each of them hooks in with an ``EpochHook`` that receives
an :class:`EpochEnd` (the epoch's metrics and the run's resumable state) after every epoch. The recipe defaults
are the official VTAB-1K scripts' (docs/design.md): AdamW, weight decay 0.05 except on 1-D parameters, batch 32
with drop_last, timm's cosine schedule with 10 warm-up epochs stepped per epoch, 100 cosine + 10 cool-down
epochs, seed 42.
"""
from __future__ import annotations

import functools
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .cache import PrefixCacheError, place_features, prepare_prefix_cache, to_device
from .config import TrainConfig
from .devices import (
    GpuMemory,
    SetupError,
    autocast,
    device_rng_state,
    fp32_matmul,
    image_loader,
    resolve_device,
    resolve_precision,
    restore_device_rng,
)
from .io import atomic_path, trainable_state_dict
from .objectives import Classification, Objective, sum_dtype


@dataclass
class TrainingState:
    """What continuing a run after ``epochs_done`` epochs needs to go on exactly as if it had not stopped: the
    trainable weights (kilobytes for DTL; never the frozen backbone), the optimizer and loss-scaler state, the
    generators that draw the batch order and the dropout / drop-path masks, and what was measured so far.
    ``save``/``load`` use ``torch.save`` with plain tensors and containers only (``weights_only`` loading)."""

    epochs_done: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict
    data_order: torch.Tensor  # torch.Generator state of the shuffling
    rng: torch.Tensor  # torch's default CPU generator (dropout, drop-path)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # the training GPU's generator (dtl.devices)
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    images_seen: int = 0
    saved_bytes_per_batch: int = 0
    cpu_time_s: float = 0.0
    # keep_best: the trainable weights of the best evaluation so far, its epoch and its primary score (accuracy;
    # mIoU for segmentation)
    best_trainable: dict[str, torch.Tensor] = field(default_factory=dict)
    best_epoch: int = -1
    best_score: float = -1.0
    # the GPU memory peaks so far (dtl.devices.GpuMemory), so a resumed run reports the whole run's
    gpu_peak_allocated_bytes: int = 0
    gpu_peak_reserved_bytes: int = 0
    gpu_eval_peak_allocated_bytes: int = 0

    def save(self, path) -> None:
        # The fields themselves, not dataclasses.asdict: that deep-copies every tensor first, which for the
        # optimizer state of a model on a GPU is a second copy of it in GPU memory (0.7 GB for ViT-B's AdamW).
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path) -> "TrainingState":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "best_accuracy" in state:  # checkpoints written before segmentation named the score so
            state["best_score"] = state.pop("best_accuracy")
        return cls(**state)


@dataclass
class TrainResult:
    metrics: dict  # final metrics: "<split>/accuracy", "<split>/loss", "train/loss", ...
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    trainable_params: int = 0
    images_per_s: float = 0.0  # training throughput (forward + backward + step), evaluation excluded
    train_time_s: float = 0.0
    # The CUDA allocator's peaks while training (weights, gradients, optimizer state, activations, the batch) and
    # while evaluating, the prefix cache kept on the GPU left out (gpu_cache_bytes); None off a GPU.
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None
    gpu_eval_peak_allocated_bytes: int | None = None
    gpu_cache_bytes: int | None = None  # the prefix cache's features kept on the GPU (0: in host memory)
    peak_rss_bytes: int = 0  # the process's peak resident memory (host RAM, whatever the device)
    device: str = "cpu"
    precision: str = "fp32"
    cache_report: dict = field(default_factory=dict)  # dtl.cache.CacheReport of the training split, as a dict
    # Bytes autograd kept for backward in the first training step: the activation memory a method needs per
    # batch (DTL's saving, and how it shrinks as M moves later), measurable on any device.
    saved_bytes_per_batch: int = 0
    cpu_time_s: float = 0.0  # CPU seconds of this process while training and evaluating (all its threads)
    # Per evaluated split, each image's score at the last epoch (in dataset order): whether it was classified
    # correctly (bool), or for segmentation the image's mean IoU. What a paired comparison of two models on the
    # same images needs.
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict:
        """Flat, JSON-ready: final metrics plus the run's cost figures."""
        return {
            **self.metrics,
            "trainable_params": self.trainable_params,
            "images_per_s": self.images_per_s,
            "train_time_s": self.train_time_s,
            "cpu_time_s": self.cpu_time_s,
            "saved_bytes_per_batch": self.saved_bytes_per_batch,
            "gpu_peak_allocated_bytes": self.gpu_peak_allocated_bytes,
            "gpu_peak_reserved_bytes": self.gpu_peak_reserved_bytes,
            "gpu_eval_peak_allocated_bytes": self.gpu_eval_peak_allocated_bytes,
            "gpu_cache_bytes": self.gpu_cache_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels; none on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> CosineLRScheduler:
    return CosineLRScheduler(
        optimizer,
        t_initial=config.epochs - config.cooldown_epochs,
        lr_min=config.min_lr,
        warmup_lr_init=config.warmup_lr,
        warmup_t=config.warmup_epochs,
        t_in_epochs=True,
    )


class SavedTensorBytes:
    """Counts the bytes of the buffers autograd keeps for backward inside the ``with`` block: each storage once,
    storages of ``model``'s parameters and buffers left out (frozen weights saved by reference cost nothing)."""

    def __init__(self, model: nn.Module):
        self._excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded:
            self._storages[pointer] = max(self._storages.get(pointer, 0), storage.nbytes())
        # Kept as-is, a saved output would hold its own grad_fn: a cycle through autograd's C++ graph that
        # Python's GC cannot see, so a forward that is never backpropagated (the benchmarks' counts) would leak
        # its whole graph. The detached view shares the storage and backward computes the same gradients.
        return tensor.detach()

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str,
             per_image: bool = False, classes: Sequence[int] | None = None,
             objective: Objective | None = None) -> dict:
    """Score ``model`` over ``loader`` as ``objective`` scores (default: classification, i.e. top-1 accuracy and
    mean cross-entropy; ``dtl.objectives``). With ``per_image`` also ``per_image``, each item's score in loader
    order (classification: whether it was classified correctly); with ``classes`` also ``accuracy_masked``, the
    accuracy of the argmax over those classes only (a test set that holds a subset of the classes the model
    tells apart, such as ImageNet-A and -R)."""
    objective = objective or Classification()
    model.eval()
    # The sums stay on the device until the end: reading them per batch would make the host wait for the GPU.
    tally = objective.tally(device, per_image, classes)
    with fp32_matmul(device):
        for inputs, labels in loader:
            inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = objective.predict(model, inputs)
            tally.add(logits, labels)
    return tally.result()


class EpochProgress:
    """Each epoch as it ends: epoch/total, loss, train accuracy, lr, images/s and the time left. A tqdm bar on a
    terminal; plain lines, one per epoch, in a log (a DVC stage, CI), in the style of timm's train script."""

    SHOWN = ("train/loss", "train/accuracy", "val/accuracy", "test/accuracy")

    def __init__(self, epochs: int, first_epoch: int, images_per_epoch: int, enabled: bool):
        self.epochs, self.images_per_epoch, self.enabled = epochs, images_per_epoch, enabled
        self.started, self.done = time.perf_counter(), 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=epochs, initial=first_epoch, desc="train", unit="epoch", file=sys.stderr,
                            dynamic_ncols=True)

    def epoch_done(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.done += 1
        elapsed = time.perf_counter() - self.started
        per_epoch = elapsed / self.done
        shown = {k.replace("/", "_"): metrics[k] for k in self.SHOWN if k in metrics}
        if self.bar is not None:
            self.bar.set_postfix({**{k: f"{v:.3g}" for k, v in shown.items()}, "lr": f"{metrics['lr']:.2g}"})
            self.bar.update(1)
            return
        left = per_epoch * (self.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{self.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
              + f" lr {metrics['lr']:.3g} | {self.images_per_epoch / per_epoch:.0f} img/s, {left:.0f} s left",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class EpochEnd:
    """What the epoch-end hook receives after every epoch: its index, its metrics (``train/loss``,
    ``train/accuracy``, ``lr`` and, on evaluation epochs, ``<split>/accuracy`` and ``<split>/loss``), whether it
    was the last, and :meth:`state`, the run's resumable state after it."""

    epoch: int
    metrics: dict
    last: bool
    _snapshot: Callable[[], TrainingState] = field(repr=False)  # cached: every hook of the epoch shares one

    def state(self) -> TrainingState:
        """The :class:`TrainingState` after this epoch (built on the first call: a hook that does not checkpoint
        this epoch pays nothing). ``train_and_evaluate(..., resume_from=state)`` continues from it."""
        return self._snapshot()


EpochHook = Callable[[EpochEnd], None]


def train_and_evaluate(
    model: nn.Module,
    train_data: Dataset,
    eval_data: Mapping[str, Dataset],
    config: TrainConfig,
    hooks: Sequence[EpochHook] = (),
    *,
    resume_from: TrainingState | None = None,
    keep_best: str | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data``, evaluate on each of ``eval_data`` (e.g. {"val": ..., "test": ...}).

    ``objective`` (``dtl.objectives``; default: classification with ``config.label_smoothing``) gives the loss and
    the scores. ``keep_best`` names one split of ``eval_data``: the weights of the evaluation epoch that scored it
    best in the objective's primary score (the earliest on a tie) are put back into ``model`` at the end, and the
    final metrics are those of that epoch's weights, with ``best_epoch`` (the few-shot recipe: validate every few
    epochs, test the best weights).

    After every epoch each hook gets an :class:`EpochEnd`: the epoch's metrics and its resumable state (a hook
    that checkpoints saves ``end.state()``). ``resume_from`` continues such a state: the epochs after
    ``epochs_done`` then train exactly as an uninterrupted run would have trained them. A non-finite loss raises
    ``FloatingPointError`` so a sweep can record the trial as failed.
    """
    seed_everything(config.seed)
    cpu_started = time.process_time()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise SetupError("the model has no trainable parameters")
    if len(train_data) < config.batch_size:
        raise SetupError(f"training split has {len(train_data)} samples, fewer than batch_size={config.batch_size} "
                         "(training.batch_size: batches drop the remainder, as in the official recipe)")
    if keep_best is not None and keep_best not in eval_data:
        raise ValueError(f"keep_best={keep_best!r} is not one of the evaluated splits ({', '.join(eval_data)})")
    with fp32_matmul(device):  # the prefix cache is built with the matmul precision that training uses
        loaders = _Loaders.build(model, train_data, eval_data, config, device, precision)
        objective = objective or Classification(config.label_smoothing)
        loop = _TrainingLoop(model, config, device, precision, loaders, keep_best, cpu_started, objective)
        if resume_from is not None:
            loop.restore(resume_from)
        progress = EpochProgress(config.epochs, loop.first_epoch, len(loaders.train) * config.batch_size,
                                 config.progress)
        for epoch in range(loop.first_epoch, config.epochs):
            metrics = loop.run_epoch(epoch)
            progress.epoch_done(epoch, metrics)
            snapshot = functools.cache(loop.snapshot)
            for hook in hooks:  # each its own copy of the metrics
                hook(EpochEnd(epoch, dict(metrics), epoch == config.epochs - 1, snapshot))
        progress.close()
        return loop.result()


@dataclass
class _Loaders:
    """The batches a run reads: the training split (from the prefix cache where it applies, in the order the
    image loader would draw them) and each evaluated split, with the generator that shuffles training and the
    bytes of cached features kept on the GPU."""

    train: Any
    evaluated: dict[str, Any]
    generator: torch.Generator
    cache_report: Any
    gpu_cache_bytes: int = 0

    @classmethod
    def build(cls, model: nn.Module, train_data: Dataset, eval_data: Mapping[str, Dataset], config: TrainConfig,
              device: torch.device, precision: str) -> "_Loaders":
        cache_options = dict(mode=config.prefix_cache, cache_dir=config.prefix_cache_dir, device=device,
                             precision=precision, batch_size=config.eval_batch_size, num_workers=config.num_workers,
                             progress=config.progress)
        train_features, cache_report = prepare_prefix_cache(model, train_data, **cache_options)
        if cache_report.notice and config.progress:
            print(f"prefix cache {cache_report.mode}: {cache_report.reason}", file=sys.stderr)
        eval_features = {}
        evaluations = sum(1 for e in range(config.epochs) if e == config.epochs - 1
                          or (config.eval_every and (e + 1) % config.eval_every == 0))
        if train_features is not None and evaluations > 1:
            # Small splits evaluated more than once (eval_every, e.g. val200 in a sweep) are cached too: evaluation
            # runs in eval mode, so it is deterministic. Big test splits stay uncached (size).
            for split, data in eval_data.items():
                if len(data) <= 4 * len(train_data):
                    try:
                        eval_features[split] = prepare_prefix_cache(model, data, **cache_options)[0]
                    except PrefixCacheError:
                        pass
        seed_everything(config.seed)  # building the cache must not shift the random streams of training
        generator = torch.Generator().manual_seed(config.seed)
        placed = {split: place_features(features, device) for split, features in
                  {"train": train_features, **eval_features}.items() if features is not None}
        if train_features is not None:
            # The same generator draws the same batches as the image loader below would.
            train = placed["train"].loader(config.batch_size, shuffle=True, drop_last=True, generator=generator)
        else:
            train = image_loader(train_data, config.batch_size, device, config.num_workers, order=generator,
                                 drop_last=True, seed=config.seed)
        evaluated = {
            split: placed[split].loader(config.eval_batch_size, shuffle=False, drop_last=False) if split in placed
            else image_loader(data, config.eval_batch_size, device, config.num_workers, persistent=evaluations > 1)
            for split, data in eval_data.items()
        }
        gpu_bytes = sum(f.nbytes for f in placed.values() if f.device.type == "cuda")
        return cls(train, evaluated, generator, cache_report, gpu_bytes)


class _TrainingLoop:
    """One run's optimiser, schedule and running figures: what an epoch changes and a :class:`TrainingState`
    holds (so :meth:`snapshot` and :meth:`restore` are each other's inverse)."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, precision: str,
                 loaders: _Loaders, keep_best: str | None, cpu_started: float, objective: Objective):
        self.model, self.config, self.device, self.precision = model, config, device, precision
        self.loaders, self.keep_best, self.cpu_started = loaders, keep_best, cpu_started
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.objective = objective
        self.memory = GpuMemory(device, loaders.gpu_cache_bytes)
        self.history: list[dict] = []
        self.per_image: dict[str, torch.Tensor] = {}
        self.best_trainable: dict[str, torch.Tensor] = {}
        self.best_epoch, self.best_score = -1, -1.0
        self.train_time, self.images_seen, self.saved_bytes, self.cpu_before = 0.0, 0, 0, 0.0
        self.first_epoch = 0

    def restore(self, state: TrainingState) -> None:
        if not 0 < state.epochs_done < self.config.epochs:
            raise ValueError(f"cannot resume after epoch {state.epochs_done} of a {self.config.epochs}-epoch run")
        self.model.load_state_dict(state.trainable, strict=False)
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        self.loaders.generator.set_state(state.data_order)
        torch.set_rng_state(state.rng)
        restore_device_rng(state.cuda_rng, self.device)
        self.history = list(state.history)
        self.first_epoch = state.epochs_done
        self.train_time, self.images_seen = state.train_time_s, state.images_seen
        self.saved_bytes, self.cpu_before = state.saved_bytes_per_batch, state.cpu_time_s
        self.best_trainable, self.best_epoch = state.best_trainable, state.best_epoch
        self.best_score = state.best_score
        memory = self.memory
        memory.train_allocated, memory.train_reserved = state.gpu_peak_allocated_bytes, state.gpu_peak_reserved_bytes
        memory.eval_allocated = state.gpu_eval_peak_allocated_bytes

    def snapshot(self) -> TrainingState:
        return TrainingState(
            epochs_done=len(self.history), trainable=trainable_state_dict(self.model),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            data_order=self.loaders.generator.get_state(), rng=torch.get_rng_state(),
            cuda_rng=device_rng_state(self.device),
            history=[dict(h) for h in self.history], train_time_s=self.train_time, images_seen=self.images_seen,
            saved_bytes_per_batch=self.saved_bytes, cpu_time_s=self.cpu_time(),
            best_trainable=self.best_trainable, best_epoch=self.best_epoch, best_score=self.best_score,
            gpu_peak_allocated_bytes=self.memory.train_allocated, gpu_peak_reserved_bytes=self.memory.train_reserved,
            gpu_eval_peak_allocated_bytes=self.memory.eval_allocated)

    def cpu_time(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_started

    def run_epoch(self, epoch: int) -> dict:
        """Train one epoch, evaluate if it is an evaluation epoch, keep the best weights; its metrics."""
        config = self.config
        with self.memory.measure("train"):
            metrics = {"epoch": epoch, **self.train_epoch(epoch)}
        last = epoch == config.epochs - 1
        if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            metrics.update(self.score(per_image=last))
            score = metrics.get(f"{self.keep_best}/{self.objective.primary}")
            if self.keep_best is not None and score > self.best_score:
                self.best_score, self.best_epoch = score, epoch
                # in host memory: a copy on the GPU would count as training memory
                self.best_trainable = {k: v.clone() for k, v in trainable_state_dict(self.model).items()}
        self.history.append(metrics)
        return metrics

    def score(self, per_image: bool) -> dict:
        """Every evaluated split's scores as ``<split>/<score>`` (with ``per_image``: each image's score kept)."""
        metrics = {}
        with self.memory.measure("eval"):
            for split, loader in self.loaders.evaluated.items():
                scores = evaluate(self.model, loader, self.device, self.precision, per_image=per_image,
                                  objective=self.objective)
                if per_image:
                    self.per_image[split] = scores.pop("per_image")
                scores.pop("class_iou", None)  # a list per class: what evaluating the saved weights reports
                metrics.update({f"{split}/{key}": value for key, value in scores.items()})
        return metrics

    def train_epoch(self, epoch: int) -> dict:
        model, device, optimizer = self.model, self.device, self.optimizer
        self.scheduler.step(epoch)
        model.train()
        # The epoch's sums stay on the device: reading them every step would make the host wait for the GPU at
        # every step (a non-finite loss is caught at the epoch's end, where the sum is read once).
        loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
        hits = torch.zeros(2, dtype=torch.int64, device=device)  # correctly labelled items (images, pixels), all
        seen = 0
        start = time.perf_counter()
        for step, (inputs, labels) in enumerate(self.loaders.train):
            inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
            first_step = epoch == 0 and step == 0
            counter = SavedTensorBytes(model) if first_step else nullcontext()
            with autocast(device, self.precision), counter:
                logits = model(inputs)  # images, or a batch of the prefix cache (CachedInputs)
                loss = self.objective.loss(logits, labels)
            if first_step:
                self.saved_bytes = counter.nbytes
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip is not None:
                self.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            loss_sum += loss.detach().to(loss_sum.dtype) * labels.shape[0]
            correct, labelled = self.objective.hits(logits, labels)
            hits[0] += correct
            hits[1] += labelled
            seen += labels.shape[0]
        mean_loss = loss_sum.item() / seen  # waits for the epoch's last step
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss became {mean_loss} at epoch {epoch} (lr "
                                     f"{optimizer.param_groups[0]['lr']:.3g}); try a lower training.lr")
        self.train_time += time.perf_counter() - start
        self.images_seen += seen
        correct, labelled = hits.tolist()
        return {"lr": optimizer.param_groups[0]["lr"], "train/loss": mean_loss,
                "train/accuracy": correct / labelled if labelled else math.nan}

    def result(self) -> TrainResult:
        """The finished run (``keep_best``: the best epoch's weights back in the model, re-scored per image)."""
        final = {k: v for k, v in self.history[-1].items() if k not in ("epoch", "lr")}
        if self.keep_best is not None:
            final["best_epoch"] = self.best_epoch
            if self.best_epoch != self.config.epochs - 1:  # score the best epoch's weights again, per image
                self.model.load_state_dict(self.best_trainable, strict=False)
                final.update(self.score(per_image=True))
        rss_scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        memory = self.memory
        return TrainResult(
            metrics=final,
            history=self.history,
            trainable_params=sum(p.numel() for p in self.trainable),
            images_per_s=self.images_seen / self.train_time if self.train_time > 0 else math.nan,
            train_time_s=self.train_time,
            gpu_peak_allocated_bytes=memory.train_allocated if memory.active else None,
            gpu_peak_reserved_bytes=memory.train_reserved if memory.active else None,
            gpu_eval_peak_allocated_bytes=memory.eval_allocated if memory.active else None,
            gpu_cache_bytes=memory.resident_bytes if memory.active else None,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_scale,
            device=str(self.device),
            precision=self.precision,
            cache_report=self.loaders.cache_report.to_dict(),
            saved_bytes_per_batch=self.saved_bytes,
            cpu_time_s=self.cpu_time(),
            per_image=self.per_image,
        )
