"""Using a trained model: dtl.load_trained on the train stage's outputs, dtl.predict from the shell, and the
multi-task model whose DTL tasks share one frozen pass."""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import dtl
from dtl.multitask import MultiTaskModel
from dtl.trained import TrainedModelError, export_trained, load_trained

REPO = Path(__file__).resolve().parent.parent
MICRO = "vit_micro_patch4_32"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny synthetic task through prepare -> train -> evaluate (2 epochs, the shipped micro ViT)."""
    from pipeline import evaluate, prepare, train

    root = tmp_path_factory.mktemp("trained")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(root=str(root / "data"), tasks=["patterns"], num_test=60)
    raw["training"].update(epochs=2, warmup_epochs=1, batch_size=32, eval_batch_size=64,
                           prefix_cache_dir=str(root / "prefix-cache"))
    raw["overrides"] = {"patterns": {}}
    raw["mlflow"] = {"experiment": "trained-test"}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    best = root / "best.yaml"
    best.write_text("patterns: {}\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    common = ["--params", str(params), "--best", str(best), "--outputs", str(root / "outputs")]
    logged = StageLog()
    try:
        prepare.main(common)
        with logged:  # what the train stage's log would hold from MLflow: its warnings and log records
            train.main(["patterns", *common])
        evaluate.main(["patterns", *common])
        from tracking.outbox import flush_all

        flush_all(30)  # what the stage's process does as it exits: its last records (the version's tags) sent
    finally:
        mp.undo()
    metrics = json.loads((root / "outputs" / "evaluate" / "patterns.json").read_text())
    TRAIN_LOG[:] = logged.lines
    return root, root / "outputs" / "train" / "patterns", metrics


TRAIN_LOG: list[str] = []


class StageLog(logging.Handler):
    """The warnings and the MLflow log records of the code run inside it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._warnings = warnings.catch_warnings(record=True)

    def emit(self, record) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def __enter__(self) -> "StageLog":
        logging.getLogger("mlflow").addHandler(self)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self.lines += [f"{w.category.__name__}: {w.message}" for w in self._caught]
        self._warnings.__exit__(*exc)
        logging.getLogger("mlflow").removeHandler(self)


def test_load_trained_reproduces_the_evaluate_stages_test_accuracy(trained):
    from dtl.experiment import evaluate_model

    _, folder, metrics = trained
    model = load_trained(folder)
    info = model.trained
    assert not model.training and info.task == "patterns" and info.num_classes == 9 and info.image_size == 32
    scores = evaluate_model(info.config, info.task, model, info.num_classes, seed=info.seed,
                            splits={"test": "test"})
    assert scores["test_accuracy"] == metrics["test_accuracy"]


def test_a_weights_file_loads_on_its_own_and_an_export_round_trips(trained, tmp_path):
    _, folder, _ = trained
    model = load_trained(folder)
    alone = tmp_path / "copied.safetensors"
    shutil.copy(folder / "seed42.safetensors", alone)  # no config.json or summary.json beside it
    exported = export_trained(model, tmp_path / "exported.safetensors")
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        for path in (alone, exported):
            assert torch.equal(load_trained(path)(images), expected)


def test_predict_on_the_test_list_scores_what_evaluate_scored(trained, tmp_path):
    from dtl import predict

    root, folder, metrics = trained
    test_list = root / "data" / "patterns" / "test.txt"
    out = tmp_path / "predictions.csv"
    assert predict.main(["--model", str(folder), str(test_list), "--output", str(out), "--top-k", "3"]) == 0
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert header == ["path", "task", "label", "name", "score", "top1_label", "top1_score", "top2_label",
                      "top2_score", "top3_label", "top3_score"]
    truth = [int(line.rsplit(maxsplit=1)[1]) for line in test_list.read_text().splitlines() if line.strip()]
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert len(rows) == len(truth) == 60
    accuracy = sum(int(r["label"]) == t for r, t in zip(rows, truth)) / len(truth)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert all(float(r["top1_score"]) >= float(r["top2_score"]) >= float(r["top3_score"]) for r in rows)


