"""timm model construction with normalization inside the model (inputs are pixels in [0, 1]).

Keeping normalization in the graph means attacks, certificates, the ONNX export and the
server all speak the same language: an epsilon of 8/255 is 8/255 of a pixel, everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from specformer_deploy.model.attention_variants import apply_attention_variant
from specformer_deploy.model.heads import attention_layers
from specformer_deploy.model.mlp import apply_mlp_activation
from specformer_deploy.model.weights_file import WeightsFileError, load_strict, read_weights

__all__ = ["ModelConfig", "NormalizedClassifier", "PRESETS", "DEFAULT_MODEL", "resolve_model_config", "build_model",
           "load_pretrained", "ModelError"]


class ModelError(ValueError):
    """A model name, option or weight file that cannot be used; the message says why."""


DEFAULT_MODEL = "specformer-tiny"

# name -> (timm architecture, kwargs). Image/patch size and classes are filled in per run.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # The built-in default: trains on `digits` on 2 CPU cores in about a minute.
    "specformer-tiny": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=64, depth=4,
                                                      num_heads=4, mlp_ratio=2.0)),
    # Sized for real MNIST (28x28, patch 7: 16 tokens) on 2 CPU cores; head dim 32.
    "specformer-mnist": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=7, embed_dim=128, depth=6,
                                                       num_heads=4, mlp_ratio=2.0)),
    # The same blocks behind a convolutional stem (two 3x3 stride-2 convolutions: 49 tokens), the
    # small-data lever of Xiao et al. 2021; see specformer_deploy.model.stems.
    "specformer-mnist-convstem": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, embed_dim=128, depth=6,
                                                                num_heads=4, mlp_ratio=2.0, embed_layer="conv-stem")),
    # The paper's ViT-S: depth 8, 8 heads, dim 768, mlp_ratio 3.
    "paper-vit-s": ("vit_small_patch16_224", dict(depth=8, num_heads=8, embed_dim=768, mlp_ratio=3.0)),
    "deit_tiny_patch16_224": ("deit_tiny_patch16_224", {}),
    "convit_tiny": ("convit_tiny", {}),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (stored in a run's config.json)."""

    name: str
    arch: str
    kwargs: dict[str, Any]
    img_size: int
    num_classes: int
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    mlp_act: str = "gelu"
    attention: str = "dot"
    # Input channels: the data's own (1 for grey data, 3 for colour). Configs written before this
    # field existed are three-channel models, which is what the default keeps them.
    in_chans: int = 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the pixels the model takes."""
        return (self.in_chans, self.img_size, self.img_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


class NormalizedClassifier(nn.Module):
    """``net((pixels - mean) / std)``: a timm classifier that takes pixels in [0, 1]."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


def resolve_model_config(name: str, num_classes: int, img_size: int | None = None,
                         patch_size: int | None = None, mlp_act: str = "gelu", attention: str = "dot",
                         in_chans: int = 3) -> ModelConfig:
    """Turn a preset or timm model name plus run options into a full ``ModelConfig``.

    ``in_chans`` 1 (grey) or 3 (colour); a one-channel model normalizes with the mean of the
    three-channel statistics (the luma of a grey pixel is the pixel)."""
    if in_chans not in (1, 3):
        raise ModelError(f"a model takes 1 (grey) or 3 (colour) input channels, got {in_chans}")
    if name in PRESETS:
        arch, kwargs = PRESETS[name]
        kwargs = dict(kwargs)
    elif name in timm.list_models():
        arch, kwargs = name, {}
    else:
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f"; similar timm models: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT-family "
                         f"model name{hint}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    pretrained_cfg = timm.get_pretrained_cfg(arch)
    default_size = pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 224
    size = int(kwargs.get("img_size", default_size))
    kwargs["img_size"] = size
    if name == DEFAULT_MODEL:
        mean, std = [0.5] * 3, [0.5] * 3
    elif pretrained_cfg is not None:
        mean, std = list(pretrained_cfg.mean), list(pretrained_cfg.std)
    else:
        mean, std = [0.5] * 3, [0.5] * 3
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return ModelConfig(name=name, arch=arch, kwargs=kwargs, img_size=size, num_classes=num_classes,
                       mean=[float(m) for m in mean], std=[float(s) for s in std], mlp_act=mlp_act,
                       attention=attention, in_chans=in_chans)


def build_model(config: ModelConfig) -> NormalizedClassifier:
    """Build the (randomly initialised) model; fails clearly if MSVP cannot handle it."""
    kwargs = dict(config.kwargs)
    if "embed_layer" in kwargs:  # stored by name, so config.json stays JSON
        from specformer_deploy.model.stems import STEMS

        if kwargs["embed_layer"] not in STEMS:
            raise ModelError(f"unknown stem {kwargs['embed_layer']!r}: one of {', '.join(STEMS)}")
        kwargs["embed_layer"] = STEMS[kwargs["embed_layer"]]
    try:
        net = timm.create_model(config.arch, pretrained=False, num_classes=config.num_classes,
                                in_chans=config.in_chans, **kwargs)
    except TypeError as err:
        raise ModelError(f"timm model {config.arch!r} does not accept these options {config.kwargs}: {err}") from err
    try:
        apply_attention_variant(net, config.attention)
        apply_mlp_activation(net, config.mlp_act)
    except ValueError as err:
        raise ModelError(str(err)) from err
    model = NormalizedClassifier(net, config.mean, config.std)
    list(attention_layers(model))  # raises a clear error for unsupported attention
    return model


def load_pretrained(model: NormalizedClassifier, path: str | Path) -> None:
    """Load local weights into ``model.net``: a timm checkpoint (``CheckpointSaver``), a safetensors
    file or a plain state dict (see :mod:`~specformer_deploy.model.weights_file`), or a run's own
    model weights (``net.``-prefixed, with the normalization buffers, which the model already has)."""
    try:
        weights = read_weights(path)
        state = {k.removeprefix("net."): v for k, v in weights.state.items() if k not in ("mean", "std")}
        load_strict(model.net, state, f"pretrained weights {path}")
    except WeightsFileError as err:
        raise ModelError(str(err)) from err
