"""A search's plan per task, fixed and validated before any trial starts.

Per task: the trials' schedule (the pipeline's own unless the space shortens it), ASHA's first rung, and the
current configuration as the first trial (the incumbent). Every bound of the space is checked against the task's
backbone (the schema, and the model built once with random weights), so a space that cannot work fails here,
naming the bound, and not in the middle of a sweep. A study checks its grid points with the same model check.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dtl.config import ConfigError, ExperimentConfig, TaskConfig
from dtl.experiment import build_model
from dtl.methods import all_option_names, canonical_name, get_method
from dtl.models import create_backbone, family_for

from .space import SearchSpace, for_method
from .state import SweepError


@dataclass(frozen=True)
class TaskPlan:
    """How one task is searched."""

    task: str
    space: SearchSpace  # bounds resolved for the task's backbone
    epochs: int  # of a trial trained to the end
    final_epochs: int  # what the pipeline retrains the winner with
    grace_epochs: int  # ASHA's first rung
    start: dict[str, Any] | None  # the current configuration as a point of the space (the incumbent)
    why_not: str  # why the current configuration is not a point of the space

    @property
    def shortened(self) -> bool:
        return self.epochs < self.final_epochs


def task_backbone(settings: TaskConfig):
    """The task's backbone (random weights) seen through its family interface: its number of blocks fixes the
    symbolic bound ``last_block``, and each method's defaults for it say what a ``null`` option means."""
    return family_for(create_backbone(settings.model.backbone, False, img_size=settings.data.image_size))


def current_settings(settings: TaskConfig, space: SearchSpace, family) -> dict[str, Any]:
    """What the task trains with now (params.yaml, its overrides and any earlier sweep winner) as flat override
    keys with the defaults filled in: the sweep's first trial. A space with a fixed method of its own (lora,
    adaptformer) starts from the current lr, weight decay and drop-path with that method's default options."""
    method = settings.model.method if "method" in space.param_names else space.method
    values = for_method({**asdict(settings.training), **asdict(settings.model)}, settings.model.method, method)
    values["method"] = method
    spec = get_method(canonical_name(method))
    options = spec.make_options({k: values[k] for k in spec.options.names() if values.get(k) is not None})
    values.update(options.resolved(family))
    return values


def plan_task(config: ExperimentConfig, task: str, space: SearchSpace, scheduler: str = "asha") -> TaskPlan:
    """Fail before any trial starts if the base settings + the space's schedule do not validate; else the plan."""
    schedule = {**space.training, **space.constants()}  # what every trial of the space trains with
    try:
        training = config.for_task(task, schedule, where=f"{space.path} training + base config").training
        settings = config.for_task(task)
    except ConfigError as err:
        raise SweepError(str(err)) from None
    grace = space.grace_epochs(training.epochs)
    every = training.eval_every
    if config.protocol.keep_best and every and grace % every:
        # a trial keeps its best-validated epoch as the pipeline will: on the pipeline's evaluation epochs only
        grace = max(every, round(grace / every) * every)
    # During warm-up the lr is still ramping from warmup_lr: an ASHA rung there ranks untrained models, and
    # stops good configurations at random.
    if scheduler == "asha" and grace <= training.warmup_epochs < training.epochs:
        raise SweepError(f"{space.path}: scheduler.grace_period ({space.grace_period}: epoch {grace} of "
                         f"{training.epochs}) must exceed the trials' warmup_epochs ({training.warmup_epochs}): "
                         "ASHA's first rung would compare models still warming up. Raise grace_period")
    check_validation_list(config, task)
    family = task_backbone(settings)
    resolved_space = space.resolve(len(family.blocks))
    start, why_not = resolved_space.start_point(current_settings(settings, space, family))
    check_space_bounds(config, task, resolved_space, schedule)
    return TaskPlan(task=task, space=resolved_space, epochs=training.epochs, final_epochs=settings.training.epochs,
                    grace_epochs=grace, start=start, why_not=why_not)


def check_validation_list(config: ExperimentConfig, task: str) -> None:
    """Trials select on a validation list, never on test or target sets: a domain-generalisation source without
    ``val_meta.list`` cannot be swept."""
    selection = config.for_selection().protocol
    if "val" not in selection.scored_splits(task):
        raise SweepError(f"{task}: sweeps select on {selection.split_list(task, 'val')}, which does not exist; add "
                         "held-out source images there (lines 'relative/path label'), never target or test images")


def check_space_bounds(config: ExperimentConfig, task: str, space: SearchSpace, schedule: Mapping[str, Any]) -> None:
    """Every value a trial may draw must be a valid setting for the task's backbone: each parameter's low and high
    (each choice of a categorical one) is validated against the schema, and those of model options by building
    the model once with random weights (the start block against the backbone's blocks, the kernel against its
    token grid...). So a space that cannot work fails here, before any trial, naming the bound."""
    for spec in space.params:
        enabling = {name: allowed[0] for name, allowed in spec.when.items()}  # earlier parameters it depends on
        bounds = ([("choices", choice) for choice in spec.choices] if spec.type == "categorical"
                  else [("low", spec.low), ("high", spec.high)])
        for which, value in bounds:
            try:
                resolved = config.for_task(task, {**schedule, **enabling, spec.name: value}, where="")
                if spec.name in all_option_names() or spec.name == "method":
                    check_model_builds(resolved)
            except ConfigError as err:
                # the schema's message without the check's own location ("overrides.<task>: training.<key>: ",
                # "model (<method> on <backbone>): "): the bound named above is the location
                reason = re.sub(r"^:?\s*((overrides\.[^:\s]+|[a-z_]+\.[a-z_]+|model \([^)]*\)): )*", "", str(err))
                raise SweepError(f"{space.path}: params.{spec.name}.{which}: {value!r} cannot be trained with "
                                 f"{config.model.backbone}: {reason}") from None


_BUILT_MODELS: set[str] = set()


def check_model_builds(resolved: TaskConfig) -> None:
    """``build_model`` with random weights, once per distinct backbone, method and options."""
    key = repr((resolved.model.backbone, resolved.data.image_size, resolved.model.method,
                sorted(resolved.model.model_options().items()), resolved.model.drop_path_scope))
    if key not in _BUILT_MODELS:
        build_model(resolved, 2, pretrained=False)
        _BUILT_MODELS.add(key)
