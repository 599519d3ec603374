"""Studies (grid spaces), Pareto sets and memory budgets, parameter importance (sweeps/study.py, pareto.py,
importance.py). The end-to-end study runs a real Tuner on a tiny setting (the sweep tests' fixtures)."""
from __future__ import annotations

import json
import random

import pytest
import yaml
from test_sweeps import REPO, TASK, TINY_PARAMS, sweep_factory, tiny_data, write_yaml  # noqa: F401 (fixtures)

from sweeps.space import SpaceError
from sweeps.space_file import load_space

STUDY = {"method": "dtl_plus", "seeds": [0, 1],
         "params": {"start_block": {"type": "grid", "values": [3, "last_block"]}}}


# ------------------------------------------------------------------------------------------------ grid spaces


def test_shipped_studies_parse_into_their_points():
    points = {name: [label for label, _ in load_space(name).resolve(12).grid_points()]
              for name in ("study_start_block", "study_rank", "study_dwconv", "study_methods")}
    assert points["study_start_block"] == [f"start_block={m}" for m in (0, 4, 8, 11)]
    assert points["study_rank"] == [f"rank={r}" for r in (1, 2, 4, 8, 16)]
    assert points["study_dwconv"] == ["method=dtl", "method=dtl_plus kernel_size=3", "method=dtl_plus kernel_size=5"]
    from dtl.methods import available_methods

    assert sorted(p.removeprefix("method=") for p in points["study_methods"]) == sorted(available_methods())
    for name in points:
        space = load_space(name)
        assert space.is_study and len(space.seeds) >= 3
        with pytest.raises(SpaceError, match="has no sampler"):
            space.resolve(12).define_by_run()
    # a point is a complete override entry: the space's method plus what the grid sets
    _, entry = load_space("study_dwconv").grid_points()[1]
    assert entry == {"method": "dtl_plus", "kernel_size": 3}
    assert load_space("study_start_block").grid_points()[0][1] == {"method": "dtl_plus", "start_block": 0}
    assert not load_space("dtl_plus").is_study


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["params"]["start_block"].update(values=[]), "params.start_block.values: expected a non-empty list"),
    (lambda s: s["params"]["start_block"].update(values=3), "params.start_block.values: expected a non-empty list"),
    (lambda s: s["params"]["start_block"].update(values=[3, 3]), "params.start_block.values: repeated value"),
    (lambda s: s["params"]["start_block"].update(low=1), "params.start_block: unknown key(s) low for type grid"),
    (lambda s: s["params"].update(lr={"type": "float", "low": 1e-4, "high": 1e-2}),
     "params.lr: a study (grid parameters: start_block) reports every point and samples nothing"),
    (lambda s: s["params"].update(variant={"type": "grid", "values": [1, 2]}),
     "params.variant.values[0]: variant is not an override key, so each value must be a mapping"),
    (lambda s: s["params"].update(variant={"type": "grid", "values": [{"rnk": 2}]}),
     "params.variant.values[0].rnk: not an override key"),
    (lambda s: s["params"].update(variant={"type": "grid", "values": [{"method": "dtl_pluss"}]}),
     "params.variant.values[0].method: unknown method 'dtl_pluss'"),
    (lambda s: s["params"].update(variant={"type": "grid", "values": [{"seed": 1}]}),
     "params.variant.values[0].seed: is set by the study itself"),
    (lambda s: s["params"].update(kernel_size={"type": "grid", "values": [3]}, method={"type": "grid",
                                                                                       "values": ["dtl"]}),
     "params.kernel_size: the point start_block=3, kernel_size=3, method=dtl sets kernel_size, which method dtl "
     "does not take"),
    (lambda s: s.update(seeds=[0, 0]), "seeds: expected a non-empty list of distinct integers"),
    (lambda s: s.update(seeds="0,1"), "seeds: expected a non-empty list of distinct integers"),
    (lambda s: s.update(num_samples=4), "num_samples: a study trains every point to the end"),
    (lambda s: s.update(scheduler={"grace_period": 1}), "scheduler: a study trains every point to the end"),
    (lambda s: s.update(training={"epochs": 2}), "training: a study trains every point to the end"),
])
def test_malformed_grids_are_one_line_errors(tmp_path, edit, expected):
    raw = yaml.safe_load(yaml.safe_dump(STUDY))
    edit(raw)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_seeds_belong_to_studies_only(tmp_path):
    raw = yaml.safe_load((REPO / "sweeps/spaces/dtl.yaml").read_text())
    raw["seeds"] = [0, 1]
    with pytest.raises(SpaceError, match="seeds: only a study"):
        load_space(write_yaml(tmp_path / "s.yaml", raw))


