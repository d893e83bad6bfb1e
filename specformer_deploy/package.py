"""Package an exported model as a TorchServe archive (``.mar``) with torch-model-archiver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PackageError", "package_model", "HANDLER", "DEFAULT_MODEL_CONFIG"]

HANDLER = Path(__file__).resolve().parents[1] / "handlers" / "specformer_handler.py"

# TorchServe's per-model settings (model-config.yaml); `handler:` is passed to our handler.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
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


def package_model(onnx_path: str | Path, name: str, store: str | Path = "model_store", *,
                  model_config: dict[str, Any] | None = None, version: str = "1.0") -> Path:
    """Write ``store/NAME.mar``: the ONNX file, ``model.pt2``, ``index_to_name.json``, the handler
    and ``model-config.yaml``. Returns the archive's path."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise PackageError(f"{onnx_path} does not exist")
    pt2 = onnx_path.with_suffix(".pt2")
    if not pt2.is_file():
        raise PackageError(f"{pt2} is missing: probes need it (export writes it beside the .onnx)")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise PackageError(f"--name must be letters, digits, '-' or '_', got {name!r}")
    if not HANDLER.is_file():
        raise PackageError(f"the handler {HANDLER} is missing (install the project from its source tree)")
    from .onnx_meta import read_metadata_file

    meta = read_metadata_file(onnx_path)
    if "class_names" not in meta:
        raise PackageError(f"{onnx_path} has no specformer metadata: export it with `specformer-deploy export`")
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    config = {**DEFAULT_MODEL_CONFIG, **(model_config or {})}
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
