"""The CUDA path, proved on a CPU: devices and precision, GPU memory accounting, checkpoints across machines, the
prefix cache's placement, host syncs, data loaders, Ray's GPU shares and the GPU machine's benchmarks.

Where the logic only needs torch.cuda's answers (how many GPUs, which compute capability, the allocator's
counters), ``fake_cuda`` stands in for them; device placement is checked with torch's fake tensors on a fake
``cuda`` device (forward passes only). What needs a real GPU is in ``test_gpu.py`` (``pytest -m gpu``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import dtl
from conftest import quadrant_task
from dtl.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
MICRO = "vit_micro_patch4_32"


class FakeCuda:
    """The answers of ``torch.cuda`` for a machine with ``count`` GPUs: devices, capability, per-device random
    generators (``set_rng_state`` of a GPU that is not there fails as torch's does), free memory and an
    allocator whose counters the test moves (``alloc``/``free``)."""

    def __init__(self, count: int = 1, capability: tuple[int, int] = (9, 0), free: int = 80 << 30,
                 total: int = 80 << 30):
        self.count, self.capability, self.free, self.total = count, capability, free, total
        self.rng = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.allocated = self.peak = 0
        self.fraction = 1.0
        self.fractions: list[float] = []

    def index(self, device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return device.index if device.index is not None else 0

    def set_rng_state(self, state, device="cuda") -> None:
        index = self.index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        self.rng[index] = state.clone()

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def reset_peak(self, device=None) -> None:
        self.peak = self.allocated

    def install(self, monkeypatch) -> "FakeCuda":
        cuda = torch.cuda
        for name, value in {
            "is_available": lambda: True,
            "device_count": lambda: self.count,
            "current_device": lambda: 0,
            "get_device_capability": lambda device=None: self.capability,
            "get_device_name": lambda device=None: "Fake GPU",
            "get_rng_state": lambda device="cuda": self.rng[self.index(device)].clone(),
            "get_rng_state_all": lambda: [self.rng[i].clone() for i in range(self.count)],
            "set_rng_state": self.set_rng_state,
            # as torch's: every state in the list to the GPU of its position
            "set_rng_state_all": lambda states: [self.set_rng_state(s, i) for i, s in enumerate(states)],
            "mem_get_info": lambda device=None: (self.free, self.total),
            "get_per_process_memory_fraction": lambda device=None: self.fraction,
            "set_per_process_memory_fraction": lambda fraction, device=None: self.fractions.append(fraction),
            "memory_reserved": lambda device=None: 0,
            "reset_peak_memory_stats": self.reset_peak,
            "max_memory_allocated": lambda device=None: self.peak,
            "max_memory_reserved": lambda device=None: self.peak + (2 << 20),
            "synchronize": lambda device=None: None,
        }.items():
            monkeypatch.setattr(cuda, name, value)
        return self


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fake_cuda(count=1, capability=(9, 0), ...)``: the answers of a machine with those GPUs."""
    return lambda **kwargs: FakeCuda(**kwargs).install(monkeypatch)


def training_loop(device: str, gpu_cache_bytes: int = 0, evaluated=None):
    """The engine's loop for a micro DTL+ model kept on the CPU, told that it trains on ``device``."""
    from dtl.engine import _Loaders, _TrainingLoop
    from dtl.objectives import Classification

    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    loaders = _Loaders(train=[], evaluated=evaluated or {}, generator=torch.Generator().manual_seed(0),
                       cache_report=SimpleNamespace(to_dict=dict))
    loaders.gpu_cache_bytes = gpu_cache_bytes
    config = TrainConfig(epochs=2, warmup_epochs=0, cooldown_epochs=0, progress=False, eval_every=1)
    return _TrainingLoop(model, config, torch.device(device), "fp32", loaders, None, 0.0, Classification())


# --- 1. the test suite hides the GPU -----------------------------------------------------------------------
def test_the_suite_hides_every_gpu_unless_asked_for_the_gpu_tests():
    from conftest import selects_gpu_tests

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # set before any test could start CUDA
    assert torch.cuda.device_count() == 0
    assert selects_gpu_tests("gpu") and selects_gpu_tests("gpu and not slow")
    assert not selects_gpu_tests("not slow and not gpu") and not selects_gpu_tests("") and not selects_gpu_tests(
        "not gpu")


# --- 2. a Ray trial without a GPU share sees no GPU; a fractional share caps its memory ------------------------
@pytest.mark.parametrize("share, visible, fractions", [(0.0, "", []), (0.5, "0", [0.5]), (1.0, "0", [])])
def test_a_trial_sees_only_its_gpu_share(monkeypatch, fake_cuda, share, visible, fractions):
    import ray

    from sweeps.trainable import TrialSetup, prepare_worker

    cuda = fake_cuda(count=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Ray (2.60) leaves a task that asked for no GPU
    assigned = {"CPU": 1.0, **({"GPU": share} if share else {})}
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_assigned_resources=lambda: assigned))
    threads = torch.get_num_threads()
    setup = TrialSetup(task="t", base_config={}, training={}, seed=0, eval_every=1, threads=threads,
                       tracking_uri="sqlite:///unused.db", experiment_id="0", parent_run_id="p", sweep_name="s",
                       space_name="s")
    tags = prepare_worker(setup)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible
    assert cuda.fractions == fractions  # a share of a GPU may use that share of its memory, no more
    assert tags == {"gpu_share": f"{share:g}", "cuda_visible_devices": visible,
                    **({"gpu_memory_fraction": "0.5"} if fractions else {})}


