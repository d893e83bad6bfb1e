"""A validation split carved from the training images, so settings are never chosen on the test set.

Recipes, noise levels and objectives are compared on held-out *training* images; the test images
are touched once, to report the chosen setting. The split is stratified by class and seeded by a
constant, not by the run's seed: every run (any seed, any recipe) holds out the same images, so
their validation figures compare like with like, and the same split is rebuilt from a run's
recorded ``val_images`` wherever it is measured (training, `evaluate --split val`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["SUBSET_SEED", "VALIDATION_SEED", "ValidationSplitError", "dataset_labels", "split_indices",
           "with_training_subset", "with_validation"]

VALIDATION_SEED = 2024  # fixed: the same held-out images for every run
SUBSET_SEED = 2025  # fixed: the same training subset for every run of a data-size study


class ValidationSplitError(ValueError):
    """A split size the training set cannot give (``train`` reports it like any bad option)."""


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every item's label, read without decoding images where the dataset keeps them apart."""
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    base = getattr(dataset, "base", None)  # ChannelView keeps its base's labels
    if base is not None:
        return dataset_labels(base)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def split_indices(labels: np.ndarray, count: int, seed: int = VALIDATION_SEED,
                  option: str = "--val-images") -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` indices: ``count`` images held out in proportion to each class."""
    from sklearn.model_selection import train_test_split

    classes = len(np.unique(labels))
    if not classes <= count <= len(labels) - classes:
        raise ValidationSplitError(f"{option} must be between {classes} (one per class) and "
                                   f"{len(labels) - classes} (the training set has {len(labels)} images), got {count}")
    train, validation = train_test_split(np.arange(len(labels)), test_size=count, stratify=labels,
                                         random_state=seed)
    return np.sort(train), np.sort(validation)


def with_validation(bundle: Any, count: int) -> Any:
    """``bundle`` (a :class:`~specformer_deploy.training.data.DatasetBundle`) whose training images
    lose ``count`` held out as ``bundle.validation`` (0: unchanged)."""
    if count <= 0:
        return bundle
    train, validation = split_indices(dataset_labels(bundle.train), count)
    return replace(bundle, train=Subset(bundle.train, train.tolist()),
                   validation=Subset(bundle.train, validation.tolist()))


def with_training_subset(bundle: Any, count: int) -> Any:
    """``bundle`` training on a stratified subset of ``count`` of its training images (0, or all of
    them: unchanged), the rest unused: a data-size study's smaller sets. Take it after
    :func:`with_validation`, so the held-out images stay the same whatever the subset."""
    total = len(bundle.train)
    if count <= 0 or count == total:
        return bundle
    if count > total:
        raise ValidationSplitError(f"--train-images {count} is more than the {total} training images "
                                   "(after any --val-images)")
    _, kept = split_indices(dataset_labels(bundle.train), count, SUBSET_SEED, option="--train-images")
    return replace(bundle, train=Subset(bundle.train, kept.tolist()))
