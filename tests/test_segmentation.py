"""Semantic segmentation: data folders and their checks, joint augmentation, mIoU, decode heads on every method,
the cache's refusal, the protocol through run_task, and mask prediction."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import dtl
from dtl.data.lists import DataError
from dtl.data.segmentation import (
    SegmentationDataset,
    SegmentationMeta,
    check_segmentation_root,
    holdout_indices,
    read_meta,
    split_pairs,
    training_transform,
)
from dtl.methods import available_methods, get_method
from dtl.objectives import IGNORE_INDEX, Segmentation, iou_per_class, sliding_window

MICRO = "vit_micro_patch4_32"
CNN = "convnext_micro_32"
pytestmark = pytest.mark.usefixtures("one_thread")


def write_pair(task_dir, split: str, stem: str, image: np.ndarray, labels: np.ndarray, mode: str = "L") -> None:
    (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    (task_dir / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(task_dir / "images" / split / f"{stem}.png")
    Image.fromarray(labels, mode=mode).save(task_dir / "annotations" / split / f"{stem}.png")


def block_scene(rng: np.random.Generator, size: int = 32, classes: int = 4,
                block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel says its label (20 x label + 10), in ``block`` x ``block`` squares."""
    labels = np.kron(rng.integers(0, classes, (size // block, size // block)), np.ones((block, block), dtype=np.int64))
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = 20 * labels + 10
    image[..., 1] = rng.integers(0, 256, (size, size))
    return image, labels.astype(np.uint8)


def folder(tmp_path, name: str = "task", count: int = 6, classes: int = 4, meta: dict | None = None):
    rng = np.random.default_rng(0)
    task_dir = tmp_path / name
    for split, n in (("training", count), ("validation", 2)):
        for i in range(n):
            write_pair(task_dir, split, f"{split}_{i}", *block_scene(rng, classes=classes))
    (task_dir / "meta.json").write_text(json.dumps(meta or {"num_classes": classes}))
    return task_dir


# --- data ---------------------------------------------------------------------------------------------------------
def test_augmentation_keeps_every_image_aligned_with_its_labels():
    rng = np.random.default_rng(1)
    transform = training_transform(32, (0.5,) * 3, (0.5,) * 3)
    from torchvision import tv_tensors

    torch.manual_seed(0)
    checked = 0
    for _ in range(30):
        image, labels = block_scene(rng, size=64, block=16)
        out, mask = transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                              tv_tensors.Mask(torch.from_numpy(labels)))
        red = (out[0] * 0.5 + 0.5) * 255  # undo the normalisation
        mask = mask.long()
        padded = mask == IGNORE_INDEX
        assert torch.all(out[:, padded] == -1)  # padding: image 0, labels ignored
        # Away from the squares' edges (where resizing blends neighbours) the red channel still says the label.
        window = mask[None, None].float()
        inner = F.max_pool2d(window, 5, 1, 2)[0, 0] == -F.max_pool2d(-window, 5, 1, 2)[0, 0]
        inner &= ~padded
        decoded = torch.round((red - 10) / 20).long()
        assert torch.equal(decoded[inner], mask[inner])
        checked += int(inner.sum())
    assert checked > 10_000


def test_reduce_zero_label_and_the_ade20k_defaults(tmp_path):
    meta = SegmentationMeta(3, reduce_zero_label=True)
    assert meta.labels(np.array([0, 1, 2, 3, 255], dtype=np.uint8)).tolist() == [255, 0, 1, 2, 255]
    assert SegmentationMeta(3).labels(np.array([0, 2, 255], dtype=np.uint8)).tolist() == [0, 2, 255]
    ade = tmp_path / "ADEChallengeData2016"
    ade.mkdir()
    read = read_meta(ade)
    assert (read.num_classes, read.reduce_zero_label, read.classes[:3]) == (150, True, ("wall", "building", "sky"))
    (ade / "meta.json").write_text('{"reduce_zero_label": false}')
    assert read_meta(ade).reduce_zero_label is False and read_meta(ade).num_classes == 150
    with pytest.raises(DataError, match=r"other/meta\.json: 'num_classes' must be an integer"):
        read_meta(tmp_path / "other")


def test_holdout_is_a_fixed_tenth_of_training(tmp_path):
    task_dir = folder(tmp_path, count=20)
    held, kept = split_pairs(task_dir, "holdout"), split_pairs(task_dir, "train")
    assert len(held) == 2 and len(kept) == 18 and not set(held) & set(kept)
    assert set(held) | set(kept) == set(split_pairs(task_dir, "training"))
    assert holdout_indices(20) == holdout_indices(20) and holdout_indices(1) == []


def test_every_folder_defect_is_named_in_one_line(tmp_path):
    task_dir = folder(tmp_path, count=3, classes=4)
    rng = np.random.default_rng(2)
    images, masks = task_dir / "images" / "training", task_dir / "annotations" / "training"
    Image.fromarray(block_scene(rng)[0]).save(images / "lonely_image.png")
    Image.fromarray(block_scene(rng)[1], mode="L").save(masks / "lonely_mask.png")
    write_pair(task_dir, "training", "wrong_size", block_scene(rng)[0], np.zeros((16, 32), dtype=np.uint8))
    write_pair(task_dir, "training", "big_label", *block_scene(rng))
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8), mode="L").save(masks / "big_label.png")
    write_pair(task_dir, "validation", "rgb_mask", block_scene(rng)[0], np.zeros((32, 32, 3), dtype=np.uint8),
               mode="RGB")
    write_pair(task_dir, "validation", "broken", *block_scene(rng))
    (images.parent / "validation" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as raised:
        check_segmentation_root(tmp_path, ["task"], verify_images=True)
    lines = str(raised.value).splitlines()
    assert lines[0].endswith("problem(s) found")
    expected = {"lonely_image.png: no annotation", "lonely_mask.png: no image lonely_mask.jpg or .png",
                "wrong_size.png: annotation is 32x16 but its image wrong_size.png is 32x32",
                "big_label.png: label(s) 7 at or above num_classes (allowed: 0..3 and 255)",
                "rgb_mask.png: annotation has mode RGB", "broken.png: cannot read image"}
    for fragment in expected:
        assert sum(fragment in line for line in lines[1:]) == 1, fragment
    assert len(lines) == 1 + len(expected)


def test_a_clean_folder_checks_and_reads(tmp_path):
    folder(tmp_path, count=10, classes=4, meta={"num_classes": 5, "classes": list("abcde")})
    record = check_segmentation_root(tmp_path, ["task"], verify_images=True)["task"]
    assert record["images"] == {"training": 10, "validation": 2, "train": 9, "holdout": 1}
    assert record["num_classes"] == 5 and record["classes_seen"] == 4
    data = SegmentationDataset(tmp_path, "task", "validation", 32)
    image, labels = data[0]
    assert image.shape == (3, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    assert data.augment is None and SegmentationDataset(tmp_path, "task", "train", 32, augment=True).augment


# --- scores ---------------------------------------------------------------------------------------------------------
def test_miou_is_the_dataset_wide_formula_with_ignored_pixels():
    targets = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[0, 1, 1, 1], [255, 2, 2, 0]]])
    predictions = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 2]], [[0, 1, 2, 1], [1, 2, 2, 0]]])
    logits = F.one_hot(predictions, 4).permute(0, 3, 1, 2).float()  # class 3 is never predicted nor labelled
    tally = Segmentation(4).tally(torch.device("cpu"), per_image=True)
    tally.add(logits[:1], targets[:1])
    tally.add(logits[1:], targets[1:])
    scores = tally.result()
    # by hand over both images, ignoring the 255 pixels: class 0: 3 hits, labelled 4, predicted 4 -> 3 / 5;
    # class 1: 4 hits, labelled 5, predicted 5 -> 4 / 6; class 2: 3 hits, labelled 4, predicted 4 -> 3 / 5
    assert scores["class_iou"][:3] == pytest.approx([3 / 5, 4 / 6, 3 / 5]) and scores["class_iou"][3] is None
    assert scores["miou"] == pytest.approx((3 / 5 + 4 / 6 + 3 / 5) / 3)
    assert scores["accuracy"] == pytest.approx(10 / 13)
    # each image's own mean IoU over the classes its labels or prediction hold
    first, second = [1 / 3, 2 / 3, 1 / 2], [2 / 2, 2 / 3, 2 / 3]
    assert scores["per_image"].tolist() == pytest.approx([sum(first) / 3, sum(second) / 3], abs=1e-6)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / 13
    assert scores["loss"] == pytest.approx(loss.item())
    assert iou_per_class(torch.zeros(2, 2, dtype=torch.int64)) == [None, None]


