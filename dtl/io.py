"""Atomic file writes: a crash mid-write leaves the previous file (or none), never a truncated one; and where the
repository is."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows has no fcntl: file_lock then only relies on atomic renames
    fcntl = None

if TYPE_CHECKING:  # annotations only: tracking/ and the pipeline's params read REPO_ROOT here without loading torch
    import torch
    from torch import nn

# The checkout that holds dtl/, pipeline/, sweeps/ and params.yaml; relative paths of the params files start there.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"  # what the DVC pipeline trains; a sweep starts from it too
DEFAULT_BEST = REPO_ROOT / "sweeps" / "best.yaml"  # the sweeps' winners, merged over params.yaml's tasks


def current_umask() -> int:
    """The process's umask (what ``open(path, "w")`` and ``mkdir`` subtract from 0o666 / 0o777)."""
    try:
        with open("/proc/self/status") as status:  # Linux: read it without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def file_lock(path: str | Path):
    """An exclusive lock between processes, held on the file ``path`` (made if missing) while the block runs:
    for read-modify-write of a shared file, or building a shared cache entry once."""
    if fcntl is None:  # no fcntl (Windows): atomic renames still keep each file whole
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, with the
    permissions an ordinary write would have given it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0o600; an ordinary write follows the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path`` (old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0o700; an ordinary folder follows the umask
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data, indent: int = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changed: kilobytes for DTL, not the backbone. That is the trainable parameters and the
    buffers of the modules they belong to (the running statistics of a batch norm that trains)."""
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buffer in module.named_buffers(prefix=prefix, recurse=False):
                state[name] = buffer.detach().cpu().contiguous()
    return state


def save_trainable(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # torch-free module (schema, tracking/): safetensors.torch loads torch

    with atomic_path(path) as tmp:
        save_file(trainable_state_dict(model), str(tmp), metadata=metadata)


class WeightsMismatchError(ValueError):
    """Saved trainable weights do not fit the model they are loaded into."""


def load_trainable(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load weights written by :func:`save_trainable` into a model built with the same settings (``state``: the
    weights already read from ``path``, which then only names them in errors)."""
    from safetensors.torch import load_file  # torch-free module (schema, tracking/): safetensors.torch loads torch

    if state is None:
        state = load_file(str(path))
    # Files written before the backbone interface was named ``family`` call its tensors ``adapter.*``.
    state = {f"family.{k[len('adapter.'):]}" if k.startswith("adapter.") else k: v for k, v in state.items()}
    expected = {name: tuple(t.shape) for name, t in trainable_state_dict(model).items()}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise WeightsMismatchError(f"{path} does not match the model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    wrong = [name for name, shape in expected.items() if tuple(state[name].shape) != shape]
    if wrong:
        name = wrong[0]
        raise WeightsMismatchError(f"{path} does not match the model: {name} is {tuple(state[name].shape)} in the "
                                   f"file, {expected[name]} in the model ({len(wrong)} such tensor(s))")
    model.load_state_dict(state, strict=False)

