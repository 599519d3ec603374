"""The paper's other two experiments: the embedded few-shot and domain-shift suites, keep-best training, the
few-shot and domain-generalisation protocols, and their pipeline end to end (prepare -> train -> evaluate ->
report) on tiny settings with a temporary MLflow store."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from dtl.config import ConfigError, ExperimentConfig
from dtl.data.few_shot import SEEDS, SHOTS, check_few_shot_root, list_file

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def embedded(name: str) -> dict:
    return yaml.safe_load((REPO / "params" / name).read_text())


# ------------------------------------------------------------------------------------------------- the suites


def test_the_few_shot_suite_has_every_shot_and_seed_nested_and_disjoint_from_val_and_test(tmp_path):
    from dtl.data.synthetic_few_shot import POOL_PER_CLASS, SYNTHETIC_FEW_SHOT, VAL_PER_CLASS, generate_few_shot_suite

    assert generate_few_shot_suite(tmp_path, ["textures"], image_size=16, num_test=45) == {"textures": True}
    classes = SYNTHETIC_FEW_SHOT["textures"].num_classes
    manifest = check_few_shot_root(tmp_path, ["textures"], verify_images=True)["textures"]
    assert manifest["train"] == {str(k): {str(s): k * classes for s in SEEDS} for k in SHOTS}
    assert (manifest["val"], manifest["test"]) == (VAL_PER_CLASS * classes, 45)

    def lines(shots, seed):
        return set(list_file(tmp_path, "textures", "train", shots, seed).read_text().splitlines())

    for seed in SEEDS:  # a seed's k-shot images are among its 2k-shot ones, k per class
        for small, large in zip(SHOTS, SHOTS[1:]):
            assert lines(small, seed) < lines(large, seed)
        labels = [int(line.rsplit(" ", 1)[1]) for line in lines(4, seed)]
        assert sorted(labels) == sorted(list(range(classes)) * 4)
    assert lines(16, 0) != lines(16, 1)  # the seeds draw different images
    pool = set().union(*(lines(16, s) for s in SEEDS))
    assert len(pool) <= POOL_PER_CLASS * classes
    held_out = {line.split(" ")[0] for split in ("val", "test")
                for line in list_file(tmp_path, "textures", split).read_text().splitlines()}
    assert not held_out & {line.split(" ")[0] for line in pool}
    # the same settings again: kept; other settings and a folder that is not ours: refused without overwrite
    assert generate_few_shot_suite(tmp_path, ["textures"], image_size=16, num_test=45) == {"textures": False}
    with pytest.raises(FileExistsError):
        generate_few_shot_suite(tmp_path, ["textures"], image_size=16, num_test=46)
    with pytest.raises(KeyError, match="known: emblems, textures, silhouettes"):
        generate_few_shot_suite(tmp_path, ["birds"])


def test_the_domain_shift_suite_shares_the_source_classes_and_a_and_r_hold_subsets(tmp_path):
    from dtl.data.domain_generalization import check_domain_root
    from dtl.data.synthetic_domain_shift import DOMAINS, SUBSETS, generate_domain_shift_suite

    generate_domain_shift_suite(tmp_path, image_size=16, num_test=40)
    manifest = check_domain_root(tmp_path, "shapes", DOMAINS[1:], [16], SEEDS, verify_images=True)
    assert manifest["source"]["train"] == {"16": {str(s): 160 for s in SEEDS}} and manifest["source"]["val"] == 100
    seen = {t: entry["classes_seen"]["test"] for t, entry in manifest["targets"].items()}
    assert seen == {"shapes-v2": 10, "shapes-sketch": 10, "shapes-a": len(SUBSETS["shapes-a"]),
                    "shapes-r": len(SUBSETS["shapes-r"])}
    labels = {int(line.rsplit(" ", 1)[1]) for line in list_file(tmp_path, "shapes-a", "test").read_text().splitlines()}
    assert labels == set(SUBSETS["shapes-a"])
    (tmp_path / "shapes-v2" / "annotations" / "test_meta.list").write_text("images/test_00000.png 10\n")
    with pytest.raises(Exception, match=r"shapes-v2/annotations/test_meta\.list:1: label 10 is outside \[0, 10\)"):
        check_domain_root(tmp_path, "shapes", ["shapes-v2", "shapes-x"], [16], SEEDS)
    with pytest.raises(Exception, match=r"shapes-x: target domain folder does not exist"):
        check_domain_root(tmp_path, "shapes", ["shapes-x"], [16], SEEDS)


def test_randaugment_at_the_top_magnitude_gives_black_images_instead_of_failing():
    from PIL import Image

    from dtl.data.few_shot import _posterize, few_shot_transform

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert _posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)
    assert _posterize(image, 1).getpixel((0, 0)) == (128, 0, 0) and _posterize(image, 8) is image
    transform = few_shot_transform(16, training=True)
    torch.manual_seed(0)
    assert all(transform(image).shape == (3, 16, 16) for _ in range(200))  # every op, every magnitude


# ------------------------------------------------------------------------------------------------- the engine


def test_keep_best_puts_back_the_weights_of_the_best_validation_epoch():
    from dtl.config import TrainConfig
    from dtl.engine import evaluate, train_and_evaluate

    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 8), torch.randint(0, 4, (64,))
    val = TensorDataset(torch.randn(40, 8), torch.randint(0, 4, (40,)))
    model = nn.Sequential(nn.Linear(8, 4))
    config = TrainConfig(epochs=8, warmup_epochs=0, cooldown_epochs=0, lr=0.5, batch_size=16, eval_every=1,
                         progress=False, prefix_cache="off", seed=3)
    result = train_and_evaluate(model, TensorDataset(inputs, labels), {"val": val}, config, keep_best="val")
    scores = [h["val/accuracy"] for h in result.history]
    best = scores.index(max(scores))
    assert result.metrics["best_epoch"] == best and result.metrics["val/accuracy"] == max(scores)
    loader = torch.utils.data.DataLoader(val, batch_size=40)
    assert evaluate(model, loader, torch.device("cpu"), "fp32")["accuracy"] == max(scores)  # the model holds them
    assert result.per_image["val"].sum().item() == round(40 * max(scores)) and best < len(scores) - 1
    with pytest.raises(ValueError, match="keep_best='test' is not one of the evaluated splits"):
        train_and_evaluate(model, TensorDataset(inputs, labels), {"val": val}, config, keep_best="test")


# ------------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("name, edit, expected", [
    ("few_shot.yaml", lambda p: p["data"].update(source="vtab1k"),
     "evaluation.protocol: expected one of final, val for data.source"),
    ("few_shot.yaml", lambda p: p["evaluation"].update(protocol="final") or p["data"].update(source="few_shot"),
     "evaluation.protocol: expected one of few_shot for data.source few_shot"),
    ("few_shot.yaml", lambda p: p["data"].update(shots=[4, 4]),
     "data.shots: expected a non-empty list of distinct shot counts"),
    ("few_shot.yaml", lambda p: p["data"].update(shots=[0]),
     "data.shots: expected a non-empty list of distinct shot counts"),
    ("domain_generalization.yaml", lambda p: p["data"].update(shots=[4, 16]), "data.shots: expected one shot count"),
    ("domain_generalization.yaml", lambda p: p["data"].update(targets=[]),
     "data.targets: expected at least one target domain"),
    ("domain_generalization.yaml", lambda p: p["data"].update(tasks=["shapes", "shapes-v2"]),
     "data.tasks: expected one task, the source domain"),
])
def test_few_shot_and_domain_settings_are_checked_with_the_key_named(name, edit, expected):
    raw = embedded(name)
    raw.pop("mlflow")
    edit(raw)
    with pytest.raises(ConfigError, match=expected):
        ExperimentConfig.from_dict(raw)


@pytest.mark.parametrize("name", ["few_shot", "domain_generalization"])
def test_the_paper_transfer_params_files_are_generated_and_load(name):
    from pipeline.paper_params import TRANSFER, render_transfer, transfer_params

    path = TRANSFER[name].path
    assert path.read_text() == render_transfer(name), "regenerate with: python -m pipeline.paper_params"
    raw = transfer_params(name)
    assert yaml.safe_load(path.read_text()) == raw
    assert raw["model"]["backbone"] == "vit_base_patch16_224.orig_in21k" and raw["evaluation"]["seeds"] == [0, 1, 2]
    assert raw["training"]["eval_every"] == 10 and raw["training"]["epochs"] == 100


# ------------------------------------------------------------------------------------------------- the pipeline


def tiny(tmp_path: Path, monkeypatch, name: str, edit) -> tuple[list[str], Path]:
    from pipeline.params import check_dvc_entries

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    raw = embedded(name)
    raw["data"].update(root=str(tmp_path / "data"), image_size=16)
    raw["model"].update(checkpoint=False)
    raw["training"].update(epochs=2, warmup_epochs=1, eval_every=1, batch_size=4,
                           prefix_cache_dir=str(tmp_path / "prefix-cache"))
    raw["evaluation"]["seeds"] = [0, 1]
    raw["mlflow"] = {"experiment": f"{name}-test"}
    edit(raw)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({task: {} for task in raw["data"]["tasks"]}))
    check_dvc_entries(params, best)
    return ["--params", str(params), "--best", str(best), "--outputs", str(tmp_path / "outputs")], tmp_path / "outputs"


def test_few_shot_pipeline_trains_every_shot_and_seed_and_reports_accuracy_vs_shots(tmp_path, monkeypatch):
    import mlflow

    from pipeline import evaluate, prepare, report, train

    def edit(raw):
        raw["data"].update(tasks=["textures"], shots=[1, 2], num_test=27)
        raw["overrides"] = {"textures": {}}

    common, outputs = tiny(tmp_path, monkeypatch, "few_shot.yaml", edit)
    prepare.main(common)
    record = json.loads((outputs / "prepare" / "textures.json").read_text())
    assert record["images"]["train"] == {"1": {"0": 9, "1": 9}, "2": {"0": 18, "1": 18}}
    assert record["train_images"] == 9 and record["num_classes"] == 9 and record["group"] == "Few-shot"
    train.main(["textures", *common])
    train_dir = outputs / "train" / "textures"
    assert sorted(p.name for p in train_dir.glob("*.safetensors")) == [
        "shots1_seed0.safetensors", "shots1_seed1.safetensors", "shots2_seed0.safetensors", "shots2_seed1.safetensors"]
    summary = json.loads((train_dir / "summary.json").read_text())
    assert [(s["shots"], s["seed"]) for s in summary["per_seed"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(s["best_epoch"] in (0, 1) and "test/accuracy" not in s for s in summary["per_seed"])

    evaluate.main(["textures", *common])
    metrics = json.loads((outputs / "evaluate" / "textures.json").read_text())
    assert set(metrics["shots"]) == {"1", "2"} and metrics["shots"]["2"]["num_seeds"] == 2
    per_seed = json.loads((outputs / "evaluate" / "textures.details.json").read_text())["per_seed"]
    one_shot = [s["test_accuracy"] for s in per_seed if s["shots"] == 1]
    assert metrics["shots"]["1"]["test_accuracy"] == pytest.approx(sum(one_shot) / 2)
    assert metrics["test_accuracy"] == pytest.approx(
        (metrics["shots"]["1"]["test_accuracy"] + metrics["shots"]["2"]["test_accuracy"]) / 2)
    for s in per_seed:  # the saved (best) weights reproduce the val score measured when training ended
        trained = next(t for t in summary["per_seed"] if (t["shots"], t["seed"]) == (s["shots"], s["seed"]))
        assert s["val_accuracy"] == trained["val/accuracy"]
    short = json.loads((tmp_path / "metrics" / "textures.json").read_text())
    assert set(short) >= {"test_acc", "1shot", "2shot"}

    report.main(common)
    result = json.loads((outputs / "report.json").read_text())
    assert result["protocol"] == "few_shot"
    entry = result["few_shot"]["textures"]["2"]
    assert entry["mean"] == pytest.approx(metrics["shots"]["2"]["test_accuracy"]) and entry["seeds"] == 2
    assert entry["std"] == pytest.approx(metrics["shots"]["2"]["test_accuracy_std"])
    assert "| textures |" in (outputs / "report.md").read_text() and (outputs / "report.png").stat().st_size > 0
    plotted = json.loads((tmp_path / "plots" / "tasks.json").read_text())
    assert [row["task"] for row in plotted] == ["textures 1-shot", "textures 2-shot"]
    runs = mlflow.search_runs(experiment_names=["few_shot.yaml-test"], output_format="list")
    children = [r for r in runs if r.data.tags.get("shots")]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in runs)
    names = {d.dataset.name for r in children for d in r.inputs.dataset_inputs}
    assert "textures/train_meta.list.num_shot_2.seed_1" in names


def test_domain_generalization_pipeline_reports_every_target_and_masks_only_the_subsets(tmp_path, monkeypatch):
    from pipeline import evaluate, prepare, report, train

    def edit(raw):
        raw["data"].update(num_test=30)
        raw["evaluation"]["seeds"] = [0]

    common, outputs = tiny(tmp_path, monkeypatch, "domain_generalization.yaml", edit)
    prepare.main(common)
    record = json.loads((outputs / "prepare" / "shapes.json").read_text())
    assert record["targets"]["shapes-a"] == {"test": 30, "classes_seen": 5}
    train.main(["shapes", *common])
    evaluate.main(["shapes", *common])
    metrics = json.loads((outputs / "evaluate" / "shapes.json").read_text())
    assert {"val_accuracy", "test_accuracy", "shapes-sketch_accuracy", "shapes-a_accuracy_masked",
            "shapes-r_accuracy_masked"} <= set(metrics)
    assert "shapes-v2_accuracy_masked" not in metrics and "shapes-sketch_accuracy_masked" not in metrics
    report.main(common)
    result = json.loads((outputs / "report.json").read_text())
    dg = result["domain_generalization"]
    assert result["protocol"] == "domain_generalization" and set(dg["targets"]) == {
        "shapes-v2", "shapes-sketch", "shapes-a", "shapes-r"}
    assert dg["source"]["accuracy"] == metrics["test_accuracy"] and dg["source"]["shots"] == 16
    assert dg["targets"]["shapes-r"]["accuracy_masked"] == metrics["shapes-r_accuracy_masked"]
    assert "accuracy_masked" not in dg["targets"]["shapes-v2"] and dg["targets"]["shapes-a"]["classes"] == 5
    assert "| shapes-a | target | 5 |" in (outputs / "report.md").read_text()


def test_prepare_names_a_synthetic_task_of_the_wrong_suite(tmp_path, monkeypatch, capsys):
    from pipeline import prepare

    def edit(raw):
        raw["data"]["tasks"] = ["digits"]
        raw["overrides"] = {"digits": {}}

    common, _ = tiny(tmp_path, monkeypatch, "few_shot.yaml", edit)
    with pytest.raises(SystemExit):
        prepare.main(common)
    assert "data.tasks: digits are not synthetic few-shot data sets; with data.source: synthetic use some of " \
           "emblems, textures, silhouettes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the sweeps


def test_sweep_trials_select_on_val_meta_list_and_refuse_a_source_without_one(tmp_path):
    from sweeps.planning import SweepError, check_validation_list
    from sweeps.trainable import TrialSetup, trial_config

    raw = embedded("few_shot.yaml")
    raw.pop("mlflow")
    setup = TrialSetup(task="emblems", base_config=raw, training={}, seed=0, eval_every=10, threads=1,
                       tracking_uri="", experiment_id="", parent_run_id="", sweep_name="", space_name="")
    trial = trial_config(setup, {"lr": 0.01})
    assert trial.evaluation.protocol == "few_shot" and trial.training.seed == 0
    assert trial.protocol.scored_splits("emblems") == {"val": "val"}
    # ASHA's rungs fall on the pipeline's validation epochs (every 10 of 30, not 25% = 7): a trial keeps the
    # epoch the retrained winner will keep
    from sweeps.planning import plan_task
    from sweeps.space_file import load_space

    raw["data"]["root"] = str(tmp_path / "few_shot")
    plan = plan_task(ExperimentConfig.from_dict(raw), "emblems", load_space("dtl_plus"))
    assert (plan.epochs, plan.grace_epochs) == (30, 10)

    raw = copy.deepcopy(embedded("domain_generalization.yaml"))
    raw.pop("mlflow")
    raw["data"].update(root=str(tmp_path), image_size=16, num_test=10)
    config = ExperimentConfig.from_dict(raw)
    config.protocol.ensure_data()
    check_validation_list(config, "shapes")  # the embedded source has one
    (tmp_path / "shapes" / "annotations" / "val_meta.list").unlink()
    assert config.protocol.scored_splits("shapes") == {"test": "test"}  # the pipeline still runs (NOAH's way)
    with pytest.raises(SweepError, match=r"sweeps select on .*shapes/annotations/val_meta\.list, which does not exist"):
        check_validation_list(config, "shapes")