def test_the_loss_resizes_logits_to_the_labels_and_ignores_unlabelled_crops():
    objective = Segmentation(3)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 16, 16))
    expected = F.cross_entropy(F.interpolate(logits, size=(16, 16), mode="bilinear"), labels)
    assert objective.loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    nothing = objective.loss(logits, torch.full((2, 16, 16), IGNORE_INDEX))
    assert nothing.item() == 0 and math.isfinite(nothing.item())


def test_sliding_window_covers_a_larger_image_and_equals_one_pass_on_a_crop():
    model = dtl.create_model(MICRO, "linear", num_classes=5, pretrained=True, decode_head="linear").eval()
    crop = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = sliding_window(model, crop, 32)
        assert torch.allclose(whole, F.interpolate(model(crop), size=(32, 32), mode="bilinear"))
        wide = sliding_window(model, torch.randn(1, 3, 32, 75), 32)
        small = sliding_window(model, torch.randn(1, 3, 20, 20), 32)  # padded to the crop, cropped back
    assert wide.shape == (1, 5, 32, 75) and small.shape == (1, 5, 20, 20)


# --- models -------------------------------------------------------------------------------------------------------
def applicable(backbone: str) -> list[str]:
    from dtl.models import create_backbone, family_for

    family = family_for(create_backbone(backbone, False, img_size=32))
    return [name for name in available_methods() if get_method(name).supports(family)]


