"""Where ONNX Runtime runs: a CUDA session on a given GPU when this machine and build can, else
the reason it cannot (the caller falls back to CPU and reports why)."""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["cuda_session", "cuda_unusable_reason", "cuda_usable"]

logger = logging.getLogger(__name__)


def cuda_unusable_reason() -> str | None:
    """Why ONNX Runtime cannot use CUDA here (``None`` when it has a CUDA provider *and* this
    machine has an NVIDIA device node)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return f"this onnxruntime build has no CUDAExecutionProvider (it has {', '.join(available)}; install " \
               "onnxruntime-gpu)"
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return "no NVIDIA device (/dev/nvidia*) on this machine"
    return None


def cuda_usable() -> bool:
    """True when ONNX Runtime has a CUDA provider *and* this machine has an NVIDIA device."""
    return cuda_unusable_reason() is None


def cuda_session(path: Path, options, device_id: int):
    """``(ONNX Runtime session of path on GPU device_id, None)``, or ``(None, why not)``."""
    import onnxruntime as ort

    reason = cuda_unusable_reason()
    if reason is not None:
        return None, reason
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu >= 1.21)
        try:
            ort.preload_dlls()
        except Exception as err:  # noqa: BLE001 - the session below reports what is really missing
            logger.debug("onnxruntime.preload_dlls failed: %s", err)
    try:
        session = ort.InferenceSession(str(path), options, providers=[
            ("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        return None, f"ONNX Runtime's CUDA provider failed on device {device_id}: {type(err).__name__}: {err}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return None, (f"ONNX Runtime could not start its CUDA provider on device {device_id} (CUDA or cuDNN "
                      "libraries missing?) and fell back to CPU")
    return session, None
