"""The graph randomized smoothing samples with: the export itself, or a reduced-precision copy of it.

Smoothing classifies ``n0 + n`` noisy copies of an image, so its cost is one graph's throughput.
``export --smoothing-sampler int8`` writes ``<name>.sampler-int8.onnx`` beside the export: the
logits-only part of the graph, statically quantized by ONNX Runtime (QDQ format, int8 weights per
output channel, uint8 activations) with scales calibrated once on training images under the
model's own training noise. The scales are constants of the file, so the base classifier is one
fixed function: a sample's label never depends on the other samples of its batch. (Dynamic
quantization computes activation scales per batch; a label would then depend on its batch
neighbours, and the samples would no longer be independent draws, which the binomial bound needs.)

A certificate made with this file is about the smoothed version of *that* graph, so the export's
metadata records the file's SHA-256 (covered by the metadata digests and so by a signature of
``model.onnx``) and the runtime refuses a file that does not match it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from specformer_deploy.artifact.integrity import IntegrityError

__all__ = ["PRECISIONS", "SAMPLER_KEY", "sampler_path", "logits_graph", "quantize_int8", "build_sampler",
           "file_sha256", "verified_sampler_file", "CALIBRATION_IMAGES"]

PRECISIONS = ("fp32", "int8")
SAMPLER_KEY = "smoothing_sampler"  # metadata entry (under the specformer. prefix)
CALIBRATION_IMAGES = 512
_CALIBRATION_BATCH = 64
QUANTIZATION = ("ONNX Runtime static quantization, QDQ format: int8 weights per output channel, uint8 activations, "
                "min-max scales calibrated once and fixed in the file")


def sampler_path(onnx_path: str | Path, precision: str) -> Path:
    """Where the sampling graph of ``precision`` lives beside ``model.onnx``."""
    path = Path(onnx_path)
    return path.with_name(f"{path.stem}.sampler-{precision}.onnx")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def logits_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``pixels -> logits`` alone: the certificate outputs (attention input norms, MLP inputs) and
    the metadata dropped, so the sampler computes only what smoothing counts."""
    from onnx.utils import Extractor

    model = Extractor(proto).extract_model(["pixels"], ["logits"])
    del model.metadata_props[:]
    return model


def _calibration_batches(images: np.ndarray, sigma: float, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """The training images under the model's training noise, in fixed batches: the activations the
    sampler will see, so the scales cover their range."""
    rng = np.random.default_rng(seed)
    noisy = images + np.float32(sigma) * rng.standard_normal(images.shape, dtype=np.float32)
    for start in range(0, len(noisy), _CALIBRATION_BATCH):
        yield {"pixels": np.ascontiguousarray(noisy[start: start + _CALIBRATION_BATCH], dtype=np.float32)}


def quantize_int8(fp32_logits: Path, out: Path, images: np.ndarray, sigma: float, seed: int = 0) -> None:
    """Write the statically quantized copy of ``fp32_logits`` to ``out`` (see the module docstring)."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _calibration_batches(images.astype(np.float32), sigma, seed)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = out.with_name(out.stem + ".prepared.onnx")
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer warns about every LayerNorm weight it leaves per-tensor
    try:
        # ONNX shape inference only: the symbolic pass fails on the exporter's constant nodes.
        quant_pre_process(str(fp32_logits), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        quiet.setLevel(level)
        prepared.unlink(missing_ok=True)


def _labels(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0].argmax(axis=1)


def build_sampler(proto: onnx.ModelProto, onnx_out: Path, precision: str, images: np.ndarray, sigma: float,
                  dataset: str | None, check_images: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """Write the sampling graph of ``precision`` beside ``onnx_out`` and return its metadata block
    (``None`` for fp32: the export samples itself). ``images``: training images that calibrate the
    scales (noise ``sigma`` added); ``check_images``: images the int8 labels are compared on, under
    the same noise, against the float32 graph's (the agreement is recorded, not enforced)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--smoothing-sampler must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    out = sampler_path(onnx_out, precision)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sampler-") as tmp:
        fp32 = Path(tmp) / "logits.onnx"
        onnx.save(logits_graph(proto), str(fp32))
        quantize_int8(fp32, out, images, sigma, seed)
        rng = np.random.default_rng(seed + 1)
        noisy = (check_images + np.float32(sigma) * rng.standard_normal(check_images.shape, dtype=np.float32))
        noisy = np.ascontiguousarray(noisy, dtype=np.float32)
        agreement = float((_labels(fp32, noisy) == _labels(out, noisy)).mean())
    return {"precision": precision, "file": out.name, "sha256": file_sha256(out), "quantization": QUANTIZATION,
            "calibration": {"dataset": dataset, "split": "train", "images": int(len(images)), "noise_sd": sigma,
                            "seed": seed},
            "label_agreement_with_fp32": {"images": int(len(check_images)), "noise_sd": sigma,
                                          "fraction": agreement}}


def verified_sampler_file(onnx_path: str | Path, meta: dict[str, Any]) -> Path | None:
    """The export's reduced-precision sampling graph after checking its SHA-256 against the
    metadata (``None`` when the export has none); :class:`IntegrityError` when it is missing or
    differs, so a changed sampler never certifies."""
    block = meta.get(SAMPLER_KEY)
    if not block:
        return None
    if not isinstance(block, dict) or block.get("precision") not in PRECISIONS[1:] or \
            not isinstance(block.get("file"), str) or not isinstance(block.get("sha256"), str):
        raise IntegrityError(f"{Path(onnx_path).name}: specformer.{SAMPLER_KEY} is not a sampler record")
    path = Path(onnx_path).parent / Path(block["file"]).name
    if not path.is_file():
        raise IntegrityError(f"{path.name} is missing: {Path(onnx_path).name} samples smoothing with it (export "
                             f"--smoothing-sampler {block['precision']} wrote it beside the .onnx file)")
    digest = file_sha256(path)
    if digest != block["sha256"]:
        raise IntegrityError(f"{path.name}: SHA-256 {digest[:16]}... differs from the export's "
                             f"{block['sha256'][:16]}... (the sampling graph changed after export)")
    return path
