"""Smoke tests of the embedded backbone's pretraining (tools/pretrain_embedded.py) and of the scene renderer."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dtl.data.scenes import BACKGROUNDS, PALETTE, SHAPE_IDS, SHAPES, orientation_bins, render_scenes
from dtl.io import REPO_ROOT


@pytest.fixture(scope="module")
def pretrain() -> ModuleType:
    """The script as a module (``pipeline`` need not be a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_script", REPO_ROOT / "tools" / "pretrain_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_renderer_label_maps_agree_with_pixels() -> None:
    # Flat backgrounds and no anti-aliasing: every pixel is exactly the background or its object's colour.
    images, labels = render_scenes(np.random.default_rng(0), 32, backgrounds=BACKGROUNDS.index("flat"),
                                   supersample=1)
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    shape_map, colour_map = labels["shape_map"], labels["colour_map"]
    assert ((shape_map == -1) == (colour_map == -1)).all()
    palette = np.clip(PALETTE + 0.5, 0, 255).astype(np.uint8)
    for i in range(len(images)):
        background = images[i][shape_map[i] == -1]
        assert len(background) and (background == background[0]).all()
        covered = colour_map[i] >= 0
        assert (images[i][covered] == palette[colour_map[i][covered]]).all()
        present = set(labels["shape"][i][labels["shape"][i] >= 0])
        assert set(np.unique(shape_map[i][covered])) <= present
    assert (labels["shape"] >= 0).sum(axis=1).tolist() == labels["num_objects"].tolist()


def test_renderer_honours_fixed_factors_and_seed() -> None:
    kwargs = dict(num_objects=2, shapes=SHAPE_IDS["star"], colours=[[1, 2]] * 4, radii=5.0)
    first, labels = render_scenes(np.random.default_rng(7), 4, **kwargs)
    second, _ = render_scenes(np.random.default_rng(7), 4, **kwargs)
    assert np.array_equal(first, second)
    assert (labels["shape"] == SHAPE_IDS["star"]).all() and (labels["colour"] == [1, 2]).all()
    assert np.allclose(labels["radius"], 5.0) and labels["position"].shape == (4, 2, 2)
    assert set(np.unique(labels["shape_map"])) <= {-1, SHAPE_IDS["star"]}


def test_orientation_bins_respect_symmetry() -> None:
    shapes = np.array([SHAPE_IDS["circle"], SHAPE_IDS["semicircle"], SHAPE_IDS["square"], -1])
    bins = orientation_bins(np.array([1.0, math.pi + 0.01, math.pi / 2 + 0.01, 0.0]), shapes, 8)
    assert bins.tolist() == [-1, 4, 0, -1]


def test_targets_cover_every_head(pretrain: ModuleType) -> None:
    images, targets = pretrain.make_batch(0, 0, 0, 16)
    assert images.shape == (16, 3, 32, 32) and -1.0 <= images.min() and images.max() <= 1.0
    heads = {**pretrain.GLOBAL_HEADS, **pretrain.DENSE_HEADS}
    assert set(targets) == set(heads)
    for name, classes in heads.items():
        assert targets[name].min() >= -1 and targets[name].max() < classes
    assert targets["shape_map"].shape == (16, 64)
    assert (targets["shape_map"] > 0).any() and (targets["shape_map"] == 0).any()
    assert pretrain.DENSE_HEADS["shape_map"] == len(SHAPES) + 1


def test_two_steps_give_finite_losses_and_move_weights(pretrain: ModuleType) -> None:
    torch.set_num_threads(1)
    model, optimizer, scheduler = pretrain.build_training(steps=10, lr=1e-3, seed=0)
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    for step in range(2):
        scheduler.step_update(step)
        loss, accuracy = pretrain.train_step(model, optimizer, *pretrain.make_batch(0, 0, step, 8))
        assert math.isfinite(loss) and set(accuracy) == set(pretrain.GLOBAL_HEADS) | set(pretrain.DENSE_HEADS)
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)
    decay = {g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {0.0, pretrain.WEIGHT_DECAY}


def test_script_writes_loadable_weights_and_resumes(pretrain: ModuleType, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "w.safetensors", tmp_path / "ck.pt"
    common = ["--batch-size", "4", "--checkpoint-every", "1", "--out", str(out), "--checkpoint", str(ckpt),
              "--eval-images", "8"]
    pretrain.main(["--steps", "2", *common])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps_done"] == 2 and record["images_seen"] == 8 and ckpt.is_file()
    assert set(record["source_accuracy_heldout"]) == set(pretrain.GLOBAL_HEADS) | set(pretrain.DENSE_HEADS)
    backbone = pretrain.load_backbone(out, num_classes=10)
    assert backbone.head.out_features == 10
    with safe_open(str(out), "pt") as weights:
        assert "patch_embed.proj.weight" in weights.keys() and not any(k.startswith("head") for k in weights.keys())
        assert weights.get_tensor("norm.weight").dtype == torch.float16
    pretrain.main(["--steps", "3", "--resume", *common])
    assert json.loads(out.with_suffix(".json").read_text())["steps_done"] == 3


def test_probe_features_shapes(pretrain: ModuleType) -> None:
    images = np.zeros((5, 32, 32, 3), np.uint8)
    features = pretrain.probe_features(pretrain.load_backbone(None), images, pretrain.PROBE_BLOCK)
    assert {k: v.shape for k, v in features.items()} == {"final": (5, 96), f"block{pretrain.PROBE_BLOCK}": (5, 96)}


def test_the_embedded_cnn_pretrains_with_dense_heads_on_its_last_grid(pretrain: ModuleType, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, optimizer, scheduler = pretrain.build_training(steps=10, lr=1e-3, seed=0, model_name="convnext_micro_32")
    assert model.patch == 8  # a 4 x 4 last stage at 32 px
    images, targets = pretrain.make_batch(0, 0, 0, 4, patch=model.patch)
    assert targets["shape_map"].shape == (4, 16)
    logits = model(images)
    assert logits["shape_map"].shape == (4, 16, pretrain.DENSE_HEADS["shape_map"])
    before = model.backbone.stages[0].blocks[0].conv_dw.weight.detach().clone()
    scheduler.step_update(0)
    loss, _ = pretrain.train_step(model, optimizer, images, targets)
    assert math.isfinite(loss) and not torch.equal(before, model.backbone.stages[0].blocks[0].conv_dw.weight)
    features = pretrain.probe_features(pretrain.load_backbone(None, model_name="convnext_micro_32"),
                                       np.zeros((3, 32, 32, 3), np.uint8), pretrain.PROBE_BLOCK)
    assert {k: v.shape for k, v in features.items()} == {"final": (3, 192), f"block{pretrain.PROBE_BLOCK}": (3, 48)}


def test_a_stopped_pretraining_saves_its_state_and_prints_the_resume_command(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import threading
    import time

    out, ckpt = tmp_path / "w.safetensors", tmp_path / "ck.pt"
    command = [sys.executable, str(REPO_ROOT / "tools" / "pretrain_embedded.py"), "--steps", "100000",
               "--batch-size", "8", "--checkpoint-every", "100000", "--out", str(out), "--checkpoint", str(ckpt)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while "pretrain:" not in "".join(chunks) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the progress bar appears once the loop (and its signal handler) runs
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        process.kill()
        process.stderr.close()
    stderr = "".join(chunks)
    lines = [line for line in stderr.splitlines() if "stopped by SIGTERM" in line]
    assert process.returncode == 143 and len(lines) == 1, stderr[-2000:]
    assert lines[0].endswith("--resume") and "pretrain_embedded.py" in lines[0]
    assert torch.load(ckpt, weights_only=True)["step"] >= 1 and out.is_file()
    assert "Traceback" not in stderr
