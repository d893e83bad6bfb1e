"""Smoothing never answers with a number that is not JSON, never certifies from non-finite logits,
and never starts from an absurd training sigma, even one whose digest was recomputed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from specformer_deploy.artifact.onnx_meta import metadata_digests, read_metadata, write_metadata
from specformer_deploy.serving.runtime import IntegrityError, SpecformerRuntime
from specformer_deploy.serving.smoothing import (
    MAX_SIGMA,
    SamplingError,
    SmoothingError,
    SmoothingParams,
    certify,
    certify_at_radius,
)

X = np.zeros((1, 4, 4), dtype=np.float32)


def _always(label: int):
    return lambda batch: np.full(len(batch), label)


@pytest.mark.parametrize("alpha", [0.5, 0.25, 1e-12])
@pytest.mark.parametrize("sigma", [MAX_SIGMA, 1e-30])
def test_answers_are_strict_json_at_the_extremes_of_every_accepted_range(alpha: float, sigma: float) -> None:
    """Every sample agreeing at the largest n and the loosest alpha: p_lower is as close to 1 as it
    gets, and the radius is still a finite number."""
    for run, extra in ((certify, {}), (certify_at_radius, {"radius": 0.1})):
        params = SmoothingParams(sigma=sigma, n0=1, n=2_000_000, alpha=alpha, batch_size=500_000, **extra)
        block = run(_always(2), X, 3, params)
        text = json.dumps(block, allow_nan=False)  # raises on NaN or Infinity
        assert block["label"] == 2 and math.isfinite(block["radius"]) and block["radius"] > 0
        assert json.loads(text)["radius"] == block["radius"]


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 0.9999999999999999, r"\(0, 0.5\]"), ("alpha", 0.6, "lower bound"), ("alpha", 1.0, "alpha"),
    ("sigma", 1.7e308, "at most 10"), ("sigma", 1e38, "at most 10"), ("sigma", 1e20, "at most 10"),
    ("sigma", 1e-46, "float32"), ("sigma", math.inf, "finite"), ("sigma", 0.0, "float32"),
])
def test_absurd_alpha_and_sigma_are_refused_by_name(field: str, value: float, message: str) -> None:
    fields = {"sigma": 0.25, "alpha": 0.001, field: value}
    with pytest.raises(SmoothingError, match=message) as caught:
        SmoothingParams(**fields).validate()
    assert caught.value.field == field


def test_non_finite_logits_fail_the_certificate_instead_of_certifying_label_0(exported_pair) -> None:
    """A model whose logits overflow under the noise (argmax of NaN is 0) gets no certificate."""
    runtime = SpecformerRuntime(exported_pair["vanilla"]["onnx"])
    sampler = runtime.sampler  # the session that smoothing samples with
    real_run = sampler.session.run

    class Overflowing:  # the real session, whose logits turn NaN for a large enough input
        def run(self, names, feeds):
            outputs = real_run(names, feeds)
            if np.abs(feeds["pixels"]).max() > 5:
                outputs[0] = np.full_like(outputs[0], np.nan)
            return outputs

        def __getattr__(self, name):
            return getattr(sampler.__dict__["_real_session"], name)

    sampler._real_session, sampler.session = sampler.session, Overflowing()
    pixels = np.full((1, *runtime.input_shape), 0.5, dtype=np.float32)
    assert runtime.answer(pixels, smoothing=SmoothingParams(sigma=0.1, n=200))[0]["smoothing"]["label"] is not None
    with pytest.raises(SamplingError, match="non-finite logits"):
        runtime.answer(pixels, smoothing=SmoothingParams(sigma=MAX_SIGMA, n=200))


def _with_training_sigma(src: Path, dst: Path, sigma) -> Path:
    """A copy whose metadata says it was trained at ``sigma``, with every digest recomputed by the
    project's own functions: the edit is invisible to the integrity check."""
    shutil.copy(src.with_suffix(".pt2"), dst.with_suffix(".pt2"))
    proto = onnx.load(str(src))
    meta = read_metadata(proto)
    meta["smoothing"] = {"sigma": sigma, "objective": "gaussian", "noise_copies": 1}
    meta["integrity"]["metadata_sha256"] = metadata_digests(meta)
    write_metadata(proto, meta)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("sigma, message", [(1e30, "at most 10"), (1e-46, "float32"), ("0.25", "finite number")])
def test_an_absurd_training_sigma_is_refused_at_load_even_with_recomputed_digests(exported_pair, tmp_path: Path,
                                                                                  sigma, message) -> None:
    src = Path(exported_pair["vanilla"]["onnx"])
    edited = _with_training_sigma(src, tmp_path / "model.onnx", sigma)
    with pytest.raises(IntegrityError, match=f"specformer.smoothing.sigma .*{message}"):
        SpecformerRuntime(edited)
    fine = _with_training_sigma(src, tmp_path / "fine.onnx", 0.25)
    assert SpecformerRuntime(fine).smoothing_sigma == 0.25
