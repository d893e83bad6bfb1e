"""The decode as one linear map: the sent image's values in [0, 1] -> the model's input grid.

A certified radius is a promise about the image a client holds, so the step from that image to
the model's input must be known exactly. After the sent image's integers are divided by 255 (or
65535), every step here is float32 arithmetic with no rounding and no clipping:

- channels: grey into a 3-channel model by replication, colour into a 1-channel model by the
  ITU-R 601 luma weights (0.299, 0.587, 0.114), otherwise unchanged;
- resizing: separable, antialiased bilinear (a triangle filter whose support widens with the
  downscale factor, half-pixel centres, weights renormalised at the borders: PIL's ``BILINEAR``
  and torch's ``interpolate(..., antialias=True)``), one matrix per axis.

So ``model_input = A @ sent_image`` with ``A = C (x) R_rows (x) R_cols`` (Kronecker product of the
channel map and the two 1-D resize matrices), a matrix that depends only on the shapes. Its
spectral norm is the product of the three factors' spectral norms, each tiny and exact.

Why it matters: if the smoothed classifier is constant on ``||x' - A x|| < R`` in the model grid,
then for ``||d|| < R / ||A||_2`` in the sent image ``||A d|| <= ||A||_2 ||d|| < R``, so it is constant
on the ball of radius ``R / ||A||_2`` around the sent image. numpy only (the server imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["DecodeMap", "SentImage", "resize_matrix", "channel_matrix", "decode_norm", "LUMA_WEIGHTS",
           "shape_text"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def shape_text(channels: int, height: int, width: int) -> str:
    """``"1x28x28"``: how every answer names a space's shape (channels x height x width)."""
    return f"{channels}x{height}x{width}"


@dataclass(frozen=True)
class SentImage:
    """The image a client sent, as the decode read it: its channels and size (pixels in [0, 1])."""

    channels: int
    height: int
    width: int

    @property
    def description(self) -> str:
        """``"grey 56x56"`` or ``"colour 640x480"`` (width x height, as image viewers say)."""
        kind = "grey" if self.channels == 1 else "colour"
        return f"{kind} {self.width}x{self.height}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def _triangle_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` float64 weights of antialiased bilinear resampling (PIL's algorithm)."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the filter widens when downscaling: every source pixel is seen
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), in_size)
        taps = np.arange(low, high)
        w = np.clip(1.0 - np.abs((taps + 0.5 - centre) / support), 0.0, None)
        weights[i, low:high] = w / w.sum()
    return weights


@lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The 1-D resize as a ``[out_size, in_size]`` float32 matrix (identity when the sizes agree).

    Read-only: it is cached and shared."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    matrix = np.eye(in_size, dtype=np.float32) if in_size == out_size else \
        _triangle_weights(in_size, out_size).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def channel_matrix(sent_channels: int, model_channels: int) -> np.ndarray:
    """``[model_channels, sent_channels]``: identity, grey replicated to 3, or colour to luma."""
    if sent_channels == model_channels and sent_channels in (1, 3):
        return np.eye(sent_channels, dtype=np.float32)
    if (sent_channels, model_channels) == (1, 3):
        return np.ones((3, 1), dtype=np.float32)
    if (sent_channels, model_channels) == (3, 1):
        return np.asarray([LUMA_WEIGHTS], dtype=np.float32)
    raise ValueError(f"no channel conversion from {sent_channels} to {model_channels} channels "
                     "(images have 1 (grey) or 3 (colour) channels)")


def _spectral_norm(matrix: np.ndarray) -> float:
    return float(np.linalg.norm(matrix.astype(np.float64), ord=2))


@lru_cache(maxsize=1024)
def decode_norm(sent: tuple[int, int, int], model: tuple[int, int, int]) -> float:
    """``||A||_2`` of the decode from a sent image ``(C, H, W)`` to the model's ``(C', S, S')``:
    ``||C|| ||R_rows|| ||R_cols||``, since the spectral norm of a Kronecker product is the product
    of its factors' norms. Cached per pair of shapes."""
    return (_spectral_norm(channel_matrix(sent[0], model[0])) * _spectral_norm(resize_matrix(sent[1], model[1]))
            * _spectral_norm(resize_matrix(sent[2], model[2])))


@dataclass(frozen=True)
class DecodeMap:
    """``A``: the linear map from a sent image ``[C, H, W]`` to the model's input ``[C', S, S']``."""

    sent: SentImage
    model_shape: tuple[int, int, int]

    @property
    def norm(self) -> float:
        """``||A||_2``, exact (see :func:`decode_norm`)."""
        return decode_norm(self.sent.shape, tuple(self.model_shape))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``A @ values`` for ``values`` ``[C, H, W]`` float in [0, 1]: float32, C-contiguous.

        Colour to grey goes before the resize (one plane to resize), grey to colour after it."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != self.sent.shape:
            raise ValueError(f"decode expects values of shape {list(self.sent.shape)}, got {list(values.shape)}")
        channels, rows, cols = self.model_shape
        mix = channel_matrix(self.sent.channels, channels)
        if mix.shape[0] < mix.shape[1]:
            values = np.tensordot(mix, values, axes=(1, 0))
        r_rows, r_cols = resize_matrix(self.sent.height, rows), resize_matrix(self.sent.width, cols)
        if (rows, cols) != (self.sent.height, self.sent.width):
            values = np.matmul(np.matmul(r_rows, values), r_cols.T)
        if mix.shape[0] > mix.shape[1]:
            values = np.broadcast_to(values, (channels, rows, cols))
        return np.ascontiguousarray(values, dtype=np.float32)
