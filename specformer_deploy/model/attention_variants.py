"""The SpecFormer paper's Lipschitz-motivated baselines, as drop-in attention modules for timm ViTs.

- ``l2``: L2 multi-head attention (Kim et al. 2021, "The Lipschitz constant of self-attention"):
  ``W_K = W_Q`` per head, scores ``-||q_i - q_j||^2 / sqrt(D)``, and the value path
  ``X A_h W_V^h`` with ``A_h = W_Q^h (W_Q^h)^T / sqrt(D)``, as that paper requires.
- ``lipnorm``: LipschitzNorm (Dasoulas et al. 2021, the paper's LNFormer): dot-product scores of
  each head divided by ``max(||Q||_F ||K||_(inf,2), ||Q||_F ||V||_(inf,2), ||K||_(inf,2) ||V||_(inf,2))``.
- ``scsa``: LipsFormer (Qi et al. 2023): scaled cosine similarity attention (unit-norm queries and
  keys, a per-head temperature kept in [1, 100]), CenterNorm instead of LayerNorm, and weighted
  residual shortcuts (timm's LayerScale, initialised at 0.1).

Each keeps timm's parameter names where the projection is the same (``qkv``, ``proj``), so MSVP,
export and audit find the projections; ``attention_kind`` tells the certificate code that
Theorem 4.3 (dot-product softmax attention) does not apply to them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.layers.attention import Attention
from torch import nn

__all__ = ["ATTENTION_KINDS", "L2Attention", "LipNormAttention", "ScaledCosineAttention", "CenterNorm",
           "apply_attention_variant"]

ATTENTION_KINDS = ("dot", "l2", "lipnorm", "scsa")


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*D] -> [B, H, N, D]``."""
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class L2Attention(nn.Module):
    """Kim et al.'s L2-MHA: one tied query/key projection ``q``, a value projection ``v``."""

    attention_kind = "l2"

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **_: object) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)  # W_Q = W_K; a shared bias would cancel in the distances
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(-||q_i - q_j||^2 / sqrt(D))``: a function of the pairwise distances only."""
        q = _heads(self.q(x), self.num_heads)
        sq = q.square().sum(-1)
        dist2 = (sq.unsqueeze(-1) - 2 * q @ q.transpose(-2, -1) + sq.unsqueeze(-2)).clamp_min(0)
        return torch.softmax(-dist2 * self.scale, dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        q = _heads(self.q(x), self.num_heads)  # X W_Q^h
        dim = x.shape[-1]
        wq = self.q.weight.view(self.num_heads, self.head_dim, dim)
        wv = self.v.weight.view(self.num_heads, self.head_dim, dim)
        mixing = wq @ wv.transpose(1, 2) * self.scale  # (W_Q^h)^T W_V^h / sqrt(D): [H, D, D]
        values = q @ mixing  # X A_h W_V^h
        if self.v.bias is not None:
            values = values + self.v.bias.view(1, self.num_heads, 1, self.head_dim)
        return self.proj(_merge(self.attention(x) @ values))


class LipNormAttention(Attention):
    """timm's Attention with LipschitzNorm on the scores (Dasoulas et al. 2021)."""

    attention_kind = "lipnorm"

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised scores; ``|s_ij| <= 1`` whatever the input scale (the denominator bounds them)."""
        q, k, v = self._qkv(x)
        q_f = q.flatten(2).norm(dim=-1)  # ||Q||_F per (batch, head)
        k_inf = k.norm(dim=-1).amax(dim=-1)  # ||K||_(inf,2): the largest row norm
        v_inf = v.norm(dim=-1).amax(dim=-1)
        denom = torch.stack([q_f * k_inf, q_f * v_inf, k_inf * v_inf]).amax(dim=0).clamp_min(1e-12)
        return q @ k.transpose(-2, -1) / denom[..., None, None]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        v = self._qkv(x)[2]
        return self.proj(_merge(torch.softmax(self.scores(x), dim=-1) @ v))


class ScaledCosineAttention(Attention):
    """LipsFormer's scaled cosine similarity attention: ``softmax(tau_h cos(q_i, k_j)) V``."""

    attention_kind = "scsa"

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs: object) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.log_tau = nn.Parameter(torch.full((num_heads,), math.log(10.0)))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(tau * cos(q_i, k_j))``: unchanged when queries or keys are rescaled."""
        q, k, _ = self._qkv(x)
        tau = self.log_tau.clamp(0.0, math.log(100.0)).exp().view(1, -1, 1, 1)
        cosine = F.normalize(q, dim=-1, eps=1e-6) @ F.normalize(k, dim=-1, eps=1e-6).transpose(-2, -1)
        return torch.softmax(tau * cosine, dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return self.proj(_merge(self.attention(x) @ self._qkv(x)[2]))


class CenterNorm(nn.Module):
    """LipsFormer's CenterNorm: ``gamma * D/(D-1) * (x - mean(x)) + beta`` (no variance division)."""

    def __init__(self, dim: int, **_: object) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.dim / max(self.dim - 1, 1)
        return self.weight * scale * (x - x.mean(dim=-1, keepdim=True)) + self.bias


def apply_attention_variant(net: nn.Module, kind: str) -> None:
    """Replace the attention of every block of a timm ViT (``kind`` from ``ATTENTION_KINDS``)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    if kind == "dot":
        return
    for index, block in enumerate(net.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) is not Attention:
            raise ValueError(f"--attention {kind} replaces timm's Attention; block {index} has "
                             f"{type(attn).__name__} (use a ViT/DeiT model)")
        dim, heads = attn.qkv.in_features, attn.num_heads
        bias = attn.qkv.bias is not None
        cls = {"l2": L2Attention, "lipnorm": LipNormAttention, "scsa": ScaledCosineAttention}[kind]
        block.attn = cls(dim, num_heads=heads, qkv_bias=bias)
        if kind == "scsa":
            block.norm1, block.norm2 = CenterNorm(dim), CenterNorm(dim)
            block.ls1, block.ls2 = LayerScale(dim, init_values=0.1), LayerScale(dim, init_values=0.1)
    if kind == "scsa" and isinstance(getattr(net, "norm", None), nn.LayerNorm):
        net.norm = CenterNorm(net.norm.normalized_shape[0])
