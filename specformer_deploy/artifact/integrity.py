"""Is this export the one `export` wrote? The digest checks shared by `audit` and the serving runtime.

One implementation for both, so that a file the server loads is a file audit would pass on its
digests: the weights (one SHA-256 over all initializers, and one per tensor to name what
changed), the graph (nodes, constants, inputs and outputs) and every metadata value.

``model.pt2`` (the probe's gradient path) carries no digest of its own, so it is checked against
the ONNX file it was traced with: see :func:`pt2_problems`. numpy and onnx only at import;
torch is imported inside the ``model.pt2`` functions alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from specformer_deploy.artifact.onnx_meta import (
    INTEGRITY_KEY,
    graph_digest,
    initializer_arrays,
    metadata_digests,
    tensor_digests,
    weights_digest,
)

__all__ = ["IntegrityError", "DigestVerdict", "verify_digests", "digest_problems", "pt2_problems",
           "load_verified_pt2", "reference_pixels", "PT2_LOGIT_TOLERANCE"]

# model.pt2's logits must equal ONNX Runtime's on the reference pixels to within this fraction of
# the logit scale (max(1, max|z|)): export's parity tolerance (artifact.export.PARITY_TOLERANCE),
# which both files met against the same PyTorch model when they were written.
PT2_LOGIT_TOLERANCE = 1e-4


class IntegrityError(RuntimeError):
    """An export that is not what `export` wrote: a digest or ``model.pt2`` does not match.

    ``problems`` lists each finding (the message joins them)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [message])


@dataclass(frozen=True)
class DigestVerdict:
    """Stored and recomputed SHA-256 of the weights and the graph, and every mismatch found."""

    weights: dict[str, str | None]
    graph: dict[str, str | None]
    problems: list[str] = field(default_factory=list)


def _tensor_owner(name: str, layers: list[dict[str, Any]]) -> str:
    for layer in layers:
        for key in ("q", "k", "v", "o"):
            if isinstance(layer.get(key), dict) and layer[key].get("initializer") == name:
                return f" (layer {layer['layer']} attention weights)"
    return ""


def verify_digests(proto: onnx.ModelProto, meta: dict[str, Any],
                   arrays: dict[str, np.ndarray] | None = None) -> DigestVerdict:
    """Recompute every digest the export stored in ``meta["integrity"]`` and compare.

    ``arrays`` are the initializers when the caller already has them (they are read otherwise).
    A missing integrity entry or digest counts as a mismatch: nothing unverified passes."""
    arrays = initializer_arrays(proto) if arrays is None else arrays
    integrity = meta.get(INTEGRITY_KEY)
    integrity = integrity if isinstance(integrity, dict) else {}
    problems: list[str] = []
    if not integrity:
        problems.append(f"the metadata has no specformer.{INTEGRITY_KEY} entry: nothing can be verified")

    weights = {"stored": integrity.get("weights_sha256"), "recomputed": weights_digest(arrays)}
    if weights["recomputed"] != weights["stored"]:
        stored_tensors = integrity.get("tensor_sha256") or {}
        now = tensor_digests(arrays)
        changed = sorted(n for n in set(now) | set(stored_tensors) if now.get(n) != stored_tensors.get(n))
        layers = meta.get("attention_weights") if isinstance(meta.get("attention_weights"), list) else []
        for name in changed:
            what = "added" if name not in stored_tensors else "removed" if name not in now else "changed"
            problems.append(f"weight tensor {name} {what} after export{_tensor_owner(name, layers)}")
        if not changed:
            problems.append("the weights digest differs from the metadata's")

    graph = {"stored": integrity.get("graph_sha256"), "recomputed": graph_digest(proto)}
    if graph["recomputed"] != graph["stored"]:
        problems.append("the graph (nodes, constants, inputs or outputs) changed after export")

    stored_meta = integrity.get("metadata_sha256") or {}
    meta_now = metadata_digests(meta)
    for key in sorted(set(meta_now) | set(stored_meta)):
        if meta_now.get(key) != stored_meta.get(key):
            problems.append(f"metadata value specformer.{key} changed after export")
    return DigestVerdict(weights, graph, problems)


def digest_problems(proto: onnx.ModelProto, meta: dict[str, Any],
                    arrays: dict[str, np.ndarray] | None = None) -> list[str]:
    """Every digest mismatch of the file (weights, graph, metadata); empty when it is intact."""
    return verify_digests(proto, meta, arrays).problems


