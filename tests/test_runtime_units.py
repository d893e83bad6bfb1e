"""Each kind of served evidence is a unit over one ModelSession, testable without the front object:
the units alone give the blocks the runtime serves, and each states its own guarantee and space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specformer_deploy.serving.layer_bounds import AttentionBounds, MlpBounds
from specformer_deploy.serving.options import ProbeRequest
from specformer_deploy.serving.probe import RobustnessProbe
from specformer_deploy.serving.runtime import SpecformerRuntime
from specformer_deploy.serving.session import ModelSession, load_export
from specformer_deploy.serving.smoother import SmoothingCertifier
from specformer_deploy.serving.smoothing import SmoothingParams


@pytest.fixture(scope="module")
def loaded(exported_pair):
    path = Path(exported_pair["msvp"]["onnx"])
    proto, meta = load_export(path)
    return path, proto, meta, ModelSession(path, meta)


@pytest.fixture(scope="module")
def pixels(loaded) -> np.ndarray:
    _, _, _, model = loaded
    return np.random.default_rng(3).random((2, *model.input_shape), dtype=np.float32)


def test_attention_bounds_need_only_the_metadata_and_the_layer_inputs(loaded, pixels) -> None:
    path, _, meta, model = loaded
    _, norms = model.infer(pixels)
    blocks = AttentionBounds(meta).blocks(norms, 0.02)
    served = SpecformerRuntime(path).answer(pixels, delta0=0.02)
    assert blocks == [answer["attention_lipschitz"] for answer in served]
    assert "Frobenius distance delta0" in blocks[0]["guarantee"] and "tokens x" in blocks[0]["space"]
    assert all(layer["bound"] > 0 for layer in blocks[0]["layers"])


def test_gelu_mlps_have_no_local_bound_unit(loaded) -> None:
    _, proto, meta, _ = loaded
    assert meta["mlp"]["activation"] == "gelu" and MlpBounds.of(meta, proto) is None


def test_probe_and_smoothing_units_run_over_the_session_alone(loaded, pixels) -> None:
    path, _, _, model = loaded
    labels = model.infer(pixels)[0].argmax(axis=1)
    request = ProbeRequest("pgd", 8 / 255, 3)
    probe = RobustnessProbe(model).attack(pixels, labels, request)
    assert probe == SpecformerRuntime(path).probe(pixels, labels, request)
    assert probe[0]["kind"] == "empirical: no guarantee" and probe[0]["linf_distance"] <= 8 / 255 + 1e-6
    smoother = SmoothingCertifier(model, "fp32", threads=1)
    params = SmoothingParams(sigma=0.25, n0=20, n=200, alpha=0.01, seed=4)
    block = smoother.certify(pixels[0], params)
    assert block == SpecformerRuntime(path, sampler="fp32", threads=1).smoothing(pixels[0], params)
    assert block["sampler"]["precision"] == "fp32" and "radius_in_sent_image" in block
    with pytest.raises(ValueError, match="sampler must be one of"):
        SmoothingCertifier(model, "bf16")
