"""The training engine: the official schedule, optimiser groups, callbacks, learning, and failure modes."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import dtl
from conftest import quadrant_task
from dtl.config import TrainConfig
from dtl.engine import make_scheduler, parameter_groups, train_and_evaluate

MICRO = "vit_micro_patch4_32"


def test_official_schedule_warmup_cosine_cooldown():
    config = TrainConfig(lr=1e-3)  # 110 epochs: 10 warm-up (overlapping), 100 cosine, 10 at min_lr
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=config.lr)
    scheduler = make_scheduler(optimizer, config)
    lrs = []
    for epoch in range(config.epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7)
    assert lrs[5] == pytest.approx(1e-7 + 5 * (1e-3 - 1e-7) / 10)
    assert max(lrs) == pytest.approx(lrs[10]) and lrs[10] < 1e-3  # cosine has started by epoch 10
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))
    assert lrs[100:] == pytest.approx([1e-8] * 10)


def test_no_weight_decay_on_biases_and_1d_parameters():
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=3)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model.head.bias)}
    assert len(decay["params"]) == 2 * 12 + 1 + 1  # side maps (down, up) x 12, conv, head weight


def test_training_lowers_the_loss_beats_chance_and_reports_every_epoch():
    torch.manual_seed(0)
    model = dtl.create_model(MICRO, "dtl_plus", num_classes=4)
    seen = []
    config = TrainConfig(epochs=6, warmup_epochs=1, cooldown_epochs=0, lr=3e-3, batch_size=32, progress=False,
                         eval_every=3)
    result = train_and_evaluate(model, quadrant_task(192), {"test": quadrant_task(96, seed=1)}, config,
                                [lambda end: seen.append((end.epoch, end.metrics))])
    assert [epoch for epoch, _ in seen] == list(range(6))
    assert "test/accuracy" in seen[2][1] and "test/accuracy" not in seen[1][1]
    assert seen[-1][1]["train/loss"] < 0.8 * seen[0][1]["train/loss"]
    assert result.metrics["test/accuracy"] > 0.5  # chance is 0.25
    assert result.trainable_params == dtl.trainable_parameters(model)
    assert result.images_per_s > 0 and result.peak_rss_bytes > 0 and result.gpu_peak_allocated_bytes is None
    assert len(result.history) == 6


def test_same_seed_same_result():
    def run():
        torch.manual_seed(5)
        model = dtl.create_model(MICRO, "dtl", num_classes=4)
        config = TrainConfig(epochs=2, warmup_epochs=0, cooldown_epochs=0, lr=1e-3, progress=False, seed=3)
        return train_and_evaluate(model, quadrant_task(64), {"test": quadrant_task(32, 1)}, config).metrics

    assert run() == run()


def test_nan_loss_raises_floating_point_error():
    model = dtl.create_model(MICRO, "dtl", num_classes=4)
    images, labels = quadrant_task(64).tensors
    images[0, 0, 0, 0] = float("nan")
    config = TrainConfig(epochs=1, warmup_epochs=0, cooldown_epochs=0, progress=False, batch_size=64)
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 0"):
        train_and_evaluate(model, TensorDataset(images, labels), {}, config)


def test_too_small_training_split_is_a_clear_error():
    model = dtl.create_model(MICRO, "dtl", num_classes=4)
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        train_and_evaluate(model, quadrant_task(10), {}, TrainConfig(epochs=1, cooldown_epochs=0, progress=False))


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "training.epochs: expected an integer >= 1"),
    ("cooldown_epochs", 110, "training.cooldown_epochs"),
    ("precision", "fp8", "training.precision: expected one of auto, fp32, bf16, fp16"),
    ("lr", 0, "training.lr: expected a number > 0"),
    ("device", "tpu", "training.device"),
])
def test_train_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_fp16_on_cpu_is_refused():
    model = dtl.create_model(MICRO, "dtl", num_classes=4)
    config = TrainConfig(epochs=1, cooldown_epochs=0, precision="fp16", device="cpu", progress=False)
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        train_and_evaluate(model, quadrant_task(64), {}, config)


@pytest.mark.parametrize("prefix_cache", ["off", "memory"])
def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(tmp_path, prefix_cache):
    from dtl.engine import TrainingState

    data = quadrant_task(48)
    config = TrainConfig(epochs=4, warmup_epochs=1, cooldown_epochs=0, batch_size=16, lr=3e-3, eval_every=1,
                         progress=False, prefix_cache=prefix_cache)

    def model():  # stochastic depth after M: the resumed run must draw the same masks
        torch.manual_seed(0)
        return dtl.create_model(MICRO, "dtl_plus", num_classes=4, drop_path_rate=0.3, drop_path_scope="suffix")

    straight = model()
    reference = train_and_evaluate(straight, data, {"val": data}, config)
    saved = []
    first = model()

    class Stop(Exception):
        pass

    def save_and_stop(end):  # a killed worker: the run dies after its second epoch's checkpoint
        state = end.state()
        saved.append(tmp_path / f"epoch{state.epochs_done}.pt")
        state.save(saved[-1])
        if state.epochs_done == 2:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(first, data, {"val": data}, config, [save_and_stop])
    state = TrainingState.load(saved[-1])  # from disk, as a restarted trial reads its checkpoint
    assert state.epochs_done == 2 and len(state.history) == 2 and set(state.trainable) == {
        n for n, p in first.named_parameters() if p.requires_grad}
    resumed_model = model()  # a fresh process: untrained side network, same frozen backbone
    resumed = train_and_evaluate(resumed_model, data, {"val": data}, config, resume_from=state)
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in reference.history]
    assert resumed.metrics == reference.metrics
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="cannot resume after epoch 4 of a 4-epoch run"):
        train_and_evaluate(model(), data, {}, config, resume_from=TrainingState(**{**state.__dict__, "epochs_done": 4}))
