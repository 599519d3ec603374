"""Evaluation protocols, one module each, behind a registry (``dtl.protocols.base``).

``final`` and ``val`` read VTAB-1K folders (``vtab.py``), ``few_shot`` and ``domain_generalization`` the NOAH
list-file layout (``noah.py``), ``segmentation`` and ``segmentation_val`` ADE20K's folder layout
(``segmentation.py``). ``config.protocol`` is the protocol of a configuration, bound to it; the pipeline
stages, the sweeps and the report ask it, so a new protocol is one module here that subclasses
:class:`~dtl.protocols.base.Protocol` and calls :func:`register_protocol`. Nothing here imports torch.
"""
from __future__ import annotations

# Registration order is the order messages and docs list the protocols in.
from . import final, val, few_shot, domain_generalization, segmentation  # noqa: F401  # isort: skip
from .base import (
    Protocol,
    SyntheticSuite,
    available_protocols,
    data_sources,
    get_protocol,
    protocols_for_source,
    register_protocol,
)
from .noah import TARGET_PREFIX

__all__ = ["TARGET_PREFIX", "Protocol", "SyntheticSuite", "available_protocols", "data_sources", "get_protocol",
           "protocols_for_source", "register_protocol"]
