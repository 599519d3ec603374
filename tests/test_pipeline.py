"""The DVC pipeline: params validation, the sweep contract (sweeps/best.yaml), the report's group means, and
prepare -> train -> evaluate -> report end to end on a tiny synthetic task with a temporary MLflow store."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtl.config import ConfigError, read_best
from dtl.config import load_config as load_params
from pipeline import params as pipeline_params
from pipeline.params import check_dvc_entries, load_pipeline_settings
from sweeps.search_strategy import write_best

REPO = Path(__file__).resolve().parent.parent
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def params_file(tmp_path: Path, edit=None, name: str = "params.yaml") -> Path:
    raw = copy.deepcopy(COMMITTED)
    if edit:
        edit(raw)
    return write_yaml(tmp_path / name, raw)


# --------------------------------------------------------------------------------------------- params.yaml


def test_committed_params_and_best_load_and_cover_every_task():
    from dtl.data import SYNTHETIC_TASKS, VTAB_TASKS

    config = load_params(pipeline_params.DEFAULT_PARAMS, pipeline_params.DEFAULT_BEST)
    assert config.data.source == "synthetic" and config.model.checkpoint is True
    check_dvc_entries()  # every task of data.tasks has both templated params entries
    best = read_best(pipeline_params.DEFAULT_BEST)
    assert set(VTAB_TASKS) | set(SYNTHETIC_TASKS) <= set(best)
    assert load_pipeline_settings().mlflow_experiment


@pytest.mark.parametrize("method", ["dtl_plus", "dtl"])
def test_paper_params_files_are_the_presets_and_load(method):
    from dtl.presets import paper_overrides
    from pipeline.paper_params import PAPER_FILES, paper_params, render

    path = PAPER_FILES[method]
    assert path.read_text() == render(method), "regenerate with: python -m pipeline.paper_params"
    assert yaml.safe_load(path.read_text()) == paper_params(method)
    check_dvc_entries(path)  # 19 tasks, each with both templated entries
    config = load_params(path)
    assert config.model.backbone == "vit_base_patch16_224.orig_in21k" and config.training.epochs == 110
    for task, values in paper_overrides("vit", method).items():
        tuned = config.for_task(task)
        assert (tuned.training.lr, tuned.model.drop_path) == (values["lr"], values["drop_path"])
        assert tuned.model.kernel_size == values.get("kernel_size")


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["model"].update(rnak=4), ["model", "rnak", "allowed"]),
    (lambda p: p.update(trainig={}), ["trainig", "allowed"]),
    (lambda p: p["model"].update(method="prompt"), ["model.method", "dtl_plus", "'prompt'"]),
    (lambda p: p["model"].update(drop_path=1.5), ["model.drop_path", "[0, 1)"]),
    (lambda p: p["training"].update(lr=-1), ["training.lr", "a number", "-1"]),
    (lambda p: p["evaluation"].update(protocol="test"), ["evaluation.protocol", "final, val"]),
    (lambda p: p["data"].update(source="imagenet"), ["data.source", "synthetic, vtab1k"]),
    (lambda p: p["overrides"].update(digits={"lrr": 0.1}), ["overrides.digits", "lrr", "allowed"]),
    (lambda p: p["overrides"].update(digits={"kernel_size": 0}), ["overrides.digits", "model.kernel_size"]),
    (lambda p: p["overrides"].update(digits={"epochs": 0}), ["overrides.digits", "training.epochs"]),
    (lambda p: p["mlflow"].update(experimnt="x"), ["mlflow", "experimnt", "allowed: experiment"]),
])
def test_params_errors_name_the_key_and_what_is_allowed(tmp_path, edit, expected):
    path = params_file(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        load_params(path, tmp_path / "no-best.yaml")
        load_pipeline_settings(path)  # the pipeline's own section
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, message


def test_best_yaml_errors_name_the_file_and_task(tmp_path):
    path = params_file(tmp_path)
    best = write_yaml(tmp_path / "best.yaml", {"digits": {"lr": 0.01, "ranks": 4}})
    with pytest.raises(ConfigError, match=r"best\.yaml: digits: unknown key\(s\) ranks; allowed: .*rank"):
        load_params(path, best)
    write_yaml(best, {"digits": {"drop_path": 2.0}})
    with pytest.raises(ConfigError, match=r"best\.yaml: digits: model\.drop_path: expected a number in \[0, 1\)"):
        load_params(path, best)
    write_yaml(best, {"digits": [1, 2]})
    with pytest.raises(ConfigError, match=r"best\.yaml: digits: expected a mapping"):
        load_params(path, best)
    write_yaml(best, ["digits"])
    with pytest.raises(ConfigError, match=r"best\.yaml: expected a mapping of task"):
        load_params(path, best)


def test_precedence_globals_then_params_overrides_then_sweep_winners(tmp_path):
    path = params_file(tmp_path, lambda p: p["overrides"].update(digits={"lr": 0.01, "drop_path": 0.1},
                                                                  patterns={"kernel_size": 5}))
    best = write_yaml(tmp_path / "best.yaml", {"digits": {"lr": 0.002, "rank": 4}, "patterns": {}})
    merged = load_params(path, best)
    assert merged.overrides["digits"] == {"lr": 0.002, "drop_path": 0.1, "rank": 4}
    digits = load_params(path, best, task="digits")
    assert (digits.training.lr, digits.model.drop_path, digits.model.rank) == (0.002, 0.1, 4)
    assert digits.training.epochs == COMMITTED["training"]["epochs"]  # untouched globals stay
    patterns = load_params(path, best, task="patterns")
    assert patterns.model.kernel_size == 5 and patterns.training.lr == COMMITTED["training"]["lr"]
    assert load_params(path, None, task="digits").training.lr == 0.01  # best_path=None ignores the sweeps


def test_check_dvc_entries_names_missing_templated_keys(tmp_path):
    path = params_file(tmp_path, lambda p: p["overrides"].pop("digits"))
    best = write_yaml(tmp_path / "best.yaml", {t: {} for t in COMMITTED["data"]["tasks"] if t != "patterns"})
    with pytest.raises(ConfigError) as err:
        check_dvc_entries(path, best)
    assert "overrides: {digits: {}}" in str(err.value) and "add 'patterns: {}'" in str(err.value)


def test_write_best_replaces_only_given_tasks_and_validates(tmp_path):
    path = params_file(tmp_path)
    best = write_yaml(tmp_path / "best.yaml", {"digits": {}, "patterns": {"lr": 0.004}})
    write_best(best, {"digits": {"lr": 0.003, "method": "dtl", "rank": 4}}, header="written by a test\nclear: {}",
               params_path=path)
    text = best.read_text()
    assert text.startswith("# written by a test\n# clear: {}\n")
    assert read_best(best) == {"digits": {"lr": 0.003, "method": "dtl", "rank": 4}, "patterns": {"lr": 0.004}}
    with pytest.raises(ConfigError, match="digits: unknown key"):
        write_best(best, {"digits": {"learning_rate": 0.1}}, params_path=path)
    with pytest.raises(ConfigError, match="digits: training.lr"):
        write_best(best, {"digits": {"lr": 0}}, params_path=path)
    assert read_best(best)["digits"]["lr"] == 0.003  # a rejected update leaves the file as it was


WRITER = """
import os, sys, time
from sweeps.search_strategy import write_best
path, prefix = sys.argv[1], sys.argv[2]
open(path + "." + prefix + ".ready", "w").close()
while not os.path.exists(path + ".go"):  # both start writing at once
    time.sleep(0.01)
