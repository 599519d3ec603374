"""Pretrain an embedded backbone (``vit_micro_patch4_32``, or ``convnext_micro_32`` with ``--model``) on
generated scenes, then check that it transfers.

Nothing can be downloaded where this toolkit runs, so its default backbone is pretrained here, on CPU, on
scenes from ``dtl.data.scenes``. The source task asks for everything a scene is made of:
global heads on the pooled tokens (shape, count, colour, 3x3 position, background, size, orientation of the
largest object) and dense heads on every token of the last block's grid (shape and colour of the object under
it; ViT: each 4 px patch, the ConvNeXt: each 8 px cell of its 4 x 4 last stage); the dense heads were the
largest gain measured. The backbone is read the way DTL reads it (``dtl.models.family_for``: the same pooling
and final norm). The result is written as fp16 safetensors (backbone only, timm key names) to
``outputs/pretrain/<model>.safetensors`` (``--out``) with a JSON record of the run next to it; the
script then says how to install it as the shipped backbone (``dtl/weights/``), which it never overwrites unless
``--out`` names it.

``--eval-only`` runs the transfer check: a logistic-regression probe on frozen features of four synthetic
VTAB-like tasks, pretrained vs random init. A checkpoint that does not beat random init is not worth shipping.

Typical use (one thread, so the other core stays free; about 93 img/s = 0.73 steps/s on an idle core)::

    python tools/pretrain_embedded.py --steps 1800 --threads 1 --time-budget-min 50
    python tools/pretrain_embedded.py --eval-only
    python tools/pretrain_embedded.py --model convnext_micro_32 --steps 1800 --threads 1 --time-budget-min 40

A SIGTERM or Ctrl-C saves the training state and prints the ``--resume`` command.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

# Run as a script from anywhere: the checkout that holds ``dtl`` must be importable (dtl.io then names it REPO_ROOT).
if (checkout := str(Path(__file__).resolve().parents[1])) not in sys.path:
    sys.path.insert(0, checkout)

from dtl.data.scenes import (  # noqa: E402
    BACKGROUNDS,
    DEFAULT_RADIUS_RANGE,
    PALETTE,
    SHAPES,
    orientation_bins,
    render_scenes,
)
from dtl.io import REPO_ROOT, atomic_path, write_text  # noqa: E402
from dtl.models import family_for  # noqa: E402
from dtl.models.embedded import EMBEDDED_BACKBONE, EMBEDDED_MODELS  # noqa: E402  (registers the models)
from dtl.models.family import BackboneFamily  # noqa: E402
from dtl.models.vit import VitFamily  # noqa: E402

OUT_DIR = REPO_ROOT / "outputs" / "pretrain"

MAX_OBJECTS = 4
SIZE_BINS = 4
ORIENTATION_BINS = 8
PATCH = 4                # px per token of the last block's grid (the ViT's patch; the ConvNeXt's is 8)
#: Global heads on the pooled feature: name -> classes.
GLOBAL_HEADS: dict[str, int] = {
    "shape": len(SHAPES), "count": MAX_OBJECTS, "colour": len(PALETTE), "position": 9,
    "background": len(BACKGROUNDS), "size": SIZE_BINS, "orientation": ORIENTATION_BINS,
}
#: Dense heads on every patch token: class 0 is background, 1.. the shape / palette colour.
DENSE_HEADS: dict[str, int] = {"shape_map": len(SHAPES) + 1, "colour_map": len(PALETTE) + 1}
LABEL_SMOOTHING = 0.1
WARMUP_STEPS = 200
GRAD_CLIP = 1.0
WEIGHT_DECAY = 0.05
SUPERSAMPLE = 2          # the synthetic VTAB-like tasks are anti-aliased too: same image statistics
PROBE_TASKS = ("dsprites_loc", "dsprites_ori", "clevr_count", "digits")
PROBE_BLOCK = 3          # a middle block (0-indexed): positional information fades in the last blocks
PROBE_TRAIN, PROBE_TEST = 800, 500
RANDOM_INIT_SEEDS = (0, 1)


class PretrainModel(nn.Module):
    """The backbone plus the source-task heads; the heads are thrown away after pretraining.

    Pooling is DTL's (the family interface's ``pool``: for the ViT the mean of the patch tokens of the last block,
    then the final norm; for the ConvNeXt the mean, then its head's norm). The dense heads read every token of
    the last block through the same norm.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        # Not a submodule: it wraps the same backbone, and the state dict keeps timm's "backbone.*" keys once.
        self.__dict__["family"] = family_for(backbone)
        width = self.family.num_features
        self.heads = nn.ModuleDict({k: nn.Linear(width, c) for k, c in GLOBAL_HEADS.items()})
        self.dense_heads = nn.ModuleDict({k: nn.Linear(width, c) for k, c in DENSE_HEADS.items()})

    def no_weight_decay(self) -> set[str]:
        """The ViT's position embedding and cls token stay undecayed, as in timm (read by ``create_optimizer_v2``)."""
        return {f"backbone.{name}" for name in getattr(self.backbone, "no_weight_decay", set)()}

    @property
    def patch(self) -> int:
        """Pixels per token of the last block's grid (what the dense targets are sampled at)."""
        return 32 // self.family.grid_size(len(self.family.stages) - 1)[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        last = len(self.family.blocks) - 1
        tokens = self.family.block_states(x, last_block=last)[self.family.block_output_name(last)]
        pooled = self.family.pool(tokens)
        per_patch = token_features(self.family, tokens)
        logits = {k: head(pooled) for k, head in self.heads.items()}
        logits.update({k: head(per_patch) for k, head in self.dense_heads.items()})
        return logits


