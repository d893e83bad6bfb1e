"""White-box attacks in pixel space ([0, 1]): every epsilon is a pixel-space radius.

The primitive that adversarial training (PGD-AT, Madry et al.), SmoothAdv training, evaluation and
the served PGD probe all use, so it sits below all of them. The paper's FGSM and PGD-2 at 2/255 are
weak attacks, so there are also many-step PGD with restarts, PGD on the Carlini-Wagner margin
("CW-20") and AutoAttack (through torchattacks).

Model mode is the caller's job: run attacks on a model in eval mode (``model.eval()``), so that
dropout does not randomise the gradient and the prediction that decides "fooled". Training
generates its examples in eval mode too. Only ``autoattack`` switches the mode itself
(torchattacks puts the model in eval mode and restores it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from specformer_deploy.budgets import BudgetError, madry_step_size

__all__ = ["MAX_RESTARTS", "MAX_STEPS", "Norm", "autoattack", "check_budget", "cw_linf", "cw_margin",
           "default_step_size", "fgsm", "input_grad_only", "pgd"]

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_STEPS = 10_000  # a typo guard: more steps than this is almost certainly "8/255:100000" by mistake
MAX_RESTARTS = 1_000


# --------------------------------------------------------------------------------------------- budgets

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _l2_diameter(shape: tuple[int, ...] | torch.Size) -> float:
    """L2 diameter of the pixel cube [0, 1]^d: a larger L2 ball contains the whole cube."""
    return math.sqrt(math.prod(shape))


def check_budget(eps: float, step_size: float, steps: int, norm: Norm = "linf",
                 input_shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """Reject budgets that make no sense in pixel space, before any work is done.

    Linf: eps in [0, 1] and step size in (0, 1] (a pixel cannot move by more than 1).
    L2: eps >= 0 and step size > 0; with ``input_shape`` (one example, e.g. ``(3, 32, 32)``) eps must
    also stay within the cube's diameter sqrt(C*H*W), beyond which the ball holds every image.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(eps) and math.isfinite(step_size)):
        raise ValueError(f"eps and step size must be finite, got eps={eps}, step size={step_size}")
    if norm == "linf":
        if not (0.0 <= eps <= 1.0):
            raise ValueError(f"eps must lie in [0, 1] (pixel space), got {eps}")
        if not (0.0 < step_size <= 1.0):
            raise ValueError(f"step size must lie in (0, 1], got {step_size}")
        return
    if eps < 0.0:
        raise ValueError(f"L2 eps must be >= 0, got {eps}")
    if step_size <= 0.0:
        raise ValueError(f"step size must be > 0, got {step_size}")
    if input_shape is not None and eps > _l2_diameter(input_shape) + 1e-9:
        raise ValueError(f"L2 eps {eps} exceeds the diameter {_l2_diameter(input_shape):.4g} of the pixel cube "
                         f"for inputs of shape {tuple(input_shape)}: the ball would contain every image")


def default_step_size(eps: float, steps: int, norm: Norm = "linf") -> float:
    """Madry et al.'s rule (:func:`specformer_deploy.budgets.madry_step_size`), as a ValueError."""
    try:
        return madry_step_size(eps, steps, norm)
    except BudgetError as err:
        raise ValueError(str(err)) from None


# --------------------------------------------------------------------------------------------- PGD core

def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta)).clamp(max=1.0)


def _ascent(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad)


@contextmanager
def input_grad_only(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the attack's duration, and are restored after (even on errors).

    Attacks need the gradient w.r.t. the input only; with frozen parameters autograd records no
    weight-gradient bookkeeping, which makes each PGD step about 5% faster on CPU. Do not train
    the same model from another thread while an attack runs.
    """
    params = [p for p in getattr(model, "parameters", lambda: [])() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device)
    direction = _ascent(direction, "l2")
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
    return direction * radius * eps


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _objective(loss_fn: LossFn, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scalar to differentiate, per-example values or None): losses may be per-example or summed."""
    loss = loss_fn(logits, y)
    if loss.dim() == 0:
        return loss, None
    if loss.shape != (logits.shape[0],):
        raise ValueError(f"loss_fn must return a scalar or one value per example, got shape {tuple(loss.shape)}")
    return loss.sum(), loss


def _pgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
             norm: Norm, random_start: bool, loss_fn: LossFn, generator: torch.Generator | None) -> torch.Tensor:
    """One PGD run; the iterate is the adversarial image itself (fewer ops than a separate delta)."""
    if norm == "linf":  # the Linf ball intersected with [0, 1] is a box: one clamp projects onto both
        low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    if random_start:
        adv = (x + _random_start(x, eps, norm, generator)).clamp_(0.0, 1.0)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            total, _ = _objective(loss_fn, model(adv), y)
            (grad,) = torch.autograd.grad(total, adv)
        adv = adv.detach().add_(_ascent(grad, norm), alpha=step_size)
        if norm == "linf":
            adv = torch.maximum(adv, low, out=adv)
            adv = torch.minimum(adv, high, out=adv)
        else:
            adv = (x + _project(adv - x, eps, norm)).clamp_(0.0, 1.0)
    return adv.detach()


