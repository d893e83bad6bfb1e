"""Convolutional stems for small data: early convolutions in place of the patchify convolution.

A ViT trained from scratch on a few thousand images lacks the locality a CNN gets for free;
Xiao et al. 2021 ("Early convolutions help transformers see better") replace the single
``patch x patch`` stride-``patch`` convolution with a few 3x3 stride-2 convolutions and a 1x1
projection, and report better optimisation and accuracy at the same cost. The stem keeps timm's
``PatchEmbed`` interface (grid, number of patches, flattened ``[B, N, D]`` tokens), so the
transformer blocks after it are timm's own and their attention certificates apply unchanged:
the certificates are about each attention layer's input, whatever produced it.
"""

from __future__ import annotations

from typing import Any

from timm.layers import PatchEmbed
from torch import nn

__all__ = ["ConvStem", "STEMS"]


class ConvStem(PatchEmbed):
    """``log2(patch)`` 3x3 stride-2 convolutions (BatchNorm, ReLU), widths doubling up to ``embed_dim / 2``,
    then a 1x1 convolution to ``embed_dim``: the same ``patch``-fold reduction as timm's patchify stem."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 768,
                 **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        stride = self.patch_size[0]
        steps = stride.bit_length() - 1
        if self.patch_size[0] != self.patch_size[1] or stride < 2 or 1 << steps != stride:
            raise ValueError(f"a convolutional stem needs a square power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        channels = in_chans
        for step in range(steps):
            width = max(embed_dim >> (steps - step), 8)
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=kwargs.get("bias", True)))
        self.proj = nn.Sequential(*layers)


STEMS: dict[str, type[PatchEmbed]] = {"conv-stem": ConvStem}
