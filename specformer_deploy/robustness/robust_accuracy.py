"""Accuracy under one attack over a data set, batch by batch (RobustBench's rule: an example is
robust when it is classified correctly both clean and attacked)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from specformer_deploy.attacks import AttackSpec, parse_attack, run_attack

__all__ = ["RobustAccuracy", "robust_accuracy"]

Progress = Callable[[int, "int | None", int], None]


@dataclass
class RobustAccuracy:
    """Accuracy under one attack. ``float(result)`` is the accuracy."""

    spec: str | None  # None: clean accuracy
    correct: int
    clean_correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.total if self.total else float("nan")

    def __float__(self) -> float:
        return self.accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "clean_accuracy": self.clean_accuracy}


Data = Union[DataLoader, Dataset, "tuple[torch.Tensor, torch.Tensor]", Iterable["tuple[torch.Tensor, torch.Tensor]"]]


def _batches(data: Data, batch_size: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """(batches, total examples if known) for tensors, a Dataset, a DataLoader or any iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)), x.shape[0]
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return iter(DataLoader(data, batch_size=batch_size, shuffle=False)), len(data)  # type: ignore[arg-type]
    total = None
    if isinstance(data, DataLoader):
        try:
            total = len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return iter(data), total


def robust_accuracy(model: nn.Module, data: Data, spec: AttackSpec | str | None, num_classes: int | None = None,
                    batch_size: int = 128, device: torch.device | str | None = None, seed: int = 0,
                    progress: Progress | None = None) -> RobustAccuracy:
    """Accuracy of ``model`` under ``spec`` (clean accuracy when ``spec`` is None), batch by batch.

    ``data``: ``(images, labels)`` tensors (split into ``batch_size`` chunks), a Dataset, a
    DataLoader or any iterable of ``(images, labels)`` batches; pixels in [0, 1]. An example counts
    as robust when it is classified correctly both clean and attacked (RobustBench's rule), so
    only clean-correct examples are attacked. Put the model in eval mode first (a model in train
    mode triggers a warning: dropout would make the attack and the verdict random). ``seed`` fixes
    PGD's random starts and AutoAttack's. ``progress(done, total, correct)`` is called after each
    batch (``total`` is None when the data has no length).
    """
    if isinstance(spec, str):
        spec = parse_attack(spec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model.training:
        warnings.warn("robust_accuracy on a model in train mode: call model.eval() first", stacklevel=2)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    batches, total = _batches(data, batch_size)
    correct = clean_correct = done = 0
    started = time.perf_counter()
    for index, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            ok = model(x).argmax(dim=1) == y
        clean_correct += int(ok.sum())
        if spec is not None and bool(ok.any()):
            keep = ok.nonzero().squeeze(1)
            adv = run_attack(model, spec, x[keep], y[keep], num_classes=num_classes, generator=generator,
                             seed=seed + index)
            with torch.no_grad():
                ok[keep] = model(adv).argmax(dim=1) == y[keep]
        correct += int(ok.sum())
        done += int(y.shape[0])
        if progress is not None:
            progress(done, total, correct)
    return RobustAccuracy(spec=None if spec is None else str(spec), correct=correct, clean_correct=clean_correct,
                          total=done, seconds=time.perf_counter() - started)
