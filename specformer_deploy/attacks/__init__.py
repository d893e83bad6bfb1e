"""Attacks: the primitive below training, evaluation and serving (all import from here, never the
other way round). ``white_box`` holds the gradient attacks, ``spec`` the command-line attack strings."""

from specformer_deploy.attacks.spec import ATTACKS, DEFAULT_STEPS, AttackSpec, format_eps, parse_attack, run_attack
from specformer_deploy.attacks.white_box import (
    MAX_RESTARTS,
    MAX_STEPS,
    autoattack,
    check_budget,
    cw_linf,
    cw_margin,
    default_step_size,
    fgsm,
    input_grad_only,
    pgd,
)

__all__ = ["ATTACKS", "DEFAULT_STEPS", "MAX_RESTARTS", "MAX_STEPS", "AttackSpec", "autoattack", "check_budget",
           "cw_linf", "cw_margin", "default_step_size", "fgsm", "format_eps", "input_grad_only", "parse_attack",
           "pgd", "run_attack"]
