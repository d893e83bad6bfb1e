"""What an export needs from the place its weights come from: a run of ours or a checkpoint.

The export itself (trace, parity, metadata, sampler) is the same for both; only these differ.
A run knows its training (MSVP, data, noise, seed) and has test images for parity; a checkpoint
trained elsewhere knows only its file, so its metadata records the file and leaves the
run-only fields out rather than inventing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ExportSource"]


@dataclass
class ExportSource:
    """A model ready to export, with what only its origin can say about it."""

    model: nn.Module  # pixels in [0, 1] -> logits, eval mode, normalization inside
    model_config: dict[str, Any]  # ModelConfig.to_dict(): rebuilds the network, recorded as specformer.model
    class_names: list[str]
    parity_pixels: torch.Tensor  # [n, C, S, S] in [0, 1]: ONNX Runtime must agree with PyTorch on these
    parity_source: str  # what those images are, recorded in specformer.parity.source
    sections: dict[str, Any]  # metadata entries only the origin knows (a run's training, a checkpoint's file)
    noise_sd: float = 0.0  # the Gaussian noise the weights were trained under (0: none, or not known)
    # Training images for the int8 sampler's calibration, and the data set's name (None: no sampler).
    calibration: Callable[[], tuple[np.ndarray, str | None]] | None = None
    seed: int = 0
    normalization_from: str | None = None  # where mean/std came from, when not a run's own config
