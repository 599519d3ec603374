"""Creating a frozen-able timm backbone from a hub name or a local checkpoint, with errors a user can act on."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from .registry import creation_options

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
# Keys a classification checkpoint may carry that a headless backbone does not use.
# Parts of a classifier that a headless backbone may lack (an attention pool: SigLIP's, PE's, replaced by DTL's
# head); a checkpoint's weights of those parts are skipped unless the backbone has them (EVA-02's fc_norm is its
# final norm).
_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.", "attn_pool.")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the chosen backbone."""


def create_backbone(
    name: str,
    pretrained: bool | str | Path = False,
    *,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build the timm model ``name`` without a classifier (num_classes=0) and load weights.

    ``pretrained`` is False (random init), True (timm's hub; fails offline with advice) or the path of a local
    ``.npz`` (original ViT release), ``.pth``/``.pt``/``.bin`` or ``.safetensors`` checkpoint.
    Drop-path follows timm's stochastic-depth rule over all blocks, as in the authors' code. Only keywords the
    model's class takes are passed to it: the family's creation options where it takes them, and a setting it
    cannot take is refused in one line naming the model and the keyword.
    """
    if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise ValueError(
            f"unknown backbone {name!r}: expected a timm model name such as 'vit_base_patch16_224' "
            "or the embedded 'vit_micro_patch4_32' (see timm.list_models('vit_*'))"
        )
    skeleton = backbone_skeleton(name)
    model_class = type(skeleton)
    accepted = constructor_keywords(model_class)
    kwargs: dict = {"num_classes": 0, **{key: value for key, value in creation_options(skeleton).items()
                                         if accepted is None or key in accepted}}
    for key, value in (("drop_path_rate", drop_path_rate), ("img_size", img_size)):
        if not value:
            continue
        if accepted is None or key in accepted:
            kwargs[key] = value
        elif key == "drop_path_rate":
            raise ValueError(f"backbone {name!r} ({model_class.__name__}) takes no drop_path_rate: set "
                             "model.drop_path: 0")

    if pretrained is True:
        shipped = timm.models.get_pretrained_cfg(name)
        if shipped is not None and shipped.file:  # weights that ship with a package, e.g. the embedded backbone
            pretrained = shipped.file
    if pretrained is True:
        try:
            return _create(name, True, kwargs, img_size)
        except Exception as err:  # offline hub: LocalEntryNotFoundError, OSError, HTTP errors
            raise CheckpointError(
                f"could not fetch pretrained weights for {name!r} from the hub ({type(err).__name__}: {err}). "
                "This machine may be offline: download the checkpoint elsewhere and pass its path instead, "
                "e.g. pretrained='/path/to/ViT-B_16.npz' (or .pth/.safetensors)."
            ) from err

    model = _create(name, False, kwargs, img_size)
    if pretrained:
        load_checkpoint(model, pretrained)
    return model


def backbone_skeleton(name: str) -> nn.Module:
    """The model timm builds for ``name`` with its defaults, on the meta device (no memory, no weights): what
    the family's creation options and the accepted keywords are read from."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0)
    except Exception:  # a model whose construction computes with real tensors: build it for real, once
        return timm.create_model(name, pretrained=False, num_classes=0)


def constructor_keywords(model_class: type[nn.Module]) -> set[str] | None:
    """The keyword arguments ``model_class`` takes (None: any, through ``**kwargs``)."""
    parameters = inspect.signature(model_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _create(name: str, pretrained: bool, kwargs: dict, img_size: int | None) -> nn.Module:
    """``timm.create_model``; a model that takes any input size (a CNN) has no ``img_size`` argument, so the size
    it runs at is recorded in its ``pretrained_cfg`` instead (what the token grids and the data are sized by)."""
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if img_size is not None and "img_size" not in kwargs:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into a headless backbone, checking that every backbone weight was found."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"unsupported checkpoint type {path.suffix!r} for {path}: expected one of {CHECKPOINT_SUFFIXES}")

    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"{path}: .npz checkpoints are supported for ViT backbones only")
        try:
            model.load_pretrained(str(path))
        except Exception as err:  # npz layout mismatch surfaces as KeyError/ValueError deep in timm
            raise CheckpointError(f"{path} does not fit {type(model).__name__}: {type(err).__name__}: {err}") from err
        return

    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as err:
        # torch's own message for a file it will not unpickle suggests weights_only=False, i.e. running whatever
        # code the file holds: never pass that on. Keep the first line of any other error.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "pickle" in type(err).__name__.lower():
            reason = "it holds no plain tensors torch can load safely (another format, a truncated download, or " \
                     "a pickle with code in it)"
        raise CheckpointError(f"could not read checkpoint {path}: {reason}; expected a state dict saved with "
                              "torch.save, a .safetensors file or the original .npz") from None
    # The model family's own converter maps foreign layouts (e.g. the official Swin code) to timm's.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as err:
            raise CheckpointError(f"{path} does not fit {type(model).__name__}: {type(err).__name__}: {err}") from err
    own = model.state_dict()
    absent = tuple(prefix for prefix in _HEAD_PREFIXES if not any(k.startswith(prefix) for k in own))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(absent)}

    expected = {k: v.shape for k, v in own.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    # Non-persistent buffers (e.g. Swin's relative position index) may legitimately be absent.
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()},
                          strict=False)