@pytest.mark.parametrize("backbone", [MICRO, CNN])
@pytest.mark.parametrize("head", ["linear", "fpn"])
def test_every_method_segments_and_dtl_starts_as_the_frozen_backbone_plus_the_head(backbone, head):
    images = torch.randn(2, 3, 32, 32)
    for method in applicable(backbone):
        torch.manual_seed(0)
        model = dtl.create_model(backbone, method, num_classes=6, pretrained=True, decode_head=head).eval()
        with torch.no_grad():
            logits = model(images)
            assert logits.shape[:2] == (2, 6) and logits.dtype == torch.float32, method
            if method in ("dtl", "dtl_plus", "linear", "lora", "adaptformer"):  # these start as the backbone
                family = model.family
                plain = model.head(model.head.inputs(family, family.forward_blocks(images, model.head.blocks)))
                torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5, msg=method)


def test_no_gradient_reaches_frozen_weights_of_a_segmentation_model():
    from conftest import randomised

    model = randomised(dtl.create_model(MICRO, "dtl_plus", num_classes=4, pretrained=True, decode_head="fpn"))
    labels = torch.randint(0, 4, (2, 32, 32))
    Segmentation(4).loss(model(torch.randn(2, 3, 32, 32)), labels).backward()
    assert all(p.grad is None for p in model.family.parameters())
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad), trained
    assert any(name.startswith("side_maps") for name in trained) and any(name.startswith("head.") for name in trained)


def test_the_frozen_prefix_keeps_nothing_for_backward_whatever_the_head_reads():
    from dtl.engine import SavedTensorBytes

    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4, pretrained=True, decode_head="fpn", start_block=6)
    assert model.prefix_head_blocks == [2, 5]  # two of the four levels lie in blocks 0..M
    images = torch.randn(2, 3, 32, 32)
    with SavedTensorBytes(model) as counter:
        model(images).sum()
    state = model.forward_prefix(images)
    assert not any(t.requires_grad for t in (*state.side_inputs, state.block_output, *state.head_outputs))
    later = dtl.create_model(MICRO, "dtl_plus", num_classes=4, pretrained=True, decode_head="fpn", start_block=10)
    with SavedTensorBytes(later) as later_counter:
        later(images).sum()
    assert later_counter.nbytes < counter.nbytes  # fewer blocks after M keep activations


