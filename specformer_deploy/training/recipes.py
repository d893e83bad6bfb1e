"""Training recipes of the paper's attention baselines, where the common recipe fails them.

The SpecFormer paper trained each baseline "with the protocol of its own paper". With the common
recipe (SGD, lr 0.1) two of them do not learn on MNIST, and the reasons are in their formulations,
not in bugs (measured by ``tools/diagnose_baselines.py`` on the validation split; docs/RESULTS.md):

- ``l2`` (Kim et al. 2021): the value path ``X W_Q W_Q^T W_V / sqrt(D)`` is cubic in the weights, so
  at a small initialisation the attention output and both of its gradients are near zero (a saddle
  at the origin); the class token then receives almost nothing from the patches and SGD stays at
  chance. Adam's per-parameter step sizes leave the saddle. Kim et al. trained with Adam.
- ``lipnorm`` (Dasoulas et al. 2021): LipschitzNorm bounds every score by 1 in absolute value, so
  attention stays close to uniform (its entropy is within a few percent of log N); SGD learns
  slowly on top of that, AdamW much faster. Dasoulas et al. trained with Adam.

Each recipe is TrainConfig overrides, its learning rate the best of the validation sweep.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASELINE_RECIPES", "recipe_note"]

BASELINE_RECIPES: dict[str, dict[str, Any]] = {
    "l2": {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05},
    "lipnorm": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
}


def recipe_note(attention: str, optimizer: str) -> str | None:
    """A line for a run about to train a baseline with an optimizer its recipe does not use."""
    recipe = BASELINE_RECIPES.get(attention)
    if recipe is None or recipe["optimizer"] == optimizer:
        return None
    flags = " ".join(f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float) else
                     f"--{key.replace('_', '-')} {value}" for key, value in recipe.items())
    return (f"--attention {attention} learns slowly or not at all with --optimizer {optimizer} (see "
            f"specformer_deploy/training/recipes.py); its recipe, chosen on a validation split: {flags}")
