"""Mean ± sd over seeds and a paired bootstrap interval for "model A minus model B" accuracy.

The interval answers whether a difference between two models trained with the same seeds and
tested on the same images is larger than what the choice of seed and of test images explains.
Two-level (hierarchical) percentile bootstrap: each resample draws the seeds with replacement,
then, inside every drawn seed, the test images with replacement, and takes the mean over the
drawn seeds of the mean per-image difference. Pairing (the same image and seed for both models)
is kept, so per-image agreement between the models narrows the interval as it should.

numpy only: the serving side and the reports import it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "mean_sd", "paired_bootstrap"]

METHOD = ("paired two-level percentile bootstrap: seeds resampled with replacement, then test images "
          "with replacement within each drawn seed")


@dataclass(frozen=True)
class Interval:
    """Observed difference and its ``level`` percentile interval (all in accuracy units, 0–1)."""

    difference: float
    low: float
    high: float
    level: float
    resamples: int
    seeds: int
    images: int

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of zero: the sign is not noise at this level."""
        return self.low > 0 or self.high < 0


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value, which has no spread to estimate)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("mean_sd of no values")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _differences(correct_a: Sequence[Sequence[bool]], correct_b: Sequence[Sequence[bool]]) -> np.ndarray:
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need [seeds, images] arrays of one shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError("need at least one seed and one image")
    return a - b


def paired_bootstrap(correct_a: Sequence[Sequence[float]], correct_b: Sequence[Sequence[float]], *,
                     resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval for mean(A) − mean(B) from per-image scores ``[seeds][images]`` (1 correct, 0 wrong).

    Row ``s`` of both arrays must be the same seed, column ``i`` the same test image. With one
    seed this is the ordinary paired bootstrap over images. ``seed`` fixes the generator so a
    report regenerated from its JSON shows the same interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = _differences(correct_a, correct_b)
    seeds, images = diff.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // (seeds * images))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        drawn_seeds = rng.integers(0, seeds, size=(count, seeds))
        drawn_images = rng.integers(0, images, size=(count, seeds, images))
        picked = diff[drawn_seeds[:, :, None], drawn_images]
        stats[start:start + count] = picked.mean(axis=(1, 2))
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return Interval(difference=float(diff.mean()), low=float(low), high=float(high), level=level,
                    resamples=resamples, seeds=seeds, images=images)
