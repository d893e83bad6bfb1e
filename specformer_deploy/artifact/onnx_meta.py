"""What an exported ONNX file says about itself, readable with onnx + numpy only (no torch).

Shared by `export` (which writes it) and `audit` / the serving runtime (which check it):
the ``specformer.*`` metadata, digests of the weights and graph, and the per-head blocks of
the attention projections read straight from the initializers.

Integrity, not authenticity: the digests tell a file changed after export (a flipped weight,
an edited value), not who changed it; someone who rewrites weights *and* every digest is not
detected by hashing, only by the recomputed spectral norms disagreeing with training records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["PREFIX", "FORMAT_VERSION", "NotAnExportError", "read_metadata", "read_metadata_file", "require_export",
           "require_export_metadata", "write_metadata", "tensor_digests", "weights_digest", "graph_digest",
           "metadata_digests", "initializer_arrays", "oriented", "head_blocks", "spectral_norms"]

PREFIX = "specformer."
FORMAT_VERSION = 1
# The entry holding the digests of all other entries; it is not digested itself.
INTEGRITY_KEY = "integrity"
# What every consumer of an export (evaluate, package, the serving runtime) reads from its metadata.
REQUIRED_KEYS = ("format_version", "model", "image_size", "num_classes", "class_names", "spectral", INTEGRITY_KEY)


class NotAnExportError(ValueError):
    """The file is missing, unreadable, lacks the metadata written by `export`, or lacks its ``.pt2``."""


def input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the pixels an export takes: its ``input_shape``, or
    ``(3, S, S)`` for exports written before channels were recorded (all were three-channel)."""
    shape = meta.get("input_shape")
    if shape is None:
        size = int(meta["image_size"])
        return (3, size, size)
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """``specformer.*`` metadata with JSON values decoded (prefix stripped)."""
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(PREFIX):
            try:
                out[prop.key[len(PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(PREFIX):]] = prop.value
    return out


def read_metadata_file(path: str | Path) -> dict[str, Any]:
    """``read_metadata`` of an ONNX file on disk (weights stay unparsed beyond the protobuf)."""
    return read_metadata(onnx.load(str(path), load_external_data=False))


def require_export(onnx_path: str | Path, need_pt2: bool) -> dict[str, Any]:
    """The metadata of an export of this tool, after checking the file is one.

    ``need_pt2``: the caller runs attacks or probes, whose gradients come from ``model.pt2``
    beside the ``.onnx`` (ONNX Runtime has none). Raises :class:`NotAnExportError` with a
    message that says what to do.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise NotAnExportError(f"{path} does not exist")
    try:
        meta = read_metadata_file(path)
    except Exception as err:  # protobuf raises several types for a corrupt file
        raise NotAnExportError(f"{path} is not a readable ONNX file (truncated or corrupt?): {err}") from err
    require_export_metadata(meta, path)
    pt2 = path.with_suffix(".pt2")
    if need_pt2 and not pt2.is_file():
        raise NotAnExportError(f"{pt2} is missing: attacks and probes take their gradients from it "
                               "(`specformer-deploy export` writes it beside the .onnx)")
    return meta


def require_export_metadata(meta: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`NotAnExportError` unless ``meta`` (read from ``path``) has every entry that
    consumers read; for callers that already parsed the file (the serving runtime verifies it too)."""
    if any(key not in meta for key in REQUIRED_KEYS):
        raise NotAnExportError(f"{path} has no specformer metadata: export it with `specformer-deploy export`")


def write_metadata(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Merge ``values`` into ``metadata_props`` under the prefix (other entries are kept).

    ``onnx.helper.set_model_props`` would delete existing entries, so the merge is done here.
    """
    encoded = {PREFIX + key: json.dumps(value, sort_keys=True) for key, value in values.items()}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in encoded]
    del model.metadata_props[:]
    for key, value in kept + sorted(encoded.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _feed(h: hashlib._Hash, name: str, array: np.ndarray) -> None:
    h.update(name.encode())
    h.update(b"\0" + array.dtype.str.encode() + b"\0")
    h.update(json.dumps(list(array.shape)).encode())
    h.update(np.ascontiguousarray(array).tobytes())


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def tensor_digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each initializer over (name, dtype, shape, bytes)."""
    out = {}
    for name in sorted(arrays):
        h = hashlib.sha256()
        _feed(h, name, arrays[name])
        out[name] = h.hexdigest()
    return out


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """One SHA-256 over all initializers (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        _feed(h, name, arrays[name])
    return h.hexdigest()


def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph's nodes (Constant values included), inputs and outputs."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.SerializeToString(deterministic=True))
    for value in list(model.graph.input) + list(model.graph.output):
        h.update(value.SerializeToString(deterministic=True))
    return h.hexdigest()


def metadata_digests(metadata: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each metadata value's canonical JSON (the integrity entry excluded)."""
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
            for key, value in sorted(metadata.items()) if key != INTEGRITY_KEY}


def oriented(array: np.ndarray, ref: dict[str, Any]) -> np.ndarray:
    """The weight as ``[out, in]`` (PyTorch's Linear layout), whichever way the initializer stores it.

    ``ref`` is a metadata reference ``{"initializer": name, "transposed": bool}``."""
    return array.T if ref.get("transposed") else array


def head_blocks(arrays: dict[str, np.ndarray], layer: dict[str, Any], num_heads: int,
                head_dim: int) -> dict[str, np.ndarray]:
    """Per-head blocks of one layer from the initializers, following the metadata's references.

    ``layer`` maps ``q``/``k``/``v`` to ``{"initializer", "transposed", "rows": [a, b]}`` (rows of
    the ``[out, in]`` weight) and ``o`` to ``{"initializer", "transposed", "cols": [a, b]}``.
    Returns ``q``, ``k``, ``v`` as ``[H, D_h, d]`` and ``o`` as ``[H, d_out, D_h]``.
    """
    out = {}
    for name in ("q", "k", "v"):
        ref = layer[name]
        weight = oriented(arrays[ref["initializer"]], ref)
        start, stop = ref["rows"]
        block = weight[start:stop]
        if block.shape[0] != num_heads * head_dim:
            raise ValueError(f"{ref['initializer']} rows {start}:{stop} do not hold {num_heads} heads of {head_dim}")
        out[name] = block.reshape(num_heads, head_dim, block.shape[1])
    ref = layer["o"]
    weight = oriented(arrays[ref["initializer"]], ref)
    start, stop = ref["cols"]
    block = weight[:, start:stop]
    out["o"] = block.reshape(block.shape[0], num_heads, head_dim).transpose(1, 0, 2)
    return out


def spectral_norms(matrices: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Exact largest singular value of each matrix of each stack, in float64.

    ``sigma_max(W) = sqrt(lambda_max(G))`` with ``G`` the smaller Gram matrix (``W W^T`` or
    ``W^T W``), from one batched symmetric eigensolver call per shape: a ``64 x 768`` head block
    needs a ``64 x 64`` eigenproblem instead of an SVD. In float64 the top eigenvalue is exact to
    rounding (its relative error is ~1e-16 of lambda_max, so sigma_max's is ~1e-16 too).
    """
    stacks = [np.asarray(m, dtype=np.float64) for m in matrices]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, stack in enumerate(stacks):
        groups.setdefault(stack.shape[1:], []).append(index)
    results: list[np.ndarray | None] = [None] * len(stacks)
    for (rows, cols), members in groups.items():
        joined = np.concatenate([stacks[i] for i in members])
        gram = joined @ joined.transpose(0, 2, 1) if rows <= cols else joined.transpose(0, 2, 1) @ joined
        sigmas = np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[..., -1], 0.0))
        offset = 0
        for i in members:
            n = stacks[i].shape[0]
            results[i] = sigmas[offset: offset + n]
            offset += n
    return [r for r in results if r is not None]