def test_predict_skips_a_corrupt_image_names_it_and_exits_non_zero(trained, tmp_path, capsys):
    from PIL import Image

    from dtl import predict

    _, folder, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 20, 200)).save(images / f"ok{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "predictions.json"
    assert predict.main(["--model", str(folder), str(images), "--output", str(out), "--top-k", "20"]) == 1
    rows = json.loads(out.read_text())
    assert [Path(r["path"]).name for r in rows] == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(r["task"] == "patterns" and r["name"] == str(r["label"]) for r in rows)
    assert len(rows[0]) == 5 + 2 * 9  # top-k capped at the task's 9 classes
    err = capsys.readouterr().err
    assert f"skipped {images / 'broken.png'}" in err and "skipped 1 unreadable image" in err


def test_predict_errors_are_one_line(trained, tmp_path, capsys):
    from dtl import predict

    assert predict.main(["--model", str(tmp_path / "nothing"), str(tmp_path), "--output",
                         str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing: no such file or folder" in err
    with pytest.raises(SystemExit):
        predict.main(["--model", str(trained[1]), str(tmp_path), "--output", str(tmp_path / "p.xlsx")])
    assert "expected a .csv or .json" in capsys.readouterr().err


def test_load_trained_names_the_file_that_does_not_fit(trained, tmp_path):
    _, folder, _ = trained
    copy = tmp_path / "train"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["rank"] = 7  # the saved side maps have another rank
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "seed42.safetensors").unlink()
    dtl.io.save_trainable(load_trained(folder), copy / "seed42.safetensors")  # without the embedded settings
    with pytest.raises(TrainedModelError, match="seed42.safetensors does not match the model"):
        load_trained(copy)
    config["model"].update(rank=None, checkpoint=str(tmp_path / "missing.safetensors"))
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainedModelError, match="missing.safetensors"):
        load_trained(copy)
    with pytest.raises(TrainedModelError, match="no run with seed 3"):
        load_trained(folder, seed=3)


def test_multi_task_predictions_equal_the_single_task_models_exactly():
    torch.manual_seed(0)
    models = {
        "early": dtl.create_model(MICRO, "dtl_plus", num_classes=5, pretrained=True, start_block=2),
        "late": dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=True, start_block=9),
        "default": dtl.create_model(MICRO, "dtl_plus", num_classes=7, pretrained=True),
        "lora": dtl.create_model(MICRO, "lora", num_classes=4, pretrained=True),
    }
    for model in models.values():  # trained-looking side networks and heads, not the zero init
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.2)
        model.eval()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = {task: model(images) for task, model in models.items()}
    multi = MultiTaskModel(models)
    assert multi.shared_blocks == 10 and multi.shared_tasks == ["early", "late", "default"]
    assert all(models[t].family is multi.shared_family for t in multi.shared_tasks)  # one backbone in memory
    got = multi(images)
    assert list(got) == list(models)
    for task in models:
        assert torch.equal(got[task], expected[task]), task


def test_multi_task_refuses_tasks_on_different_backbones():
    same = dtl.create_model(MICRO, "dtl", num_classes=3, pretrained=True)
    other = dtl.create_model(MICRO, "dtl", num_classes=3)  # random init
    with pytest.raises(ValueError, match="frozen backbone differs"):
        MultiTaskModel({"a": same, "b": other})


