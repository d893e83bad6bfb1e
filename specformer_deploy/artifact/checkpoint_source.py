"""Bring your own model: a timm checkpoint trained elsewhere, made ready for :func:`export_model`.

The network is rebuilt from its timm name and the options the checkpoint cannot tell (classes,
image size, channels, normalization), the weights are loaded strictly, and parity is checked on
the user's own images or, without them, on seeded random pixels; the metadata says which. Only
the file is known about the training, so the metadata records the file (name, SHA-256, entry)
and the model name, and leaves out what a run of ours would record (MSVP, data, noise, accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specformer_deploy.artifact.source import ExportSource
from specformer_deploy.model.factory import ModelError, build_model, resolve_model_config
from specformer_deploy.model.weights_file import WeightsFileError, load_strict, read_weights

__all__ = ["CheckpointExportError", "checkpoint_source", "read_class_names", "parity_images_from_dir",
           "random_parity_pixels", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PARITY_SEED = 0


class CheckpointExportError(ValueError):
    """An option or file that keeps a checkpoint from being exported; the message names it."""


def checkpoint_source(checkpoint: str | Path, model_name: str, num_classes: int, img_size: int, *,
                      in_chans: int = 3, mean: list[float] | None = None, std: list[float] | None = None,
                      ema: bool = False, class_names: str | Path | None = None,
                      parity_images: str | Path | None = None, parity_count: int = 64) -> ExportSource:
    """The model in ``checkpoint`` (timm ``CheckpointSaver`` file, safetensors or a state dict) as
    an export source. ``mean``/``std`` default to timm's ``pretrained_cfg`` of ``model_name``."""
    if num_classes < 1:
        raise CheckpointExportError(f"--num-classes must be at least 1, got {num_classes}")
    if img_size < 1:
        raise CheckpointExportError(f"--img-size must be a positive number of pixels, got {img_size}")
    try:
        config = resolve_model_config(model_name, num_classes, img_size=img_size, in_chans=in_chans)
    except ModelError as err:
        raise CheckpointExportError(str(err)) from err
    origin = f"timm pretrained_cfg of {config.arch}"
    if mean is not None or std is not None:
        config.mean, config.std = _normalization(mean, std, in_chans, config.mean, config.std)
        origin = "--mean/--std"
    try:
        model = build_model(config)
        weights = read_weights(checkpoint, ema=ema)
    except (ModelError, WeightsFileError) as err:
        raise CheckpointExportError(str(err)) from err
    entry = f" ({weights.entry})" if weights.entry else ""
    try:
        load_strict(model.net, weights.state, f"{Path(checkpoint).name}{entry}")
    except WeightsFileError as err:
        recorded = weights.details.get("arch")
        hint = (f" (the checkpoint records that it was trained as {recorded!r}, not {config.arch!r}: --model)"
                if isinstance(recorded, str) and recorded != config.arch and recorded in _timm_names() else "")
        raise CheckpointExportError(f"{err}{hint}") from err
    model.eval()
    names = ([str(i) for i in range(num_classes)] if class_names is None
             else read_class_names(class_names, num_classes))
    if parity_images is not None:
        pixels = parity_images_from_dir(parity_images, img_size, in_chans, parity_count)
        parity_from = f"{pixels.shape[0]} images from {Path(parity_images).name} (decoded as the server decodes them)"
    else:
        pixels = random_parity_pixels(config.input_shape, parity_count)
        parity_from = f"seeded random pixels (uniform in [0, 1], seed {PARITY_SEED}; no --parity-images given)"
    source = {"kind": "checkpoint", "model": model_name, **weights.describe(), "ema": ema}
    return ExportSource(model=model, model_config=config.to_dict(), class_names=names, parity_pixels=pixels,
                        parity_source=parity_from, sections={"source": source}, normalization_from=origin)


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def _normalization(mean: list[float] | None, std: list[float] | None, channels: int,
                   default_mean: list[float], default_std: list[float]) -> tuple[list[float], list[float]]:
    mean = list(mean) if mean is not None else default_mean
    std = list(std) if std is not None else default_std
    for name, values in (("--mean", mean), ("--std", std)):
        if len(values) != channels:
            raise CheckpointExportError(f"{name} needs {channels} value(s), one per input channel (--in-chans "
                                        f"{channels}), got {len(values)}: {values}")
    if not all(0.0 < s < float("inf") for s in std):
        raise CheckpointExportError(f"--std values must be positive and finite, got {std}")
    if not all(abs(m) < float("inf") for m in mean):
        raise CheckpointExportError(f"--mean values must be finite, got {mean}")
    return [float(m) for m in mean], [float(s) for s in std]


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One name per line (blank lines skipped), or a JSON list; exactly ``num_classes`` of them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointExportError(f"cannot read --class-names {path}: {err}") from err
    names: Any
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointExportError(f"--class-names {path} starts like a JSON list but is not one: {err}") from err
        if not all(isinstance(n, str) for n in names):
            raise CheckpointExportError(f"--class-names {path}: every entry of the JSON list must be a string")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise CheckpointExportError(f"--class-names {path} has {len(names)} names but --num-classes is {num_classes}")
    return list(names)


def parity_images_from_dir(directory: str | Path, size: int, channels: int, count: int) -> torch.Tensor:
    """Up to ``count`` images of ``directory`` (sorted by name), decoded and resized exactly as the
    server decodes a sent image, so parity is checked on the pixels a client's images become."""
    from specformer_deploy.serving.images import ImageError, read_image

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointExportError(f"--parity-images {directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise CheckpointExportError(f"--parity-images {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pixels = []
    for path in files:
        try:
            pixels.append(torch.from_numpy(read_image(path.read_bytes(), size, channels).pixels))
        except ImageError as err:
            raise CheckpointExportError(f"--parity-images: {path} is not a usable image: {err}") from err
    return torch.stack(pixels)


def random_parity_pixels(shape: tuple[int, int, int], count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(PARITY_SEED)
    return torch.rand((count, *shape), generator=generator)
