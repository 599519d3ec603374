"""The one way settings are checked: ``need(ok, key, expected, value)`` raises :class:`ConfigError` with the
message ``<key>: expected <what is allowed>, got <value>``, and small predicates say what "allowed" means.

The experiment schema's sections (``dtl.config``), the training settings and every method's options use it, so
an error reads the same wherever it comes from and callers catch one exception type. Nothing here imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names the key (``model.rank``, ``training.lr``)."""


def need(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def is_int(low: int, high: int | None = None) -> Callable[[Any], bool]:
    """An integer (not a bool) in ``low..high``."""
    return lambda value: (isinstance(value, int) and not isinstance(value, bool) and value >= low
                          and (high is None or value <= high))


def is_number(low: float, *, above: bool = False, below: float | None = None) -> Callable[[Any], bool]:
    """A finite number (not a bool) >= ``low`` (> with ``above``), and < ``below`` when given."""
    def check(value: Any) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok and (value > low if above else value >= low) and (below is None or value < below)
    return check


def describe_number(low: float, *, above: bool = False, below: float | None = None) -> str:
    """The words for :func:`is_number`'s range: ``a number > 0``, ``a number in [0, 1)``."""
    if below is not None:
        return f"a number in [{low:g}, {below:g})"
    return f"a number {'>' if above else '>='} {low:g}"
