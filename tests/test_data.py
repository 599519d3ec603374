"""Tests of dtl.data: the synthetic suite generator, the VTAB-1K dataset and its error reporting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dtl.data import (
    SPLITS,
    SYNTHETIC_TASKS,
    TASK_GROUPS,
    VTAB_TASKS,
    DataError,
    VTabDataset,
    check_vtab_root,
    generate_synthetic_suite,
    sample_task,
    vtab_transform,
)

NUM_TEST = 60
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("suite")
    return root, generate_synthetic_suite(root, image_size=IMAGE_SIZE, num_test=NUM_TEST, seed=0)


def write_task(root: Path, task: str, lines: dict[str, list[str]], images: list[str],
               num_classes: int | None = 4) -> Path:
    """A small hand-made VTAB task folder; ``images`` are created as valid 8x8 PNGs."""
    folder = root / task
    folder.mkdir(parents=True)
    for name in images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(folder / name)
    for split, split_lines in lines.items():
        (folder / f"{split}.txt").write_text("".join(line + "\n" for line in split_lines))
    if num_classes is not None:
        (folder / "meta.json").write_text(json.dumps({"num_classes": num_classes}))
    return folder


def good_lines() -> dict[str, list[str]]:
    train, val = ["a.png 0", "b.png 1"], ["c.png 2"]
    return {"train800": train, "val200": val, "train800val200": train + val, "test": ["d.png 3"]}


GOOD_IMAGES = ["a.png", "b.png", "c.png", "d.png"]


def test_vtab_tables() -> None:
    assert len(VTAB_TASKS) == 19
    assert sorted(t for group in TASK_GROUPS.values() for t in group) == sorted(VTAB_TASKS)
    assert SPLITS == ("train800", "val200", "train800val200", "test")
    assert VTAB_TASKS["sun397"] == 397 and VTAB_TASKS["dsprites_loc"] == 16


def test_suite_layout_counts_and_labels(suite: tuple[Path, dict]) -> None:
    root, manifest = suite
    assert set(manifest) == set(SYNTHETIC_TASKS)
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "staging folders left behind"
    for task, info in SYNTHETIC_TASKS.items():
        folder = root / task
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["num_classes"] == info.num_classes and meta["group"] == info.group and meta["seed"] == 0
        counts = {}
        for split in SPLITS:
            lines = (folder / f"{split}.txt").read_text().splitlines()
            counts[split] = len(lines)
            labels = [int(line.rsplit(maxsplit=1)[1]) for line in lines]
            assert all(0 <= label < info.num_classes for label in labels)
            assert all((folder / line.rsplit(maxsplit=1)[0]).is_file() for line in lines)
        assert counts == {"train800": 800, "val200": 200, "train800val200": 1000, "test": NUM_TEST}
        trainval = (folder / "train800val200.txt").read_text()
        assert trainval == (folder / "train800.txt").read_text() + (folder / "val200.txt").read_text()
        assert manifest[task]["generated"] is True
    checked = check_vtab_root(root)
    assert checked["digits"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": NUM_TEST,
                                 "num_classes": 10, "classes_seen": 10}
    with Image.open(root / "patterns" / "images" / "test_00000.png") as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_suite_skips_existing_and_refuses_to_clobber(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    before = (root / "digits" / "test.txt").stat().st_mtime_ns
    again = generate_synthetic_suite(root, tasks=["digits"], image_size=IMAGE_SIZE, num_test=NUM_TEST, seed=0)
    assert again["digits"]["generated"] is False
    assert (root / "digits" / "test.txt").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_suite(root, tasks=["digits"], image_size=IMAGE_SIZE, num_test=NUM_TEST, seed=1)


def test_suite_is_deterministic_and_overwrite_replaces(tmp_path: Path) -> None:
    kwargs = dict(tasks=["dsprites_ori", "digits"], image_size=IMAGE_SIZE, num_test=20)
    generate_synthetic_suite(tmp_path / "a", seed=3, **kwargs)
    generate_synthetic_suite(tmp_path / "b", seed=3, **kwargs)
    for task in kwargs["tasks"]:
        for name in [f"{s}.txt" for s in SPLITS] + ["images/train_00007.png", "images/test_00003.png"]:
            assert (tmp_path / "a" / task / name).read_bytes() == (tmp_path / "b" / task / name).read_bytes()
    generate_synthetic_suite(tmp_path / "b", seed=4, overwrite=True, **kwargs)
    assert json.loads((tmp_path / "b" / "digits" / "meta.json").read_text())["seed"] == 4
    assert ((tmp_path / "a" / "digits" / "images" / "train_00000.png").read_bytes()
            != (tmp_path / "b" / "digits" / "images" / "train_00000.png").read_bytes())


@pytest.mark.parametrize("task", list(SYNTHETIC_TASKS))
def test_sample_task_is_balanced(task: str) -> None:
    k = SYNTHETIC_TASKS[task].num_classes
    images, labels = sample_task(task, 4 * k, np.random.default_rng(0), image_size=IMAGE_SIZE)
    assert images.shape == (4 * k, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=k).tolist() == [4] * k


def test_sample_task_rejects_unknown_task() -> None:
    with pytest.raises(KeyError, match="unknown synthetic task"):
        sample_task("nope", 4, np.random.default_rng(0))


def test_dataset_items_and_preload(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    ds = VTabDataset(root, "clevr_count", "val200", img_size=24)
    assert (len(ds), ds.num_classes, ds.task, ds.split) == (200, 8, "clevr_count", "val200")
    assert all(isinstance(p, Path) and isinstance(y, int) for p, y in ds.samples)
    x, y = ds[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.min() < 0 < x.max()
    preloaded = VTabDataset(root, "clevr_count", "val200", img_size=24, preload=True)
    assert torch.equal(preloaded[7][0], ds[7][0]) and preloaded[7][1] == ds[7][1]
    assert VTabDataset(root, "clevr_count", "val200", img_size=24, num_classes=20).num_classes == 20


def test_vtab_transform_is_the_official_recipe(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    with Image.open(root / "digits" / "images" / "train_00000.png") as image:
        image = image.convert("RGB")
    official = T.Compose([T.Resize((40, 40), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(40),
                          T.ToTensor(), T.Normalize(0.5, 0.5)])
    torch.testing.assert_close(vtab_transform(40)(image), official(image), rtol=0, atol=1e-6)


def test_num_classes_from_vtab_table_and_spaces_in_paths(tmp_path: Path) -> None:
    write_task(tmp_path, "svhn", {"test": ["my images/a b.png 9"]}, ["my images/a b.png"], num_classes=None)
    ds = VTabDataset(tmp_path, "svhn", "test", img_size=8)
    assert ds.num_classes == 10 and ds.samples == [(tmp_path / "svhn" / "my images" / "a b.png", 9)]
    assert ds[0][0].shape == (3, 8, 8)


def test_unknown_task_without_meta_needs_num_classes(tmp_path: Path) -> None:
    write_task(tmp_path, "mine", {"test": ["a.png 0"]}, ["a.png"], num_classes=None)
    with pytest.raises(DataError, match="num_classes"):
        VTabDataset(tmp_path, "mine", "test")
    assert VTabDataset(tmp_path, "mine", "test", num_classes=3).num_classes == 3


@pytest.mark.parametrize("line, expected", [
    ("a.png", "expected 'relative/path/to/image <integer label>'"),
    ("a.png one", "label 'one' is not an integer"),
    ("a.png 4", r"label 4 is outside \[0, 4\)"),
    ("a.png -1", r"label -1 is outside \[0, 4\)"),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    write_task(tmp_path, "t", {"train800": ["a.png 0", line]}, ["a.png"])
    with pytest.raises(DataError, match=expected) as err:
        VTabDataset(tmp_path, "t", "train800")
    assert f"{tmp_path / 't' / 'train800.txt'}:2:" in str(err.value)


def test_missing_root_task_and_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        VTabDataset(tmp_path / "absent", "t", "test")
    assert str(tmp_path / "absent") in str(err.value)
    with pytest.raises(DataError, match="task folder .* does not exist"):
        VTabDataset(tmp_path, "t", "test")
    write_task(tmp_path, "t", {"train800": ["a.png 0"]}, ["a.png"])
    with pytest.raises(DataError, match=r"list file .*test\.txt does not exist"):
        VTabDataset(tmp_path, "t", "test")
    with pytest.raises(DataError, match="unknown split"):
        VTabDataset(tmp_path, "t", "train")


def test_missing_and_corrupt_images_fail_at_load_naming_the_file(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "t", {"test": ["a.png 0", "gone.png 1", "bad.png 2"]}, ["a.png"])
    (folder / "bad.png").write_bytes(b"not a png")
    ds = VTabDataset(tmp_path, "t", "test", img_size=8)
    assert ds[0][1] == 0
    with pytest.raises(DataError, match=r"test\.txt:2: cannot read image .*gone\.png"):
        ds[1]
    with pytest.raises(DataError, match=r"test\.txt:3: cannot read image .*bad\.png"):
        ds[2]
    with pytest.raises(DataError, match="gone.png"):
        VTabDataset(tmp_path, "t", "test", img_size=8, preload=True)


def test_check_vtab_root_lists_every_problem(tmp_path: Path) -> None:
    write_task(tmp_path, "good", good_lines(), GOOD_IMAGES)
    lines = good_lines()
    lines["train800"] = ["a.png 0", "broken-line", "b.png 9"]     # malformed + out of range
    lines["val200"] = ["missing.png 2"]                            # image does not exist
    del lines["test"]                                              # list file missing
    write_task(tmp_path, "bad", lines, GOOD_IMAGES)
    with pytest.raises(DataError) as err:
        check_vtab_root(tmp_path, ["good", "bad", "absent"])
    message = str(err.value)
    bad = tmp_path / "bad"
    for expected in (f"{bad / 'train800.txt'}:2: expected", f"{bad / 'train800.txt'}:3: label 9 is outside",
                     f"{bad / 'val200.txt'}:1: image {bad / 'missing.png'} does not exist",
                     f"{bad / 'test.txt'}: list file does not exist",
                     f"{bad / 'train800val200.txt'}: should hold exactly the lines",
                     f"{tmp_path / 'absent'}: task folder does not exist"):
        assert expected in message
    assert "6 problem(s)" in message
    assert check_vtab_root(tmp_path, ["good"]) == {
        "good": {"train800": 2, "val200": 1, "train800val200": 3, "test": 1, "num_classes": 4, "classes_seen": 4}}
    with pytest.raises(DataError, match="does not exist"):
        check_vtab_root(tmp_path / "nowhere", ["good"])
