"""The shared experiment schema, the paper preset, atomic I/O, and the one training entry point."""
from __future__ import annotations

import pytest
import torch

import dtl
from dtl.config import OVERRIDE_KEYS, ConfigError, ExperimentConfig, load_config
from dtl.experiment import ensure_data, run_task
from dtl.io import load_trainable, save_trainable, write_json
from dtl.presets import PAPER_COMMON, paper_overrides


def test_defaults_validate_and_overrides_merge_per_task():
    config = ExperimentConfig.from_dict({"training": {"lr": 0.001},
                                         "overrides": {"dsprites_loc": {"lr": 0.004, "kernel_size": 5}}})
    task = config.for_task("dsprites_loc")
    assert task.training.lr == 0.004 and task.model.kernel_size == 5
    assert config.for_task("digits").training.lr == 0.001  # tasks without overrides keep the globals
    assert config.training.lr == 0.001  # the original is not mutated


@pytest.mark.parametrize("raw,message", [
    ({"model": {"rnk": 2}}, "model: unknown key\\(s\\) rnk; allowed: .*rank"),
    ({"model": {"method": "prompt"}}, "model.method: expected one of dtl, dtl_plus"),
    ({"model": {"rank": 0}}, "model.rank: expected null or an integer >= 1"),
    ({"model": {"drop_path": 1.5}}, "model.drop_path: expected a number in \\[0, 1\\)"),
    ({"training": {"lr": -1}}, "training.lr: expected a number >= 0"),
    ({"data": {"source": "imagenet"}}, "data.source: expected one of synthetic, vtab1k"),
    ({"data": {"tasks": []}}, "data.tasks: expected a non-empty list"),
    ({"evaluation": {"protocol": "test"}}, "evaluation.protocol: expected one of final, val"),
    ({"overrides": {"cifar": {"learning_rate": 1}}}, "overrides.cifar: unknown key\\(s\\) learning_rate"),
    ({"overrides": {"cifar": {"lr": "fast"}}}, "overrides.cifar: .*lr"),
    ({"sweep": {}}, "unknown top-level key\\(s\\) sweep"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw, where="params.yaml")


def test_load_config_reports_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  rank: [1\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(path)
    path.write_text("model:\n  rank: 4\n")
    assert load_config(path).model.rank == 4
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_config(tmp_path / "missing.yaml")


def test_model_options_pass_only_what_the_method_takes():
    config = ExperimentConfig.from_dict({"model": {"method": "lora", "rank": 8, "kernel_size": 3, "start_block": 4}})
    assert config.model.model_options() == {"rank": 8}
    config = ExperimentConfig.from_dict({"model": {"method": "dtl_plus", "kernel_size": 5}})
    assert config.model.model_options() == {"beta": 100.0, "kernel_size": 5}


def test_paper_preset_matches_the_table_and_validates():
    vit = paper_overrides("vit", "dtl_plus")
    assert len(vit) == 19
    assert vit["resisc45"] == {"lr": 0.01, "drop_path": 0.1, "kernel_size": 3}
    assert paper_overrides("vit", "dtl")["dsprites_loc"] == {"lr": 0.01, "drop_path": 0.0}
    assert paper_overrides("swin", "dtl_plus")["svhn"] == {"lr": 0.005, "drop_path": 0.5}
    assert PAPER_COMMON["swin"]["start_block"] == 14
    config = ExperimentConfig.from_dict({"overrides": vit})  # every entry is a valid override
    assert config.for_task("svhn").model.kernel_size == 5
    assert set(vit["cifar"]) <= set(OVERRIDE_KEYS)
    with pytest.raises(ValueError, match="no paper preset"):
        paper_overrides("vit", "lora")


def test_save_trainable_round_trips_only_trainable_weights(tmp_path):
    torch.manual_seed(0)
    model = dtl.create_model("vit_micro_patch4_32", "dtl_plus", num_classes=5)
    with torch.no_grad():
        for m in model.side_maps.values():
            m.up.weight.normal_()
    path = tmp_path / "out" / "trainable.safetensors"
    save_trainable(model, path)
    assert path.stat().st_size < 100_000  # kilobytes, not the backbone (1.3M params)
    torch.manual_seed(0)
    fresh = dtl.create_model("vit_micro_patch4_32", "dtl_plus", num_classes=5)
    load_trainable(fresh, path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), fresh.eval()(images))
    other = dtl.create_model("vit_micro_patch4_32", "dtl", num_classes=5)
    with pytest.raises(ValueError, match="does not match the model"):
        load_trainable(other, path)
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind


def test_write_json_is_atomic_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text().strip().startswith("{") and "0.5" in path.read_text()  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_run_task_end_to_end_on_a_synthetic_task(tmp_path):
    config = ExperimentConfig.from_dict({
        "data": {"root": str(tmp_path / "data"), "tasks": ["patterns"], "num_test": 64},
        "model": {"checkpoint": False, "method": "dtl_plus"},
        "training": {"epochs": 3, "warmup_epochs": 1, "cooldown_epochs": 0, "lr": 0.003, "batch_size": 64,
                     "progress": False},
        "evaluation": {"protocol": "val"},
    })
    ensure_data(config)
    epochs = []
    run = run_task(config, "patterns", seed=7, callbacks=[lambda epoch, metrics: epochs.append(metrics)])
    summary = run.summary()
    assert summary["task"] == "patterns" and summary["seed"] == 7 and summary["protocol"] == "val"
    assert 0.0 <= summary["val/accuracy"] <= 1.0 and "test/accuracy" not in summary
    assert len(epochs) == 3 and epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert summary["num_classes"] == run.model.head.out_features
