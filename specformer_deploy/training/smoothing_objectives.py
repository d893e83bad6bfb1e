"""Training objectives made for randomized smoothing: the losses and the attack they need.

A smoothed classifier ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, certifies a
larger radius the more confidently and consistently ``f`` labels the noisy copies of ``x``. Plain
Gaussian augmentation (Cohen et al., 2019) only asks each noisy copy to be right. The two
objectives here ask more, each with ``m`` noisy copies of every image in one batch:

Consistency regularization (Jeong & Shin, NeurIPS 2020, "Consistency Regularization for
Certified Robustness of Smoothed Classifiers"; github.com/jh-jeong/smoothing-consistency,
``code/consistency.py``, loss ``'default'``)::

    loss = mean_i CE(f(x + d_i), y) + lambda * mean_i KL(p_bar || p_i) + eta * H(p_bar)

with ``p_i = softmax(f(x + d_i))``, ``p_bar = mean_i p_i`` and every term averaged over the batch.
The KL term pulls the copies' predictions to their mean; the entropy term makes the mean
confident (without it the KL term is content with a flat ``p_bar``). Their defaults: ``m = 2``,
``eta = 0.5``; ``lambda = 20`` for MNIST at every sigma (their EXPERIMENTS.MD; 10 is the script's
default and their CIFAR-10 choice).

SmoothAdv (Salman et al., NeurIPS 2019, "Provably Robust Deep Learning via Adversarially Trained
Smoothed Classifiers"; github.com/Hadisalman/smoothing-adversarial, ``code/attacks.py``,
``PGD_L2._attack_mutlinoise``): L2 PGD against the smoothed *soft* classifier,
maximizing ``-log(mean_i softmax(f(x' + d_i))_y)`` over ``||x' - x||_2 <= eps`` with the ``m`` noise
samples ``d_i`` drawn once and held fixed through the attack; training then takes the mean
cross-entropy of the ``m`` copies ``x' + d_i`` (their ``--train-multi-noise``). Their step rule:
start at ``x``, move ``2 * eps / steps`` along the L2-normalized gradient, project the move onto
the eps-ball and the point onto ``[0, 1]``; the noisy copies are not clipped. Their defaults:
``steps = 10`` and ``eps`` warmed up linearly over the first 10 epochs
(``min(eps, (epoch + 1) * eps / warmup)``); ``eps`` in {0.25, 0.5, 1.0} and ``m`` in {1, 2, 4, 8}
on CIFAR-10; the MNIST runs of Jeong & Shin use ``eps = 255/256``, ``steps = 10``, ``warmup = 10``,
``m = 4``.

SmoothAdv with consistency (Jeong & Shin's best MNIST figures; their ``train_consistency.py
--adv-training``): SmoothAdv's attack with its ``m`` fixed noise draws, then the consistency loss
above on the ``m`` copies ``x' + d_i`` of the attacked image, the very draws the attack held fixed.
Their MNIST runs: ``m = 4``, ``eps = 255/256``, 10 steps, warmup 10, ``lambda = 1``, ``eta = 0.5``.

Noisy copies are laid out copy-major: rows ``[i*B, (i+1)*B)`` of a batch of ``m*B`` are copy ``i``
of the ``B`` images, so the whole batch is one forward call.
"""

from __future__ import annotations

import torch
from torch import nn

from specformer_deploy.attacks import input_grad_only

__all__ = ["gaussian_noise", "noisy_copies", "repeat_target", "consistency_terms",
           "consistency_regularizer", "smoothed_nll", "smoothadv_attack", "smoothadv_step_size",
           "warmed_up_eps"]

# Floor under probabilities before a log, as both reference implementations take it.
_PROBABILITY_FLOOR = 1e-20


