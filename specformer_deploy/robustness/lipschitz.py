"""Empirical lower bounds of local Lipschitz constants: power iteration on ``J^T J`` via jvp/vjp.

``||J(x)||_2`` at any point of a neighbourhood is a lower bound of the local Lipschitz constant
there, so every certificate (an upper bound) can be shown beside a number it must never be
below. Nothing here materialises a Jacobian: each iteration is one jvp and one vjp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from specformer_deploy.model.heads import attention_layers

__all__ = ["unfused_attention", "jacobian_norm", "local_lower_bound", "attention_layer_function", "network_function",
           "attention_inputs"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Use timm's explicit softmax path: the fused SDPA kernel has no forward-mode AD (jvp)."""
    layers = [a for a in attention_layers(model) if hasattr(a, "fused_attn")]
    saved = [a.fused_attn for a in layers]
    try:
        for attn in layers:
            attn.fused_attn = False
        yield model
    finally:
        for attn, value in zip(layers, saved):
            attn.fused_attn = value


def jacobian_norm(fn: Fn, x: torch.Tensor, iterations: int = 30, generator: torch.Generator | None = None) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (power iteration, a lower estimate)."""
    from torch.func import jvp, vjp

    x = x.detach()
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    v = v / v.norm()
    _, pullback = vjp(fn, x)
    sigma = 0.0
    for _ in range(iterations):
        _, jv = jvp(fn, (x,), (v,))
        sigma = float(jv.detach().norm())
        (w,) = pullback(jv)
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return sigma


def local_lower_bound(fn: Fn, x0: torch.Tensor, radius: float, samples: int = 4, iterations: int = 30,
                      seed: int = 0) -> float:
    """Max of ``||J||`` at the centre and at ``samples`` random points on the Frobenius ball's surface."""
    generator = torch.Generator().manual_seed(seed)
    best = jacobian_norm(fn, x0, iterations, generator)
    for _ in range(samples):
        direction = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        point = x0 + radius * direction / direction.norm()
        best = max(best, jacobian_norm(fn, point, iterations, generator))
    return best


def attention_layer_function(model: nn.Module, layer: int) -> Fn:
    """``X [N, d] -> attn_l(X) [N, d]`` for one image's tokens (the layer the certificate bounds)."""
    attn = list(attention_layers(model))[layer]
    return lambda tokens: attn(tokens.unsqueeze(0)).squeeze(0)


def network_function(model: nn.Module) -> Fn:
    """``pixels [3, H, W] -> logits [classes]`` for one image."""
    return lambda pixels: model(pixels.unsqueeze(0)).squeeze(0)


def attention_inputs(model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each attention layer's input tokens (the first LayerNorm's output) for one image ``[3, H, W]``."""
    net = getattr(model, "net", model)
    taps: list[torch.Tensor] = []
    hooks = [block.norm1.register_forward_hook(lambda m, a, o: taps.append(o.detach()[0])) for block in net.blocks]
    try:
        with torch.no_grad():
            model(pixels.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    return taps

