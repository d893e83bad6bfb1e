"""Figures (matplotlib, headless): the paper's Figure 2a, max sigma per layer for Q, K, V."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_sigma_per_layer", "save_figure", "sigma_curves"]


SigmaSet = dict[str, list[list[float]]]


def sigma_curves(per_seed: Sequence[SigmaSet], projection: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: mean over seeds of (max over heads of sigma), and the min and max over seeds.

    The max over heads is taken within each seed first, so the band shows how far the curve a
    reader would draw from one seed moves when the seed changes.
    """
    curves = np.stack([np.asarray(s[f"sigma_{projection}"], dtype=float).max(axis=1) for s in per_seed])
    return curves.mean(axis=0), curves.min(axis=0), curves.max(axis=0)


def plot_sigma_per_layer(series: Sequence[tuple[str, SigmaSet | Sequence[SigmaSet]]], path: str | Path) -> Path:
    """One panel per projection (Q, K, V); one line per model: max over heads of sigma, per layer.

    ``series`` is ``[(label, sigmas), ...]`` where ``sigmas`` is one model's
    ``{"sigma_q": [[...heads] per layer], "sigma_k": ..., "sigma_v": ...}`` or a list of them, one
    per training seed; with several seeds the line is their mean and a shaded band spans the
    min–max over seeds (the figure's title says so).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeded = [(label, [sigmas] if isinstance(sigmas, Mapping) else list(sigmas)) for label, sigmas in series]
    seed_counts = sorted({len(per_seed) for _, per_seed in seeded if len(per_seed) > 1})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9 if seed_counts else 3.6), sharey=False)
    if seed_counts:
        fig.suptitle(f"lines: mean over {'/'.join(map(str, seed_counts))} training seeds; "
                     "shaded bands: min–max over those seeds")
    for ax, name, title in zip(axes, ("q", "k", "v"), ("$W_Q$", "$W_K$", "$W_V$")):
        for (label, per_seed), marker in zip(seeded, "osd^v<>"):
            mean, low, high = sigma_curves(per_seed, name)
            layers = np.arange(len(mean))
            (line,) = ax.plot(layers, mean, marker=marker, label=label)
            if len(per_seed) > 1:
                ax.fill_between(layers, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"max singular value of {title} per layer")
        ax.set_xlabel("layer (0 = first block)")
        ax.set_ylabel(r"$\max_h \sigma_{max}$")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize="small")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure (its folder created) and free it: every plot of the toolkit ends here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
