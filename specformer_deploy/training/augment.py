"""Augmentation that fits digits: small random shifts and rotations, never flips.

A mirrored or upside-down digit is another symbol (or none), so MNIST-style data gets only what
leaves a digit a digit: a few pixels of translation and a few degrees of rotation, with the
background (0) filling what moves in. It is applied to the clean images, before Mixup and before
the Gaussian noise, so the noise a smoothed classifier certifies with stays exactly
``N(0, sigma^2 I)`` on every training input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["shift_and_rotate", "augment_seed"]

_AUGMENT_STREAM = 0xA06_3E47  # keeps this stream apart from the noise's for the same (seed, step, rank)


def augment_seed(seed: int, step: int, rank: int) -> int:
    """One step's augmentation seed: a function of the run's seed and global step, so a resumed run
    draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step, rank, _AUGMENT_STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shift_and_rotate(x: torch.Tensor, max_shift: int, max_degrees: float, seed: int) -> torch.Tensor:
    """Each image of ``x`` (``[B, C, H, W]``) shifted by whole pixels drawn uniformly from
    ``[-max_shift, max_shift]`` on each axis and rotated about its centre by an angle uniform in
    ``[-max_degrees, max_degrees]``; zeros fill in. A shift alone moves pixels exactly (bilinear
    sampling at pixel centres); a rotation interpolates bilinearly."""
    if max_shift <= 0 and max_degrees <= 0:
        return x
    batch, _, height, width = x.shape
    generator = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator).float()
    angles = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output coordinates in [-1, 1] to input ones: the inverse of the motion.
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = cos, cos
    theta[:, 0, 1], theta[:, 1, 0] = sin * height / width, -sin * width / height
    theta[:, 0, 2] = -2 * shifts[:, 0] / width
    theta[:, 1, 2] = -2 * shifts[:, 1] / height
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
