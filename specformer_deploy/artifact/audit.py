"""Audit an ONNX file: recompute every head's spectral norm and every digest, compare with the metadata.

Needs onnx and numpy only (no torch), so it can run wherever the model is deployed. Exit codes:
0 consistent, 1 inconsistent (a weight or metadata value changed after export), 2 unreadable,
truncated, or not an export of this tool (a plain timm ViT ONNX still gets its sigmas reported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError, verify_digests
from specformer_deploy.artifact.onnx_meta import (
    head_blocks,
    initializer_arrays,
    input_shape,
    oriented,
    read_metadata,
    spectral_norms,
)

__all__ = ["AuditReport", "audit_file", "EXIT_CONSISTENT", "EXIT_INCONSISTENT", "EXIT_UNVERIFIABLE"]

EXIT_CONSISTENT, EXIT_INCONSISTENT, EXIT_UNVERIFIABLE = 0, 1, 2
SIGMA_RTOL = 1e-6
PROJECTIONS = ("q", "k", "v", "o")


@dataclass
class AuditReport:
    path: str
    exit_code: int
    verdict: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    sigmas: dict[str, list[list[float]]] = field(default_factory=dict)
    stored_sigmas: dict[str, list[list[float]]] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path, "exit_code": self.exit_code, "verdict": self.verdict, "problems": self.problems,
                "notes": self.notes, "model": self.model, "integrity": self.integrity, "layers": self.layers,
                "sigmas": self.sigmas, "stored_sigmas": self.stored_sigmas}


def _load(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"{path} is not a readable ONNX file (truncated or corrupt?): {err}") from err
    if not model.graph.node or not model.opset_import:
        raise ValueError(f"{path} is not an ONNX model (no graph or opset after parsing)")
    return model


def _layer_rows(sigmas: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-layer summary: max/mean over heads and Theorem 4.3's weight factor."""
    rows = []
    for layer in range(sigmas["q"].shape[0]):
        row: dict[str, Any] = {"layer": layer}
        for name in PROJECTIONS:
            if name in sigmas:
                row[name] = {"max": float(sigmas[name][layer].max()), "mean": float(sigmas[name][layer].mean())}
        factor = sigmas["v"][layer] * (sigmas["q"][layer] * sigmas["k"][layer] + 1.0)
        row["weight_factor_max"] = float(factor.max())  # ||W_V|| (||W_Q|| ||W_K|| + 1), worst head
        rows.append(row)
    return rows


def _guess_plain_layers(arrays: dict[str, np.ndarray], heads: int | None) -> list[dict[str, Any]]:
    """Find timm-style attention weights by name in a file without our metadata."""
    by_layer: dict[int, dict[str, str]] = {}
    for name in arrays:
        match = re.search(r"blocks\.(\d+)\.attn\.(qkv|qk|v|proj)\.weight$", name)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = name
    layers = []
    for index in sorted(by_layer):
        found = by_layer[index]
        if "proj" not in found or not ("qkv" in found or ("qk" in found and "v" in found)):
            continue
        width = arrays[found["proj"]].shape[1]
        entry: dict[str, Any] = {"layer": index}
        if "qkv" in found:
            for i, key in enumerate("qkv"):
                entry[key] = {"initializer": found["qkv"], "transposed": False, "rows": [i * width, (i + 1) * width]}
        else:
            entry["q"] = {"initializer": found["qk"], "transposed": False, "rows": [0, width]}
            entry["k"] = {"initializer": found["qk"], "transposed": False, "rows": [width, 2 * width]}
            entry["v"] = {"initializer": found["v"], "transposed": False, "rows": [0, width]}
        entry["o"] = {"initializer": found["proj"], "transposed": False, "cols": [0, width]}
        entry["width"] = width
        layers.append(entry)
    return layers


def _recompute(arrays: dict[str, np.ndarray], layers: list[dict[str, Any]], heads: int,
               head_dim: int) -> dict[str, np.ndarray]:
    blocks = [head_blocks(arrays, layer, heads, head_dim) for layer in layers]
    stacks = [b[name] for b in blocks for name in PROJECTIONS]
    norms = spectral_norms(stacks)
    out = {name: np.stack([norms[i * 4 + j] for i in range(len(layers))]) for j, name in enumerate(PROJECTIONS)}
    return out


def audit_file(path: str | Path, heads: int | None = None, verify_key: str | Path | None = None) -> AuditReport:
    """Audit one file; never raises for a bad file (the report carries exit code 2 instead).
    ``verify_key``: also check the export's signature (``model.sig``) against that public key."""
    path = Path(path)
    try:
        proto = _load(path)
    except ValueError as err:
        return AuditReport(str(path), EXIT_UNVERIFIABLE, "unreadable", problems=[str(err)])
    arrays = initializer_arrays(proto)
    meta = read_metadata(proto)
    if "attention_weights" not in meta or "integrity" not in meta:
        return _audit_plain(path, arrays, heads)
    report = _audit_export(path, proto, arrays, meta)
    if verify_key is not None:
        _check_signature(report, path, verify_key)
    return report