def test_a_study_trial_trains_the_final_protocol_with_its_seed_and_the_methods_defaults():
    from dtl.config import ExperimentConfig
    from sweeps.trainable import TrialSetup, split_trial_config, trial_config

    base = ExperimentConfig.from_dict({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "root": "/abs/data"},
                                       "model": {**TINY_PARAMS["model"], "rank": 4},
                                       "overrides": {TASK: {"lr": 0.01, "kernel_size": 3}}})
    setup = TrialSetup(task=TASK, base_config=base.to_dict(), training={}, seed=0, eval_every=0, threads=1,
                       tracking_uri="sqlite:///x.db", experiment_id="1", parent_run_id="p", sweep_name="s",
                       space_name="study", study=True)
    task, incumbent, params = split_trial_config({"task": TASK, "seed": 2, "method": "dtl_plus",
                                                  "dwconv": {"method": "dtl_plus", "kernel_size": 5}})
    assert (task, incumbent, params) == (TASK, False, {"method": "dtl_plus", "kernel_size": 5})
    config = trial_config(setup, params, seed=2).for_task(TASK)
    assert config.evaluation.protocol == "final"  # train800val200 -> test, never the selection protocol
    assert config.training.seed == 2 and config.training.eval_every == 0 and config.training.lr == 0.01
    assert config.model.kernel_size == 5 and config.model.rank == 4
    # another method runs at its own defaults: the base's DTL options do not carry over
    lora = trial_config(setup, {"method": "lora"}, seed=0).for_task(TASK)
    assert lora.model.method == "lora" and lora.model.rank is None and lora.model.kernel_size is None
    # a sweep trial of the same base selects on val200
    sweep = trial_config(TrialSetup(**{**setup.__dict__, "study": False}), {"rank": 2}).for_task(TASK)
    assert sweep.evaluation.protocol == "val"


def test_study_aggregates_mean_std_and_the_group_mean_per_seed():
    from sweeps.study import StudyRow, aggregate, markdown

    rows = [StudyRow(task, "rank=1", {"rank": 1}, seed, "done", accuracy,
                     cost={"saved_bytes_per_batch": 2.0 ** 20, "trainable_params": 10.0})
            for task, seed, accuracy in (("a", 0, 0.5), ("a", 1, 0.7), ("b", 0, 0.9), ("b", 1, 0.9),
                                         ("c", 0, 0.1), ("c", 1, 0.3))]
    rows.append(StudyRow("c", "rank=1", {"rank": 1}, 2, "failed", None, error="boom"))
    [point] = aggregate(rows, ["rank=1"], ["a", "b", "c"], {"a": "Natural", "b": "Natural", "c": "Structured"})
    assert point["tasks"]["a"]["mean"] == pytest.approx(0.6) and point["tasks"]["a"]["seeds"] == 2
    assert point["tasks"]["a"]["std"] == pytest.approx(0.1414, abs=1e-4)
    # per seed: mean(Natural, Structured) = mean((0.5+0.9)/2, 0.1) = 0.4 and mean(0.8, 0.3) = 0.55
    assert point["group_mean"]["mean"] == pytest.approx(0.475) and point["group_mean"]["seeds"] == 2
    table = markdown("s", [point], ["a", "b", "c"], [0, 1], 20, "final")
    assert "| rank=1 | 60.0 ± 14.1 | 90.0 ± 0.0 | 20.0 ± 14.1 | 47.5 ± 10.6 | 10 | 1.00 |" in table


