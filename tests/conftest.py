"""Shared fixtures: small models and a deterministic CPU set-up."""

from __future__ import annotations

import pytest
import torch

from specformer_deploy.models import build_model, resolve_model_config


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
