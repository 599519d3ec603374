"""Creating a frozen-able timm backbone from a hub name or a local checkpoint, with errors a user can act on."""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")
# Keys a classification checkpoint may carry that a headless backbone does not use.
_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")


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
    Drop-path follows timm's stochastic-depth rule over all blocks, as in the authors' code.
    """
    if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise ValueError(
            f"unknown backbone {name!r}: expected a timm model name such as 'vit_base_patch16_224' "
            "or the embedded 'vit_micro_patch4_32' (see timm.list_models('vit_*'))"
        )
    kwargs: dict = dict(num_classes=0, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if name.startswith("vit_"):
        # Keep the pretrained final `norm`: DTL applies it after the patch-token mean itself. timm's
        # global_pool='avg' would swap it for a new, untrained fc_norm.
        kwargs.update(global_pool="", fc_norm=False)

    if pretrained is True:
        shipped = timm.models.get_pretrained_cfg(name)
        if shipped is not None and shipped.file:  # weights that ship with a package, e.g. the embedded backbone
            pretrained = shipped.file
    if pretrained is True:
        try:
            return _create(name, True, kwargs)
        except Exception as err:  # offline hub: LocalEntryNotFoundError, OSError, HTTP errors
            raise CheckpointError(
                f"could not fetch pretrained weights for {name!r} from the hub ({type(err).__name__}: {err}). "
                "This machine may be offline: download the checkpoint elsewhere and pass its path instead, "
                "e.g. pretrained='/path/to/ViT-B_16.npz' (or .pth/.safetensors)."
            ) from err

    model = _create(name, False, kwargs)
    if pretrained:
        load_checkpoint(model, pretrained)
    return model


def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model``; a model that takes any input size (a CNN) has no ``img_size`` argument, so the size
    it runs at is recorded in its ``pretrained_cfg`` instead (what the token grids and the data are sized by)."""
    img_size = kwargs.get("img_size")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        if img_size is None or "img_size" not in str(err):
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
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
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}

    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(_HEAD_PREFIXES)}
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