def test_a_tiny_study_tests_every_point_and_never_writes_best_yaml(sweep_factory):  # noqa: F811
    sweep = sweep_factory(STUDY)
    before = sweep.best.read_text()
    code, out = sweep.run()
    assert code == 0, out
    assert sweep.best.read_text() == before  # a study reports; it never selects
    folder = sweep.storage / "tiny"
    study = json.loads((folder / "study.json").read_text())
    assert (folder / "study.png").stat().st_size > 0
    assert [p["point"] for p in study["points"]] == ["start_block=3", "start_block=11"]  # last_block resolved
    runs = study["runs"]
    assert sorted((r["point"], r["seed"]) for r in runs) == sorted(
        (p, s) for p in ("start_block=3", "start_block=11") for s in (0, 1))
    assert all(r["status"] == "done" and 0 <= r["score"] <= 1 for r in runs)
    assert all(r["scores"]["test_accuracy"] == r["score"] for r in runs)  # the final protocol's test split
    # a later M keeps less for backward (blocks 0..M keep nothing)
    saved = {p["point"]: p["saved_bytes_per_batch"] for p in study["points"]}
    assert saved["start_block=11"] < saved["start_block=3"]
    table = (folder / "study.md").read_text()
    assert "| start_block=3 |" in table and "±" in table
    client = sweep.client()
    experiment = client.get_experiment_by_name("dtl-sweeps")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'tiny'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["kind"] == "study" and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["evaluation.protocol"] == "final" for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study.json", "study.md", "study.png"} <= artifacts
    code, out = sweep.run("--resume", "--seeds", "0", "1", "2", log="resume.log")  # other seeds need a new study
    assert code != 0 and "keeps them when resumed" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------------ Pareto, budget


def _row(trial_id, accuracy, saved, status="done", incumbent=False):
    from sweeps.results import TrialRow
    from sweeps.selection import encode_scores

    right = round(accuracy * 200)  # which of 200 val images it got right: the first `right` of them
    return TrialRow(task=TASK, trial_id=trial_id, status=status, epochs=2, val_score=right / 200, params={},
                    incumbent=incumbent, cost={"saved_bytes_per_batch": saved, "trainable_params": 1.0},
                    per_image=encode_scores([i < right for i in range(200)]))


def test_the_pareto_set_is_exactly_the_non_dominated_set():
    from sweeps.pareto import pareto_set

    generator = random.Random(0)
    for _ in range(50):
        rows = [_row(f"t{i}", generator.choice([0.5, 0.6, 0.7, 0.8]), generator.choice([1, 2, 3, 4, 5]))
                for i in range(12)]
        rows.append(_row("stopped", 0.99, 0.5, status="stopped early"))  # not trained to the end: never on it
        front = {r.trial_id for r in pareto_set(rows, ["val_accuracy", "saved_bytes"])}
        done = [r for r in rows if r.status == "done"]
        expected = {r.trial_id for r in done if not any(
            o.val_score >= r.val_score and o.cost["saved_bytes_per_batch"] <= r.cost["saved_bytes_per_batch"]
            and (o.val_score > r.val_score or o.cost["saved_bytes_per_batch"] < r.cost["saved_bytes_per_batch"])
            for o in done)}
        assert front == expected and front


