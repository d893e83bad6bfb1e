"""What a client may ask for, and the ranges it must stay in: a request outside them is a
:class:`RequestError` (served as a 4xx naming the option) before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specformer_deploy.budgets import madry_step_size

__all__ = ["LIMITS", "ProbeRequest", "RequestError", "check_options"]

LIMITS = {"max_steps": 100, "max_restarts": 100, "max_delta0": 1e4, "max_top_k": 100, "max_eps_linf": 1.0,
          "max_batch_probe": 64}


class RequestError(ValueError):
    """A client option outside its documented range; ``option`` names it, the message says why."""

    def __init__(self, message: str, option: str = "options") -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class ProbeRequest:
    """A robustness probe: attack the prediction inside an eps-ball and report whether it flips.

    PGD runs ``restarts`` random starts (seeded per image, so an answer does not depend on its
    batch) and keeps the strongest; its cost is ``steps x restarts`` gradient steps per image."""

    attack: str = "pgd"  # pgd | fgsm
    eps: float = 2 / 255
    steps: int = 10
    norm: str = "linf"  # linf | l2
    restarts: int = 1

    def validate(self, image_size: int, channels: int = 3) -> ProbeRequest:
        if self.attack not in ("pgd", "fgsm"):
            raise RequestError(f"probe must be 'pgd' or 'fgsm', got {self.attack!r}", "probe")
        if self.norm not in ("linf", "l2"):
            raise RequestError(f"norm must be 'linf' or 'l2', got {self.norm!r}", "norm")
        if self.attack == "fgsm" and self.norm != "linf":
            raise RequestError("fgsm is an Linf attack: use norm 'linf' or probe 'pgd'", "norm")
        max_eps = LIMITS["max_eps_linf"] if self.norm == "linf" else math.sqrt(channels * image_size * image_size)
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0 < self.eps <= max_eps):
            raise RequestError(f"eps must be in (0, {max_eps:.4g}] for norm {self.norm} (pixel space [0, 1]), "
                               f"got {self.eps}", "eps")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= LIMITS["max_steps"]):
            raise RequestError(f"steps must be an integer in [1, {LIMITS['max_steps']}], got {self.steps}", "steps")
        if not (isinstance(self.restarts, int) and 1 <= self.restarts <= LIMITS["max_restarts"]):
            raise RequestError(f"restarts must be an integer in [1, {LIMITS['max_restarts']}], got {self.restarts}",
                               "restarts")
        if self.attack == "fgsm" and self.restarts != 1:
            raise RequestError("fgsm has no random start, so restarts must be 1: use probe 'pgd' for restarts",
                               "restarts")
        if np.float32(self.step_size) == 0:  # the attack runs in float32: a zero step never moves a pixel
            raise RequestError(f"eps {self.eps:.3g} with steps {self.steps} gives a PGD step 2.5*eps/steps that is 0 "
                               "in float32: use a larger eps or fewer steps", "eps")
        return self

    @property
    def step_size(self) -> float:
        """Madry et al.'s rule ``2.5 eps / steps``, Linf steps capped at 1 (FGSM takes one full step)."""
        return self.eps if self.attack == "fgsm" else madry_step_size(self.eps, self.steps, self.norm)

    @property
    def cost(self) -> tuple[int, int]:
        """``(steps, restarts)`` of gradient work per image: what an endpoint's probe cost cap counts."""
        return (1, 1) if self.attack == "fgsm" else (self.steps, self.restarts)


def check_options(delta0: float, top_k: int, probe: ProbeRequest | None, image_size: int, channels: int = 3) -> None:
    """Reject options outside their documented ranges (``LIMITS``) before any work is done."""
    if not (isinstance(delta0, (int, float)) and math.isfinite(delta0) and 0 <= delta0 <= LIMITS["max_delta0"]):
        raise RequestError(f"delta0 must be a number in [0, {LIMITS['max_delta0']:g}], got {delta0}", "delta0")
    if not (isinstance(top_k, int) and 1 <= top_k <= LIMITS["max_top_k"]):
        raise RequestError(f"top_k must be an integer in [1, {LIMITS['max_top_k']}], got {top_k}", "top_k")
    if probe is not None:
        probe.validate(image_size, channels)
