"""Attack budgets in pixel space: how epsilons are written and how PGD's step follows from them.

One parser and one step-size rule for the whole toolkit (CLI options, attack specs, served
requests, training), so that ``8/255`` means the same number everywhere. Pure Python: the
serving side imports it without torch.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["BudgetError", "parse_epsilon", "madry_step_size"]


class BudgetError(ValueError):
    """A budget that is not a finite number (or a fraction like ``8/255``); the message names it."""


def parse_epsilon(value: Any, name: str = "eps") -> float:
    """``0.0314``, ``8/255`` (a fraction of two numbers) or a number -> float.

    Refuses booleans, non-finite values and anything else with a :class:`BudgetError` naming
    ``name``; range checks belong to the caller, which knows the norm and the input size."""
    if isinstance(value, bool):
        raise BudgetError(f"{name} must be a number or a fraction like 8/255, got a boolean")
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                number = float(num) / float(den)
            else:
                number = float(text)
        except ZeroDivisionError:
            raise BudgetError(f"{name} {_shown(value)} divides by zero") from None
        except (ValueError, OverflowError):
            raise BudgetError(f"{name} must be a number or a fraction like 8/255, got {_shown(value)}") from None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise BudgetError(f"{name} is too large to be a budget") from None
    else:
        raise BudgetError(f"{name} must be a number or a fraction like 8/255, got a {type(value).__name__}")
    if not math.isfinite(number):
        raise BudgetError(f"{name} must be finite, got {_shown(value)}")
    return number


def madry_step_size(eps: float, steps: int, norm: str = "linf") -> float:
    """Madry et al.'s rule, ``2.5 * eps / steps``: enough to cross the ball and come back.

    Linf steps are capped at 1, which changes nothing: no pixel can move further in [0, 1]."""
    if steps < 1:
        raise BudgetError(f"steps must be >= 1, got {steps}")
    step = 2.5 * eps / steps
    return min(step, 1.0) if norm == "linf" else step


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value, quoted and capped, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