def test_a_budgeted_pick_never_exceeds_the_budget():
    from sweeps.results import TaskOutcome, decide
    from sweeps.search_strategy import decide_task
    from sweeps.state import SweepState

    generator = random.Random(1)
    checked_over_budget = False
    for _ in range(40):
        rows = [_row(f"t{i}", generator.random(), generator.uniform(1, 100), incumbent=i == 0) for i in range(10)]
        budget = generator.uniform(5, 100)
        state = SweepState(path=None, name="s", space="x", space_file="x", tasks={}, num_samples=10, scheduler="fifo",
                           seed=0, alpha=0.05, params_path="", best_path="", experiment="e", experiment_id="1",
                           tracking_uri="", memory_budget=budget)
        outcome = TaskOutcome(task=TASK, epochs=2, final_epochs=2, rows=rows)
        decide_task(outcome, state)
        fitting = [r for r in rows if r.cost["saved_bytes_per_batch"] <= budget]
        if not fitting:
            assert outcome.best is None
            continue
        assert outcome.best.cost["saved_bytes_per_batch"] <= budget
        if rows[0] not in fitting:  # the incumbent is over the budget: the best accuracy within it wins
            checked_over_budget = True
            assert outcome.best is max(fitting, key=lambda r: r.val_score)
            assert "over the budget" in outcome.decision.reason and outcome.decision.replaced
        else:  # the incumbent rule among the configurations within the budget
            assert outcome.best.trial_id == decide(fitting, 0.05).winner
    assert checked_over_budget  # the draws met both cases


def test_objectives_are_checked():
    from sweeps.pareto import parse_objectives
    from sweeps.state import SweepError

    assert parse_objectives("val_accuracy,saved_bytes") == ["val_accuracy", "saved_bytes"]
    for bad in ("saved_bytes,val_accuracy", "val_accuracy,memory", "val_accuracy,saved_bytes,saved_bytes", ""):
        with pytest.raises(SweepError, match="--objectives"):
            parse_objectives(bad)


# ------------------------------------------------------------------------------------------------ importance


def test_importance_ranks_the_one_parameter_that_matters_first():
    from sweeps.importance import task_importance
    from sweeps.results import TrialRow

    space = load_space("dtl_plus").resolve(12)
    generator = random.Random(0)
    rows, histories = [], {}
    for i in range(40):
        params = {"method": generator.choice(["dtl", "dtl_plus"]), "rank": generator.randint(1, 16),
                  "start_block": generator.randint(0, 11), "lr": 10 ** generator.uniform(-4, -2),
                  "weight_decay": generator.uniform(0, 0.1), "drop_path": generator.choice([0.0, 0.1, 0.2])}
        rows.append(TrialRow(task=TASK, trial_id=f"t{i}", status="stopped early", epochs=5, val_score=None,
                             params=params))
        score = 0.9 - 0.05 * params["start_block"] + generator.gauss(0, 0.001)  # only M matters
        histories[f"t{i}"] = {5: score, 15: score} if i % 2 else {5: score}
    found = task_importance(rows, histories, space)
    assert found["epoch"] == 5 and found["trials"] == 40 and found["reliable"]
    ranked = sorted(found["importance"], key=lambda k: -found["importance"][k])
    assert ranked[0] == "start_block" and found["importance"]["start_block"] > 0.8
    assert "kernel_size" not in found["importance"]  # conditional: not in every trial
    assert sum(found["importance"].values()) == pytest.approx(1.0)
    few = task_importance(rows[:6], histories, space)
    assert not few["reliable"]


def test_importance_of_trials_that_all_scored_the_same_is_empty_not_an_error():
    from sweeps.importance import task_importance
    from sweeps.results import TrialRow

    space = load_space("dtl_plus").resolve(12)
    rows = [TrialRow(task=TASK, trial_id=f"t{i}", status="done", epochs=2, val_score=0.1,
                     params={"method": "dtl", "rank": 1 + i, "start_block": i, "lr": 1e-3 * (i + 1),
                             "weight_decay": 0.01, "drop_path": 0.0}) for i in range(2)]
    found = task_importance(rows, {"t0": {2: 0.1}, "t1": {2: 0.1}}, space)  # two trials, one score: no variance
    assert found["importance"] == {} and found["trials"] == 2 and not found["reliable"]