def gaussian_noise(shape: torch.Size | tuple[int, ...], sigma: float, copies: int, seed: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``copies`` independent ``N(0, sigma^2 I)`` draws of ``shape``, as ``[copies, *shape]``, from a
    generator of their own seeded with ``seed`` (one copy draws what ``randn(shape)`` draws)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return sigma * torch.randn((copies, *shape), generator=generator, device=device, dtype=dtype)


def noisy_copies(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x + noise[i]`` for every copy ``i``, concatenated copy-major into one ``[m*B, ...]`` batch."""
    return (x.unsqueeze(0) + noise).flatten(0, 1)


def repeat_target(target: torch.Tensor, copies: int) -> torch.Tensor:
    """The targets of a copy-major batch: hard labels ``[B]`` or soft ones ``[B, C]`` repeated per copy."""
    return target.repeat(copies, *([1] * (target.dim() - 1)))


def _per_copy(logits: torch.Tensor, copies: int) -> torch.Tensor:
    if logits.shape[0] % copies:
        raise ValueError(f"a batch of {logits.shape[0]} rows is not {copies} copies of one batch")
    return logits.float().reshape(copies, logits.shape[0] // copies, *logits.shape[1:])


def consistency_terms(logits: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``mean_i KL(p_bar || p_i)``, ``H(p_bar)``), each averaged over the batch (Jeong & Shin 2020)."""
    log_p = torch.log_softmax(_per_copy(logits, copies), dim=-1)  # [m, B, C]
    p_bar = log_p.exp().mean(dim=0)  # [B, C]
    log_p_bar = torch.log(p_bar.clamp_min(_PROBABILITY_FLOOR))
    kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(dim=-1).mean(dim=0)  # [B]
    entropy = -(p_bar * log_p_bar).sum(dim=-1)  # [B]
    return kl.mean(), entropy.mean()


def consistency_regularizer(logits: torch.Tensor, copies: int, lam: float, eta: float) -> torch.Tensor:
    """``lambda * mean_i KL(p_bar || p_i) + eta * H(p_bar)``: what consistency training adds to the
    copies' cross-entropy."""
    kl, entropy = consistency_terms(logits, copies)
    return lam * kl + eta * entropy


def smoothed_nll(logits: torch.Tensor, y: torch.Tensor, copies: int) -> torch.Tensor:
    """Per image, ``-log(mean_i softmax(logits_i)_y)``: the loss of the smoothed soft classifier
    estimated with the batch's ``m`` copies (what SmoothAdv's attack maximizes)."""
    p_bar = torch.softmax(_per_copy(logits, copies), dim=-1).mean(dim=0)
    return -torch.log(p_bar.gather(1, y.view(-1, 1)).squeeze(1).clamp_min(_PROBABILITY_FLOOR))


def smoothadv_step_size(eps: float, steps: int) -> float:
    """Salman et al.'s step, ``2 * eps / steps`` (their PGD_L2's SGD learning rate)."""
    return 2.0 * eps / steps


def warmed_up_eps(eps: float, epoch: int, warmup_epochs: int) -> float:
    """The attack radius of ``epoch`` (0-based): ``min(eps, (epoch + 1) * eps / warmup)``, as both
    reference trainers raise it, so early epochs attack a model that cannot yet resist."""
    if warmup_epochs <= 0:
        return eps
    return min(eps, (epoch + 1) * eps / warmup_epochs)


def _unit_l2(t: torch.Tensor) -> torch.Tensor:
    return t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _into_l2_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return delta * (eps / norms).clamp(max=1.0)


def smoothadv_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, eps: float,
                     steps: int) -> torch.Tensor:
    """SmoothAdv's L2 PGD (Salman et al. 2019): ``x'`` with ``||x' - x||_2 <= eps``, ``x'`` in ``[0, 1]``,
    that raises ``smoothed_nll`` over the fixed noise ``noise`` (``[m, B, ...]``).

    Starts at ``x``; each step moves ``2 * eps / steps`` along the normalized gradient, then projects
    the move onto the ball and the point onto ``[0, 1]`` (clamping towards ``x``, which lies in the
    cube, never leaves the ball). ``steps = 0`` or ``eps = 0`` returns ``x``. Run the model in eval
    mode: the attack does not switch modes."""
    if steps < 0 or not eps >= 0:
        raise ValueError(f"SmoothAdv needs steps >= 0 and eps >= 0, got steps={steps}, eps={eps}")
    x = x.detach()
    if steps == 0 or eps == 0:
        return x.clone()
    noise, copies, step = noise.detach(), noise.shape[0], smoothadv_step_size(eps, steps)
    adv = x.clone()
    with input_grad_only(model), torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = smoothed_nll(model(noisy_copies(adv, noise)), y, copies).sum()
            (grad,) = torch.autograd.grad(loss, adv)
            moved = adv.detach() + step * _unit_l2(grad)
            adv = (x + _into_l2_ball(moved - x, eps)).clamp_(0.0, 1.0)
    return adv.detach()