def _check_signature(report: AuditReport, path: Path, verify_key: str | Path) -> None:
    """The signature's verdict in the report: a missing or failing signature makes it inconsistent."""
    from specformer_deploy.artifact.integrity import IntegrityError
    from specformer_deploy.artifact.signing import SigningError, verify_export

    try:
        verify_export(path, verify_key)
    except SigningError as err:
        report.problems.append(str(err))
        report.exit_code, report.verdict = EXIT_UNVERIFIABLE, "unverifiable"
        return
    except IntegrityError as err:
        report.problems.append(str(err))
        report.exit_code, report.verdict = EXIT_INCONSISTENT, "inconsistent"
        return
    report.integrity["signature"] = f"valid: {Path(verify_key).name} signed model.onnx and model.pt2"
    report.notes.append(f"signature verified against {Path(verify_key).name}")


def _audit_export(path: Path, proto: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> AuditReport:
    """Every check of a file written by `export`; any problem makes the verdict inconsistent."""
    report = AuditReport(str(path), EXIT_CONSISTENT, "consistent")
    report.model = {k: meta.get(k) for k in ("model", "layers", "heads", "head_dim", "tokens", "msvp", "training",
                                             "smoothing", "source")}
    report.model["input_shape"] = list(input_shape(meta))
    if "input_shape" not in meta:
        report.notes.append("input shape not recorded (an export made before channels were): read as 3 channels")
    _note_source(report, meta.get("source"))
    _note_smoothing(report, meta.get("smoothing"), meta.get("source"))
    layers = meta["attention_weights"]
    try:
        sigmas = _recompute(arrays, layers, int(meta["heads"]), int(meta["head_dim"]))
    except (KeyError, ValueError, TypeError) as err:
        return AuditReport(str(path), EXIT_INCONSISTENT, "inconsistent",
                           problems=[f"the attention weights named in the metadata cannot be read: {err}"])
    report.sigmas = {f"sigma_{n}": sigmas[n].tolist() for n in PROJECTIONS}
    report.layers = _layer_rows(sigmas)
    _check_digests(report, proto, arrays, meta)
    _check_sampler(report, path, meta)
    _check_certificate_inputs(report, arrays, layers, meta)
    _check_sigmas(report, sigmas, meta.get("spectral", {}))
    if report.problems:
        report.exit_code, report.verdict = EXIT_INCONSISTENT, "inconsistent"
    return report


def _note_source(report: AuditReport, source: Any) -> None:
    """Where the weights came from, for an export of a checkpoint trained elsewhere."""
    if isinstance(source, dict) and source.get("kind") == "checkpoint":
        entry = f", entry {source['entry']}" if source.get("entry") else ""
        report.notes.append(f"weights from checkpoint {source.get('file')} (sha256 {str(source.get('sha256'))[:16]}..."
                            f"{entry}) as timm model {source.get('model')}; its training is not recorded")


def _note_smoothing(report: AuditReport, block: Any, source: Any = None) -> None:
    """The noise sigma the model was trained with: the one randomized smoothing should certify at."""
    sigma = block.get("sigma") if isinstance(block, dict) else None
    if sigma is None and isinstance(source, dict) and source.get("kind") == "checkpoint":
        report.notes.append("randomized smoothing: no training noise is recorded for a checkpoint trained elsewhere; "
                            "certify at the sigma it was trained under (--sigma), and expect little from one trained "
                            "without noise (fine-tune: train --pretrained FILE --noise-sd SIGMA)")
    elif sigma is None:
        report.notes.append("randomized smoothing: trained without Gaussian noise (no specformer.smoothing); its "
                            "smoothed classifier is not the one it learned")
    else:
        objective = block.get("objective", "gaussian")
        settings = ", ".join(f"{k} {v}" for k, v in sorted(block.items()) if k not in ("sigma", "objective"))
        report.notes.append(f"randomized smoothing: trained with Gaussian pixel noise sigma {sigma} (train "
                            f"--noise-sd), objective {objective}" + (f" ({settings})" if settings else "")
                            + "; certify at this sigma")


def _check_sampler(report: AuditReport, path: Path, meta: dict[str, Any]) -> None:
    """The smoothing sampling graph (``export --smoothing-sampler``) against its recorded SHA-256,
    by the check the runtime makes at load."""
    from specformer_deploy.artifact.sampler import SAMPLER_KEY, verified_sampler_file

    try:
        sampler = verified_sampler_file(path, meta)
    except IntegrityError as err:
        report.problems.append(str(err))
        return
    if sampler is not None:
        block = meta[SAMPLER_KEY]
        report.integrity["smoothing_sampler"] = f"{sampler.name} ({block['precision']}), sha256 {block['sha256']}"


def _check_digests(report: AuditReport, proto: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Weights, graph and metadata values against the digests stored at export, by the same code the
    serving worker runs before it loads a file (:func:`specformer_deploy.artifact.integrity.verify_digests`)."""
    verdict = verify_digests(proto, meta, arrays)
    report.integrity = {"weights_sha256": verdict.weights, "graph_sha256": verdict.graph}
    report.problems.extend(verdict.problems)


def _check_sigmas(report: AuditReport, sigmas: dict[str, np.ndarray], stored: dict[str, Any]) -> None:
    """Per-head spectral norms recomputed from the weights against the metadata's, head by head."""
    report.stored_sigmas = {f"sigma_{n}": stored.get(f"sigma_{n}") for n in PROJECTIONS}
    for name in PROJECTIONS:
        values = stored.get(f"sigma_{name}")
        if values is None or np.asarray(values).shape != sigmas[name].shape:
            report.problems.append(f"metadata sigma_{name} is missing or has the wrong shape")
            continue
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isclose(values, sigmas[name], rtol=SIGMA_RTOL, atol=1e-9)
        for layer, head in zip(*np.nonzero(bad)):
            report.problems.append(f"sigma_{name} of layer {layer} head {head}: metadata {values[layer, head]:.6g}, "
                                   f"recomputed {sigmas[name][layer, head]:.6g}")
        for row, layer_bad in zip(report.layers, bad):
            row.setdefault("mismatch", False)
            row["mismatch"] = bool(row["mismatch"] or layer_bad.any())
            row[f"{name}_stored_max"] = float(values[row["layer"]].max())


def _check_certificate_inputs(report: AuditReport, arrays: dict[str, np.ndarray], layers: list[dict[str, Any]],
                              meta: dict[str, Any]) -> None:
    """What the certificates read besides per-head sigmas: ``||W_O||`` per layer and ``||b_q||`` per head."""
    stored_o = meta.get("spectral", {}).get("sigma_o_full")
    if stored_o is not None:
        whole = [oriented(arrays[layer["o"]["initializer"]], layer["o"]) for layer in layers]
        recomputed = [float(s[0]) for s in spectral_norms([w[None] for w in whole])]
        for layer, (a, b) in enumerate(zip(stored_o, recomputed)):
            if not np.isclose(a, b, rtol=SIGMA_RTOL, atol=1e-9):
                report.problems.append(f"||W_O|| of layer {layer}: metadata {a:.6g}, recomputed {b:.6g}")
    stored_b = meta.get("bias_q_norm")
    if stored_b is None:
        return
    head_dim = int(meta["head_dim"])
    for layer, entry in enumerate(layers):
        ref = entry.get("q_bias")
        if ref is None:
            now = np.zeros(len(stored_b[layer]))
        else:
            start, stop = ref["range"]
            bias = arrays[ref["initializer"]][start:stop].astype(np.float64)
            now = np.linalg.norm(bias.reshape(-1, head_dim), axis=1)
        bad = ~np.isclose(np.asarray(stored_b[layer], dtype=np.float64), now, rtol=SIGMA_RTOL, atol=1e-9)
        for head in np.nonzero(bad)[0]:
            report.problems.append(f"||b_q|| of layer {layer} head {head}: metadata {stored_b[layer][head]:.6g}, "
                                   f"recomputed {now[head]:.6g}")


def _audit_plain(path: Path, arrays: dict[str, np.ndarray], heads: int | None) -> AuditReport:
    report = AuditReport(str(path), EXIT_UNVERIFIABLE, "unverifiable")
    report.problems.append("no specformer metadata: this file is not an export of specformer-deploy, so nothing "
                           "could be verified")
    layers = _guess_plain_layers(arrays, heads)
    if not layers:
        report.notes.append("no timm-style attention weights (blocks.N.attn.qkv/proj) were found")
        return report
    width = layers[0]["width"]
    count = heads or 1
    if width % count:
        report.notes.append(f"--heads {count} does not divide the attention width {width}")
        return report
    sigmas = _recompute(arrays, layers, count, width // count)
    report.sigmas = {f"sigma_{n}": sigmas[n].tolist() for n in PROJECTIONS}
    report.layers = _layer_rows(sigmas)
    report.notes.append(f"sigmas recomputed from {len(layers)} attention layers found by name"
                        + (f" with {count} heads" if heads else " as whole matrices (pass --heads N for per-head)"))
    return report
