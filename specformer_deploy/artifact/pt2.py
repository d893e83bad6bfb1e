"""``model.pt2``: the exported program reloaded for input gradients (ONNX Runtime has none).

torch only, no training code: the server's probe and `evaluate` on an export load it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["ExportedLogits", "load_exported_logits"]


class ExportedLogits(nn.Module):
    """The logits of a reloaded ``model.pt2`` (which returns ``(logits, attn_input_norms, ...)``).

    The program was traced in eval mode and cannot switch modes (``eval()`` on it raises), so
    ``train()``/``eval()`` only set this wrapper's flag.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program
        self.training = False

    def train(self, mode: bool = True) -> ExportedLogits:
        self.training = mode
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.program(pixels)[0]


def load_exported_logits(pt2: str | Path) -> ExportedLogits:
    """Reload ``model.pt2`` for input gradients (attacks, probes): same trace as the ONNX file."""
    return ExportedLogits(torch.export.load(str(pt2)).module())