def test_a_sweep_trials_checkpoint_folder_loads(tmp_path):
    from dtl.config import load_config
    from dtl.engine import TrainingState
    from dtl.io import trainable_state_dict, write_json
    from dtl.trained import RECORD_FILE, TRIAL_STATE_FILE, record

    config = load_config(REPO / "params.yaml", task="patterns")
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=9, pretrained=True).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    state = TrainingState(epochs_done=1, trainable=trainable_state_dict(model), optimizer={}, scaler={},
                          data_order=torch.Generator().get_state(), rng=torch.get_rng_state())
    state.save(tmp_path / TRIAL_STATE_FILE)
    write_json(tmp_path / RECORD_FILE, record(config, "patterns", 9, 0, None))
    images = torch.randn(3, 3, 32, 32)
    loaded = load_trained(tmp_path)
    assert loaded.trained.image_size == 32 and loaded.trained.source == tmp_path / TRIAL_STATE_FILE
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_the_registered_pyfunc_predicts_what_load_trained_predicts(trained, monkeypatch):
    import mlflow
    import pandas as pd

    from dtl.predict import Predictor, decode_batches, list_entries
    from tracking import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND
    from tracking.pyfunc import encode_image

    root, folder, metrics = trained
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["registered_model"] == {"name": "dtl-patterns", "version": 1}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    experiment = mlflow.tracking.MlflowClient().get_experiment_by_name("trained-test")
    assert experiment.tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    version = mlflow.tracking.MlflowClient().get_model_version("dtl-patterns", "1")
    assert float(version.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert "sweep_winner" not in version.tags  # best.yaml had no settings for the task
    pyfunc = mlflow.pyfunc.load_model("models:/dtl-patterns/latest")
    assert list(pyfunc.metadata.get_input_schema().input_names()) == ["image"]
    assert pyfunc.metadata.get_output_schema().input_names() == ["label", "name", "score", "error"]
    # logged as code: MLflow runs the toolkit's model file to load it; no pickled object in the version
    local = Path(mlflow.artifacts.download_artifacts("models:/dtl-patterns/1"))
    assert "model_code_path" in (local / "MLmodel").read_text() and not list(local.rglob("*.pkl"))
    assert (local / "artifacts").is_dir() and json.loads(next((local / "artifacts").glob("settings*")).read_text())[
        "class_names"] == list(load_trained(folder).trained.class_names)
    assert not [line for line in TRAIN_LOG if "CloudPickle" in line or "cloudpickle" in line.lower()], TRAIN_LOG
    paths = list_entries(root / "data" / "patterns" / "test.txt")[:10]
    out = pyfunc.predict(pd.DataFrame({"image": [encode_image(p) for p in paths] + ["bm90IGFuIGltYWdl"]}))
    predictor = Predictor([load_trained(folder)], top_k=1)
    (_, batch), = decode_batches(paths, predictor.transform, 64, lambda *a: None)
    expected = predictor.predict(paths, batch)
    assert list(out["label"][:10]) == [p.labels[0] for p in expected]
    assert list(out["score"][:10]) == pytest.approx([p.scores[0] for p in expected], abs=1e-6)
    assert out["error"][:10].isna().all()
    # the bad row ("not an image", base64-encoded) gets the reason and no prediction; the others are predicted
    assert out["error"][10] == "not an image: cannot identify image file"
    assert pd.isna(out["label"][10]) and pd.isna(out["score"][10]) and pd.isna(out["name"][10])


def test_a_served_model_refuses_a_request_without_images_naming_the_input(trained, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    root, _, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    pyfunc = mlflow.pyfunc.load_model("models:/dtl-patterns/latest")
    for bad in (pd.DataFrame({"picture": ["aGVsbG8="]}), pd.DataFrame({"image": ["not base64!"]})):
        with pytest.raises(MlflowException, match="image") as error:
            pyfunc.predict(bad)
        assert error.value.get_http_status_code() == 400


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http_on_loopback(trained, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from dtl.predict import list_entries
    from tracking.pyfunc import encode_image

    root, folder, _ = trained
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # mlflow runs the environment's uvicorn by name: as an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    mlflow_cli = bin_dir / "mlflow"
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/dtl-patterns/latest",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the model server did not answer /ping within 120 s"
                time.sleep(1)
        paths = list_entries(root / "data" / "patterns" / "test.txt")[:4]
        corrupt = encode_image(b"\x89PNG\r\n\x1a\n but not a picture")  # one corrupt row among good ones

        def invoke(columns: list[str], data: list) -> tuple[int, dict]:
            body = json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        status, answer = invoke(["image"], [[encode_image(p)] for p in paths] + [[corrupt]])
        refused = invoke(["picture"], [["aGVsbG8="]]), invoke(["image"], [["not base64!"]])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert status == 200
    rows = answer["predictions"]
    assert rows[4]["label"] is None and rows[4]["error"].startswith(("not an image", "unreadable image")), rows[4]
    assert all(row["error"] is None for row in rows[:4]), rows
    assert rows[4]["name"] is None and rows[4]["score"] is None
    for code, body in refused:  # MLflow's 400 answer, naming the input it expects
        assert code == 400 and "image" in body["message"], body
    rows = rows[:4]
    model = load_trained(folder)
    transform = model.trained.transform()
    from PIL import Image

    with torch.no_grad():
        expected = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])).argmax(-1).tolist()
    assert [r["label"] for r in rows] == expected
