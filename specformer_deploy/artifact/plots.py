"""Figures (matplotlib, headless): the paper's Figure 2a, max sigma per layer for Q, K, V."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_sigma_per_layer", "save_figure"]


def plot_sigma_per_layer(series: Sequence[tuple[str, dict[str, list[list[float]]]]], path: str | Path) -> Path:
    """One panel per projection (Q, K, V); one line per model: max over heads of sigma, per layer.

    ``series`` is ``[(label, {"sigma_q": [[...heads] per layer], "sigma_k": ..., "sigma_v": ...}), ...]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=False)
    for ax, name, title in zip(axes, ("q", "k", "v"), ("$W_Q$", "$W_K$", "$W_V$")):
        for (label, sigmas), marker in zip(series, "osd^v<>"):
            values = np.asarray(sigmas[f"sigma_{name}"], dtype=float).max(axis=1)
            ax.plot(np.arange(len(values)), values, marker=marker, label=label)
        ax.set_title(f"max singular value of {title} per layer")
        ax.set_xlabel("layer (0 = first block)")
        ax.set_ylabel(r"$\max_h \sigma_{max}$")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend()
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
