"""Shared fixtures: small models and a deterministic CPU set-up."""

from __future__ import annotations

import pytest
import torch

from specformer_deploy.model.factory import build_model, resolve_model_config


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """The built-in default architecture with random weights (10 classes)."""
    return build_model(resolve_model_config("specformer-tiny", num_classes=10)).eval()


@pytest.fixture
def small_convit():
    """ConViT-tiny at 32x32 with 4x4 patches: GPSA layers first, then MHSA layers."""
    return build_model(resolve_model_config("convit_tiny", num_classes=10, img_size=32, patch_size=4)).eval()


@pytest.fixture(scope="session")
def exported_pair(tmp_path_factory):
    """A vanilla and an MSVP run (same seed, 2 epochs on digits), each exported to ONNX."""
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, msvp in (("vanilla", False), ("msvp", True)):
        cfg = TrainConfig(epochs=2, batch_size=32, warmup_epochs=1, msvp=msvp, lambda_q=1e-2, lambda_k=1e-2,
                          lambda_v=1e-2, seed=5)
        train(cfg, root / name, show_progress=False)
        out[name] = export_run(root / name, root / name / "export" / "model.onnx")
        out[name]["run"] = root / name
    return out
