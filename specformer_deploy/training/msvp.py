"""Maximum Singular Value Penalization (SpecFormer, Eq. 13/14 and Algorithm 1).

Every attention layer's W_Q, W_K, W_V is split into its heads' blocks (rows of the fused
projection, see ``heads``) and the largest singular value of each block is tracked by power
iteration with persistent vectors, batched over all heads and Q/K/V of a layer in one op.
The penalty ``sum_{l,h} lambda * sigma^2`` is differentiable in the weights only, exactly like
``torch.nn.utils.parametrizations.spectral_norm``: ``u, v`` are constants of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specformer_deploy.model.heads import LayerHeads, attention_layers, layer_heads

__all__ = ["MSVPConfig", "MSVP", "power_iteration_", "exact_spectral_norms"]

_EPS = 1e-12


@dataclass(frozen=True)
class MSVPConfig:
    """Penalty weights per projection and the number of power iterations per step."""

    lambda_q: float = 1e-4
    lambda_k: float = 1e-4
    lambda_v: float = 1e-4
    n_power_iterations: int = 1

    def __post_init__(self) -> None:
        for name in ("lambda_q", "lambda_k", "lambda_v"):
            value = getattr(self, name)
            if not (value >= 0.0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {self.n_power_iterations}")


@torch.no_grad()
def power_iteration_(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iterations: int) -> None:
    """Run ``n_iterations`` steps of power iteration in place on a batch of matrices.

    ``w`` is ``[B, m, n]``, ``u`` is ``[B, m]`` and ``v`` is ``[B, n]``; afterwards ``u`` and
    ``v`` approximate the top left/right singular vectors of every matrix of the batch.
    """
    for _ in range(n_iterations):
        v.copy_(F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=-1, eps=_EPS))
        u.copy_(F.normalize(torch.bmm(w, v.unsqueeze(-1)).squeeze(-1), dim=-1, eps=_EPS))


def rayleigh_sigma(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sigma = u^T W v`` per matrix of the batch; the gradient flows through ``w`` only."""
    return torch.bmm(torch.bmm(u.detach().unsqueeze(1), w), v.detach().unsqueeze(-1)).view(-1)


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``t.copy_(s)`` for every pair, fused into one launch where torch offers it."""
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(targets, sources)
        else:  # pragma: no cover - older torch
            for target, source in zip(targets, sources):
                target.copy_(source)


class MSVP(nn.Module):
    """Power-iteration state and penalty for every attention layer of a timm ViT.

    The module holds no reference to the model's parameters in its state dict, only the
    ``u_<layer>`` / ``v_<layer>`` buffers (shapes ``[3, H, D_h]`` and ``[3, H, d]``), so it is
    saved beside the model's weights and restored with ``load_state_dict``.
    """

    def __init__(self, model: nn.Module, config: MSVPConfig | None = None, *, init_iterations: int = 15,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config or MSVPConfig()
        # A plain list keeps the attention modules out of this module's parameters and state.
        self._layers: list[nn.Module] = list(attention_layers(model))
        lambdas = torch.tensor([self.config.lambda_q, self.config.lambda_k, self.config.lambda_v])
        self.register_buffer("lambdas", lambdas, persistent=False)
        for index, attn in enumerate(self._layers):
            heads = layer_heads(attn)
            w = heads.qkv.detach()
            three, n_heads, head_dim, dim = w.shape
            u = torch.randn(three, n_heads, head_dim, generator=generator, dtype=w.dtype)
            v = torch.randn(three, n_heads, dim, generator=generator, dtype=w.dtype)
            u = F.normalize(u.to(w.device), dim=-1, eps=_EPS)
            v = F.normalize(v.to(w.device), dim=-1, eps=_EPS)
            power_iteration_(w.reshape(-1, head_dim, dim), u.view(-1, head_dim), v.view(-1, dim), init_iterations)
            self.register_buffer(f"u_{index}", u)
            self.register_buffer(f"v_{index}", v)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer_heads(self, index: int) -> LayerHeads:
        return layer_heads(self._layers[index])

    def vectors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"u_{index}"), getattr(self, f"v_{index}")

    def sigmas(self, update: bool | None = None) -> torch.Tensor:
        """Estimated sigma_max of every head's W_Q, W_K, W_V as ``[layers, 3, heads]``.

        With ``update`` (default: ``self.training``) the persistent vectors first take
        ``n_power_iterations`` steps on the current weights, as Algorithm 1 does once per step.
        Layers of equal shape are stacked into one batch, so a step costs a fixed handful of
        kernels whatever the depth (on a GPU, launches rather than FLOPs dominate this work).
        """
        update = self.training if update is None else update
        heads = [self.layer_heads(i).qkv for i in range(self.num_layers)]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, w in enumerate(heads):
            groups.setdefault(tuple(w.shape), []).append(index)
        out: list[torch.Tensor | None] = [None] * self.num_layers
        with torch.autocast(device_type=self.lambdas.device.type, enabled=False):
            for (three, n_heads, head_dim, dim), members in groups.items():
                w = torch.stack([heads[i] for i in members]).float().reshape(-1, head_dim, dim)
                us = [getattr(self, f"u_{i}") for i in members]
                vs = [getattr(self, f"v_{i}") for i in members]
                u = torch.cat([b.reshape(-1, head_dim) for b in us])
                v = torch.cat([b.reshape(-1, dim) for b in vs])
                if update:
                    power_iteration_(w.detach(), u, v, self.config.n_power_iterations)
                    rows = three * n_heads
                    _copy_all(us + vs, [c.view_as(b) for c, b in zip(u.split(rows) + v.split(rows), us + vs)])
                sigma = rayleigh_sigma(w, u, v).view(len(members), three, n_heads)
                if len(groups) == 1:
                    return sigma
                for position, index in enumerate(members):
                    out[index] = sigma[position]
        return torch.stack(out)  # type: ignore[arg-type]

    def penalty(self, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_{l,h} (lambda_q sigma_q^2 + lambda_k sigma_k^2 + lambda_v sigma_v^2)``."""
        sigmas = self.sigmas() if sigmas is None else sigmas
        return (self.lambdas.to(sigmas)[None, :, None] * sigmas.square()).sum()

    def forward(self) -> torch.Tensor:
        return self.penalty()


@torch.no_grad()
def exact_spectral_norms(model: nn.Module) -> torch.Tensor:
    """Exact sigma_max (by SVD) of every head's W_Q, W_K, W_V, W_O: ``[layers, 4, heads]``."""
    rows = []
    for attn in attention_layers(model):
        heads = layer_heads(attn)
        qkv = torch.linalg.matrix_norm(heads.qkv.double(), ord=2)  # [3, H]
        o = torch.linalg.matrix_norm(heads.o.double(), ord=2)  # [H]
        rows.append(torch.cat([qkv, o.unsqueeze(0)]).float())
    return torch.stack(rows)
