"""The optional parts of the toolkit: ``import dtl`` needs torch and timm only; the DVC pipeline and the sweeps
each need packages of their own, installed as extras (``pip install '.[pipeline]'``, ``'.[sweeps]'``,
``'.[all]'``; see pyproject.toml)."""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def require_extra(part: str, extra: str, modules: Sequence[str]) -> None:
    """Stop in one line, naming the extra to install, when a module ``part`` needs is not installed (checked
    before anything of ``part`` runs, so the error is not an ImportError from deep inside it)."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"{part} needs {', '.join(missing)}, not installed here: pip install '.[{extra}]' in the "
                         f"repository (or '.[all]'); the library alone (import dtl) needs none of them")
