"""Package an exported model as a TorchServe archive (``.mar``) with torch-model-archiver."""

from __future__ import annotations

import json
from importlib import resources
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PackageError", "package_model", "model_config_for", "parse_device_ids", "HANDLER",
           "DEFAULT_MODEL_CONFIG"]

HANDLER = Path(str(resources.files("specformer_handlers") / "specformer_handler.py"))

# TorchServe's per-model settings (model-config.yaml); `handler:` is passed to our handler.
# `deviceType: cpu` is explicit: without it TorchServe 0.12 hands every worker a gpu_id
# (round-robin over all GPUs it finds with nvidia-smi) whenever the host has GPUs, so the same
# archive would run on CPU on one host and on GPU on another. GPU archives say so: `deviceIds`.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "deviceType": "cpu",
    "batchSize": 8,
    "maxBatchDelay": 5,  # ms to wait for a batch to fill
    "responseTimeout": 60,  # s; probes are capped (<= 100 steps) to stay far below it
    "handler": {"max_image_pixels": 40_000_000, "threads_per_worker": 1},
}


class PackageError(RuntimeError):
    """The archive could not be built; the message says what is missing."""


def _yaml(config: dict[str, Any], indent: int = 0) -> str:
    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(_yaml(value, indent + 2))
        elif isinstance(value, list):
            lines.append(" " * indent + f"{key}: [{', '.join(str(v) for v in value)}]")
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def parse_device_ids(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``: a comma-separated list of distinct non-negative GPU indices."""
    parts = [part.strip() for part in str(text).split(",")]
    if not text or not text.strip() or any(not part for part in parts):
        raise PackageError(f"--device-ids must be a comma-separated list of GPU indices like 0 or 0,1; got {text!r}")
    ids = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            raise PackageError(f"--device-ids: {part!r} is not a non-negative integer GPU index (as nvidia-smi "
                               f"numbers them); list the GPUs explicitly, e.g. 0,1; got {text!r}")
        ids.append(int(part))
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise PackageError(f"--device-ids lists GPU {', '.join(map(str, repeated))} more than once; list each GPU "
                           "once and use --workers for several workers per GPU")
    return ids


def model_config_for(model_config: dict[str, Any] | None = None,
                     device_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``model-config.yaml`` that :func:`package_model` writes.

    Without ``device_ids``: ``deviceType: cpu`` (workers never get a gpu_id). With them:
    ``deviceType: gpu`` and ``deviceIds``, and one worker per listed GPU unless ``model_config``
    sets ``minWorkers``/``maxWorkers`` (TorchServe then assigns workers to the listed GPUs
    round-robin). ``model_config`` entries win over the defaults."""
    config = {**DEFAULT_MODEL_CONFIG}
    if device_ids is not None:
        ids = list(device_ids)
        valid = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        if not ids or not valid or len(set(ids)) < len(ids):
            raise PackageError(f"device_ids must be distinct non-negative GPU indices, got {ids}")
        config.update(deviceType="gpu", deviceIds=ids, minWorkers=len(ids), maxWorkers=len(ids))
    config.update(model_config or {})
    for key in ("minWorkers", "maxWorkers"):
        if not (isinstance(config[key], int) and config[key] >= 1):
            raise PackageError(f"{key} must be an integer >= 1, got {config[key]!r}")
    if config["minWorkers"] > config["maxWorkers"]:
        raise PackageError(f"minWorkers ({config['minWorkers']}) exceeds maxWorkers ({config['maxWorkers']})")
    return config


def package_model(onnx_path: str | Path, name: str, store: str | Path = "model_store", *,
                  model_config: dict[str, Any] | None = None, version: str = "1.0",
                  device_ids: Sequence[int] | None = None) -> Path:
    """Write ``store/NAME.mar``: the ONNX file, ``model.pt2``, ``index_to_name.json``, the handler
    and ``model-config.yaml`` (see :func:`model_config_for` for ``device_ids``). Returns the
    archive's path."""
    onnx_path = Path(onnx_path)
    config = model_config_for(model_config, device_ids)
    if not onnx_path.is_file():
        raise PackageError(f"{onnx_path} does not exist")
    pt2 = onnx_path.with_suffix(".pt2")
    if not pt2.is_file():
        raise PackageError(f"{pt2} is missing: probes need it (export writes it beside the .onnx)")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise PackageError(f"--name must be letters, digits, '-' or '_', got {name!r}")
    if not HANDLER.is_file():
        raise PackageError(f"the handler {HANDLER} is missing (install the project from its source tree)")
    from specformer_deploy.artifact.onnx_meta import read_metadata_file

    meta = read_metadata_file(onnx_path)
    if "class_names" not in meta:
        raise PackageError(f"{onnx_path} has no specformer metadata: export it with `specformer-deploy export`")
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        serialized = tmp_dir / "model.onnx"
        shutil.copyfile(onnx_path, serialized)
        shutil.copyfile(pt2, tmp_dir / "model.pt2")
        (tmp_dir / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(meta["class_names"])}))
        (tmp_dir / "model-config.yaml").write_text(_yaml(config) + "\n")
        command = [archiver, "--model-name", name, "--version", version, "--serialized-file", str(serialized),
                   "--handler", str(HANDLER), "--extra-files",
                   f"{tmp_dir / 'model.pt2'},{tmp_dir / 'index_to_name.json'}",
                   "--config-file", str(tmp_dir / "model-config.yaml"), "--export-path", str(store), "--force"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as err:
            raise PackageError(f"torch-model-archiver not found ({err}); pip install torch-model-archiver") from err
        if result.returncode != 0:
            raise PackageError(f"torch-model-archiver failed: {result.stderr.strip() or result.stdout.strip()}")
    archive = store / f"{name}.mar"
    if not archive.is_file():
        raise PackageError(f"torch-model-archiver did not write {archive}")
    return archive
