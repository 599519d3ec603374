"""Search spaces as data: ``sweeps/spaces/<name>.yaml`` -> a validated :class:`SearchSpace`.

A space file says which method a sweep tunes, what it searches and how ASHA may stop trials early::

    description: DTL+ around the paper's settings
    method: dtl_plus              # the method of every trial (unless ``method`` itself is searched)
    num_samples: 12               # trials per task (default of --num-samples)
    scheduler: {grace_period: 25%, reduction_factor: 2}   # ASHA's first rung: a share of the trials' epochs
    params:                       # searched, in this order; names are flat override keys (dtl.config.OVERRIDE_KEYS)
      method: {type: categorical, choices: [dtl_plus, dtl]}        # DWConv on (dtl_plus) / off (dtl)
      kernel_size: {type: int, low: 3, high: 5, when: {method: dtl_plus}}
      start_block: {type: int, low: 0, high: last_block}         # last_block: N-1 of the chosen backbone
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}

**Trials train with the pipeline's own schedule** (the task's resolved ``training`` section: epochs, warm-up,
cool-down), so a trial's val200 score predicts what the retrained winner will score; the budget is spent
through the number of trials and ASHA's rungs. A space may shorten that schedule explicitly with a
``training`` section (``training: {epochs: 4, warmup_epochs: 1, cooldown_epochs: 0}``): cheaper trials whose
ranking may not hold at full length; the results table then says that trials were shorter than the final
training. ``scheduler.grace_period`` is either a number of epochs or a share of each trial's epochs (``25%``),
which is what lets one space serve a 20-epoch and a 110-epoch schedule; either way the first rung must come
after the warm-up.

**Studies.** A space whose parameters are all ``type: grid`` is a *study*: it reports, it never selects. Ray
Tune's ``grid_search`` crosses every grid with the tasks and the study's ``seeds``; every point trains to the end
under the base configuration's own protocol (VTAB-1K ``final``: train800val200 -> test; few-shot and domain
generalisation: their protocols) and nothing is written to ``sweeps/best.yaml``::

    description: where to add the side network back (M)
    method: dtl_plus
    seeds: [0, 1, 2]
    params:
      start_block: {type: grid, values: [0, 3, 6, 9, 11]}        # one override key, one value per point
      dwconv:                                                     # a label: each value sets several keys
        type: grid
        values: [{method: dtl}, {method: dtl_plus, kernel_size: 3}]

``when`` makes a parameter conditional on an earlier categorical one (sampled only when that one took one of
the listed values), which is what Optuna's define-by-run API expresses: :meth:`SearchSpace.define_by_run`
returns the function that ``OptunaSearch(space=...)`` calls for each trial. A trial's configuration is
therefore a complete override entry (``{method: ..., rank: ..., lr: ...}``) that can be written to
``sweeps/best.yaml`` as it is.

A malformed file raises :class:`~sweeps.space.SpaceError` naming the file and the key (``params.lr.low: expected ...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dtl.config import OVERRIDE_KEYS, TrainConfig, yaml_number
from dtl.methods import available_methods, canonical_name, get_method, method_options

from .space import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_STUDY_SEEDS,
    METHOD_SPECIFIC,
    PARAM_TYPES,
    RESERVED_TRAINING_KEYS,
    SCHEDULER_KEYS,
    SPACES_DIR,
    STUDY_EXCLUDED_KEYS,
    SYMBOLIC_BOUNDS,
    TOP_LEVEL_KEYS,
    ParamSpec,
    SearchSpace,
    SpaceError,
    grid_entries,
    is_int,
    is_number,
)


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_path(name_or_path: str | Path) -> Path:
    """``dtl_plus`` -> sweeps/spaces/dtl_plus.yaml; a path to a .yaml file is used as it is."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise SpaceError(f"{path}: search space file not found")
        return path.resolve()
    path = SPACES_DIR / f"{text}.yaml"
    if not path.is_file():
        raise SpaceError(f"unknown search space {text!r}: expected one of {', '.join(available_spaces())} "
                         f"(files in {SPACES_DIR}) or the path of a .yaml file")
    return path


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and validate a space file (by name in sweeps/spaces/ or by path)."""
    path = space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None
    return parse_space(raw, path)


def parse_space(raw: Any, path: Path) -> SearchSpace:
    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {message}")

    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
                         f"allowed: {', '.join(TOP_LEVEL_KEYS)}")

    method = raw.get("method")
    if not isinstance(method, str) or method not in method_options():
        raise fail("method", f"expected one of {', '.join(available_methods())}, got {method!r}")
    method = canonical_name(method)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", f"expected text, got {type(description).__name__}")
    num_samples = raw.get("num_samples", 8)
    if not is_int(num_samples) or num_samples < 1:
        raise fail("num_samples", f"expected an integer >= 1, got {num_samples!r}")

    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise fail("training", f"expected a mapping of training setting -> value, got {type(training).__name__}")
    training_keys = set(TrainConfig.field_names()) & {k for k, s in OVERRIDE_KEYS.items() if s == "training"}
    for key in training:
        if key not in training_keys or key in RESERVED_TRAINING_KEYS:
            allowed = sorted(training_keys - set(RESERVED_TRAINING_KEYS))
            raise fail(f"training.{key}", f"not a training setting a sweep may fix; allowed: {', '.join(allowed)}")
    try:
        TrainConfig(**{**TrainConfig().to_dict(), "cooldown_epochs": 0, **training})
    except ValueError as err:
        raise SpaceError(f"{path}: {err}") from None

    scheduler = raw.get("scheduler") or {}
    if not isinstance(scheduler, dict):
        raise fail("scheduler", f"expected a mapping with {', '.join(SCHEDULER_KEYS)}, got {type(scheduler).__name__}")
    for key in scheduler:
        if key not in SCHEDULER_KEYS:
            raise fail(f"scheduler.{key}", f"unknown key; allowed: {', '.join(SCHEDULER_KEYS)}")
    grace_period = scheduler.get("grace_period", DEFAULT_GRACE_PERIOD)
    reduction_factor = scheduler.get("reduction_factor", 2)
    if not (is_int(grace_period) and grace_period >= 1) and not _is_share(grace_period):
        raise fail("scheduler.grace_period", f"expected a number of epochs >= 1 or a share of the trials' epochs "
                                             f"such as '25%', got {grace_period!r}")
    if not is_int(reduction_factor) or reduction_factor < 2:
        raise fail("scheduler.reduction_factor", f"expected an integer >= 2, got {reduction_factor!r}")

    raw_params = raw.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise fail("params", "expected a non-empty mapping of override key -> {type, low, high | choices}")
    params: list[ParamSpec] = []
    for name, spec in raw_params.items():
        params.append(_parse_param(str(name), spec, params, training, fail))
    grids = [p.name for p in params if p.type == "grid"]
    seeds: tuple[int, ...] = ()
    if grids:
        sampled = [p.name for p in params if p.type != "grid"]
        if sampled:
            raise fail(f"params.{sampled[0]}", f"a study (grid parameters: {', '.join(grids)}) reports every point "
                                               "and samples nothing: make it a grid or fix it in the params file")
        present = [key for key in STUDY_EXCLUDED_KEYS if key in raw]
        if present:
            raise fail(present[0], "a study trains every point to the end with the pipeline's schedule: remove it")
        seeds = _parse_seeds(raw.get("seeds", list(DEFAULT_STUDY_SEEDS)), fail)
        _check_grid_methods(method, params, fail)
    else:
        if "seeds" in raw:
            raise fail("seeds", "only a study (a space of grid parameters) trains several seeds per point")
        _check_methods(method, params, fail)
    return SearchSpace(name=path.stem, path=path, method=method, params=tuple(params), description=description,
                       num_samples=num_samples, training=dict(training), grace_period=grace_period,
                       reduction_factor=reduction_factor, seeds=seeds)


def _parse_seeds(raw: Any, fail: Callable[[str, str], SpaceError]) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or not all(is_int(s) for s in raw) or len(set(raw)) != len(raw):
        raise fail("seeds", f"expected a non-empty list of distinct integers such as [0, 1, 2], got {raw!r}")
    return tuple(raw)


def _parse_grid(name: str, spec: dict, fail: Callable[[str, str], SpaceError]) -> ParamSpec:
    """``{type: grid, values: [...]}``: plain values of the override key ``name``, or mappings of override keys
    (then ``name`` is only a label)."""
    key = f"params.{name}"
    unknown = sorted(set(spec) - {"type", "values"})
    if unknown:
        raise fail(key, f"unknown key(s) {', '.join(map(str, unknown))} for type grid; allowed: type, values")
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise fail(f"{key}.values", f"expected a non-empty list of values (one per point), got {values!r}")
    if len(set(map(repr, values))) != len(values):
        raise fail(f"{key}.values", f"repeated value in {values!r}")
    is_key = name in OVERRIDE_KEYS
    for index, value in enumerate(values):
        where = f"{key}.values[{index}]"
        entry = value if isinstance(value, dict) else {name: value}
        if not isinstance(value, dict) and not is_key:
            raise fail(where, f"{name} is not an override key, so each value must be a mapping of override keys "
                              f"such as {{method: dtl_plus, kernel_size: 3}}, got {value!r}")
        if not entry:
            raise fail(where, "expected at least one override key")
        for option, setting in entry.items():
            if option not in OVERRIDE_KEYS:
                raise fail(f"{where}.{option}", f"not an override key; allowed: {', '.join(sorted(OVERRIDE_KEYS))}")
            if option in RESERVED_TRAINING_KEYS:
                raise fail(f"{where}.{option}", "is set by the study itself (its seeds and evaluation epochs)")
            if not isinstance(setting, (str, int, float, bool)) or setting is None:
                raise fail(f"{where}.{option}", f"expected a plain value (text, a number, true/false), got {setting!r}")
            if option == "method" and setting not in method_options():
                raise fail(f"{where}.method", f"unknown method {setting!r}; expected one of "
                                              f"{', '.join(available_methods())}")
    values = [{k: yaml_number(v) for k, v in value.items()} if isinstance(value, dict) else yaml_number(value)
              for value in values]
    return ParamSpec(name=name, type="grid", choices=tuple(values))


def _check_grid_methods(method: str, params: list[ParamSpec], fail: Callable[[str, str], SpaceError]) -> None:
    """Each point's method must take every option the point sets (a kernel for a method without a DWConv would
    be a point that differs from another only in name)."""
    for values, entry in grid_entries(params):
        point_method = canonical_name(entry.get("method", method))
        for option in entry:
            if option in METHOD_SPECIFIC and option not in method_options()[point_method]:
                owner = next(spec for spec, value in zip(params, values) if option in spec.point(value))
                takers = [m for m in available_methods() if option in method_options()[m]]
                raise fail(f"params.{owner.name}", f"the point {', '.join(f'{k}={v}' for k, v in entry.items())} "
                                                   f"sets {option}, which method {point_method} does not take "
                                                   f"(taken by {', '.join(takers)})")


def _parse_param(name: str, spec: Any, earlier: list[ParamSpec], training: Mapping[str, Any],
                 fail: Callable[[str, str], SpaceError]) -> ParamSpec:
    key = f"params.{name}"
    grid = isinstance(spec, dict) and spec.get("type") == "grid"
    if name not in OVERRIDE_KEYS and not grid:  # a grid of mappings is named by a label of its own
        raise fail(key, f"not an override key; allowed: {', '.join(sorted(OVERRIDE_KEYS))}")
    if name in training or name in RESERVED_TRAINING_KEYS:
        raise fail(key, "is fixed by the sweep (training section or reserved); it cannot be searched too")
    if not isinstance(spec, dict):
        raise fail(key, f"expected a mapping such as {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}, "
                        f"got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise fail(f"{key}.type", f"expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    if kind == "grid":
        return _parse_grid(name, spec, fail)
    allowed = {"type", "when"} | ({"choices"} if kind == "categorical" else {"low", "high", "log", "step"})
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise fail(key, f"unknown key(s) {', '.join(map(str, unknown))} for type {kind}; "
                        f"allowed: {', '.join(sorted(allowed))}")

    when = _parse_when(spec.get("when"), key, earlier, fail)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", f"expected a non-empty list, got {choices!r}")
        if any(not isinstance(c, (str, int, float, bool)) or c is None for c in choices):
            raise fail(f"{key}.choices", f"expected plain values (text, numbers, true/false), got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise fail(f"{key}.choices", f"repeated choice in {choices!r}")
        if name == "method":
            bad = [c for c in choices if not isinstance(c, str) or c not in method_options()]
            if bad:
                raise fail(f"{key}.choices", f"unknown method(s) {bad}; expected some of {', '.join(available_methods())}")
        return ParamSpec(name=name, type=kind, choices=tuple(choices), when=when)

    def bound(which: str) -> Any:
        value = yaml_number(spec.get(which)) if kind == "float" else spec.get(which)  # 1e-4 (YAML 1.1: text)
        if kind == "int" and isinstance(value, str):
            if value not in SYMBOLIC_BOUNDS:
                raise fail(f"{key}.{which}", f"expected an integer or one of {', '.join(SYMBOLIC_BOUNDS)}, got {value!r}")
            return value
        number_ok = is_int(value) if kind == "int" else (is_number(value) and math.isfinite(value))
        if not number_ok:
            raise fail(f"{key}.{which}", f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        return int(value) if kind == "int" else float(value)

    low, high = bound("low"), bound("high")
    if not isinstance(low, str) and not isinstance(high, str) and low > high:
        raise fail(key, f"low ({low}) must not exceed high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{key}.log", f"expected true or false, got {log!r}")
    if log and not isinstance(low, str) and low <= 0:
        raise fail(f"{key}.low", f"a log-scaled range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if not (is_int(step) if kind == "int" else is_number(step)) or step <= 0:
            raise fail(f"{key}.step", f"expected a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if log:
            raise fail(key, "step and log cannot be combined (Optuna does not support it)")
    return ParamSpec(name=name, type=kind, low=low, high=high, log=log, step=step, when=when)


def _parse_when(raw: Any, key: str, earlier: list[ParamSpec],
                fail: Callable[[str, str], SpaceError]) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise fail(f"{key}.when", f"expected a mapping of earlier categorical parameter -> value(s), got {raw!r}")
    by_name = {p.name: p for p in earlier}
    when: dict[str, tuple[Any, ...]] = {}
    for other, values in raw.items():
        target = by_name.get(other)
        if target is None or target.type != "categorical":
            raise fail(f"{key}.when.{other}", "must name a categorical parameter listed earlier in params")
        values = tuple(values) if isinstance(values, list) else (values,)
        bad = [v for v in values if v not in target.choices]
        if bad:
            raise fail(f"{key}.when.{other}", f"value(s) {bad} are not among its choices {list(target.choices)}")
        when[other] = values
    return when


def _check_methods(method: str, params: list[ParamSpec], fail: Callable[[str, str], SpaceError]) -> None:
    """A method-specific option (``kernel_size``, ``start_block``...) must only be sampled for methods taking it,
    so no trial wastes a search dimension on a setting its model ignores."""
    method_param = next((p for p in params if p.name == "method"), None)
    for spec in params:
        if spec.name not in METHOD_SPECIFIC:
            continue
        if method_param is None:
            possible = {method}
        else:
            possible = set(spec.when.get("method", method_param.choices))
        wrong = sorted(m for m in possible if spec.name not in method_options()[m])
        if wrong:
            takers = [m for m in available_methods() if spec.name in method_options()[m]]
            raise fail(f"params.{spec.name}", f"method(s) {', '.join(wrong)} do not take {spec.name} (taken by "
                                              f"{', '.join(takers)}); add `when: {{method: [...]}}` or remove it")
        fixed = sorted(m for m in possible if spec.name not in get_method(canonical_name(m)).searchable)
        if fixed:
            raise fail(f"params.{spec.name}", f"a sweep may not search {spec.name} of method(s) {', '.join(fixed)} "
                                              "(it changes how a trial runs, not the model it trains)")


def _is_share(value: Any) -> bool:
    """'25%': a percentage in (0, 100]."""
    if not isinstance(value, str) or not value.endswith("%"):
        return False
    try:
        return 0 < float(value[:-1]) <= 100
    except ValueError:
        return False