for step in range(1, 11):
    write_best(path, {f"{prefix}{i}": {"lr": step * 1e-4, "rank": i + 1} for i in range(100)}, header="x" * 2000)
"""


def test_two_writers_of_best_yaml_keep_each_others_entries_and_a_reader_never_sees_half_a_file(tmp_path):
    best = write_yaml(tmp_path / "best.yaml", {"digits": {}})
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(best), prefix], env=env) for prefix in "ab"]
    while not all(Path(f"{best}.{prefix}.ready").exists() for prefix in "ab"):
        assert all(w.poll() is None for w in writers)
    Path(f"{best}.go").touch()
    reads = 0
    while any(w.poll() is None for w in writers):  # as dvc repro reads it while sweeps write it
        entries = read_best(best)  # raises on a truncated file
        for prefix in "ab":
            mine = [entries[k] for k in entries if k.startswith(prefix)]
            assert len(mine) in (0, 100), len(mine)  # a writer's update lands whole
            assert len({e["lr"] for e in mine}) <= 1
        reads += 1
    assert [w.returncode for w in writers] == [0, 0] and reads > 1
    final = read_best(best)
    assert final["digits"] == {} and len(final) == 201  # neither writer lost the other's entries
    assert {final[f"{p}{i}"]["lr"] for p in "ab" for i in range(100)} == {10e-4}


def test_write_best_turns_numpy_scalars_into_plain_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    best = tmp_path / "best.yaml"
    write_best(best, {"digits": {"lr": np.float64(0.001), "rank": np.int64(3)}}, params_path=None)
    assert "!!" not in best.read_text()
    assert read_best(best) == {"digits": {"lr": 0.001, "rank": 3}}


# --------------------------------------------------------------------------------------------------- report


def write_fake_evaluation(outputs: Path, task: str, group: str, accuracy: float) -> None:
    """What evaluate@<task> writes: the numbers (DVC metrics) and what they describe."""
    folder = outputs / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.json").write_text(json.dumps({
        "test_accuracy": accuracy, "test_accuracy_std": 0.0, "test_loss": 1.0, "trainable_params": 1000,
        "trainable_params_excl_head": 900, "images_per_s": 100.0, "train_time_s": 1.0, "peak_memory_mb": 500.0,
        "num_seeds": 1}))
    (folder / f"{task}.details.json").write_text(json.dumps({
        "task": task, "group": group, "method": "dtl_plus", "memory_kind": "process_rss", "mlflow_run_id": None}))


def test_report_group_means_match_hand_computed_values(tmp_path, monkeypatch):
    from pipeline import report as report_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    table = {"cifar": ("Natural", 0.70), "svhn": ("Natural", 0.90), "eurosat": ("Specialized", 0.95),
             "clevr_count": ("Structured", 0.60), "dsprites_loc": ("Structured", 0.80),
             "kitti": ("Structured", 0.70)}
    outputs = tmp_path / "outputs"
    for task, (group, accuracy) in table.items():
        write_fake_evaluation(outputs, task, group, accuracy)
    path = params_file(tmp_path, lambda p: (p["data"].update(source="vtab1k", tasks=list(table)),
                                            p.update(overrides={t: {} for t in table})))
    report = report_stage.make_report(path, tmp_path / "no-best.yaml", outputs)

    test = report["test"]
    assert test["groups"] == pytest.approx({"Natural": 0.80, "Specialized": 0.95, "Structured": 0.70})
    assert list(test["groups"]) == ["Natural", "Specialized", "Structured"]
    assert test["group_mean"] == pytest.approx((0.80 + 0.95 + 0.70) / 3)
    assert test["task_mean"] == pytest.approx(sum(a for _, a in table.values()) / 6)
    assert test["tasks_per_group"] == {"Natural": 2, "Specialized": 1, "Structured": 3}
    markdown = (outputs / "report.md").read_text()
    assert "| Structured mean (3 tasks) | 70.0 |" in markdown and "**81.7**" in markdown
    metrics = json.loads((outputs / "report.json").read_text())
    assert metrics["test"]["group_mean"] == pytest.approx(0.8166666) and metrics["test"]["Natural"] == pytest.approx(0.80)
    assert all(isinstance(v, (int, float)) for v in metrics["test"].values())  # DVC metrics: numbers only
    assert (outputs / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((outputs.parent / "plots" / "tasks.json").read_text())  # git-tracked, next to outputs/
    assert [r["task"] for r in rows] == list(table) and rows[0]["test_acc"] == 0.70

    import mlflow

    runs = mlflow.search_runs(experiment_names=[COMMITTED["mlflow"]["experiment"]], output_format="list")
    assert [r.data.tags["dvc_stage"] for r in runs] == ["report"]
    assert runs[0].data.metrics["test_group_mean"] == pytest.approx(0.8166666)


def test_report_fails_clearly_when_a_task_was_not_evaluated(tmp_path, capsys):
    from pipeline import report as report_stage

    path = params_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report_stage.main(["--params", str(path), "--outputs", str(tmp_path / "outputs")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "report failed" in err and "evaluate/dsprites_loc.json is missing (written by evaluate@dsprites_loc)" in err


def test_a_terminated_stage_removes_its_temporary_output_and_keeps_the_old_one(tmp_path, capsys):
    import os
    import signal

    from dtl.io import atomic_dir
    from pipeline.stage import run_stage

    target = tmp_path / "outputs" / "train" / "digits"
    target.mkdir(parents=True)
    (target / "seed42.safetensors").write_text("previous result")

    def killed_mid_write():
        with atomic_dir(target) as staging:
            (staging / "seed42.safetensors").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)  # what a killed `dvc repro` sends its stage

    with pytest.raises(SystemExit) as exit_info:
        run_stage("train@digits", killed_mid_write)
    assert exit_info.value.code == 130 and "train@digits interrupted" in capsys.readouterr().err
    assert (target / "seed42.safetensors").read_text() == "previous result"
    assert [p.name for p in target.parent.iterdir()] == ["digits"]  # no staging folder left behind
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ------------------------------------------------------------------------------------------ prepare (vtab1k)


def test_prepare_on_a_broken_vtab_folder_lists_every_problem_and_keeps_old_outputs(tmp_path, capsys):
    from pipeline import prepare

    root = tmp_path / "vtab"
    (root / "eurosat" / "images").mkdir(parents=True)
    for split in ("train800", "val200", "train800val200"):
        (root / "eurosat" / f"{split}.txt").write_text("images/a.jpg 3\n")
    (root / "dtd").mkdir()
    outputs = tmp_path / "outputs"
    (outputs / "prepare").mkdir(parents=True)
    (outputs / "prepare" / "manifest.json").write_text('{"old": true}')
    path = params_file(tmp_path, lambda p: (p["data"].update(source="vtab1k", root=str(root),
                                                             tasks=["eurosat", "dtd"]),
                                            p.update(overrides={"eurosat": {}, "dtd": {}})))
    best = write_yaml(tmp_path / "best.yaml", {"eurosat": {}, "dtd": {}})
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--params", str(path), "--best", str(best), "--outputs", str(outputs)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "prepare failed" in err
    assert "eurosat/test.txt" in err and "images/a.jpg does not exist" in err and "dtd/train800.txt" in err
    assert (outputs / "prepare" / "manifest.json").read_text() == '{"old": true}'


def vtab_task(root: Path, task: str = "my_task", modes=("RGB",), name: str = "img {i}.png", crlf: bool = False,
              num_classes: int = 3) -> Path:
    """A small VTAB-format task folder: images in several PIL modes, paths with a space, optional CRLF lines."""
    import numpy as np
    from PIL import Image

    folder = root / task
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        mode = modes[i % len(modes)]
        image = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert(mode)
        path = folder / "images" / name.format(i=i)
        image.save(path.with_suffix(".jpg") if mode == "CMYK" else path)
        lines.append(f"images/{(path.with_suffix('.jpg') if mode == 'CMYK' else path).name} {i % num_classes}")
    end = "\r\n" if crlf else "\n"
    for split, chosen in (("train800", lines[:4]), ("val200", lines[4:6]), ("train800val200", lines[:6]),
                          ("test", lines[6:])):
        (folder / f"{split}.txt").write_text(end.join(chosen) + end, newline="")
    return folder


def prepare_vtab(tmp_path: Path, root: Path, task: str = "my_task", **data) -> tuple[int, str]:
    from pipeline import prepare

    path = params_file(tmp_path, lambda p: (p["data"].update(source="vtab1k", root=str(root), tasks=[task], **data),
                                            p["training"].update(batch_size=2),
                                            p.update(overrides={task: {}})))
    best = write_yaml(tmp_path / "best.yaml", {task: {}})
    try:
        prepare.main(["--params", str(path), "--best", str(best), "--outputs", str(tmp_path / "outputs")])
    except SystemExit as exit_info:
        return exit_info.code, ""
    return 0, ""


def test_prepare_accepts_cmyk_rgba_palette_and_grey_images_paths_with_spaces_and_crlf_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path / "cache" / "prefix"))
    root = tmp_path / "vtab"
    vtab_task(root, modes=("CMYK", "RGBA", "P", "L", "RGB"), crlf=True)
    code, _ = prepare_vtab(tmp_path, root, num_classes={"my_task": 3})
    assert code == 0
    record = json.loads((tmp_path / "outputs" / "prepare" / "my_task.json").read_text())
    assert record["images"] == {"train800": 4, "val200": 2, "train800val200": 6, "test": 2}
    checked = list((tmp_path / "cache" / "checked_images").glob("*.json"))
    assert len(checked) == 1 and len(json.loads(checked[0].read_text())) == 8  # each image decoded once


@pytest.mark.parametrize("defect, expected", [
    ("missing list", "my_task/test.txt: list file does not exist"),
    ("no label", "my_task/train800.txt:2: expected 'relative/path/to/image <integer label>'"),
    ("label out of range", "my_task/train800.txt:1: label 7 is outside [0, 3)"),
    ("missing image", "does not exist"),
    ("truncated jpeg", "cannot read image"),
    ("not an image", "cannot read image"),
    ("no class count", "data.num_classes: {my_task: <classes>}"),
])
def test_prepare_names_each_defect_of_a_vtab_folder_without_a_traceback(tmp_path, capsys, monkeypatch, defect,
                                                                        expected):
    monkeypatch.setenv("DTL_CACHE_DIR", str(tmp_path / "cache" / "prefix"))
    root = tmp_path / "vtab"
    folder = vtab_task(root, modes=("RGB",), name="img{i}.jpg")
    data = {} if defect == "no class count" else {"num_classes": {"my_task": 3}}
    train = folder / "train800.txt"
    if defect == "missing list":
        (folder / "test.txt").unlink()
    elif defect == "no label":
        train.write_text(train.read_text().replace("images/img1.jpg 1", "images/img1.jpg"))
    elif defect == "label out of range":
        train.write_text(train.read_text().replace("images/img0.jpg 0", "images/img0.jpg 7"))
    elif defect == "missing image":
        (folder / "images" / "img2.jpg").unlink()
    elif defect == "truncated jpeg":
        data_bytes = (folder / "images" / "img3.jpg").read_bytes()
        (folder / "images" / "img3.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    elif defect == "not an image":
        (folder / "images" / "img3.jpg").write_text("this is not a JPEG")
    code, _ = prepare_vtab(tmp_path, root, **data)
    err = capsys.readouterr().err
    assert code == 1 and "prepare failed" in err and expected in err and "Traceback" not in err, err
    if defect in ("truncated jpeg", "not an image"):
        assert "my_task/train800.txt:4: cannot read image" in err  # the list file and line that name it


def test_prepare_never_overwrites_a_folder_the_generator_did_not_write(tmp_path, capsys):
    from pipeline import prepare

    root = tmp_path / "data"
    (root / "digits").mkdir(parents=True)
    (root / "digits" / "precious.txt").write_text("mine")
    path = params_file(tmp_path, lambda p: (p["data"].update(root=str(root), tasks=["digits"]),
                                            p.update(overrides={"digits": {}})))
    best = write_yaml(tmp_path / "best.yaml", {"digits": {}})
    with pytest.raises(SystemExit):
        prepare.main(["--params", str(path), "--best", str(best), "--outputs", str(tmp_path / "outputs")])
    assert "was not written by the synthetic generator" in capsys.readouterr().err
    assert (root / "digits" / "precious.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ stages end to end


@pytest.fixture()
def tiny_pipeline(tmp_path, monkeypatch):
    """params for one tiny synthetic task: 50 test images, 2 epochs, random-init backbone (runs anywhere)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    def edit(p):
        p["data"].update(root=str(tmp_path / "data"), tasks=["digits"], num_test=50)
        p["model"].update(checkpoint=False)
        p["training"].update(epochs=2, warmup_epochs=1, batch_size=32, eval_batch_size=50,
                             prefix_cache_dir=str(tmp_path / "prefix-cache"))
        p["overrides"] = {"digits": {"lr": 0.01}}
        p["mlflow"] = {"experiment": "pipeline-test"}

    path = params_file(tmp_path, edit)
    best = write_yaml(tmp_path / "best.yaml", {"digits": {"kernel_size": 5}})
    return path, best, tmp_path / "outputs"


