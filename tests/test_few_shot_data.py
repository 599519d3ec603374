"""Few-shot lists in the NOAH layout and the domain-generalisation accuracies: counts, repeats, errors, the mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtl.data.domain_generalization import masked_predictions
from dtl.data.few_shot import FewShotDataset, check_few_shot_root, list_file
from dtl.data.lists import DataError

CLASSES = 4


def write_noah(root: Path, dataset: str = "oxford-pets", shots=(1, 2), seeds=(0, 1, 2), repeat_one_shot=False,
               classes: int = CLASSES) -> Path:
    """A data set folder as the release lays it out: images (one with a space in its name) + annotations/."""
    folder = root / dataset
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for c in range(classes):
        for i in range(20):
            name = f"images/class {c}_{i}.jpg" if i == 0 else f"images/c{c}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / name)
            names.append((name, c))

    def lines(selected):
        return "".join(f"{name} {label}\n" for name, label in selected)

    for k in shots:
        for s in seeds:
            pick = []
            for c in range(classes):
                of_class = [n for n, cc in names if cc == c]
                pick += [(n, c) for n in of_class[s:s + k]]
            if repeat_one_shot and k == 1:
                pick = pick + pick  # the Pets quirk: every line twice
            (folder / "annotations" / f"train_meta.list.num_shot_{k}.seed_{s}").write_text(lines(pick))
    (folder / "annotations" / "val_meta.list").write_text(lines(names[1::4]))
    (folder / "annotations" / "test_meta.list").write_text(lines(names[::3]))
    return folder


def test_a_noah_folder_loads_with_the_right_counts_per_shot_and_seed(tmp_path):
    write_noah(tmp_path, shots=(1, 2, 4))
    manifest = check_few_shot_root(tmp_path, ["oxford-pets"], shots=(1, 2, 4), seeds=(0, 1, 2),
                                   num_classes={"oxford-pets": CLASSES}, verify_images=True)
    entry = manifest["oxford-pets"]
    assert entry["train"] == {str(k): {str(s): k * CLASSES for s in (0, 1, 2)} for k in (1, 2, 4)}
    assert entry["test"] == len(range(0, 20 * CLASSES, 3)) and entry["repeated_lines"] == {}
    train = FewShotDataset(tmp_path, "oxford-pets", "train", shots=2, seed=1, img_size=16, num_classes=CLASSES)
    image, label = train[0]
    assert len(train) == 2 * CLASSES and image.shape == (3, 16, 16) and label == 0
    assert train.samples[0][0] == tmp_path / "oxford-pets" / "images" / "c0_1.jpg"  # relative to the data set
    test = FewShotDataset(tmp_path, "oxford-pets", "test", img_size=16, num_classes=CLASSES)
    assert test.samples[0][0].name == "class 0_0.jpg" and test[0][0].shape == (3, 16, 16)  # a space in the name
    assert sorted({label for _, label in train.samples}) == list(range(CLASSES))


def test_repeated_lines_are_kept_as_the_official_loader_does_and_reported(tmp_path):
    write_noah(tmp_path, shots=(1, 2), repeat_one_shot=True)
    one = FewShotDataset(tmp_path, "oxford-pets", "train", shots=1, seed=0, img_size=16, num_classes=CLASSES)
    assert len(one) == 2 * CLASSES and len({path for path, _ in one.samples}) == CLASSES  # each image twice
    manifest = check_few_shot_root(tmp_path, ["oxford-pets"], shots=(1, 2), num_classes={"oxford-pets": CLASSES})
    assert manifest["oxford-pets"]["repeated_lines"] == {f"train_meta.list.num_shot_1.seed_{s}": CLASSES
                                                         for s in (0, 1, 2)}
    assert manifest["oxford-pets"]["train"]["1"]["0"] == 2 * CLASSES


@pytest.mark.parametrize("breakage, expected", [
    (lambda f: (f / "annotations" / "val_meta.list").unlink(), r"val_meta\.list: list file does not exist"),
    (lambda f: (f / "annotations" / "test_meta.list").write_text("images/c0_1.jpg 0\nimages/c0_2.jpg\n"),
     r"test_meta\.list:2: expected 'relative/path/to/image <integer label>', got 'images/c0_2\.jpg'"),
    (lambda f: (f / "annotations" / "train_meta.list.num_shot_2.seed_1").write_text("images/c0_1.jpg 9\n"),
     r"train_meta\.list\.num_shot_2\.seed_1:1: label 9 is outside \[0, 4\)"),
    (lambda f: (f / "annotations" / "test_meta.list").write_text("images/c0_1.jpg 0\nimages/gone.jpg 1\n"),
     r"test_meta\.list:2: image .*images/gone\.jpg does not exist"),
    (lambda f: (f / "images" / "c1_3.jpg").write_text("not an image"), r"cannot read image .*c1_3\.jpg"),
])
def test_each_malformed_case_names_the_file_and_line(tmp_path, breakage, expected):
    folder = write_noah(tmp_path)
    breakage(folder)
    with pytest.raises(DataError, match=expected):
        check_few_shot_root(tmp_path, ["oxford-pets"], shots=(1, 2), num_classes={"oxford-pets": CLASSES},
                            verify_images=True)


def test_the_datasets_and_splits_are_named_as_the_release_names_them(tmp_path):
    assert list_file(tmp_path, "standford-cars", "train", 16, 2).name == "train_meta.list.num_shot_16.seed_2"
    with pytest.raises(DataError, match="needs shots and seed"):
        list_file(tmp_path, "food101", "train")
    with pytest.raises(DataError, match="my-birds: data set folder does not exist"):
        check_few_shot_root(tmp_path, ["my-birds"])
    (tmp_path / "my-birds").mkdir()
    with pytest.raises(DataError, match="not one of fgvc-aircraft, food101.*my-birds/meta.json is missing"):
        check_few_shot_root(tmp_path, ["my-birds"])
    write_noah(tmp_path, dataset="food101")
    assert FewShotDataset(tmp_path, "food101", "val").num_classes == 101  # the release's class count


def test_the_200_class_mask_changes_only_what_it_should():
    from torch.utils.data import DataLoader, TensorDataset

    from dtl.engine import evaluate

    torch.manual_seed(0)
    logits = torch.randn(64, 1000)
    present = list(range(0, 1000, 5))  # 200 classes
    labels = torch.tensor(present)[torch.randint(0, 200, (64,))]
    logits[:8, 3] = 50.0  # a class the target does not hold wins the full argmax for the first 8 images
    masked = masked_predictions(logits, present)
    assert set(masked.tolist()) <= set(present)
    inside = torch.isin(logits.argmax(-1), torch.tensor(present))
    assert torch.equal(masked[inside], logits.argmax(-1)[inside])  # unchanged where the argmax was a held class
    assert not inside[:8].any() and (masked[:8] != 3).all()

    class Lookup(torch.nn.Module):
        def forward(self, index):
            return logits[index]

    loader = DataLoader(TensorDataset(torch.arange(64), labels), batch_size=16)
    scores = evaluate(Lookup(), loader, torch.device("cpu"), "fp32", classes=present)
    assert scores["accuracy_masked"] == (masked == labels).float().mean().item() >= scores["accuracy"]
    logits[torch.arange(64), labels] = 100.0  # every image right: the mask changes nothing
    assert evaluate(Lookup(), loader, torch.device("cpu"), "fp32", classes=present)["accuracy_masked"] == 1.0
