"""The method registry: one :class:`Method` per PETL method, registered by the module that implements it.

A method says what it needs and what it can do, so that nothing else in the toolkit has to know it by name:

* ``options``: a dataclass of the method's own settings (``rank``, ``start_block``...), every field defaulting to
  ``None`` = "the method's default for this backbone" (:meth:`MethodOptions.resolved`), validated on creation
  with errors that name ``model.<field>``;
* ``build(family, head, options, backbone_dtype)``: the model, ending in ``model.head`` (built from ``head``, a
  ``dtl.methods.heads.HeadSpec``: a classifier or a segmentation decode head); given
  as ``"package.module:function"`` it is imported on first use, so the registry (and the experiment schema
  that reads it) imports no torch;
* capabilities: ``low_precision_backbone`` (can store the frozen backbone in bf16/fp16), ``families`` (names of
  the backbone families it supports, as ``BackboneFamily.name`` gives them; empty: any), ``searchable`` (options
  a sweep may search);
* what ``dtl.benchmark`` reads: ``benchmark_variants`` (extra rows), ``benchmark_reference`` (the other rows'
  figures are also given as ratios to this method's), ``benchmark_targets`` (:class:`BenchmarkTargets`) and
  ``added_modules`` (:class:`AddedModules`: how the modules it adds count in the breakdown of the bytes kept for
  backward).

``dtl.create_model``, the experiment schema (``dtl.config``: the model options and the per-task override keys),
the benchmark rows and the sweeps' method checks are all derived from here. A new method is one sub-package of
``dtl/methods/`` whose ``__init__`` calls :func:`register_method` (``full/`` is the smallest).
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ..validation import ConfigError, need


class OptionError(ConfigError):
    """A method option has a wrong value; the message names ``model.<option>``."""


@dataclass
class MethodOptions:
    """Base of every method's options dataclass: fields default to None (the method's default for the backbone)."""

    # option -> (check, what is allowed), evaluated on every non-None value
    checks: ClassVar[Mapping[str, tuple[Callable[[Any], bool], str]]] = {}

    def __post_init__(self) -> None:
        for name, (ok, expected) in self.checks.items():
            value = getattr(self, name)
            if value is not None:
                try:
                    need(ok(value), f"model.{name}", expected, value)
                except ConfigError as err:
                    raise OptionError(str(err)) from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def defaults(self, family) -> dict[str, Any]:
        """The values of unset (None) options for this backbone; override in methods with family defaults."""
        return {}

    def resolved(self, family) -> dict[str, Any]:
        """Every option with a value: the ones set, the method's defaults for ``family`` for the others."""
        defaults = self.defaults(family)
        values = {name: getattr(self, name) for name in self.names()}
        return {name: defaults.get(name) if value is None else value for name, value in values.items()}


@dataclass(frozen=True)
class AddedModules:
    """The modules a method adds to a model, as ``dtl.benchmark.saved_bytes_breakdown`` counts them: bytes kept
    while one of them runs count as ``kind``, unless the module sits in a part of the backbone that the breakdown
    names first (the head, an attention or an MLP)."""

    kind: str  # the breakdown kind they count as: "side network", "adapter"...
    names: tuple[str, ...] = ()  # fragments of their module names (matched against each part of the dotted name)
    own_forward: bool = False  # the model's own forward (outside every submodule) runs them too: its bytes count