def shrink_task(folder: Path, train: int, val: int) -> None:
    """Keep the first lines of the list files (a VTAB-format task small enough to train in seconds)."""
    train_lines = (folder / "train800.txt").read_text().splitlines(keepends=True)[:train]
    val_lines = (folder / "val200.txt").read_text().splitlines(keepends=True)[:val]
    (folder / "train800.txt").write_text("".join(train_lines))
    (folder / "val200.txt").write_text("".join(val_lines))
    (folder / "train800val200.txt").write_text("".join(train_lines + val_lines))


def test_prepare_train_evaluate_report_on_a_tiny_task(tiny_pipeline):
    import mlflow
    from safetensors.torch import load_file

    from pipeline import evaluate, prepare, report, train

    path, best, outputs = tiny_pipeline
    common = ["--params", str(path), "--best", str(best), "--outputs", str(outputs)]
    prepare.main(common)  # synthetic: generates the task
    record = json.loads((outputs / "prepare" / "digits.json").read_text())
    assert record["images"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 50}
    assert record["num_classes"] == 10 and record["group"] == "Natural" and record["classes_seen"] == 10

    # The same folder read as a (shrunken) VTAB-1K task: prepare re-checks it and the fingerprint changes.
    shrink_task(Path(yaml.safe_load(path.read_text())["data"]["root"]) / "digits", train=64, val=32)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["source"] = "vtab1k"
    write_yaml(path, raw)
    prepare.main(common)
    shrunk = json.loads((outputs / "prepare" / "digits.json").read_text())
    assert shrunk["images"]["train800val200"] == 96 and shrunk["fingerprint"] != record["fingerprint"]

    train.main(["digits", *common])
    train_dir = outputs / "train" / "digits"
    assert sorted(p.name for p in train_dir.iterdir()) == ["config.json", "history.tsv", "seed42.safetensors",
                                                           "summary.json"]
    weights = load_file(str(train_dir / "seed42.safetensors"))
    assert any(k.startswith("head") for k in weights) and not any("blocks" in k and "attn" in k for k in weights)
    assert (train_dir / "seed42.safetensors").stat().st_size < 100_000  # kilobytes, not the backbone
    config = json.loads((train_dir / "config.json").read_text())
    assert config["training"]["lr"] == 0.01 and config["model"]["kernel_size"] == 5  # override + sweep winner
    history = (outputs.parent / "plots" / "curves" / "digits.tsv").read_text().splitlines()
    assert history[0].split("\t") == ["epoch", "lr", "train_loss", "train_accuracy"] and len(history) == 3
    summary = json.loads((train_dir / "summary.json").read_text())
    trained_accuracy = summary["per_seed"][0]["test/accuracy"]

    evaluate.main(["digits", *common])
    metrics = json.loads((outputs / "evaluate" / "digits.json").read_text())
    assert metrics["test_accuracy"] == trained_accuracy  # the saved weights reproduce the trained model exactly
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["num_seeds"] == 1
    assert metrics["trainable_params"] == sum(t.numel() for t in weights.values())
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # DVC metrics: numbers only

    report.main(common)
    assert "| digits | Natural |" in (outputs / "report.md").read_text()

    runs = mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list")
    by_stage = {r.data.tags["dvc_stage"]: r for r in runs}
    assert set(by_stage) == {"train@digits", "evaluate@digits", "report"}  # one run per stage, its own duration
    run = by_stage["train@digits"]
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow"]["run_id"]
    evaluated = by_stage["evaluate@digits"]
    assert evaluated.data.tags["mlflow.parentRunId"] == run.info.run_id and evaluated.info.status == "FINISHED"
    assert evaluated.info.start_time >= run.info.end_time  # the train run does not stay open until evaluation
    assert evaluated.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    tags = run.data.tags
    assert (tags["task"], tags["data_source"], tags["method"]) == ("digits", "vtab1k", "dtl_plus")
    assert "git_commit" in tags and tags["report_run_id"] == by_stage["report"].info.run_id
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}  # the UI's Dataset column
    assert set(inputs) == {"digits/train800val200"} and inputs["digits/train800val200"].tags[0].value == "train"
    assert {d.dataset.name for d in evaluated.inputs.dataset_inputs} == {"digits/test"}
    assert run.data.params["training.lr"] == "0.01" and run.data.params["model.kernel_size"] == "5"
    assert run.data.metrics["eval_test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    artifacts = {a.path for folder in ("train", "report") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"train/seed42.safetensors", "train/summary.json", "report/report.md"} <= artifacts
    assert {a.path for a in client.list_artifacts(evaluated.info.run_id, "evaluate")} == {
        "evaluate/digits.json", "evaluate/digits.details.json"}


def test_two_seeds_and_the_val_protocol(tiny_pipeline):
    """protocol val: train on train800, score val200 (and test); two seeds: child runs and a mean."""
    import mlflow

    from pipeline import evaluate, prepare, train

    path, best, outputs = tiny_pipeline
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"].update(seeds=[1, 2], protocol="val")
    raw["training"].update(epochs=1, warmup_epochs=0)
    write_yaml(path, raw)
    common = ["--params", str(path), "--best", str(best), "--outputs", str(outputs)]
    prepare.main(common)
    shrink_task(Path(raw["data"]["root"]) / "digits", train=32, val=8)
    raw["data"]["source"] = "vtab1k"
    write_yaml(path, raw)
    prepare.main(common)
    train.main(["digits", *common])
    evaluate.main(["digits", *common])
    assert {p.name for p in (outputs / "train" / "digits").glob("*.safetensors")} == {"seed1.safetensors",
                                                                                      "seed2.safetensors"}
    details = json.loads((outputs / "evaluate" / "digits.details.json").read_text())
    accuracies = [s["test_accuracy"] for s in details["per_seed"]]
    metrics = json.loads((outputs / "evaluate" / "digits.json").read_text())
    assert metrics["num_seeds"] == 2 and metrics["test_accuracy"] == pytest.approx(sum(accuracies) / 2)
    summary = json.loads((outputs / "train" / "digits" / "summary.json").read_text())
    assert [s["val/accuracy"] for s in summary["per_seed"]] == [s["val_accuracy"] for s in details["per_seed"]]
    assert "test/accuracy" not in summary["per_seed"][0]  # the test split is not looked at while training
    runs = mlflow.search_runs(experiment_names=["pipeline-test"], output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags["dvc_stage"] == "train@digits"]  # the seeds (the evaluate run is a child too)
    assert sorted(r.data.tags["seed"] for r in children) == ["1", "2"]
    assert all(r.info.status == "FINISHED" and "train_loss" in r.data.metrics for r in children)


def test_train_of_a_task_outside_data_tasks_fails_clearly(tiny_pipeline, capsys):
    from pipeline import train

    path, best, outputs = tiny_pipeline
    with pytest.raises(SystemExit):
        train.main(["cifar", "--params", str(path), "--best", str(best), "--outputs", str(outputs)])
    assert "task 'cifar' is not in data.tasks (digits)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ dvc repro


class RepoCopy:
    """A copy of the repository with a tiny params.yaml, its own DVC (and git, if asked) and MLflow store."""

    def __init__(self, tmp_path: Path, *, tasks=("digits", "patterns"), epochs: int = 1, git: bool = False):
        self.tmp = tmp_path
        self.work = tmp_path / "repo"
        self.work.mkdir()
        for name in ("dvc.yaml", ".dvcignore", "pyproject.toml", ".gitignore"):
            shutil.copy(REPO / name, self.work / name)
        for folder in ("dtl", "pipeline", "sweeps", "tracking"):
            shutil.copytree(REPO / folder, self.work / folder, ignore=shutil.ignore_patterns("__pycache__"))
        raw = copy.deepcopy(COMMITTED)
        raw["data"].update(tasks=list(tasks), num_test=64)
        raw["training"].update(epochs=epochs, warmup_epochs=0, prefix_cache_dir=str(tmp_path / "prefix-cache"))
        raw["model"]["checkpoint"] = (REPO / "dtl/weights/vit_micro_patch4_32.safetensors").is_file()
        raw["overrides"] = {task: {} for task in tasks}
        write_yaml(self.work / "params.yaml", raw)
        write_yaml(self.work / "sweeps" / "best.yaml", {task: {} for task in tasks})
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DTL_PYTHON": sys.executable,
                    "DTL_CACHE_DIR": str(tmp_path / "prefix-cache"),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{self.work}/mlflow.db",
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@t"}
        self.dvc_path = str(Path(sys.executable).parent / "dvc")
        if not (self.work / "dtl/weights/vit_micro_patch4_32.safetensors").is_file():
            (self.work / "dtl/weights").mkdir(exist_ok=True)
            (self.work / "dtl/weights/vit_micro_patch4_32.safetensors").write_bytes(b"placeholder: random-init run")
        if git:
            for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
                subprocess.run(["git", *args], cwd=self.work, env=self.env, check=True, capture_output=True)
            self.dvc("init", "-q")
            subprocess.run(["git", "commit", "-qam", "dvc init"], cwd=self.work, env=self.env, check=True,
                           capture_output=True)
        else:
            self.dvc("init", "--no-scm")

    def dvc(self, *args: str, timeout: float = 900, stderr: bool = False) -> str:
        """Run DVC here; its stdout (and, with ``stderr``, the stages' stderr after it)."""
        out = subprocess.run([self.dvc_path, *args], cwd=self.work, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr if stderr else out.stdout

    def runs(self) -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("dtl-pipeline")
        return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_noop(tmp_path):
    """A copy of the repository with a tiny params.yaml: `dvc repro` runs every stage, then does nothing."""
    repo = RepoCopy(tmp_path)
    repo.dvc("repro")
    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    text = json.dumps(shown)
    assert "metrics/digits.json" in text and "metrics/patterns.json" in text and "metrics/summary.json" in text
    assert "test_acc" in text
    second = repo.dvc("repro")
    assert "didn't change" in second or "up to date" in second
    assert not any(f"Running stage '{s}" in second for s in ("prepare", "train", "evaluate", "report"))
    assert max(len(line) for line in repo.dvc("metrics", "show").splitlines()) <= 120  # fits a terminal
    check_plots_render_offline(repo)


def check_plots_render_offline(repo: RepoCopy) -> None:
    """`dvc plots show` with the shipped template: a page that loads nothing from the network, whose inline
    script defines vegaEmbed (run in node when there is one), and whose every chart renders with no network."""
    import re
    import shutil as sh

    import vl_convert

    from pipeline import plots_page

    plots_page.install(repo.work)
    repo.dvc("plots", "show")
    html = (repo.work / "dvc_plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html  # nothing fetched
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]
    assert len(specs) >= 5  # the curves of both tasks and the report's per-task plots
    for spec in specs:
        svg = vl_convert.vegalite_to_svg(spec)
        assert svg.startswith("<svg") and ("<path" in svg or "<text" in svg)
    if sh.which("node"):
        bundle = re.search(r'<script type="text/javascript">\n(.*?)\n    </script>', html, re.S).group(1)
        (repo.tmp / "bundle.js").write_text(bundle)
        # a browser's globals, no DOM: the bundle must load and define vegaEmbed without fetching anything
        probe = ("const vm = require('vm'); const ctx = {console, setTimeout, clearTimeout, setInterval, "
                 "clearInterval, structuredClone, URL, TextEncoder, TextDecoder}; ctx.window = ctx; ctx.self = ctx; "
                 "vm.createContext(ctx); vm.runInContext(require('fs').readFileSync(process.argv[1], 'utf8'), ctx); "
                 "console.log(typeof ctx.vegaEmbed);")
        out = subprocess.run(["node", "-e", probe, str(repo.tmp / "bundle.js")], capture_output=True, text=True)
        assert out.stdout.strip() == "function", out.stderr[-500:]


@pytest.mark.slow
def test_sigterm_to_dvc_alone_stops_its_stage_and_leaves_nothing_behind(tmp_path):
    import os
    import signal
    import time

    import psutil

    repo = RepoCopy(tmp_path, tasks=("digits",), epochs=40)
    raw = yaml.safe_load((repo.work / "params.yaml").read_text())
    raw["training"]["prefix_cache"] = "off"  # a slow train stage: the whole backbone every epoch
    write_yaml(repo.work / "params.yaml", raw)
    log = open(tmp_path / "repro.log", "w")
    dvc = subprocess.Popen([repo.dvc_path, "repro"], cwd=repo.work, env=repo.env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)

    def stages() -> list:
        return [p for p in psutil.process_iter(["cmdline"])
                if "pipeline.train" in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]

    deadline = time.monotonic() + 300
    while not (stages() and "epoch 2/40" in (tmp_path / "repro.log").read_text()):
        assert dvc.poll() is None and time.monotonic() < deadline, (tmp_path / "repro.log").read_text()
        time.sleep(1)
    os.kill(dvc.pid, signal.SIGTERM)  # DVC alone, as a user or a job scheduler sends it
    dvc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while stages() and time.monotonic() < deadline:
        time.sleep(1)
    assert not stages(), "the train stage outlived dvc repro"
    assert not list((repo.work / "outputs" / "train").glob(".digits.*.tmp"))
    assert [r.info.status for r in repo.runs()] == ["KILLED"]

    raw["training"]["epochs"] = 2
    write_yaml(repo.work / "params.yaml", raw)
    repo.dvc("repro")
    runs = repo.runs()
    finished = sorted(r.data.tags["dvc_stage"] for r in runs if r.info.status == "FINISHED")
    assert finished == ["evaluate@digits", "report", "train@digits"]  # one per stage
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert not list((repo.work / "outputs" / "train").glob(".digits.*.tmp"))


@pytest.mark.slow
def test_experiments_compare_and_the_default_comes_back_from_the_cache(tmp_path):
    import time

    repo = RepoCopy(tmp_path, epochs=2, git=True)
    repo.dvc("exp", "run", "-n", "default")
    repo.dvc("exp", "run", "-n", "linear", "-S", "model.method=linear")
    shown = json.loads(repo.dvc("exp", "show", "--json"))
    accuracy = {}
    for entry in shown:
        for experiment in entry.get("experiments") or []:
            for rev in experiment["revs"]:
                metrics = rev["data"]["metrics"]
                accuracy[rev["name"]] = {path: data["data"]["test_acc"] for path, data in metrics.items()}
    assert set(accuracy) >= {"default", "linear"}
    for name in ("default", "linear"):
        assert {"metrics/digits.json", "metrics/patterns.json", "metrics/summary.json"} <= set(accuracy[name])
    started = time.perf_counter()
    repo.dvc("exp", "apply", "default")
    assert time.perf_counter() - started < 60
    assert yaml.safe_load((repo.work / "params.yaml").read_text())["model"]["method"] == "dtl_plus"
    status = repo.dvc("status")
    assert "up to date" in status or "changed" not in status, status
    assert json.loads((repo.work / "metrics" / "digits.json").read_text())["test_acc"] == \
        accuracy["default"]["metrics/digits.json"]
    assert max(len(line) for line in repo.dvc("metrics", "show").splitlines()) <= 120


@pytest.mark.slow
def test_dvc_repro_finishes_with_the_prefix_cache_in_memory_on_a_full_disk(tmp_path, small_disk):
    """``DTL_CACHE_DIR`` on a tmpfs far smaller than one cache entry: every stage finishes, one line says the
    cache lives in memory and why, and the folder holds no partial entry."""
    mount = small_disk("4m")
    repo = RepoCopy(tmp_path, tasks=("digits",))
    raw = yaml.safe_load((repo.work / "params.yaml").read_text())
    raw["training"]["prefix_cache_dir"] = str(mount)
    write_yaml(repo.work / "params.yaml", raw)
    repo.env["DTL_CACHE_DIR"] = str(mount)
    out = repo.dvc("repro", stderr=True)
    assert f"prefix cache memory: not enough free disk space in {mount}" in out or (
        f"prefix cache memory: cannot write {mount}" in out and "No space left on device" in out), out[-3000:]
    assert json.loads((repo.work / "metrics" / "digits.json").read_text())["test_acc"] > 0
    left = [p for p in mount.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not left, left  # no partial or temporary entry for a later run to read
