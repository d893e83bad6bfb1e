"""Robust accuracy tables in the layout of the SpecFormer paper's Tables 1 and 2.

A model is a run directory (PyTorch weights) or an exported ``.onnx`` whose ``model.pt2``
beside it gives the gradients (the same traced graph, so the same function). Every attack runs
in pixel space on the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specformer_deploy.attacks import AttackSpec, parse_attack
from specformer_deploy.robustness.robust_accuracy import robust_accuracy
from specformer_deploy.training.data import load_dataset

__all__ = ["PROTOCOLS", "load_attack_model", "evaluate_model"]

# The paper's two protocols: standard training is attacked at 2/255, adversarial training at 8/255.
PROTOCOLS: dict[str, list[str]] = {
    "standard": ["fgsm:2/255", "pgd:2/255:2"],
    "adversarial": ["cw:8/255:20", "pgd:8/255:20", "pgd:8/255:100"],
}


def load_attack_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model returning logits, info)`` from a run directory or an exported ``.onnx`` (+ ``.pt2``).

    ``info`` has ``dataset``, ``data_dir``, ``image_size``, ``num_classes``, ``channels`` and ``source``.
    """
    path = Path(path)
    if path.is_dir():
        from specformer_deploy.training.train import load_run_model

        model, config = load_run_model(path, device)
        info = {"dataset": config["train"]["dataset"], "data_dir": config["train"].get("data_dir"),
                "image_size": config["model"]["img_size"], "num_classes": config["model"]["num_classes"],
                "channels": int(config["model"].get("in_chans", 3)), "source": "run directory (PyTorch)"}
        return model.eval(), info
    if path.suffix != ".onnx":
        raise ValueError(f"{path} is neither a run directory nor an .onnx file")
    from specformer_deploy.artifact.onnx_meta import input_shape, require_export
    from specformer_deploy.artifact.pt2 import load_exported_logits

    meta = require_export(path, need_pt2=True)
    pt2 = path.with_suffix(".pt2")
    model = load_exported_logits(pt2).to(device)
    info = {"dataset": (meta.get("training") or {}).get("dataset"), "data_dir": None,
            "image_size": meta["image_size"], "num_classes": meta["num_classes"],
            "channels": input_shape(meta)[0], "source": f"{pt2.name} (same trace as {path.name})"}
    return model, info


def evaluate_model(model: nn.Module, info: dict[str, Any], attacks: list[AttackSpec | str], *,
                   dataset: str | None = None, data_dir: str | None = None, limit: int | None = None,
                   batch_size: int = 128, seed: int = 0, device: torch.device | str = "cpu",
                   on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """``{"clean": acc, "<spec>": acc, ..., "details": {...}}`` on the first ``limit`` test images."""
    dataset = dataset or info.get("dataset")
    if not dataset:
        raise ValueError("the model does not record its dataset: pass --dataset")
    bundle = load_dataset(dataset, int(info["image_size"]), data_dir or info.get("data_dir"),
                          int(info.get("channels", 3)))
    if bundle.num_classes != int(info["num_classes"]):
        raise ValueError(f"dataset {dataset} has {bundle.num_classes} classes but the model has {info['num_classes']}")
    count = len(bundle.test) if limit is None else min(limit, len(bundle.test))
    if count < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    x = torch.stack([bundle.test[i][0] for i in range(count)])
    y = torch.tensor([bundle.test[i][1] for i in range(count)])
    specs = [parse_attack(a, tuple(x.shape[1:])) if isinstance(a, str) else a for a in attacks]
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for spec in [None, *specs]:
        key = "clean" if spec is None else str(spec)
        progress = None
        if on_progress is not None:
            progress = lambda done, total, correct, key=key: on_progress(key, done, total or count)  # noqa: E731
        result = robust_accuracy(model, (x, y), spec, num_classes=bundle.num_classes, batch_size=batch_size,
                                 device=device, seed=seed, progress=progress)
        results[key] = result.accuracy
        details[key] = {"label": "Clean" if spec is None else spec.label, "correct": result.correct,
                        "total": result.total, "seconds": round(result.seconds, 3),
                        **({} if spec is None else {"attack": spec.to_dict()})}
    results["details"] = {"dataset": dataset, "images": count, "source": info.get("source"), "attacks": details}
    return results