def test_a_trials_loader_workers_fit_in_its_cpu_share():
    from sweeps.trainable import TrialSetup, trial_config

    base = {"data": {"tasks": ["digits"], "image_size": 16}, "model": {"checkpoint": False},
            "training": {"num_workers": 8}, "overrides": {"digits": {}}}
    for cpus, workers in ((1, 0), (4, 3), (16, 8)):
        setup = TrialSetup(task="digits", base_config=base, training={}, seed=0, eval_every=1, threads=cpus,
                           tracking_uri="", experiment_id="0", parent_run_id="p", sweep_name="s", space_name="s")
        assert trial_config(setup, {}).training.num_workers == workers


def test_more_than_one_gpu_per_trial_is_refused_in_one_line():
    from sweeps.options import SweepOptions, check_options
    from sweeps.state import SweepError

    with pytest.raises(SweepError, match=r"--gpus-per-trial 2: a trial trains on one GPU, so at most 1"):
        check_options(SweepOptions(gpus_per_trial=2))
    check_options(SweepOptions(gpus_per_trial=0.5))


# --- 2b. a checkpoint resumes on a machine with fewer GPUs (or none) ------------------------------------------
def test_a_checkpoint_saved_on_two_gpus_resumes_on_one_and_on_the_cpu(fake_cuda, tmp_path):
    from dtl.engine import TrainingState

    two = fake_cuda(count=2)
    two.rng[0] = torch.tensor([7], dtype=torch.uint8)
    loop = training_loop("cuda:0")
    loop.history.append({"epoch": 0})  # one epoch of two done
    saved = loop.snapshot()
    assert [s.tolist() for s in saved.cuda_rng] == [[7]]  # the generator of the GPU it trained on, only
    saved.save(tmp_path / "state.pt")
    state = TrainingState.load(tmp_path / "state.pt")

    one = fake_cuda(count=1)
    training_loop("cuda").restore(state)
    assert one.rng[0].tolist() == [7]
    old = TrainingState(**{**state.__dict__, "cuda_rng": [torch.tensor([1], dtype=torch.uint8),
                                                          torch.tensor([2], dtype=torch.uint8)]})
    training_loop("cuda:0").restore(old)  # a checkpoint of an earlier version: every GPU of its node
    assert one.rng[0].tolist() == [1]
    training_loop("cpu").restore(state)  # nothing of a GPU to restore


