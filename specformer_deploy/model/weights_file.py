"""Read weights trained outside this toolkit, and load them strictly into a timm model.

Three layouts are read: timm's ``CheckpointSaver`` files (``model_best.pth.tar``,
``checkpoint-N.pth.tar``: a dict with ``state_dict`` and often ``state_dict_ema``, ``args``,
``epoch``), ``.safetensors`` files, and plain ``torch.save(model.state_dict())`` files. Torch
files are unpickled with ``weights_only=True``: a checkpoint is data, and the only Python class
allowed besides tensors is ``argparse.Namespace`` (timm's ``train.py`` stores its arguments in
one). Loading is strict: a missing, unexpected or mis-shaped key is an error that names it and,
where the shape tells, which option (classes, image size, channels) disagrees with the file.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsFileError", "WeightsFile", "read_weights", "load_strict", "file_sha256"]

EMA_ENTRIES = ("state_dict_ema", "model_ema")  # timm's CheckpointSaver, then older timm and DeiT releases
MODEL_ENTRIES = ("state_dict", "model")  # timm's CheckpointSaver, then DeiT/our own checkpoint.pt
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the problem."""


@dataclass
class WeightsFile:
    """The tensors read from ``path`` and where in the file they were found."""

    path: Path
    state: dict[str, torch.Tensor]
    layout: str  # "timm checkpoint", "safetensors" or "state dict"
    entry: str | None = None  # the checkpoint entry the weights came from (state_dict, state_dict_ema, ...)
    sha256: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # epoch, arch, metric when the file records them

    def describe(self) -> dict[str, Any]:
        """The provenance an export's metadata records (JSON-ready)."""
        return {"file": self.path.name, "sha256": self.sha256, "layout": self.layout, "entry": self.entry,
                **self.details}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(path: str | Path, ema: bool = False) -> WeightsFile:
    """The model weights in ``path``; ``ema`` picks the EMA copy of a timm checkpoint (an error when
    the file has none, rather than silently the trained weights)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        if ema:
            raise WeightsFileError(f"--ema: {path.name} is a safetensors file, which holds one set of weights "
                                   "(export the EMA weights to their own file, or pass the timm checkpoint)")
        weights = WeightsFile(path, _read_safetensors(path), "safetensors")
    else:
        weights = _pick_entry(path, _read_torch_file(path), ema)
    weights.state = _strip_wrappers(weights.state)
    weights.sha256 = file_sha256(path)
    return weights


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsFileError(f"cannot read {path} as safetensors (truncated or not a safetensors file): "
                               f"{err}") from err


def _read_torch_file(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).split("\n")[0]
        if "GLOBAL" in str(err) or "Unsupported" in str(err):
            raise WeightsFileError(f"{path} stores Python objects besides tensors, which are not unpickled "
                                   f"(weights_only=True): {first}. Re-save the weights with "
                                   "torch.save(model.state_dict(), FILE) or as .safetensors") from err
        raise WeightsFileError(f"cannot read {path} (truncated or not a torch file): {first}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsFileError(f"cannot read {path} (truncated or not a torch file): "
                               f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _pick_entry(path: Path, content: Any, ema: bool) -> WeightsFile:
    if not isinstance(content, dict):
        raise WeightsFileError(f"{path} holds a {type(content).__name__}, not a state dict or a timm checkpoint")
    if _is_state_dict(content):
        if ema:
            raise WeightsFileError(f"--ema: {path.name} is a plain state dict without EMA weights (a timm "
                                   f"checkpoint keeps them under {EMA_ENTRIES[0]})")
        return WeightsFile(path, dict(content), "state dict")
    entries = EMA_ENTRIES if ema else MODEL_ENTRIES
    for entry in entries:
        if _is_state_dict(content.get(entry)):
            args = content.get("args")
            details = {"epoch": content.get("epoch"), "arch": content.get("arch"), "metric": content.get("metric")}
            if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "model", None), str):
                details["arch"] = args.model
            details = {k: v for k, v in details.items() if isinstance(v, (int, float, str))}
            return WeightsFile(path, dict(content[entry]), "timm checkpoint", entry, details=details)
    found = ", ".join(sorted(map(str, content))) or "nothing"
    wanted = " or ".join(entries)
    hint = " (it was saved without a model EMA: export without --ema)" if ema and any(
        _is_state_dict(content.get(e)) for e in MODEL_ENTRIES) else ""
    raise WeightsFileError(f"{path.name} has no {wanted} entry holding weights{hint}; its entries: {found}")


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DDP adds (and torch.compile's ``_orig_mod.``) when every key has it."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``net`` only if every key and shape matches; the error names what does not
    and, for the classifier, the position embedding and the patch projection, the option to change."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or mismatched):
        net.load_state_dict(state, strict=True)
        return
    parts = [_shape_hint(net, k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:4]]
    if len(mismatched) > 4:
        parts.append(f"and {len(mismatched) - 4} more mis-shaped keys")
    if missing:
        parts.append(f"missing from the file ({len(missing)}): {_names(missing)}")
    if unexpected:
        parts.append(f"in the file but not in the model ({len(unexpected)}): {_names(unexpected)}")
    raise WeightsFileError(f"{source} does not fit the model: " + "; ".join(parts))


def _names(keys: list[str], shown: int = 6) -> str:
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _shape_hint(net: nn.Module, key: str, file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> str:
    base = f"{key} is {list(file_shape)} in the file but {list(model_shape)} in the model"
    classifier = _classifier_prefix(net)
    if classifier and key.startswith(classifier + ".") and file_shape and model_shape:
        return (f"{base}: the checkpoint's classifier has {file_shape[0]} classes, the model {model_shape[0]} "
                "(--num-classes)")
    if key.endswith("pos_embed") and len(file_shape) == 3:
        hint = _size_hint(net, file_shape, model_shape)
        return f"{base}: the checkpoint was trained at another image size (--img-size){hint}"
    if key.endswith("patch_embed.proj.weight") and len(file_shape) == 4:
        if file_shape[1] != model_shape[1]:
            return (f"{base}: the checkpoint takes {file_shape[1]}-channel images, the model {model_shape[1]} "
                    "(--in-chans)")
        if file_shape[2:] != model_shape[2:]:
            return (f"{base}: the checkpoint's patches are {file_shape[2]}x{file_shape[3]} (another model name or "
                    "patch size)")
    return base


def _classifier_prefix(net: nn.Module) -> str | None:
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    return next((name for name, module in net.named_modules() if module is head and name), None)


def _size_hint(net: nn.Module, file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> str:
    """The square image size whose patch grid gives the file's number of positions, when one does."""
    patch_embed = getattr(net, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    grid = getattr(patch_embed, "grid_size", None)
    if not (patch and grid):
        return ""
    extra = model_shape[1] - int(grid[0]) * int(grid[1])  # class/distillation tokens that carry a position
    side = round((file_shape[1] - extra) ** 0.5) if file_shape[1] > extra else 0
    if side <= 0 or side * side != file_shape[1] - extra:
        return ""
    return f"; its {file_shape[1]} positions fit --img-size {side * int(patch[0])}"