def test_augmented_training_refuses_the_prefix_cache_and_an_unaugmented_split_trains_the_same_cached(tmp_path):
    from dtl.cache import PrefixCacheError, prepare_prefix_cache
    from dtl.config import TrainConfig
    from dtl.engine import train_and_evaluate

    folder(tmp_path, count=16)
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4, pretrained=True, decode_head="fpn")
    augmented = SegmentationDataset(tmp_path, "task", "training", 32, augment=True)
    with pytest.raises(PrefixCacheError, match=r"the training data is augmented \(SegmentationDataset.augment"):
        prepare_prefix_cache(model, augmented, mode="memory")
    plain = SegmentationDataset(tmp_path, "task", "training", 32)
    runs = {}
    for mode in ("off", "memory"):
        torch.manual_seed(0)
        model = dtl.create_model(MICRO, "dtl_plus", num_classes=4, pretrained=True, decode_head="fpn")
        config = TrainConfig(epochs=2, warmup_epochs=0, cooldown_epochs=0, batch_size=4, lr=0.01, progress=False,
                             prefix_cache=mode)
        runs[mode] = train_and_evaluate(model, plain, {"val": plain}, config, objective=Segmentation(4))
    assert runs["memory"].cache_report["mode"] == "memory"
    assert runs["off"].metrics["val/miou"] == pytest.approx(runs["memory"].metrics["val/miou"], abs=1e-6)
    assert runs["off"].metrics["train/loss"] == pytest.approx(runs["memory"].metrics["train/loss"], rel=1e-5)


def test_a_segmentation_config_needs_a_decode_head_and_a_classification_one_none():
    from dtl.config import ConfigError, ExperimentConfig

    with pytest.raises(ConfigError, match=r"model.decode_head: expected one of linear, fpn for evaluation.protocol "
                                          r"segmentation"):
        ExperimentConfig.from_dict({"evaluation": {"protocol": "segmentation"}})
    with pytest.raises(ConfigError, match=r"model.decode_head: expected null for evaluation.protocol final"):
        ExperimentConfig.from_dict({"model": {"decode_head": "fpn"}})
    config = ExperimentConfig.from_dict({"model": {"decode_head": "fpn"}, "evaluation": {"protocol": "segmentation"}})
    assert config.for_selection().evaluation.protocol == "segmentation_val"
    assert config.protocol.score == "miou" and config.for_selection().protocol.scored == {"val": "holdout"}


# --- the protocol, end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_segmentation(tmp_path_factory):
    """DTL+ with the FPN head trained 2 epochs on the embedded shape_masks task (a small validation split)."""
    from dtl.config import ExperimentConfig
    from dtl.experiment import run_task

    root = tmp_path_factory.mktemp("segmentation")
    config = ExperimentConfig.from_dict({
        "data": {"root": str(root), "tasks": ["shape_masks"], "image_size": 32, "num_test": 40},
        "model": {"decode_head": "fpn"},
        "training": {"epochs": 2, "warmup_epochs": 1, "cooldown_epochs": 0, "batch_size": 64, "progress": False},
        "evaluation": {"protocol": "segmentation"}})
    config.protocol.ensure_data()
    return config, run_task(config, "shape_masks"), root


def test_run_task_trains_and_scores_the_validation_split(trained_segmentation):
    from dtl.experiment import evaluate_model

    config, run, _ = trained_segmentation
    metrics = run.result.metrics
    assert 0 < metrics["test/miou"] < metrics["test/accuracy"] <= 1 and run.num_classes == 11
    assert run.result.cache_report["mode"] == "off" and "augmented" in run.result.cache_report["reason"]
    assert run.result.per_image["test"].shape == (40,) and run.result.per_image["test"].dtype == torch.float32
    scores = evaluate_model(run.config, "shape_masks", run.model, run.num_classes, seed=42)
    assert scores["test_miou"] == pytest.approx(metrics["test/miou"]) and len(scores["test_class_iou"]) == 11


