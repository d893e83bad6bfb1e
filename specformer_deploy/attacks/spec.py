"""Attacks named on the command line: ``NAME:EPS[:STEPS[:RESTARTS]]``, validated, and run.

E.g. ``pgd:8/255:20``, ``pgd-l2:0.5:10:5``, ``cw:8/255``, ``autoattack:8/255``, ``fgsm:2/255``;
every epsilon is a pixel-space radius ([0, 1] pixels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from specformer_deploy.attacks.white_box import (
    MAX_RESTARTS,
    MAX_STEPS,
    Norm,
    _is_int,
    autoattack,
    check_budget,
    cw_linf,
    default_step_size,
    fgsm,
    pgd,
)
from specformer_deploy.budgets import BudgetError, parse_epsilon

__all__ = ["ATTACKS", "DEFAULT_STEPS", "AttackSpec", "format_eps", "parse_attack", "run_attack"]

# name -> norm. "autoattack-l2" is torchattacks' AutoAttack with norm="L2".
ATTACKS: dict[str, Norm] = {"fgsm": "linf", "pgd": "linf", "pgd-l2": "l2", "cw": "linf", "autoattack": "linf",
                            "autoattack-l2": "l2"}
# Steps used when the spec string gives none. CW-20 as in the SpecFormer paper; fgsm is one step by
# definition and AutoAttack's schedule is its own (100 iterations per attack), so neither takes STEPS.
DEFAULT_STEPS: dict[str, int] = {"fgsm": 1, "pgd": 10, "pgd-l2": 10, "cw": 20, "autoattack": 100,
                                 "autoattack-l2": 100}
_FIXED_STEPS = ("fgsm", "autoattack", "autoattack-l2")


# --------------------------------------------------------------------------------------------- specs

def format_eps(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths (the usual way to state it), else a short decimal."""
    k = eps * 255
    if 0 < k < 255 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.6g}"


@dataclass(frozen=True)
class AttackSpec:
    """One attack with its budget; build it with ``parse_attack`` or directly (it validates itself).

    ``step_size=None`` means ``default_step_size(eps, steps)`` (FGSM: eps). ``steps`` is fixed for
    fgsm (1) and AutoAttack (its own schedule; kept at 100 for the record).
    """

    name: str
    eps: float
    steps: int | None = None  # None: DEFAULT_STEPS[name]
    step_size: float | None = None
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(ATTACKS)}")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.name])
        if not _is_int(self.steps) or self.steps < 1 or self.steps > MAX_STEPS:
            raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if self.name in _FIXED_STEPS and self.steps != DEFAULT_STEPS[self.name]:
            raise ValueError(f"{self.name} takes no step count (it always uses {DEFAULT_STEPS[self.name]})")
        if not _is_int(self.restarts) or not (1 <= self.restarts <= MAX_RESTARTS):
            raise ValueError(f"restarts must be an integer in [1, {MAX_RESTARTS}], got {self.restarts!r}")
        if self.restarts > 1 and self.name in _FIXED_STEPS:
            raise ValueError(f"{self.name} takes no restarts")
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a finite number > 0 (for clean accuracy use no attack), got {self.eps}")
        if self.norm == "linf" and self.eps > 1:
            hint = f"; did you mean {self.eps:g}/255?" if self.eps <= 255 else ""
            raise ValueError(f"Linf eps {self.eps:g} is outside (0, 1]: pixels lie in [0, 1]{hint}")
        check_budget(self.eps, self.resolved_step_size, self.steps, self.norm)

    @property
    def norm(self) -> Norm:
        return ATTACKS[self.name]

    @property
    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.name == "fgsm":
            return self.eps
        return default_step_size(self.eps, self.steps, self.norm)

    @property
    def label(self) -> str:
        """Human-readable, e.g. ``PGD-20 (Linf, eps 8/255)`` or ``CW-20 x5 restarts``."""
        base = {"fgsm": "FGSM", "pgd": "PGD", "pgd-l2": "PGD", "cw": "CW", "autoattack": "AutoAttack",
                "autoattack-l2": "AutoAttack"}[self.name]
        steps = "" if self.name in _FIXED_STEPS else f"-{self.steps}"
        restarts = f" x{self.restarts} restarts" if self.restarts > 1 else ""
        norm = "Linf" if self.norm == "linf" else "L2"
        return f"{base}{steps}{restarts} ({norm}, eps {format_eps(self.eps)})"

    def __str__(self) -> str:
        """The spec string; ``parse_attack(str(spec))`` gives back an equal spec (step size aside)."""
        parts = [self.name, format_eps(self.eps) if "/" in format_eps(self.eps) else repr(self.eps)]
        if self.name not in _FIXED_STEPS:
            parts.append(str(self.steps))
            if self.restarts > 1:
                parts.append(str(self.restarts))
        return ":".join(parts)

    def to_dict(self) -> dict[str, Any]:
        step = None if self.name.startswith("autoattack") else self.resolved_step_size  # AutoAttack: its own
        return {**asdict(self), "norm": self.norm, "resolved_step_size": step,
                "spec": str(self), "label": self.label}