def token_features(family: BackboneFamily, tokens: torch.Tensor) -> torch.Tensor:
    """Every grid token of the last block through the final norm, as (B, L, D) in row-major grid order."""
    if isinstance(family, VitFamily):
        return family.backbone.norm(tokens[:, family.num_prefix_tokens:])
    grid = family.backbone.head.norm(tokens.permute(0, 3, 1, 2))  # ConvNeXt: the head's channels-first norm
    return grid.flatten(2).transpose(1, 2)


def mean_token(family: BackboneFamily, tokens: torch.Tensor) -> torch.Tensor:
    """The mean grid token (no norm): a middle block's probe feature."""
    if isinstance(family, VitFamily):
        return tokens[:, family.num_prefix_tokens:].mean(dim=1)
    return tokens.mean(dim=(1, 2))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised with mean = std = 0.5 (the backbone's pretrained_cfg)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def scene_targets(labels: dict[str, np.ndarray], size: int, patch: int = PATCH) -> dict[str, np.ndarray]:
    """Source-task targets of rendered scenes; -1 marks an undefined target (ignored by the loss).

    Global targets describe the largest object, the one most visible after occlusion. Dense targets take the
    label map at the centre pixel of each ``patch`` x ``patch`` cell.
    """
    radius = np.where(labels["shape"] >= 0, labels["radius"], -np.inf)
    largest = radius.argmax(axis=1)
    rows = np.arange(len(largest))
    pos = labels["position"][rows, largest]                       # (n, 2) as (x, y)
    cell = np.clip((pos / size * 3).astype(np.int64), 0, 2)
    lo, hi = DEFAULT_RADIUS_RANGE
    size_bin = np.clip(((radius[rows, largest] - lo) / (hi - lo) * SIZE_BINS).astype(np.int64), 0, SIZE_BINS - 1)
    shape = labels["shape"][rows, largest]
    centre = patch // 2
    return {
        "shape": shape,
        "count": labels["num_objects"] - 1,
        "colour": labels["colour"][rows, largest],
        "position": cell[:, 1] * 3 + cell[:, 0],
        "background": labels["background"],
        "size": size_bin,
        "orientation": orientation_bins(labels["angle"][rows, largest], shape, ORIENTATION_BINS),
        "shape_map": labels["shape_map"][:, centre::patch, centre::patch].reshape(len(rows), -1) + 1,
        "colour_map": labels["colour_map"][:, centre::patch, centre::patch].reshape(len(rows), -1) + 1,
    }


def make_batch(seed: int, stream: int, index: int, batch_size: int, size: int = 32,
               patch: int = PATCH) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch ``index`` of data stream ``stream`` (0 = train, 1 = held-out eval): a pure function of its seeds,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([seed, stream, index])
    images, labels = render_scenes(rng, batch_size, size=size, max_objects=MAX_OBJECTS, supersample=SUPERSAMPLE)
    targets = {k: torch.from_numpy(v.astype(np.int64)) for k, v in scene_targets(labels, size, patch).items()}
    return to_tensor(images), targets


def losses_and_accuracies(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the heads' label-smoothed cross-entropies, and each head's accuracy on its defined targets."""
    total = torch.zeros(())
    accuracy = {}
    for name, out in logits.items():
        out = out.reshape(-1, out.shape[-1])
        target = targets[name].reshape(-1)
        total = total + F.cross_entropy(out, target, ignore_index=-1, label_smoothing=LABEL_SMOOTHING)
        valid = target >= 0
        accuracy[name] = (out.argmax(-1)[valid] == target[valid]).float().mean().item()
    return total, accuracy


def build_training(steps: int, lr: float, seed: int, model_name: str = EMBEDDED_BACKBONE
                   ) -> tuple[PretrainModel, torch.optim.Optimizer, CosineLRScheduler]:
    """Model, AdamW (no decay on norms, biases, 1-D params, position embedding) and the step-wise schedule:
    linear warm-up, then cosine to 0 at ``steps``."""
    torch.manual_seed(seed)
    model = PretrainModel(timm.create_model(model_name, num_classes=0))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=WEIGHT_DECAY)
    warmup = min(WARMUP_STEPS, steps // 2)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(steps - warmup, 1), lr_min=0.0, warmup_t=warmup,
                                  warmup_lr_init=lr / 100, warmup_prefix=True, t_in_epochs=False)
    return model, optimizer, scheduler


def train_step(model: PretrainModel, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               targets: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """One optimisation step with gradient clipping; returns the loss and the batch accuracies."""
    model.train()
    loss, accuracy = losses_and_accuracies(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return loss.item(), accuracy


@torch.no_grad()
def evaluate_source(model: PretrainModel, seed: int, num_images: int = 4096,
                    batch_size: int = 256) -> dict[str, float]:
    """Accuracy of every head on held-out scenes (a stream the training never draws from)."""
    model.eval()
    sums: dict[str, float] = {}
    batch_size = min(batch_size, num_images)
    batches = max(num_images // batch_size, 1)
    for index in range(batches):
        images, targets = make_batch(seed, 1, index, batch_size, patch=model.patch)
        _, accuracy = losses_and_accuracies(model(images), targets)
        for name, value in accuracy.items():
            sums[name] = sums.get(name, 0.0) + value / batches
    return {name: round(value, 4) for name, value in sums.items()}


def save_backbone(backbone: nn.Module, path: Path, model_name: str = EMBEDDED_BACKBONE) -> None:
    """The backbone's state dict (timm keys, no head) as fp16 safetensors: half the size, same features."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": model_name})


def save_json(record: dict[str, Any], path: Path) -> None:
    write_text(path, json.dumps(record, indent=2) + "\n")


def load_backbone(weights: Path | None, num_classes: int = 0, seed: int = 0,
                  model_name: str = EMBEDDED_BACKBONE) -> nn.Module:
    """The embedded backbone loaded from ``weights``, or randomly initialised (seeded) when it is None.

    The shipped file goes through timm's own ``pretrained=True`` path, exactly as users load it; another file
    (a smoke test's) is loaded strictly into a fresh backbone.
    """
    torch.manual_seed(seed)
    if weights is not None and weights.resolve() == EMBEDDED_MODELS[model_name].resolve():
        return timm.create_model(model_name, pretrained=True, num_classes=num_classes)
    model = timm.create_model(model_name, num_classes=0)
    if weights is not None:
        load_checkpoint(model, str(weights), strict=True)
    model.reset_classifier(num_classes)
    return model


def verify_weights(backbone: nn.Module, path: Path, model_name: str = EMBEDDED_BACKBONE) -> None:
    """Check that timm loads the written file (with a fresh 10-class head) and gets the trained weights back."""
    loaded = load_backbone(path, num_classes=10, model_name=model_name)
    for name, value in backbone.state_dict().items():
        if not torch.equal(loaded.state_dict()[name], value.to(torch.float16).float()):
            raise RuntimeError(f"{path}: tensor {name} does not round-trip through timm.create_model")


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


def record_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


@contextmanager
def stop_signals_as_interrupts():
    """SIGTERM (a scheduler's or ``timeout``'s stop) is handled as Ctrl-C: the loop saves its state and exits."""
    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the pretraining and write the weights and the record; returns the record.

    Long on purpose: one training loop whose resumable state (weights, optimiser, schedule, scene stream,
    elapsed time) is saved and restored in one place, so a resumed run replays nothing."""
    model, optimizer, scheduler = build_training(args.steps, args.lr, args.seed, args.model)
    start, elapsed_before = 0, 0.0
    previous = None
    if args.init_from is not None:
        # Continued pretraining: the weights (backbone + heads) of an earlier run, a fresh optimiser and schedule,
        # and a new scene stream so the earlier run's batches are not replayed.
        if not args.init_from.is_file():
            raise SystemExit(f"--init-from: no such training state: {args.init_from}")
        model.load_state_dict(torch.load(args.init_from, map_location="cpu", weights_only=True)["model"])
        earlier_record = record_path(args.out)
        previous = json.loads(earlier_record.read_text()) if earlier_record.is_file() else None
    stream = 1 if args.init_from is not None else 0
    if args.resume and args.checkpoint.is_file():
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        tqdm.write(f"resumed from {args.checkpoint} at step {start}")
    budget_s = args.time_budget_min * 60.0 if args.time_budget_min else None
    t0 = time.perf_counter() - elapsed_before
    running: dict[str, float] = {}
    loss = float("nan")
    step = start
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    def save_state(steps_done: int) -> None:
        with atomic_path(args.checkpoint) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": steps_done,
                        "elapsed_s": time.perf_counter() - t0}, tmp)
        save_backbone(model.backbone, args.out, args.model)

    stopped_by_budget = False
    try:
        with stop_signals_as_interrupts():
            for step in bar:
                elapsed = time.perf_counter() - t0
                # The schedule advances with steps or with time, whichever is further: a slow machine then still
                # finishes the cosine decay inside the budget instead of being cut off at a high learning rate.
                progress = max(step, int(elapsed / budget_s * args.steps) if budget_s else 0)
                if progress >= args.steps:
                    tqdm.write(f"time budget reached at step {step}: schedule completed early")
                    stopped_by_budget = True
                    break
                scheduler.step_update(progress)
                images, targets = make_batch(args.seed, stream, step, args.batch_size, patch=model.patch)
                loss, accuracy = train_step(model, optimizer, images, targets)
                if not np.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss} at step {step}")
                for name, value in accuracy.items():
                    running[name] = value if name not in running else 0.98 * running[name] + 0.02 * value
                bar.set_postfix(refresh=False, loss=f"{loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                **{k: f"{v:.2f}" for k, v in running.items()})
                if (step + 1) % args.checkpoint_every == 0:
                    save_state(step + 1)
                    rate = (step + 1 - start) * args.batch_size / (time.perf_counter() - t0 - elapsed_before)
                    tqdm.write(f"step {step + 1}: loss {loss:.3f} "
                               + " ".join(f"{k} {v:.3f}" for k, v in running.items())
                               + f" | {rate:.0f} img/s | checkpoint saved")
            else:
                step = args.steps
    except KeyboardInterrupt as stop:
        bar.close()
        save_state(bar.n)
        how = stop.args[0] if stop.args else "SIGINT"
        resume = args.command if "--resume" in args.command else f"{args.command} --resume"
        print(f"pretraining stopped by {how} at step {bar.n} of {args.steps}; training state saved to "
              f"{args.checkpoint}; continue with: {resume}", file=sys.stderr)
        raise SystemExit(143 if how == "SIGTERM" else 130) from None
    bar.close()
    wall = time.perf_counter() - t0
    save_backbone(model.backbone, args.out, args.model)
    verify_weights(model.backbone, args.out, args.model)
    record = {
        "model": args.model,
        "command": args.command,
        "seed": args.seed,
        "steps_planned": args.steps,
        "steps_done": step,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size,
        "wall_time_s": round(wall, 1),
        "images_per_s": round((step - start) * args.batch_size / max(wall - elapsed_before, 1e-9), 1),
        "threads": args.threads,
        "time_budget_min": args.time_budget_min,
        "stopped_by_time_budget": stopped_by_budget,
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": WEIGHT_DECAY, "warmup_steps": WARMUP_STEPS,
                      "schedule": "cosine to 0", "grad_clip": GRAD_CLIP, "label_smoothing": LABEL_SMOOTHING},
        "data": {"generator": "dtl.data.scenes.render_scenes", "objects": f"1-{MAX_OBJECTS}",
                 "radius_px": list(DEFAULT_RADIUS_RANGE), "supersample": SUPERSAMPLE,
                 "global_heads": GLOBAL_HEADS, "dense_heads": DENSE_HEADS},
        "final_train_loss": round(loss, 4),
        "source_accuracy_heldout": evaluate_source(model, args.seed, args.eval_images),
        "dense_cell_px": model.patch,
        "weights": {"file": args.out.name, "dtype": "float16",
                    "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest()},
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.init_from is not None:
        record["init_from"] = str(args.init_from)
        record["previous_run"] = previous
    save_json(record, record_path(args.out))
    return record


@torch.no_grad()
def probe_features(backbone: nn.Module, images: np.ndarray, block: int,
                   batch_size: int = 250) -> dict[str, np.ndarray]:
    """Frozen features: 'final' = DTL's head input (the pooled, normed last block), 'block<i>' = the mean token of
    block ``block``'s output."""
    backbone.eval()
    family = family_for(backbone)
    last = len(family.blocks) - 1
    final, middle = [], []
    for chunk in np.array_split(images, max(len(images) // batch_size, 1)):
        states = family.block_states(to_tensor(chunk))
        final.append(family.pool(states[family.block_output_name(last)]).numpy())
        middle.append(mean_token(family, states[family.block_output_name(block)]).numpy())
    return {"final": np.concatenate(final), f"block{block}": np.concatenate(middle)}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a standardised multinomial logistic regression on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def transfer_probe(weights: Path, seed: int = 0, model_name: str = EMBEDDED_BACKBONE) -> dict[str, Any]:
    """Probe table: pretrained vs random init (mean of two seeds), final and middle block."""
    from dtl.data.synthetic import SYNTHETIC_TASKS, sample_task

    backbones = {"pretrained": [load_backbone(weights, model_name=model_name)],
                 "random": [load_backbone(None, seed=s, model_name=model_name) for s in RANDOM_INIT_SEEDS]}
    rows = {}
    for task in PROBE_TASKS:
        train_x, train_y = sample_task(task, PROBE_TRAIN, np.random.default_rng([seed, 0]))
        test_x, test_y = sample_task(task, PROBE_TEST, np.random.default_rng([seed, 1]))
        row: dict[str, Any] = {"classes": SYNTHETIC_TASKS[task].num_classes,
                               "chance": round(float(np.bincount(test_y).max() / len(test_y)), 3)}
        for init, models in backbones.items():
            scores: dict[str, list[float]] = {}
            for backbone in models:
                train_f, test_f = probe_features(backbone, train_x, PROBE_BLOCK), probe_features(
                    backbone, test_x, PROBE_BLOCK)
                for layer in train_f:
                    scores.setdefault(layer, []).append(linear_probe(train_f[layer], train_y, test_f[layer], test_y))
            for layer, values in scores.items():
                row[f"{init}_{layer}"] = round(float(np.mean(values)), 3)
        rows[task] = row
        tqdm.write(f"{task:14s} " + " ".join(f"{k}={v}" for k, v in row.items()))
    wins = sum(row[f"pretrained_{layer}"] > row[f"random_{layer}"]
               for row in rows.values() for layer in ("final", f"block{PROBE_BLOCK}"))
    return {"protocol": f"frozen features -> StandardScaler + LogisticRegression, {PROBE_TRAIN} train / "
                        f"{PROBE_TEST} test per task, random init = mean of seeds {list(RANDOM_INIT_SEEDS)}; "
                        f"'final' = DTL's head input (the last block pooled, then the final norm), "
                        f"'block{PROBE_BLOCK}' = mean token of block {PROBE_BLOCK} (0-indexed) output",
            "seed": seed, "tasks": rows, "pretrained_wins": f"{wins}/{2 * len(rows)}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_BACKBONE, choices=sorted(EMBEDDED_MODELS),
                        help="the embedded backbone to pretrain")
    parser.add_argument("--steps", type=int, default=1800, help="optimisation steps (the cosine schedule's length)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (2e-3 was worse)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the scene stream")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave cores to others)")
    parser.add_argument("--out", type=Path, default=None,
                        help="backbone weights (fp16 safetensors; default outputs/pretrain/<model>.safetensors); "
                             "the JSON record is written next to it. The shipped backbone is never overwritten "
                             "unless this names it")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="wall-clock budget: the schedule speeds up so it still decays to 0 within it")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="full training state (model, heads, optimiser, step) for --resume; default "
                             "outputs/pretrain/<model>-last.pt")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continued pretraining: start from this training state (e.g. an earlier run's "
                             "--checkpoint file) with a fresh schedule and a new scene stream")
    parser.add_argument("--eval-images", type=int, default=4096,
                        help="held-out scenes for the final source-task accuracies")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training; probe the weights in --out vs random init and add the table "
                             "to the JSON record")
    args = parser.parse_args(argv)
    args.out = args.out or OUT_DIR / f"{args.model}.safetensors"
    args.checkpoint = args.checkpoint or OUT_DIR / f"{args.model}-last.pt"
    args.command = shlex.join(["python", "tools/pretrain_embedded.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        if not args.out.is_file():
            raise SystemExit(f"no weights to evaluate at {args.out}: run the pretraining first")
        path = record_path(args.out)
        record = json.loads(path.read_text()) if path.is_file() else {"model": args.model}
        start = time.perf_counter()
        record["transfer_probe"] = transfer_probe(args.out, seed=args.seed, model_name=args.model)
        record["transfer_probe"].update(command=args.command,
                                        wall_time_s=round(time.perf_counter() - start, 1), threads=args.threads)
        save_json(record, path)
        print(json.dumps(record["transfer_probe"], indent=2))
        return
    record = pretrain(args)
    print(json.dumps({k: record[k] for k in ("steps_done", "images_seen", "wall_time_s", "images_per_s",
                                             "source_accuracy_heldout")}, indent=2))
    shipped = EMBEDDED_MODELS[args.model]
    if args.out.resolve() != shipped.resolve():
        print(f"\nwrote {args.out} and {record_path(args.out)}. Check the transfer first:\n"
              f"  python tools/pretrain_embedded.py --model {args.model} --eval-only --out {args.out}\n"
              f"then install it as the embedded backbone (the DVC train stages that use it then re-run):\n"
              f"  cp {args.out} {shipped}\n  cp {record_path(args.out)} {record_path(shipped)}")


if __name__ == "__main__":
    main()