def test_predict_writes_a_palette_mask_per_image_and_the_class_fractions(trained_segmentation, tmp_path):
    import csv

    from dtl.io import save_trainable
    from dtl.predict import main
    from dtl.trained import trained_metadata

    config, run, root = trained_segmentation
    weights = tmp_path / "shape_masks.safetensors"
    save_trainable(run.model, weights, trained_metadata(run.config, "shape_masks", run.num_classes, 42, 32))
    images = sorted((root / "shape_masks" / "images" / "validation").iterdir())[:3]
    big = tmp_path / "big.png"
    Image.open(images[0]).resize((70, 45)).save(big)  # another size: predicted at its own size
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    out = tmp_path / "masks"
    assert main(["--model", str(weights), *map(str, images), str(big), str(broken), "--output", str(out)]) == 1
    mask = Image.open(out / "big.png")
    assert mask.mode == "P" and mask.size == (70, 45) and np.asarray(mask).max() < 11
    rows = list(csv.DictReader((out / "fractions.csv").open()))
    assert [r["mask"] for r in rows] == [p.name for p in images] + ["big.png"]
    names = ("background", "circle")
    assert all(sum(float(r[n]) for n in r if n not in ("path", "mask")) == pytest.approx(1, abs=1e-4) for r in rows)
    assert all(n in rows[0] for n in names)
    assert main(["--model", str(weights), str(images[0]), "--output", str(tmp_path / "x.csv")]) == 2


@pytest.mark.slow
def test_the_segmentation_pipeline_end_to_end(tmp_path, monkeypatch):
    """prepare -> train -> evaluate -> report on params/segmentation.yaml (one task, one epoch, a small validation
    split); the registered MLflow model answers with masks."""
    import base64
    import io

    import mlflow
    import pandas as pd
    import yaml

    from pipeline import evaluate, prepare, report, train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    raw = yaml.safe_load(open("params/segmentation.yaml"))
    raw["data"].update(root=str(tmp_path / "data"), tasks=["texture_regions"], num_test=20)
    raw["training"].update(epochs=1, warmup_epochs=0, prefix_cache_dir=str(tmp_path / "cache"))
    raw["overrides"] = {"texture_regions": {}}
    raw["mlflow"] = {"experiment": "segmentation-test"}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    best = tmp_path / "best.yaml"
    best.write_text("texture_regions: {}\n")
    outputs = tmp_path / "outputs"
    common = ["--params", str(params), "--best", str(best), "--outputs", str(outputs)]
    prepare.main(common)
    record = json.loads((outputs / "prepare" / "texture_regions.json").read_text())
    assert record["images"] == {"training": 1000, "validation": 20, "train": 900, "holdout": 100}
    assert record["group"] == "Segmentation" and record["num_classes"] == 9
    train.main(["texture_regions", *common])
    evaluate.main(["texture_regions", *common])
    metrics = json.loads((outputs / "evaluate" / "texture_regions.json").read_text())
    summary = json.loads((outputs / "train" / "texture_regions" / "summary.json").read_text())
    assert metrics["test_miou"] == summary["per_seed"][0]["test/miou"] and 0 < metrics["test_miou"] < 1
    dvc_metrics = json.loads((tmp_path / "metrics" / "texture_regions.json").read_text())
    assert list(dvc_metrics)[:2] == ["test_miou", "test_acc"]
    report.main(common)
    markdown = (outputs / "report.md").read_text()
    assert "# DTL pipeline report: semantic segmentation" in markdown and "| stripes_low |" in markdown
    assert (outputs / "report.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "plots" / "tasks.json").read_text())[0]["test_miou"] == round(metrics["test_miou"], 4)

    version = mlflow.tracking.MlflowClient().get_model_version("dtl-texture_regions", "1")
    assert float(version.tags["test_miou"]) == pytest.approx(metrics["test_miou"], abs=1e-6)
    model = mlflow.pyfunc.load_model("models:/dtl-texture_regions/1")
    image = sorted((tmp_path / "data" / "texture_regions" / "images" / "validation").iterdir())[0]
    answer = model.predict(pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode(),
                                                   base64.b64encode(b"no image").decode()]}))
    mask = Image.open(io.BytesIO(base64.b64decode(answer["mask"][0])))
    assert mask.mode == "P" and mask.size == (32, 32) and pd.isna(answer["mask"][1])
    assert sum(json.loads(answer["fractions"][0]).values()) == pytest.approx(1, abs=1e-4)
    assert "not an image" in answer["error"][1]
