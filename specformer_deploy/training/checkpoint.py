"""A run directory: atomic writes and safe loading of what `train` produces.

Files (all written to a temporary name in the same directory, fsynced, then renamed, so a
killed run leaves either the old or the new file, never half of one):

- ``config.json``          everything needed to rebuild the model and repeat the run
- ``model.safetensors``    the model's weights (the normalization buffers included)
- ``msvp_vectors.safetensors``  the power-iteration vectors ``u_l``, ``v_l``
- ``checkpoint.pt``        full training state for ``--resume``; ``torch.load(weights_only=True)``
- ``metrics.jsonl``        one JSON object per finished epoch
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunFiles", "atomic_write", "atomic_write_text", "read_metrics", "CheckpointError"]


class CheckpointError(ValueError):
    """A run directory that is missing, incomplete or corrupt; the message names the file."""


class RunFiles:
    """Paths of a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.weights = self.root / "model.safetensors"
        self.vectors = self.root / "msvp_vectors.safetensors"
        self.checkpoint = self.root / "checkpoint.pt"
        self.metrics = self.root / "metrics.jsonl"

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise CheckpointError(f"{self.root} is not a run directory: {self.config.name} is missing")
        try:
            return json.loads(self.config.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{self.config} is not valid JSON: {err}") from err

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        if not self.checkpoint.is_file():
            raise CheckpointError(f"{self.root} has no {self.checkpoint.name} to resume from")
        try:
            return torch.load(self.checkpoint, map_location=map_location, weights_only=True)
        except Exception as err:  # truncated or corrupt files raise many types
            raise CheckpointError(f"{self.checkpoint} is unreadable (truncated or corrupt?): {err}") from err

    def load_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not self.weights.is_file():
            raise CheckpointError(f"{self.root} has no {self.weights.name} (did training finish an epoch?)")
        try:
            return load_file(str(self.weights))
        except Exception as err:  # truncated or corrupt files raise many types
            raise CheckpointError(f"{self.weights} is unreadable (truncated or corrupt?): {err}") from err


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
