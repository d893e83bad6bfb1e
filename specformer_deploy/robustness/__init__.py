"""Robustness measurement: attacks, robust-accuracy evaluation, empirical Lipschitz estimates."""