def reference_pixels(shape: tuple[int, int, int]) -> np.ndarray:
    """Two fixed images ``[2, C, H, W]`` in [0, 1]: mid-grey and seeded uniform noise.

    Grey alone leaves many weights unexercised (e.g. every patch identical); noise reaches them."""
    grey = np.full(shape, 0.5, dtype=np.float32)
    noise = np.random.default_rng(0).random(shape, dtype=np.float32)
    return np.stack([grey, noise])


def pt2_problems(program, arrays: dict[str, np.ndarray],
                 onnx_outputs: Callable[[np.ndarray], list[tuple[str, np.ndarray]]],
                 shape: tuple[int, int, int]) -> list[str]:
    """Where a loaded ``model.pt2`` differs from the ONNX file it should have been traced with.

    Two checks, both needed: (1) every parameter and buffer of the program equals the ONNX
    initializer of the same name bit for bit (export traces both files once, with ONNX
    optimisation off, so names and values are shared; this catches any changed weight, however
    small its effect); (2) every output on :func:`reference_pixels` (the logits, and the
    ``attn_input_norms`` that the certificates are computed from) equals ONNX Runtime's within
    ``PT2_LOGIT_TOLERANCE`` of that output's scale (this catches an edited graph with intact
    weights, whichever output the edit touches). ``program`` is ``torch.export.load(...).module()``;
    ``onnx_outputs`` runs the ONNX file on pixels ``[B, *shape]`` and returns its outputs as
    ``(name, array)`` pairs in the graph's order, the order the program returns them in.
    """
    import torch

    problems = []
    tensors = dict(program.named_parameters())
    tensors.update(dict(program.named_buffers()))
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().numpy()
        if name not in arrays:
            problems.append(f"model.pt2 tensor {name} has no ONNX initializer of that name")
        elif value.dtype != arrays[name].dtype or value.shape != arrays[name].shape \
                or not np.array_equal(value, arrays[name]):
            problems.append(f"model.pt2 tensor {name} differs from the ONNX initializer of that name")
    pixels = reference_pixels(shape)
    references = onnx_outputs(pixels)
    try:
        with torch.no_grad():
            outputs = program(torch.from_numpy(pixels))
    except Exception as err:  # noqa: BLE001 - a changed graph can fail in any way: report, do not crash
        return problems + [f"model.pt2 does not run on the reference pixels: {type(err).__name__}: {err}"]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != len(references):
        return problems + [f"model.pt2 returns {len(outputs)} outputs where the ONNX file has {len(references)} "
                           f"({', '.join(name for name, _ in references)})"]
    for (name, reference), output in zip(references, outputs):
        reference, value = np.asarray(reference), output.float().cpu().numpy()
        tolerance = PT2_LOGIT_TOLERANCE * max(1.0, float(np.abs(reference).max()))
        difference = float(np.abs(value - reference).max()) if value.shape == reference.shape else np.inf
        if not difference <= tolerance:  # NaN disagrees too
            problems.append(f"model.pt2's {name} differ from ONNX Runtime's by {difference:.3g} on the reference "
                            f"pixels (tolerance {tolerance:.3g})")
    return problems


def load_verified_pt2(pt2: str | Path, arrays: dict[str, np.ndarray],
                      onnx_outputs: Callable[[np.ndarray], list[tuple[str, np.ndarray]]],
                      shape: tuple[int, int, int]):
    """``model.pt2``'s logits module on CPU, after :func:`pt2_problems` found nothing.

    Raises :class:`IntegrityError` when the file is missing, unloadable or does not match."""
    pt2 = Path(pt2)
    advice = "re-export both files with `specformer-deploy export`"
    if not pt2.is_file():
        raise IntegrityError(f"{pt2.name} is missing: the probe takes its gradients from it ({advice})")
    from specformer_deploy.artifact.pt2 import load_exported_logits

    try:
        model = load_exported_logits(pt2)
    except Exception as err:  # torch.export.load raises many types for a damaged file
        raise IntegrityError(f"{pt2.name} cannot be loaded ({type(err).__name__}: {err}); {advice}") from err
    problems = pt2_problems(model.program, arrays, onnx_outputs, shape)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IntegrityError(f"{pt2.name} does not match the ONNX file: {shown} ({advice})", problems)
    return model
