"""Batched white-box attacks in pixel space ([0, 1]); every epsilon is a pixel-space radius.

Used by adversarial training (PGD-AT, Madry et al.) and by evaluation. The caller chooses the
model's mode: evaluation runs attacks in eval mode; training generates its examples in eval
mode too, so dropout does not randomise the attack.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd", "fgsm", "check_budget"]

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_budget(eps: float, step_size: float, steps: int) -> None:
    """Reject budgets that make no sense in pixel space, before any work is done."""
    if not (0.0 <= eps <= 1.0):
        raise ValueError(f"eps must lie in [0, 1] (pixel space), got {eps}")
    if not (0.0 < step_size <= 1.0):
        raise ValueError(f"step size must lie in (0, 1], got {step_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return delta * (eps / flat).clamp(max=1.0)


def _ascent(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return grad / flat


def _random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device)
    direction = _ascent(direction, "l2")
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
    return direction * radius * eps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
        norm: Norm = "linf", random_start: bool = True, loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` (cross-entropy by default) inside the eps-ball.

    Returns adversarial pixels (detached, in [0, 1]); the model's mode is left unchanged.
    """
    check_budget(eps, step_size, steps)
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    x = x.detach()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = _project(delta.detach() + step_size * _ascent(grad, norm), eps, norm)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one full-size Linf step from the clean image."""
    return pgd(model, x, y, eps=eps, step_size=max(eps, 1e-12), steps=1, norm="linf", random_start=False)
