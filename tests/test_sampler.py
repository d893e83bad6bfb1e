"""The graph smoothing samples with: the int8 sampling graph, parallel streams, shared batches, device noise.

- A statically quantized sampler is one fixed function: the same noisy image gets the same label
  in a batch of 1, 7 or 1,000 (dynamic quantization would fail this), on one stream or several.
- A sampling graph that differs from the SHA-256 in the metadata is refused at load, by `audit`
  and by `package`; the answer names the graph that sampled.
- ``certify_many`` (images sharing batches) gives each image exactly ``certify``'s answer.
- The device-noise path (torch noise through ONNX Runtime's I/O binding, run here on the CPU)
  counts what the closed form of a linear classifier predicts, and the same seed counts the same.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import stats

from specformer_deploy.artifact.integrity import IntegrityError
from specformer_deploy.artifact.sampler import SAMPLER_KEY, file_sha256
from specformer_deploy.serving.sampler import NoiseSampler
from specformer_deploy.serving.smoothing import SmoothingParams, certify, certify_many

SIGMA = 0.25


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory) -> Path:
    """A digits model trained with noise, exported with the int8 smoothing sampler."""
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("int8")
    train(TrainConfig(epochs=2, batch_size=32, warmup_epochs=0, msvp=False, noise_sd=SIGMA, seed=1), root / "run",
          show_progress=False)
    return Path(export_run(root / "run", root / "export" / "model.onnx", smoothing_sampler="int8")["onnx"])


def _noisy_copies(runtime, count: int, seed: int = 0) -> np.ndarray:
    from specformer_deploy.training.data import load_dataset

    image = load_dataset("digits", runtime.image_size, channels=runtime.channels).test[0][0].numpy()
    rng = np.random.default_rng(seed)
    return (image + SIGMA * rng.standard_normal((count, *image.shape), dtype=np.float32)).astype(np.float32)


def test_int8_sampler_labels_do_not_depend_on_the_batch(int8_export: Path) -> None:
    """Bitwise: the int8 graph's logits for a noisy image are the same in a batch of 1, 7 or 1,000,
    so its labels are too, on one stream or two."""
    from specformer_deploy.serving.runtime import SpecformerRuntime

    runtime = SpecformerRuntime(int8_export, threads=1)
    assert runtime.sampler.precision == "int8"
    noisy = _noisy_copies(runtime, 1000)
    session = runtime.sampler.session

    def logits(batch: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"pixels": batch})[0]

    whole = logits(noisy)
    in_sevens = np.concatenate([logits(noisy[i: i + 7]) for i in range(0, 1000, 7)])
    alone = np.concatenate([logits(noisy[i: i + 1]) for i in range(0, 1000, 10)])
    assert np.array_equal(in_sevens, whole) and np.array_equal(alone, whole[::10])
    assert np.ptp(whole, axis=0).max() > 0  # the noise moves the logits: the comparison is not of constants
    labels = runtime.sampler.classify(noisy)
    assert np.array_equal(labels, whole.argmax(axis=1))
    two_streams = NoiseSampler(runtime.sampler.path, precision="int8", streams=2)
    assert two_streams.streams == 2 and np.array_equal(two_streams.classify(noisy), labels)


def test_int8_sampler_is_named_in_the_answer_and_recorded_in_the_metadata(int8_export: Path) -> None:
    from specformer_deploy.serving.runtime import SpecformerRuntime

    runtime = SpecformerRuntime(int8_export)
    sampler_file = int8_export.with_name("model.sampler-int8.onnx")
    block = runtime.meta[SAMPLER_KEY]
    assert block["file"] == sampler_file.name and block["sha256"] == file_sha256(sampler_file)
    assert block["calibration"]["split"] == "train" and block["calibration"]["noise_sd"] == SIGMA
    assert 0.5 <= block["label_agreement_with_fp32"]["fraction"] <= 1.0
    x = _noisy_copies(runtime, 1)[0] * 0 + 0.5
    answer = runtime.smoothing(x, SmoothingParams(SIGMA, n0=20, n=200, seed=3))
    assert answer["sampler"]["precision"] == "int8" and answer["sampler"]["sha256"] == block["sha256"]
    fp32 = SpecformerRuntime(int8_export, sampler="fp32").smoothing(x, SmoothingParams(SIGMA, n0=20, n=200, seed=3))
    assert fp32["sampler"]["graph"] == "model.onnx" and fp32["sampler"]["precision"] == "fp32"
    audit = subprocess.run([sys.executable, "-m", "specformer_deploy", "audit", str(int8_export), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert block["sha256"] in json.loads(audit.stdout)["integrity"]["smoothing_sampler"]


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.parent.iterdir():
        if path.is_file():
            shutil.copy(path, dst / path.name)
    return dst / src.name


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_tampered_sampling_graph_is_refused_at_load_by_audit_and_by_package(int8_export: Path, tmp_path: Path,
                                                                              damage: str) -> None:
    from specformer_deploy.serving.package import PackageError, package_model
    from specformer_deploy.serving.runtime import SpecformerRuntime

    onnx_path = _copy_export(int8_export, tmp_path / "export")
    sampler_file = onnx_path.with_name("model.sampler-int8.onnx")
    if damage == "missing":
        sampler_file.unlink()
    else:  # a valid ONNX graph, one weight nudged: what an attacker who wants other labels would ship
        model = onnx.load(str(sampler_file))
        weight = next(t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and np.prod(t.dims) > 16)
        values = numpy_helper.to_array(weight).copy()
        values.flat[0] = np.int8(-values.flat[0] if values.flat[0] else 1)
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        onnx.save(model, str(sampler_file))
    with pytest.raises(IntegrityError, match="sampler-int8"):
        SpecformerRuntime(onnx_path)
    with pytest.raises(IntegrityError, match="sampler-int8"):
        SpecformerRuntime(onnx_path, sampler="fp32")  # a changed export is refused whichever graph samples
    audit = subprocess.run([sys.executable, "-m", "specformer_deploy", "audit", str(onnx_path), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode != 0 and "sampler-int8" in audit.stdout
    with pytest.raises(PackageError, match="sampler-int8"):
        package_model(onnx_path, "tampered", tmp_path / "store")


def test_auto_writes_the_int8_sampler_for_a_noise_trained_run_only_when_it_agrees(
        int8_export: Path, exported_pair, tmp_path: Path) -> None:
    from specformer_deploy.artifact.export import AUTO_MIN_AGREEMENT, export_run
    from specformer_deploy.artifact.onnx_meta import read_metadata_file

    summary = export_run(int8_export.parent.parent / "run", tmp_path / "auto" / "model.onnx")  # the default: auto
    block = read_metadata_file(summary["onnx"]).get(SAMPLER_KEY)
    if block is None:  # dropped: the export says why, and no sampler file is left
        assert "agreed with the float32" in summary["smoothing_sampler_note"]
        assert not (tmp_path / "auto" / "model.sampler-int8.onnx").exists()
    else:
        assert block["label_agreement_with_fp32"]["fraction"] >= AUTO_MIN_AGREEMENT
        assert (tmp_path / "auto" / block["file"]).is_file()
    plain = export_run(exported_pair["vanilla"]["run"], tmp_path / "plain" / "model.onnx")
    assert plain["smoothing_sampler"] is None and not (tmp_path / "plain" / "model.sampler-int8.onnx").exists()


def test_int8_sampler_needs_a_run_trained_with_noise(exported_pair, tmp_path: Path) -> None:
    from specformer_deploy.artifact.export import ExportError, export_run

    with pytest.raises(ExportError, match="trained without noise"):
        export_run(exported_pair["vanilla"]["run"], tmp_path / "model.onnx", smoothing_sampler="int8")
    with pytest.raises(ExportError, match="fp32, int8"):
        export_run(exported_pair["vanilla"]["run"], tmp_path / "model.onnx", smoothing_sampler="fp16")


# ------------------------------------------------------------------ several images per batch

W = np.array([0.6, -0.8, 0.0], dtype=np.float32)


def _three_classes(batch: np.ndarray) -> np.ndarray:
    z = batch.reshape(len(batch), -1) @ W
    return (z >= -0.1).astype(np.int64) + (z >= 0.4).astype(np.int64)


def test_certify_many_gives_each_image_the_answer_certify_gives_it_alone() -> None:
    rng = np.random.default_rng(0)
    images = [rng.uniform(-0.5, 0.8, (3, 1, 1)).astype(np.float32) for _ in range(9)]
    params = [SmoothingParams(0.3, n0=n0, n=n, batch_size=64, seed=seed)
              for seed, (n0, n) in enumerate([(10, 50), (100, 7), (1, 1), (33, 200), (64, 64), (5, 500),
                                              (100, 100), (2, 3), (70, 130)])]
    calls = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _three_classes(batch)

    together = certify_many(counted, images, 3, params)
    alone = [certify(_three_classes, x, 3, p) for x, p in zip(images, params)]
    assert together == alone
    assert sum(calls) == sum(p.n0 + p.n for p in params)
    assert max(calls) == 64 and len(calls) == math.ceil(sum(p.n0 for p in params) / 64) + \
        math.ceil(sum(p.n for p in params) / 64)  # every batch full except each phase's last


# ------------------------------------------------------------------ noise drawn on the device

def _linear_onnx(path: Path, w: np.ndarray, b: float) -> Path:
    """logits = [0, w.x + b] on [B, 1, 2, 2] pixels: class 1 exactly when w.x + b > 0."""
    weight = np.stack([np.zeros_like(w), w], axis=1).astype(np.float32)  # [4, 2]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])],
        "linear", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([0.0, b], np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_device_noise_counts_match_the_closed_form_and_repeat_for_a_seed(tmp_path: Path) -> None:
    w, b, sigma, samples = np.array([0.5, -0.5, 0.5, 0.5], np.float32), -0.3, 0.4, 40_000
    x = np.full((1, 2, 2), 0.4, dtype=np.float32)
    sampler = NoiseSampler(_linear_onnx(tmp_path / "linear.onnx", w, b), streams=1, device="cpu")
    counts = sampler.counts(x, samples, sigma, np.random.default_rng(5), 2, 1000)
    p = stats.norm.cdf((float(w @ x.reshape(-1)) + b) / (sigma * float(np.linalg.norm(w))))
    assert counts.sum() == samples
    assert abs(counts[1] - samples * p) <= 4.5 * math.sqrt(samples * p * (1 - p))
    again = sampler.counts(x, samples, sigma, np.random.default_rng(5), 2, 1000)
    assert (again == counts).all()
    host = sampler.classify(x[None] + np.zeros((3, 1, 1, 1), np.float32))
    assert (host == int(float(w @ x.reshape(-1)) + b > 0)).all()