@dataclass(frozen=True)
class BenchmarkTargets:
    """The project's memory and speed targets for a method's benchmark rows (``dtl.benchmark.check_targets``).

    ``ratios`` (ViT-B/16, 224 px, batch 32) and ``segmentation`` (ViT-B/16, 512 px, the multi-level head) bound a
    row's figure divided by a reference row's: ``(row, figure, reference row, bound, "max" or "min")``; ``peaks``
    bound a row's GPU peak memory in bytes, bf16: ``(row, bytes)``."""

    ratios: tuple[tuple[str, str, str, float, str], ...] = ()
    segmentation: tuple[tuple[str, str, str, float, str], ...] = ()
    peaks: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Method:
    """One registered method (see the module docstring)."""

    name: str
    description: str
    options: type[MethodOptions]
    build: Callable[..., Any] | str  # (family, head spec, options, backbone_dtype) -> model, or "module:function"
    low_precision_backbone: bool = False
    families: tuple[str, ...] = ()  # names of the backbone families it supports; empty: every family
    needs: str = ""  # what of the backbone it modifies, for the refusal on other families ("attention qkv ...")
    searchable: tuple[str, ...] = ()
    benchmark_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # row -> options (+cached)
    benchmark_reference: bool = False  # every row's figures also as ratios to this method's (``<figure>_vs_<name>``)
    benchmark_targets: BenchmarkTargets = BenchmarkTargets()
    added_modules: AddedModules | None = None  # None: what it trains counts as the backbone part it lies in

    def make_options(self, values: Mapping[str, Any]) -> MethodOptions:
        unknown = sorted(set(values) - set(self.options.names()))
        if unknown:
            allowed = ", ".join(self.options.names()) or "none"
            raise TypeError(f"method {self.name!r} does not take option(s) {', '.join(unknown)} "
                            f"(method options: {allowed})")
        return self.options(**values)

    def builder(self) -> Callable[..., Any]:
        """The build function (imported now when it was registered as ``"module:function"``)."""
        if callable(self.build):
            return self.build
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    def supports(self, family) -> bool:
        """Whether the method runs on this backbone family (a subclass of a supported family counts)."""
        names = {getattr(cls, "name", "") for cls in type(family).__mro__}
        return not self.families or bool(names & set(self.families))


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, tuple[str, str]] = {}  # old name -> (new name, deprecation note)


def register_method(method: Method, aliases: Mapping[str, str] | None = None) -> Method:
    """Make ``method`` available by name (and ``aliases``: old name -> deprecation note)."""
    if method.name in _METHODS or method.name in _ALIASES:
        raise ValueError(f"a method named {method.name!r} is registered already")
    defaults = [f.name for f in fields(method.options) if f.default is not None or f.default_factory is not MISSING]
    if defaults:
        raise TypeError(f"{method.options.__name__}: options must default to None (the method's default), "
                        f"not {', '.join(defaults)}")
    _METHODS[method.name] = method
    for alias, note in (aliases or {}).items():
        _ALIASES[alias] = (method.name, note)
    return method


def available_methods() -> tuple[str, ...]:
    """Registered method names, in registration order (aliases excluded)."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a deprecated alias works with a warning."""
    if name in _ALIASES:
        new, note = _ALIASES[name]
        warnings.warn(f"method {name!r} is deprecated: use {new!r} ({note})", DeprecationWarning, stacklevel=3)
        name = new
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(_METHODS)}") from None


def canonical_name(name: str) -> str:
    """``name`` with a deprecated alias replaced by its method's name (no warning)."""
    return _ALIASES.get(name, (name, ""))[0]


def all_option_names() -> tuple[str, ...]:
    """Every option of every method, in registration order (the flat ``model.*`` keys besides the common ones)."""
    names: dict[str, None] = {}
    for method in _METHODS.values():
        names.update(dict.fromkeys(method.options.names()))
    return tuple(names)


def float_option_names() -> set[str]:
    """Options some method declares as numbers with a fraction (``beta``): where ``1e-4``-style text means a number."""
    return {f.name for method in _METHODS.values() for f in fields(method.options) if "float" in str(f.type)}


def method_options() -> dict[str, tuple[str, ...]]:
    """method name (aliases included) -> the options it takes."""
    table = {name: method.options.names() for name, method in _METHODS.items()}
    table.update({alias: table[new] for alias, (new, _) in _ALIASES.items()})
    return table


# The dtypes a frozen backbone can be stored in (``dtl.methods.factory.resolve_dtype`` maps them to torch).
BACKBONE_DTYPES = ("fp32", "bf16", "fp16")