@torch.no_grad()
def _score(model: nn.Module, adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example loss, fooled) at the final iterate; scalar losses fall back to cross-entropy."""
    logits = model(adv)
    _, per_example = _objective(loss_fn, logits, y)
    if per_example is None:
        per_example = _cross_entropy(logits, y)
    return per_example.float(), logits.argmax(dim=1) != y


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float | None, steps: int,
        norm: Norm = "linf", random_start: bool = True, loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None, restarts: int = 1) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` (cross-entropy by default) inside the eps-ball and [0, 1].

    Returns adversarial pixels (detached); the model's mode is left unchanged (use eval mode).
    ``step_size=None`` applies ``default_step_size``. ``loss_fn(logits, y)`` may return a scalar or
    one value per example (the gradient is taken of their sum).

    With ``restarts > 1`` (needs ``random_start``) the result is the per-example worst case: an
    example counts as broken if any restart fools it, and keeps the image of the first restart
    that does; otherwise the restart with the highest loss (per-example ``loss_fn`` values, or
    cross-entropy when ``loss_fn`` returns a scalar). Later restarts only run on examples not yet
    fooled, and the first restart is exactly a single run with the same generator.
    """
    if step_size is None:
        step_size = default_step_size(eps, steps, norm)
    check_budget(eps, step_size, steps, norm, tuple(x.shape[1:]) if x.dim() > 1 else None)
    if not _is_int(restarts) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 need random_start=True: restarts from the clean image all give the same result")
    loss_fn = loss_fn or _cross_entropy
    with input_grad_only(model):
        return _pgd_restarts(model, x.detach(), y, eps, step_size, steps, norm, random_start, loss_fn, generator,
                             restarts)


def _pgd_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
                  norm: Norm, random_start: bool, loss_fn: LossFn, generator: torch.Generator | None,
                  restarts: int) -> torch.Tensor:
    """Per-example worst case over restarts; later restarts only attack examples not yet fooled."""
    best = _pgd_run(model, x, y, eps, step_size, steps, norm, random_start, loss_fn, generator)
    if restarts == 1 or x.shape[0] == 0:
        return best
    score, fooled = _score(model, best, y, loss_fn)
    for _ in range(restarts - 1):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        adv = _pgd_run(model, x[active], y[active], eps, step_size, steps, norm, True, loss_fn, generator)
        new_score, new_fooled = _score(model, adv, y[active], loss_fn)
        better = new_fooled | (new_score > score[active])
        chosen = active[better]
        best[chosen] = adv[better]
        score[chosen] = new_score[better]
        fooled[chosen] = new_fooled[better]
    return best


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one full-size Linf step from the clean image."""
    return pgd(model, x, y, eps=eps, step_size=max(eps, 1e-12), steps=1, norm="linf", random_start=False)


# --------------------------------------------------------------------------------------------- CW

def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example Carlini-Wagner margin max_{j != y} z_j - z_y: positive exactly when misclassified.

    Unlike cross-entropy it does not saturate on confident predictions, which is why CW-PGD is a
    useful second opinion on models whose softmax is flat or overconfident.
    """
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def cw_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20,
            step_size: float | None = None, random_start: bool = True, restarts: int = 1,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Linf PGD on the CW margin loss ("CW-20" in the SpecFormer paper with the default 20 steps).

    Step size defaults to ``default_step_size`` (2.5 * eps / steps). Use eval mode.
    """
    return pgd(model, x, y, eps, step_size, steps, norm="linf", random_start=random_start, loss_fn=cw_margin,
               generator=generator, restarts=restarts)


# --------------------------------------------------------------------------------------------- AutoAttack

def _torchattacks() -> Any:
    """torchattacks, imported on first use: only AutoAttack needs it, and training imports this module."""
    try:
        import torchattacks
    except ImportError as err:  # a required dependency: its absence means a broken installation
        raise ImportError("AutoAttack needs the package 'torchattacks' (>= 3.5), a dependency of specformer-deploy "
                          "that is missing here: pip install 'torchattacks>=3.5'") from err
    return torchattacks


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf",
               n_classes: int | None = None, version: str = "standard", seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) through torchattacks: APGD-CE, APGD-T, FAB-T, Square (standard).

    ``n_classes`` must be the model's real number of classes (APGD-T and FAB-T target the top
    n_classes - 1 other classes; torchattacks' default of 10 silently weakens, or breaks, other
    models); ``None`` reads it from the model's output, a wrong value is an error. torchattacks
    runs the model in eval mode and restores its mode. Its seeding of the global RNG is contained:
    the caller's RNG state is unchanged afterwards. Examples it cannot break come back clean.
    """
    canonical = {"linf": "Linf", "l2": "L2"}.get(norm.lower())
    if canonical is None:
        raise ValueError(f"AutoAttack norm must be 'Linf' or 'L2', got {norm!r}")
    if version not in ("standard", "plus", "rand"):
        raise ValueError(f"AutoAttack version must be 'standard', 'plus' or 'rand', got {version!r}")
    check_budget(eps, max(eps, 1e-12) if canonical == "Linf" else 1.0, 1, canonical.lower(), tuple(x.shape[1:]))
    if x.shape[0] == 0:
        return x.detach().clone()
    actual = _num_classes(model, x)
    if n_classes is None:
        n_classes = actual
    elif n_classes != actual:
        raise ValueError(f"n_classes={n_classes} but the model outputs {actual} logits: pass the real number")
    if n_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, got {n_classes}")
    ta = _torchattacks()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        attack = ta.AutoAttack(model, norm=canonical, eps=eps, version=version, n_classes=n_classes, seed=seed)
        return attack(x.detach(), y.detach()).detach()