def _parse_number(text: str, what: str, spec: str) -> float:
    """``0.0314``, ``8/255``; anything else is a ValueError naming ``spec``."""
    try:
        return parse_epsilon(text, what)
    except BudgetError as err:
        raise ValueError(f"attack {spec!r}: {err}") from None


def _parse_int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"attack {spec!r}: {what} must be a whole number, got {text!r}") from None


def parse_attack(spec: str, input_shape: tuple[int, ...] | None = None) -> AttackSpec:
    """Parse ``NAME:EPS[:STEPS[:RESTARTS]]``, e.g. ``pgd:8/255:20``, ``pgd-l2:0.5:10:5``, ``cw:8/255``.

    Names: fgsm, pgd (Linf), pgd-l2, cw (Linf PGD on the CW margin), autoattack (Linf),
    autoattack-l2. EPS is a pixel-space radius, ``8/255`` or ``0.0314``; Linf eps must lie in
    (0, 1]. L2 eps must be > 0 and, when ``input_shape`` (one example, ``(C, H, W)``) is given,
    at most the pixel cube's diameter sqrt(C*H*W); otherwise that bound is checked when the
    attack runs. STEPS defaults to ``DEFAULT_STEPS`` (pgd 10, cw 20); fgsm and AutoAttack take
    none. The step size is ``default_step_size`` = 2.5 * eps / STEPS (Madry et al.).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty attack spec; expected NAME:EPS[:STEPS[:RESTARTS]], e.g. pgd:8/255:20")
    parts = [p.strip() for p in spec.strip().split(":")]
    name = parts[0].lower()
    if name not in ATTACKS:
        raise ValueError(f"attack {spec!r}: unknown name {parts[0]!r}; choose one of {', '.join(ATTACKS)} "
                         "(format NAME:EPS[:STEPS[:RESTARTS]])")
    if len(parts) < 2 or not parts[1]:
        raise ValueError(f"attack {spec!r}: missing EPS; expected {name}:EPS, e.g. {name}:8/255")
    if len(parts) > 4:
        raise ValueError(f"attack {spec!r}: too many fields; expected NAME:EPS[:STEPS[:RESTARTS]]")
    if len(parts) > 2 and name in _FIXED_STEPS:
        raise ValueError(f"attack {spec!r}: {name} takes only NAME:EPS (no steps or restarts)")
    eps = _parse_number(parts[1], "EPS", spec)
    steps = _parse_int(parts[2], "STEPS", spec) if len(parts) > 2 else DEFAULT_STEPS[name]
    restarts = _parse_int(parts[3], "RESTARTS", spec) if len(parts) > 3 else 1
    try:
        parsed = AttackSpec(name=name, eps=eps, steps=steps, restarts=restarts)
        if input_shape is not None:
            check_budget(parsed.eps, parsed.resolved_step_size, parsed.steps, parsed.norm, input_shape)
    except ValueError as err:
        raise ValueError(f"attack {spec!r}: {err}") from None
    return parsed


# --------------------------------------------------------------------------------------------- dispatch

def run_attack(model: nn.Module, spec: AttackSpec | str, x: torch.Tensor, y: torch.Tensor,
               num_classes: int | None = None, generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """Adversarial images for ``spec`` (an ``AttackSpec`` or a spec string); use eval mode.

    ``num_classes`` is only used by AutoAttack (``None``: read from the model). ``generator``
    drives PGD's random starts; ``seed`` AutoAttack's.
    """
    if isinstance(spec, str):
        spec = parse_attack(spec)
    if spec.name == "fgsm":
        if spec.step_size is None:
            return fgsm(model, x, y, spec.eps)
        return pgd(model, x, y, spec.eps, spec.step_size, 1, "linf", random_start=False)
    if spec.name in ("pgd", "pgd-l2"):
        return pgd(model, x, y, spec.eps, spec.resolved_step_size, spec.steps, norm=spec.norm, random_start=True,
                   generator=generator, restarts=spec.restarts)
    if spec.name == "cw":
        return cw_linf(model, x, y, spec.eps, steps=spec.steps, step_size=spec.resolved_step_size,
                       restarts=spec.restarts, generator=generator)
    return autoattack(model, x, y, spec.eps, norm=spec.norm, n_classes=num_classes, seed=seed)
