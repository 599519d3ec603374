"""The shared experiment schema, the paper preset, atomic I/O, and the one training entry point."""
from __future__ import annotations

import pytest
import torch

import dtl
from dtl.config import OVERRIDE_KEYS, ConfigError, ExperimentConfig, load_config
from dtl.experiment import run_task
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
    ({"training": {"lr": -1}}, "training.lr: expected a number > 0"),
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
    assert config.model.model_options() == {"kernel_size": 5}  # unset options: the method's defaults (beta 100)


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
    config.protocol.ensure_data()
    epochs = []
    run = run_task(config, "patterns", seed=7, hooks=[lambda end: epochs.append(end.metrics)])
    summary = run.summary()
    assert summary["task"] == "patterns" and summary["seed"] == 7 and summary["protocol"] == "val"
    assert 0.0 <= summary["val/accuracy"] <= 1.0 and "test/accuracy" not in summary
    assert len(epochs) == 3 and epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert summary["num_classes"] == run.model.head.out_features


WRONG = {"list": [1, 2], "mapping": {"a": 1}, "text": "x", "number": 3.5, "flag": True}


def wrong_values(field_type: str, name: str) -> list:
    """Values of the wrong type for a field (a flag or a number where text is wanted, text where a number is...)."""
    if name == "checkpoint":  # true, false or a path
        return [WRONG["list"], WRONG["number"]]
    if "dict" in field_type:
        return [WRONG["list"], WRONG["text"]]
    if "list" in field_type:
        return [WRONG["text"], WRONG["mapping"]]
    if "bool" in field_type and "str" not in field_type:
        return [WRONG["text"], WRONG["list"]]
    if "str" in field_type:
        return [WRONG["number"], WRONG["list"]]
    return [WRONG["text"], WRONG["list"], WRONG["mapping"]]  # numbers, and method options


def every_field():
    from dataclasses import fields

    from dtl.config import _SECTIONS

    for section, section_class in _SECTIONS.items():
        for field in fields(section_class):
            if field.name == "prefix_cache_dir" or field.name == "grad_clip":  # None or a value: below
                continue
            for value in wrong_values(str(field.type), field.name):
                yield section, field.name, value


@pytest.mark.parametrize("section, name, value", list(every_field()))
def test_every_field_rejects_a_wrong_type_in_one_line_naming_it(tmp_path, section, name, value):
    path = tmp_path / "params.yaml"
    import yaml

    path.write_text(yaml.safe_dump({section: {name: value}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and f"{section}.{name}" in message, message


@pytest.mark.parametrize("field, text, expected", [
    ("lr", "1e-4", 1e-4), ("min_lr", "1E-8", 1e-8), ("weight_decay", "5e-2", 0.05), ("label_smoothing", "1e-1", 0.1)])
def test_numbers_written_1e_4_are_numbers(tmp_path, field, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(f"training:\n  {field}: {text}\noverrides:\n  digits: {{{field}: {text}}}\n")
    config = load_config(path)
    assert getattr(config.training, field) == expected  # YAML 1.1 reads 1e-4 as text
    assert getattr(config.for_task("digits").training, field) == expected


def test_backbone_dependent_settings_fail_before_training_with_the_key(tmp_path):
    from dtl.experiment import check_run

    config = ExperimentConfig.from_dict({"model": {"checkpoint": False, "start_block": 99}})
    with pytest.raises(ConfigError, match="start_block must be in 0..11 for this backbone, got 99"):
        check_run(config, "digits", 800, 10)
    config = ExperimentConfig.from_dict({"model": {"checkpoint": False, "kernel_size": 16}})
    with pytest.raises(ConfigError, match="kernel_size=16 is too large for the smallest token grid.*use at most 15"):
        check_run(config, "digits", 800, 10)
    config = ExperimentConfig.from_dict({"model": {"checkpoint": False}, "overrides": {"digits": {"batch_size": 900}}})
    with pytest.raises(ConfigError, match="overrides.digits / training.batch_size: 900 is larger than the 800 images"):
        check_run(config, "digits", 800, 10)
    if not torch.cuda.is_available():
        config = ExperimentConfig.from_dict({"model": {"checkpoint": False}, "training": {"device": "cuda"}})
        with pytest.raises(ConfigError, match="training.device is 'cuda' but no CUDA device is available here"):
            check_run(config, "digits", 800, 10)
    check_run(ExperimentConfig.from_dict({"model": {"checkpoint": False}}), "digits", 800, 10)  # the default runs
    (tmp_path / "w.pth").write_text("not a checkpoint")  # a local weights file is read before any training
    config = ExperimentConfig.from_dict({"model": {"checkpoint": str(tmp_path / "w.pth")}})
    with pytest.raises(ConfigError, match=r"model.checkpoint: could not read checkpoint .*w\.pth"):
        check_run(config, "digits", 800, 10)
