"""The exported model, loaded once and trusted only after its checks: one ONNX Runtime session that
every kind of evidence (attention and MLP bounds, the probe, smoothing) reads from.

Loading refuses (:class:`IntegrityError`) a file that is not an export, whose signature does not
verify, or whose weights, graph or metadata differ from their export-time digests, exactly as
`audit` checks them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError, digest_problems
from specformer_deploy.artifact.onnx_meta import NotAnExportError, input_shape, read_metadata, require_export_metadata
from specformer_deploy.serving.devices import cuda_session

__all__ = ["ModelSession", "load_export"]


def load_export(path: Path, verify: bool = True, verify_key: str | Path | None = None):
    """``(ModelProto, metadata)`` of an export, after its signature (with ``verify_key``) and, with
    ``verify``, its digests were checked."""
    import onnx

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if verify_key is not None:  # authenticity first: nothing of an unsigned or re-signed file is read
        from specformer_deploy.artifact.signing import SigningError, verify_export

        try:
            verify_export(path, verify_key)
        except SigningError as err:
            raise IntegrityError(f"the verify key cannot be used: {err}") from None
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf raises several types for a corrupt file
        raise IntegrityError(f"{path} is not a readable ONNX file: {err}") from err
    meta = read_metadata(proto)
    try:
        require_export_metadata(meta, path)
    except NotAnExportError as err:
        raise IntegrityError(str(err)) from None
    if verify:
        problems = digest_problems(proto, meta)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise IntegrityError(f"SHA-256 does not match the export's: {shown} ({path.name} changed after "
                                 "export)", problems)
    return proto, meta


class ModelSession:
    """The ONNX Runtime session of a loaded export, its shapes and class names.

    ``device_id`` asks for ONNX Runtime's CUDA provider on that GPU; where CUDA is not usable the
    session runs on CPU and ``cuda_fallback`` says why. ``device`` is what is actually used
    (``"cuda:N"`` or ``"cpu"``)."""

    def __init__(self, path: Path, meta: dict[str, Any], *, device_id: int | None = None, threads: int | None = None,
                 verified: bool = True) -> None:
        import onnxruntime as ort

        self.path, self.meta, self.verified = path, meta, verified
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        if threads:
            self.options.intra_op_num_threads = threads
        self.session, self.cuda_fallback = None, None
        if device_id is not None:
            self.session, self.cuda_fallback = cuda_session(path, self.options, int(device_id))
        if self.session is None:
            self.session = ort.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.device = f"cuda:{device_id}" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.image_size = int(meta["image_size"])
        self.input_shape = input_shape(meta)  # (channels, S, S); (3, S, S) for older exports
        self.channels = self.input_shape[0]
        self.class_names = list(meta["class_names"])

    def run(self, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        """The graph's named outputs for ``[B, C, S, S]`` pixels."""
        return self.session.run(names, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, C, S, S]`` pixels -> ``(logits [B, classes], attn_input_norms [B, L])``."""
        logits, norms = self.run(["logits", "attn_input_norms"], pixels)
        return logits, norms

    def predictions(self, logits: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """Softmax probabilities and the top-k classes of each image (``logits`` is ``[B, C]``)."""
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1)[:, :k]
        names = self.class_names
        out = []
        for row, ranked in zip(probs.tolist(), order.tolist()):
            label = ranked[0]
            out.append({"label": label, "class": names[label], "probability": row[label],
                        "top_k": [{"label": i, "class": names[i], "probability": row[i]} for i in ranked]})
        return out
