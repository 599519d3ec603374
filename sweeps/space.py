"""A search space as objects: its parameters (:class:`ParamSpec`), the space (:class:`SearchSpace`) and the
define-by-run function Optuna samples it with (:class:`DefineByRun`). Files become spaces in
:mod:`sweeps.space_file`, which documents their format.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dtl.methods import canonical_name, method_options

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
PARAM_TYPES = ("int", "float", "categorical", "grid")
# Symbolic bounds an int parameter may use; resolved per backbone by :meth:`SearchSpace.resolve`.
SYMBOLIC_BOUNDS = ("last_block",)
SYMBOLIC_KEYS = ("start_block", "extract_start")  # grid values of these may be written ``last_block`` too
TOP_LEVEL_KEYS = ("description", "method", "num_samples", "seeds", "training", "scheduler", "params")
# What a study may not have: it runs every point to the end with the pipeline's schedule.
STUDY_EXCLUDED_KEYS = ("num_samples", "training", "scheduler")
DEFAULT_STUDY_SEEDS = (0, 1, 2)
SCHEDULER_KEYS = ("grace_period", "reduction_factor")
DEFAULT_GRACE_PERIOD = "25%"
# Training keys that the sweep itself decides (when val200 is scored: at ASHA's rungs; the seed).
RESERVED_TRAINING_KEYS = ("eval_every", "seed")
# Model options that only some methods take (checked against the methods a parameter can meet).
METHOD_SPECIFIC = sorted({option for options in method_options().values() for option in options})



def for_method(values: Mapping[str, Any], current: str, method: str) -> dict[str, Any]:
    """Flat override keys for ``method`` from ``values``, which were set for the ``current`` method: when the
    method changes, every method-specific option is unset, so the new method runs at its own defaults (another
    method's options mean something else to it, or nothing)."""
    if canonical_name(method) == canonical_name(current):
        return dict(values)
    return {**values, **dict.fromkeys(METHOD_SPECIFIC)}

class SpaceError(ValueError):
    """A search space file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter. ``when`` maps an earlier categorical parameter to the values that enable this one."""

    name: str
    type: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()  # categorical: the choices; grid: the values, one per point
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def active(self, sampled: Mapping[str, Any]) -> bool:
        return all(sampled.get(name) in values for name, values in self.when.items())

    def point(self, value: Any) -> dict[str, Any]:
        """The override keys a grid value sets: ``{name: value}``, or the value itself when it is a mapping."""
        return dict(value) if isinstance(value, Mapping) else {self.name: value}

    def label(self, value: Any) -> str:
        """``start_block=3``; ``method=dtl_plus kernel_size=3`` for a mapping value."""
        return " ".join(f"{k}={v}" for k, v in self.point(value).items())

    def describe(self) -> str:
        if self.type == "grid":
            return f"{self.name}: grid [" + "; ".join(self.label(v) for v in self.choices) + "]"
        if self.type == "categorical":
            text = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            text = f"{self.low}..{self.high}" + (" log" if self.log else "") + (f" step {self.step}" if self.step else "")
        if self.when:
            text += " if " + " and ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return f"{self.name}: {text}"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    method: str
    params: tuple[ParamSpec, ...]
    description: str = ""
    num_samples: int = 8
    training: Mapping[str, Any] = field(default_factory=dict)  # an explicit shortened schedule; {}: the pipeline's
    grace_period: int | str = DEFAULT_GRACE_PERIOD  # ASHA's first rung: epochs, or a share of the epochs ("25%")
    reduction_factor: int = 2
    seeds: tuple[int, ...] = ()  # a study's training seeds (every point runs once per seed and task)

    @property
    def is_study(self) -> bool:
        """A study (all parameters grids) reports every point; a search selects a winner."""
        return bool(self.params) and all(p.type == "grid" for p in self.params)

    def grid_points(self) -> list[tuple[str, dict[str, Any]]]:
        """Every point of a study, in file order (the last grid varies fastest): (label, override entry)."""
        return [(", ".join(spec.label(v) for spec, v in zip(self.params, values)), {**self.constants(), **entry})
                for values, entry in grid_entries(self.params)]

    def grace_epochs(self, epochs: int) -> int:
        """ASHA's first rung, in epochs, for trials of ``epochs`` epochs."""
        if isinstance(self.grace_period, str):
            share = float(self.grace_period.rstrip("%")) / 100
            return min(epochs, max(1, math.ceil(share * epochs)))
        return min(epochs, self.grace_period)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def constants(self) -> dict[str, Any]:
        """Override keys every trial gets besides its sampled ones (the method, unless it is searched)."""
        return {} if "method" in self.param_names else {"method": self.method}

    def resolve(self, num_blocks: int) -> "SearchSpace":
        """Replace symbolic bounds (``last_block``) with numbers for a backbone of ``num_blocks`` blocks."""
        symbols = {"last_block": num_blocks - 1}
        params = []
        for spec in self.params:
            if spec.type == "grid":
                values = tuple({k: symbols.get(v, v) if k in SYMBOLIC_KEYS else v for k, v in spec.point(value).items()}
                               if isinstance(value, Mapping) else symbols.get(value, value)
                               if isinstance(value, str) and spec.name in SYMBOLIC_KEYS else value
                               for value in spec.choices)
                params.append(replace(spec, choices=values))
                continue
            low, high = (symbols.get(v, v) if isinstance(v, str) else v for v in (spec.low, spec.high))
            if spec.type != "categorical" and low > high:
                raise SpaceError(f"{self.path}: params.{spec.name}: low ({low}) > high ({high}) for a backbone with "
                                 f"{num_blocks} blocks")
            params.append(replace(spec, low=low, high=high))
        return replace(self, params=tuple(params))

    def define_by_run(self) -> "DefineByRun":
        """The function ``OptunaSearch(space=...)`` calls per trial (see :class:`DefineByRun`)."""
        if self.is_study:
            raise SpaceError(f"{self.path}: a study (grid parameters) has no sampler: its points are its grids")
        unresolved = [p.name for p in self.params if isinstance(p.low, str) or isinstance(p.high, str)]
        if unresolved:
            raise SpaceError(f"{self.path}: call resolve(num_blocks) first: symbolic bounds in {', '.join(unresolved)}")
        return DefineByRun(self.params, self.constants())

    def start_point(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """The base configuration as a point of this space, to be tried first; or None and the reason.

        ``settings`` maps each parameter name to the value the task trains with now (``params.yaml``, its
        overrides and any earlier sweep winner, defaults resolved). Seeding the search with it makes the current
        configuration compete in every sweep: a winner has to beat it on val200 under the same budget.
        """
        point: dict[str, Any] = {}
        for spec in self.params:
            if not spec.active(point):
                continue
            value = settings.get(spec.name)
            if spec.type == "categorical":
                inside = value in spec.choices
            else:
                inside = is_number(value) and spec.low <= value <= spec.high and (spec.type == "float" or is_int(value))
            if not inside:
                return None, f"the current {spec.name} ({value!r}) lies outside the space ({spec.describe()})"
            point[spec.name] = value
        return point, ""

    def summary(self) -> str:
        if self.is_study:
            points = self.grid_points()
            lines = [f"study {self.name} ({self.path}): method {self.method}, {len(points)} points x "
                     f"{len(self.seeds)} seeds ({', '.join(map(str, self.seeds))}) per task"]
            lines += [f"  {spec.describe()}" for spec in self.params]
            lines.append("  every point trains to the end with the pipeline's schedule and protocol (tested, "
                         "never selected)")
            return "\n".join(lines)
        lines = [f"space {self.name} ({self.path}): method {self.method}, {self.num_samples} samples per task"]
        lines += [f"  {spec.describe()}" for spec in self.params]
        if self.training:
            lines.append("  shortened training for every trial: "
                         + ", ".join(f"{k}={v}" for k, v in self.training.items()))
        else:
            lines.append("  every trial trains with the pipeline's schedule (the task's training settings)")
        lines.append(f"  ASHA: first rung at {self.grace_period}{'' if isinstance(self.grace_period, str) else ' epochs'}"
                     f", reduction factor {self.reduction_factor}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DefineByRun:
    """Optuna define-by-run function: samples the active parameters in file order (a conditional one only when
    its condition holds) and returns the constants to merge into the trial's config. A class rather than a
    closure because OptunaSearch pickles it into the experiment state (for ``--resume``)."""

    params: tuple[ParamSpec, ...]
    constants: Mapping[str, Any]

    def __call__(self, trial) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        for spec in self.params:
            if not spec.active(sampled):
                continue
            if spec.type == "int":
                sampled[spec.name] = trial.suggest_int(spec.name, spec.low, spec.high, step=spec.step or 1, log=spec.log)
            elif spec.type == "float":
                sampled[spec.name] = trial.suggest_float(spec.name, spec.low, spec.high, step=spec.step, log=spec.log)
            else:
                sampled[spec.name] = trial.suggest_categorical(spec.name, list(spec.choices))
        return dict(self.constants)

def grid_entries(params: Sequence[ParamSpec]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every combination of the grids' values (the last grid varies fastest) and the override keys it sets."""
    combos = []
    for values in itertools.product(*(spec.choices for spec in params)):
        entry: dict[str, Any] = {}
        for spec, value in zip(params, values):
            entry.update(spec.point(value))
        combos.append((values, entry))
    return combos


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