# --- 3. the local cluster gives each worker node GPUs of its own ----------------------------------------------
def test_each_worker_node_of_the_local_cluster_owns_different_gpus():
    from sweeps.local_cluster import node_gpus

    assert node_gpus(2, 1, ["0", "1"]) == ["0", "1"]
    assert node_gpus(2, 2, ["4", "5", "6", "7"]) == ["4,5", "6,7"]
    assert node_gpus(3, 1, []) == ["logical0"] * 3  # no GPUs here: logical ones, invisible to CUDA
    assert node_gpus(2, 0, ["0", "1"]) == [None, None]
    with pytest.raises(ValueError, match=r"needs whole GPUs of its own, 3 in all, and this machine has 2"):
        node_gpus(3, 1, ["0", "1"])


def test_ray_trials_on_two_worker_nodes_see_two_different_gpus():
    """Ray numbers each node's GPUs from 0: without the cluster's own CUDA_VISIBLE_DEVICES per node, a task on
    either node would be handed physical GPU 0. (A fresh process: Ray reads its authentication mode at import.)"""
    driver = """
import os
from sweeps.cluster import start_ray
from sweeps.local_cluster import LocalCluster
with LocalCluster(workers=2, cpus_per_worker=1, gpus_per_worker=1, mlflow=False) as cluster:
    start_ray(cluster.address)
    import ray
    @ray.remote(num_gpus=1, num_cpus=1)
    def visible():
        import time
        time.sleep(1.0)  # both tasks hold their GPU at once
        return os.environ["CUDA_VISIBLE_DEVICES"]
    print(sorted(ray.get([visible.remote(), visible.remote()])))
    ray.shutdown()
"""
    # the machine's GPUs: none need exist, Ray only numbers them
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['3', '5']"


