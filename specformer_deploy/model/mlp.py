"""ReLU-family MLP activations for local Lipschitz bounds (Huang et al. 2021, "second seed").

With ReLU or a clipped ReLU (``min(relu(x), t)`` with a learnable threshold ``t >= 0`` per hidden
unit), a unit whose pre-activation stays below 0 (or above ``t``) over a neighbourhood is constant
there and drops out of the local Jacobian; a sparsity loss on the activations makes that common.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["MLP_ACTIVATIONS", "ClippedReLU", "apply_mlp_activation", "mlp_modules", "activation_sparsity"]

MLP_ACTIVATIONS = ("gelu", "relu", "clipped-relu")


class ClippedReLU(nn.Module):
    """``min(relu(x), t)`` per unit; ``t`` is learned and used as ``max(t, 0)`` so it stays >= 0."""

    def __init__(self, features: int, init: float = 3.0) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.full((features,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.threshold.clamp_min(0.0))


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Each transformer block's MLP (timm ``Mlp``: ``fc1``, ``act``, ``fc2``), in depth order."""
    net = getattr(model, "net", model)
    mlps = [getattr(block, "mlp", None) for block in net.blocks]
    for index, mlp in enumerate(mlps):
        if mlp is None or not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")):
            raise ValueError(f"block {index} has no timm Mlp (fc1, act, fc2); --mlp-act needs one")
    return mlps


def apply_mlp_activation(model: nn.Module, kind: str) -> None:
    """Replace every block's MLP activation (timm's default is GELU)."""
    if kind not in MLP_ACTIVATIONS:
        raise ValueError(f"--mlp-act must be one of {', '.join(MLP_ACTIVATIONS)}, got {kind!r}")
    if kind == "gelu":
        return
    for mlp in mlp_modules(model):
        mlp.act = nn.ReLU() if kind == "relu" else ClippedReLU(mlp.fc1.out_features)


@contextmanager
def activation_sparsity(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``mean |act(x)|`` of every MLP during the forward passes inside the block.

    The sum is the sparsity loss: pushing activations to 0 turns units off, and an off unit is
    constant over a neighbourhood, which is what the local bound drops.
    """
    collected: list[torch.Tensor] = []
    hooks = [mlp.act.register_forward_hook(lambda m, a, out: collected.append(out.abs().mean()))
             for mlp in mlp_modules(model)]
    try:
        yield collected
    finally:
        for hook in hooks:
            hook.remove()