# --- 4. a GPU index that is not there is one line naming the key and the GPU count ----------------------------
def test_a_gpu_index_past_the_visible_gpus_names_the_key_and_the_count(fake_cuda, monkeypatch):
    from dtl.engine import SetupError, resolve_device

    fake_cuda(count=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with pytest.raises(SetupError) as error:
        resolve_device("cuda:3")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("training.device is 'cuda:3' but this process sees 1 CUDA device")
    assert "CUDA_VISIBLE_DEVICES=2" in message and "use cuda:0 or 'auto'" in message
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda").type == "cuda"


def test_training_device_cuda_3_in_params_stops_prepare_in_one_line(fake_cuda, tmp_path, capsys, monkeypatch):
    import yaml
    from PIL import Image

    from pipeline import prepare

    fake_cuda(count=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # a machine with one GPU and no scheduler narrowing it
    folder = tmp_path / "data" / "my_task"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    for split, items in (("train800", range(4)), ("val200", range(4, 5)), ("train800val200", range(5)),
                         ("test", range(5, 6))):
        (folder / f"{split}.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in items))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="vtab1k", root=str(tmp_path / "data"), tasks=["my_task"],
                          num_classes={"my_task": 2})
    params["training"].update(batch_size=2, device="cuda:3")
    params["model"]["checkpoint"] = False
    params["overrides"] = {"my_task": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "best.yaml").write_text("my_task: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--params", str(tmp_path / "params.yaml"), "--best", str(tmp_path / "best.yaml"),
                      "--outputs", str(tmp_path / "outputs")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("prepare failed")]
    assert failed == ["prepare failed: training.device is 'cuda:3' but this process sees 1 CUDA device: use cuda:0 "
                      "or 'auto'"], err
    assert "Traceback" not in err


# --- 5. the evaluate stage allows the prediction or two a GPU may flip ----------------------------------------
def test_one_flipped_prediction_in_200_passes_the_evaluate_check_and_many_do_not(tmp_path, monkeypatch):
    import dtl.experiment
    from dtl.config import ExperimentConfig
    from pipeline.evaluate import rescore
    from pipeline.stage import StageError

    config = ExperimentConfig.from_dict({"model": {"checkpoint": False}})
    (tmp_path / "seed42.safetensors").write_bytes(b"")
    summary = {"num_classes": 10, "per_seed": [{"seed": 42, "weights": "seed42.safetensors", "test/accuracy": 157 / 200}]}

    def rescored(correct: int):
        monkeypatch.setattr(dtl.experiment, "evaluate_saved", lambda *args, **kwargs: {
            "test_accuracy": correct / 200, "test_loss": 1.0, "test_images": 200})
        return rescore(config, "digits", tmp_path, summary)

    assert rescored(156)[0]["test_accuracy"] == 156 / 200  # 157/200 - 156/200 = 0.0050000000000000044
    assert rescored(159)[0]["test_accuracy"] == 159 / 200
    with pytest.raises(StageError, match=r"\(3 of 200 images, more than the 2 that non-deterministic GPU kernels"):
        rescored(160)


# --- 6. GPU memory: training's peak without the cache, evaluation's apart, the cache on its own ---------------
def test_the_training_peak_leaves_out_the_gpu_cache_and_evaluation_is_measured_apart(fake_cuda, monkeypatch):
    import dtl.engine

    cuda = fake_cuda(count=1)
    cache, weights = 2400 << 20, 100 << 20
    cuda.alloc(weights + cache)  # the model and the prefix cache, placed before training starts
    cuda.reset_peak()

    def train_epoch(epoch):  # activations, gradients and optimizer state come and go
        cuda.alloc(600 << 20)
        cuda.alloc(-(600 << 20))
        return {"lr": 1e-3, "train/loss": 1.0, "train/accuracy": 0.5}

    def evaluate(model, loader, device, precision, per_image=False, classes=None, objective=None):
        cuda.alloc(300 << 20)
        cuda.alloc(-(300 << 20))
        return {"accuracy": 0.5, "loss": 1.0, **({"per_image": torch.ones(2, dtype=torch.bool)} if per_image else {})}

    monkeypatch.setattr(dtl.engine, "evaluate", evaluate)
    loop = training_loop("cuda", gpu_cache_bytes=cache, evaluated={"val": None})
    loop.train_epoch = train_epoch
    loop.run_epoch(0)
    loop.run_epoch(1)
    result = loop.result()
    assert result.gpu_peak_allocated_bytes == weights + (600 << 20)  # not the cache's 2.4 GB
    assert result.gpu_peak_reserved_bytes == weights + (600 << 20) + (2 << 20)
    assert result.gpu_eval_peak_allocated_bytes == weights + (300 << 20)
    assert result.gpu_cache_bytes == cache
    summary = result.summary()
    assert summary["gpu_peak_allocated_bytes"] == result.gpu_peak_allocated_bytes and summary["gpu_cache_bytes"] == cache


def test_memory_figures_are_named_for_what_they_measure():
    from dtl.protocols.base import memory_figures
    from pipeline.evaluate import cost_metrics

    cpu_run = {"trainable_params": 10, "trainable_params_excl_head": 5, "images_per_s": 1.0, "train_time_s": 1.0,
               "saved_bytes_per_batch": 2 << 20, "peak_rss_bytes": 1700 << 20, "gpu_peak_allocated_bytes": None,
               "gpu_peak_reserved_bytes": None}
    costs = cost_metrics({"per_seed": [cpu_run]})
    assert costs["peak_rss_mb"] == 1700 and costs["saved_for_backward_mb"] == 2 and "gpu_peak_allocated_mb" not in costs
    gpu_run = {**cpu_run, "gpu_peak_allocated_bytes": 800 << 20, "gpu_peak_reserved_bytes": 900 << 20,
               "gpu_cache_bytes": 0}
    costs = cost_metrics({"per_seed": [gpu_run]})
    assert (costs["gpu_peak_allocated_mb"], costs["gpu_peak_reserved_mb"], costs["gpu_cache_mb"]) == (800, 900, 0)
    # metrics written before the figures had their own names are read by their kind
    assert memory_figures({"peak_memory_mb": 512.0}, "gpu_allocated") == {"gpu_peak_allocated_mb": 512.0}
    assert memory_figures({"peak_memory_mb": 1600.0}, "process_rss") == {"peak_rss_mb": 1600.0}


# --- 7. saving a checkpoint copies no tensor --------------------------------------------------------------------
def test_saving_a_checkpoint_writes_the_optimizer_state_without_copying_it(tmp_path, monkeypatch):
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    states = []
    dtl.engine.train_and_evaluate(model, quadrant_task(32), {}, TrainConfig(
        epochs=2, warmup_epochs=0, cooldown_epochs=0, batch_size=16, progress=False),
        [lambda end: states.append(end.state())])
    state = states[0]
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, **kwargs: (written.append(obj), real_save(obj, path)))
    state.save(tmp_path / "state.pt")
    moments = state.optimizer["state"][0]
    saved = written[0]["optimizer"]["state"][0]
    # the same tensors, not copies: a copy of a GPU model's optimizer state would sit in GPU memory
    assert saved["exp_avg"] is moments["exp_avg"] and saved["exp_avg_sq"] is moments["exp_avg_sq"]
    loaded = dtl.engine.TrainingState.load(tmp_path / "state.pt")
    torch.testing.assert_close(loaded.optimizer["state"][0]["exp_avg"], moments["exp_avg"])


# --- 8. logits in fp32 under any autocast ------------------------------------------------------------------------
@pytest.mark.parametrize("method", dtl.available_methods())
def test_logits_are_fp32_under_bf16_autocast(method):
    model = dtl.create_model(MICRO, method, num_classes=5).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
        assert logits.dtype == torch.float32, method
        if getattr(model, "cache_layout", None) is not None:  # from the prefix cache too
            from dtl.cache import compute_frozen_features

            features = compute_frozen_features(model, TensorDataset(torch.randn(2, 3, 32, 32), torch.zeros(2)),
                                               precision="bf16")
            cached, _ = features.select(model.cached_names()).batch(torch.arange(2))
            assert model(cached).dtype == torch.float32, method


# --- 9. precision auto: bf16 where the GPU has it, fp16 with loss scaling where it only emulates it ------------
def test_precision_auto_picks_bf16_only_on_gpus_that_compute_it(fake_cuda):
    from dtl.engine import resolve_precision

    cuda = torch.device("cuda")
    fake_cuda(capability=(9, 0))
    assert resolve_precision("auto", cuda) == "bf16"
    fake_cuda(capability=(8, 0))
    assert resolve_precision("auto", cuda) == "bf16"
    fake_cuda(capability=(7, 0))  # V100
    assert resolve_precision("auto", cuda) == "fp16"
    fake_cuda(capability=(7, 5))  # T4
    assert resolve_precision("auto", cuda) == "fp16"
    with pytest.warns(UserWarning, match=r"compute capability 7.5\) only emulates bf16"):
        assert resolve_precision("bf16", cuda) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


# --- 10. the prefix cache: kept in host memory without a copy, batches in pinned memory; the GPU share's cap --
def test_features_too_large_for_the_gpu_stay_where_they_are_uncopied(fake_cuda):
    from dtl.cache import FrozenFeatures, place_features

    fake_cuda(free=1 << 20)  # 1 MiB free: a quarter of it holds nothing
    tensors = {"x_0": torch.randn(64, 17, 96), "x_1": torch.randn(64, 17, 96)}
    features = FrozenFeatures(tensors, torch.arange(64))
    placed = place_features(features, torch.device("cuda"))
    assert placed.pinned and placed.device.type == "cpu"
    for name, tensor in tensors.items():  # the memory-mapped entry is read per batch, never copied whole
        assert placed.tensors[name].data_ptr() == tensor.data_ptr()
    assert not place_features(features, torch.device("cpu")).pinned


def test_the_gpu_room_for_features_respects_the_trials_memory_share(fake_cuda):
    from dtl.cache import gpu_memory_left

    cuda = fake_cuda(free=60 << 30, total=80 << 30)
    assert gpu_memory_left(torch.device("cuda")) == 60 << 30
    cuda.fraction = 0.25  # a quarter of the GPU: at most 20 GiB, whatever else is free
    assert gpu_memory_left(torch.device("cuda")) == 20 << 30


# --- 11. no host sync per training step ---------------------------------------------------------------------------
def test_a_training_epoch_reads_its_figures_from_the_device_once_not_per_step(monkeypatch):
    """Reading a GPU tensor's value (``item``, ``tolist``, ``bool``) makes the host wait for the GPU: the count of
    such reads by the toolkit's code in an epoch must not grow with its steps. (AdamW's own reads are of its step
    counters, which stay on the CPU.)"""
    from dtl.engine import train_and_evaluate

    toolkit = str(REPO / "dtl")

    def reads(images: int) -> int:
        count = [0]
        for name in ("item", "tolist", "__bool__"):
            real = getattr(torch.Tensor, name)

            def counted(self, *args, _real=real, **kwargs):
                count[0] += sys._getframe(1).f_code.co_filename.startswith(toolkit)
                return _real(self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        torch.manual_seed(0)
        model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
        config = TrainConfig(epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=8, progress=False,
                             prefix_cache="off")
        train_and_evaluate(model, quadrant_task(images), {}, config)
        monkeypatch.undo()
        return count[0]

    assert reads(16) == reads(64)  # 2 steps and 8 steps


# --- 12. loader workers live across epochs; a shuffled order does not depend on them ------------------------------
def test_training_loader_workers_persist_and_draw_the_batches_of_a_plain_loader():
    from torch.utils.data import DataLoader

    from dtl.engine import _Loaders

    model = dtl.create_model(MICRO, "linear", num_classes=4)
    data = quadrant_task(24)
    config = TrainConfig(epochs=3, warmup_epochs=0, cooldown_epochs=0, batch_size=8, num_workers=1, progress=False,
                         prefix_cache="off", eval_every=1)
    loaders = _Loaders.build(model, data, {"val": data}, config, torch.device("cpu"), "fp32")
    assert loaders.train.persistent_workers and loaders.evaluated["val"].persistent_workers
    once = TrainConfig(**{**config.to_dict(), "eval_every": 0})
    assert not _Loaders.build(model, data, {"val": data}, once, torch.device("cpu"), "fp32").evaluated[
        "val"].persistent_workers  # evaluated once: no workers kept for it
    plain = DataLoader(data, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(42))
    for _ in range(2):
        assert [labels.tolist() for _, labels in loaders.train] == [labels.tolist() for _, labels in plain]


def test_loaders_for_a_gpu_pin_memory():
    from dtl.devices import image_loader

    loader = image_loader(quadrant_task(8), 4, torch.device("cuda"), num_workers=2)
    assert loader.pin_memory and loader.persistent_workers
    assert not image_loader(quadrant_task(8), 4, torch.device("cpu")).pin_memory


# --- 13. TF32 for fp32 matrix products on a GPU, only while training or evaluating --------------------------------
def test_fp32_matmuls_use_tf32_on_a_gpu_and_nothing_changes_on_a_cpu(monkeypatch):
    from contextlib import contextmanager

    import dtl.cache
    import dtl.engine
    from dtl.devices import fp32_matmul

    before = torch.get_float32_matmul_precision()
    with fp32_matmul(torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with fp32_matmul(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before

    entered = []

    @contextmanager
    def recorded(device):
        entered.append(device.type)
        with fp32_matmul(device):
            yield

    # training, evaluation and the prefix cache's pass all run under it, on the run's device
    monkeypatch.setattr(dtl.engine, "fp32_matmul", recorded)
    monkeypatch.setattr(dtl.cache, "fp32_matmul", recorded)
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    dtl.engine.train_and_evaluate(model, quadrant_task(16), {"val": quadrant_task(8)}, TrainConfig(
        epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=8, progress=False, prefix_cache="memory"))
    assert entered.count("cpu") >= 3 and set(entered) == {"cpu"}


# --- device placement on a fake GPU (forward passes) ------------------------------------------------------------------
@pytest.mark.parametrize("method", dtl.available_methods())
def test_every_method_computes_on_the_gpu_it_was_moved_to(method):
    """Fake tensors raise on an operation that mixes devices, as CUDA would: a tensor made on the CPU inside a
    forward pass, a cached batch left behind. Forward only (autocast and backward do not run on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dtl.cache import FrozenFeatures

    model = dtl.create_model(MICRO, method, num_classes=5)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        logits = model(torch.randn(2, 3, 32, 32, device="cuda"))
        assert logits.device.type == "cuda" and logits.dtype == torch.float32
        if getattr(model, "cache_layout", None) is not None:
            frozen = model.compute_frozen(torch.randn(4, 3, 32, 32, device="cuda"))
            features = FrozenFeatures(frozen, torch.arange(4, device="cuda")).select(model.cached_names())
            cached, labels = features.batch(torch.tensor([2, 0]))  # indices from a CPU loader
            assert model(cached).device.type == "cuda" and labels.device.type == "cuda"


# --- the smaller ones --------------------------------------------------------------------------------------------------
def test_the_multitask_benchmark_accepts_device_auto(tmp_path):
    out = tmp_path / "multitask.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multitask.py"), "--backbone", MICRO, "--tasks",
                           "2", "--batch-size", "4", "--rounds", "1", "--device", "auto", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["shared"]["images_per_s"] > 0


def test_the_memory_breakdown_names_a_missing_gpu_in_one_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_breakdown", REPO / "benchmarks" / "memory_breakdown.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cuda:1", "--backbone", MICRO]) == 2
    assert capsys.readouterr().err.strip() == ("error: --device is 'cuda:1' but no CUDA device is available here: use "
                                               "'auto' (the GPU when there is one, else the CPU) or 'cpu'")


# --- the GPU machine's one command, run on a CPU --------------------------------------------------------------------
def acceptance(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "acceptance.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu",
                           "--quick", "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    return done, json.loads(out.read_text()) if out.exists() else {}


def test_the_gpu_acceptance_script_runs_its_sequence_on_a_cpu(tmp_path):
    # the multi-task part runs benchmarks/multitask.py, tested above; the sweep part needs Ray: a slow test below
    done, summary = acceptance(tmp_path, "--skip", "sweep", "multitask")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = summary["parts"]
    assert list(parts) == ["tests", "train_step", "prefix_cache", "multitask", "sweep"]
    assert parts["tests"]["status"] == "skipped" and "needs a CUDA GPU" in parts["tests"]["reason"]
    assert len(parts["tests"]["skipped"]) >= 8  # every GPU test, each with its reason
    for protocol, batch in (("dtl", 32), ("vpetl", 64)):
        rows = parts["train_step"]["results"][protocol]
        assert {r["protocol"] for r in rows} == {protocol} and {r["batch_size"] for r in rows} == {batch}
        assert all(r["saved_bytes"] >= 0 and r["images_per_s"] > 0 for r in rows)
    assert {r["precision"] for r in parts["train_step"]["results"]["vpetl"]} == {"fp32"}
    assert [r["run"] for r in parts["prefix_cache"]["results"]] == ["off", "cold", "warm"]
    assert parts["multitask"]["status"] == parts["sweep"]["status"] == "skipped"
    text = (tmp_path / "acceptance.md").read_text()
    assert text.startswith("### GPU acceptance: ") and "Training step, protocol `dtl`" in text


@pytest.mark.slow
def test_the_gpu_acceptance_sweep_packs_two_half_gpu_trials_and_the_multitask_rows_agree(tmp_path):
    done, summary = acceptance(tmp_path, "--skip", "tests", "train_step", "prefix_cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["parts"]["multitask"]["status"] == "passed"
    sweep = summary["parts"]["sweep"]
    assert sweep["status"] == "passed" and sweep["in_flight"] == 2 and len(sweep["trials"]) == 4
    assert {t["gpu_share"] for t in sweep["trials"]} == {"0.5"}
