"""Package an exported model for TorchServe: archives (``.mar``) and the server's config.properties.

A deployment is two models by default: ``NAME`` answers predictions and certificates and refuses
probes, ``NAME-probe`` serves the PGD/FGSM probes with its own workers and queue. TorchServe runs
one batch at a time per worker, so a cheap request queued behind a 100-step probe waits for the
whole probe; separate models keep the cheap queue short whatever the probes do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PackageError", "Deployment", "package_model", "package_deployment", "model_config_for",
           "probe_model_config_for", "parse_device_ids", "write_config_properties", "handler_defaults", "HANDLER",
           "CONFIG_PROPERTIES", "DEFAULT_MODEL_CONFIG", "DEFAULT_PROBE_MODEL_CONFIG", "PROBE_SUFFIX"]

HANDLER = Path(str(resources.files("specformer_handlers") / "specformer_handler.py"))
# The TorchServe configuration shipped with the package; the repository's model_store/config.properties
# is this very file (the package file is a link to it), so a new store gets what the repository documents.
CONFIG_PROPERTIES = resources.files("specformer_deploy.serving") / "config.properties"
PROBE_SUFFIX = "-probe"

# TorchServe's per-model settings (model-config.yaml); `handler:` is passed to our handler.
# `deviceType: cpu` is explicit: without it TorchServe 0.12 hands every worker a gpu_id
# (round-robin over all GPUs it finds with nvidia-smi) whenever the host has GPUs, so the same
# archive would run on CPU on one host and on GPU on another. GPU archives say so: `deviceIds`.
# jobQueueSize bounds the requests TorchServe holds per model (each up to max_request_size bytes);
# a cheap request takes milliseconds, so 512 queued drain in about a second on one CPU worker.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "deviceType": "cpu",
    "batchSize": 8,
    "maxBatchDelay": 5,  # ms to wait for a batch to fill
    "responseTimeout": 60,  # s for one batch; probes are capped (handler.max_probe_cost) to stay far below it
    "jobQueueSize": 512,
}

# The probe model: a batch of 8 probes of 100 steps takes seconds on one CPU thread, so its queue is
# short (a probe queued behind 64 others waits about a minute on one worker) and its timeout long.
DEFAULT_PROBE_MODEL_CONFIG: dict[str, Any] = {
    **DEFAULT_MODEL_CONFIG,
    "responseTimeout": 120,
    "jobQueueSize": 64,
}


class PackageError(RuntimeError):
    """The archive could not be built; the message says what is missing."""


@dataclass(frozen=True)
class Deployment:
    """What :func:`package_deployment` wrote: the archives by model name and the server config."""

    store: Path
    archives: dict[str, Path]
    model_configs: dict[str, dict[str, Any]]
    config_properties: Path
    config_properties_written: bool

    @property
    def models_argument(self) -> list[str]:
        """``torchserve --models`` values: ``NAME=NAME.mar`` for every archive."""
        return [f"{name}={archive.name}" for name, archive in self.archives.items()]

    def serve_command(self) -> str:
        """The command that serves this store as written (key_file.json lands in the current directory)."""
        return (f"torchserve --start --ncs --model-store {self.store} --ts-config {self.config_properties} "
                f"--models {' '.join(self.models_argument)}")


class _FlowListDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with lists on one line (``deviceIds: [0, 1]``), mappings as blocks."""


_FlowListDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def _yaml(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)


def handler_defaults() -> dict[str, Any]:
    """The handler's per-request caps with their defaults (serving/limits.py), written into every
    archive so that a deployer sees them and can change them."""
    from specformer_deploy.serving.limits import ServingLimits

    defaults = {key: value for key, value in ServingLimits().as_dict().items() if value is not None}
    defaults.setdefault("threads_per_worker", 1)  # the workers share the host's cores; one ONNX/torch thread each
    return defaults


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


def _config_for(defaults: dict[str, Any], model_config: dict[str, Any] | None,
                device_ids: Sequence[int] | None) -> dict[str, Any]:
    config = {**defaults, "handler": handler_defaults()}
    if device_ids is not None:
        ids = list(device_ids)
        valid = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        if not ids or not valid or len(set(ids)) < len(ids):
            raise PackageError(f"device_ids must be distinct non-negative GPU indices, got {ids}")
        config.update(deviceType="gpu", deviceIds=ids, minWorkers=len(ids), maxWorkers=len(ids))
    overrides = dict(model_config or {})
    config["handler"].update(overrides.pop("handler", None) or {})
    config.update(overrides)
    for key in ("minWorkers", "maxWorkers", "batchSize", "jobQueueSize", "responseTimeout"):
        if not (isinstance(config[key], int) and not isinstance(config[key], bool) and config[key] >= 1):
            raise PackageError(f"{key} must be an integer >= 1, got {config[key]!r}")
    if config["minWorkers"] > config["maxWorkers"]:
        raise PackageError(f"minWorkers ({config['minWorkers']}) exceeds maxWorkers ({config['maxWorkers']})")
    return config


def model_config_for(model_config: dict[str, Any] | None = None,
                     device_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``model-config.yaml`` that :func:`package_model` writes.

    Without ``device_ids``: ``deviceType: cpu`` (workers never get a gpu_id). With them:
    ``deviceType: gpu`` and ``deviceIds``, and one worker per listed GPU unless ``model_config``
    sets ``minWorkers``/``maxWorkers`` (TorchServe then assigns workers to the listed GPUs
    round-robin). ``model_config`` entries win over the defaults; its ``handler`` entries are
    merged into the handler's defaults (:func:`handler_defaults`)."""
    return _config_for(DEFAULT_MODEL_CONFIG, model_config, device_ids)


def probe_model_config_for(model_config: dict[str, Any] | None = None,
                           device_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The probe model's ``model-config.yaml``: as :func:`model_config_for` with the probe
    defaults (a short queue, a long timeout)."""
    return _config_for(DEFAULT_PROBE_MODEL_CONFIG, model_config, device_ids)


def _check_name(name: str) -> None:
    if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        raise PackageError(f"--name must be letters, digits, '-' or '_', got {name!r}")


def _check_export(onnx_path: Path) -> list[str]:
    """The class names of a valid export; refuses anything ``package`` cannot serve."""
    from specformer_deploy.artifact.onnx_meta import NotAnExportError, require_export

    if not HANDLER.is_file():
        raise PackageError(f"the handler {HANDLER} is missing: reinstall specformer-deploy")
    try:
        meta = require_export(onnx_path, need_pt2=True)
    except NotAnExportError as err:
        raise PackageError(str(err)) from err
    _sampler_file(onnx_path)  # a missing or changed smoothing sampler is refused before anything is measured
    return list(meta["class_names"])


VERIFY_KEY_FILE = "verify_key.pem"  # the public key's name inside an archive packaged with --verify-key


def _check_signature(onnx_path: Path, verify_key: Path | None) -> None:
    """The export's signature must verify with ``verify_key`` now: a deployer learns it at
    packaging, not from a 503."""
    if verify_key is None:
        return
    from specformer_deploy.artifact.integrity import IntegrityError
    from specformer_deploy.artifact.signing import SigningError, verify_export

    try:
        verify_export(onnx_path, verify_key)
    except (IntegrityError, SigningError) as err:
        raise PackageError(f"--verify-key {verify_key}: {err}") from None


def _naming_key(config: dict[str, Any], verify_key: Path | None) -> dict[str, Any]:
    """``config`` whose handler verifies the export against the archive's public key."""
    if verify_key is None:
        return config
    return {**config, "handler": {**config["handler"], "verify_key": VERIFY_KEY_FILE}}


def _sampler_file(onnx_path: Path) -> Path | None:
    """The export's reduced-precision smoothing sampler (its SHA-256 checked), or ``None``."""
    from specformer_deploy.artifact.integrity import IntegrityError
    from specformer_deploy.artifact.onnx_meta import read_metadata_file
    from specformer_deploy.artifact.sampler import verified_sampler_file

    try:
        return verified_sampler_file(onnx_path, read_metadata_file(onnx_path))
    except IntegrityError as err:
        raise PackageError(str(err)) from None


def _archive(onnx_path: Path, class_names: list[str], name: str, store: Path, config: dict[str, Any],
             version: str, verify_key: Path | None = None) -> Path:
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        serialized = tmp_dir / "model.onnx"
        shutil.copyfile(onnx_path, serialized)
        shutil.copyfile(onnx_path.with_suffix(".pt2"), tmp_dir / "model.pt2")
        (tmp_dir / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(class_names)}))
        (tmp_dir / "model-config.yaml").write_text(_yaml(config))
        extra = [tmp_dir / "model.pt2", tmp_dir / "index_to_name.json"]
        sampler = _sampler_file(onnx_path)
        if sampler is not None:  # the smoothing sampling graph: beside model.onnx, under its recorded name
            shutil.copyfile(sampler, tmp_dir / sampler.name)
            extra.append(tmp_dir / sampler.name)
        if verify_key is not None:
            shutil.copyfile(verify_key, tmp_dir / VERIFY_KEY_FILE)
            shutil.copyfile(onnx_path.with_suffix(".sig"), tmp_dir / "model.sig")
            extra += [tmp_dir / VERIFY_KEY_FILE, tmp_dir / "model.sig"]
        command = [archiver, "--model-name", name, "--version", version, "--serialized-file", str(serialized),
                   "--handler", str(HANDLER), "--extra-files", ",".join(map(str, extra)),
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


SMOOTHING_TIMEOUT_MARGIN = 1.25  # responseTimeout sized so half of it holds the cap's samples, plus this margin


def sized_for_smoothing(onnx_path: Path, config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``config`` with ``responseTimeout`` raised so that half of it fits ``handler.max_smoothing_samples``
    at the rate this model samples here (measured now, with the workers' thread count): the worker
    admits what the timeout allows, so a cap the timeout cannot hold would be a cap in name only.
    A ``responseTimeout`` the caller set is kept (the worker then caps smoothing by it)."""
    cap = int(config["handler"].get("max_smoothing_samples") or 0)
    if cap <= 0 or "responseTimeout" in (overrides or {}):
        return config
    from specformer_deploy.artifact.integrity import IntegrityError
    from specformer_deploy.serving.runtime import SpecformerRuntime

    threads = config["handler"].get("threads_per_worker") or max(1, (os.cpu_count() or 1) // 2)
    try:  # only the speed is measured here; the worker checks the file at load and refuses a bad one
        rate = SpecformerRuntime(onnx_path, threads=threads, verify=False).sampling_rate()
    except IntegrityError:
        return config
    needed = math.ceil(2 * cap / rate * SMOOTHING_TIMEOUT_MARGIN)
    return {**config, "responseTimeout": max(int(config["responseTimeout"]), needed)}


def package_model(onnx_path: str | Path, name: str, store: str | Path = "model_store", *,
                  model_config: dict[str, Any] | None = None, version: str = "1.0",
                  device_ids: Sequence[int] | None = None, verify_key: str | Path | None = None) -> Path:
    """Write one archive, ``store/NAME.mar``: the ONNX file, ``model.pt2``, ``index_to_name.json``,
    the handler and ``model-config.yaml`` (see :func:`model_config_for`). It serves probes itself
    unless its ``handler`` config says otherwise. Returns the archive's path."""
    onnx_path = Path(onnx_path)
    config = model_config_for(model_config, device_ids)
    _check_name(name)
    class_names = _check_export(onnx_path)
    key = None if verify_key is None else Path(verify_key)
    _check_signature(onnx_path, key)
    config = _naming_key(sized_for_smoothing(onnx_path, config, model_config), key)
    return _archive(onnx_path, class_names, name, Path(store), config, version, key)


def write_config_properties(store: str | Path) -> tuple[Path, bool]:
    """``store/config.properties`` from the shipped configuration when the store has none; a
    deployer's own file is never overwritten. Returns the path and whether it was written now."""
    target = Path(store) / "config.properties"
    if target.exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(CONFIG_PROPERTIES.read_text())
    return target, True


def package_deployment(onnx_path: str | Path, name: str, store: str | Path = "model_store", *,
                       model_config: dict[str, Any] | None = None,
                       probe_model_config: dict[str, Any] | None = None, probe_workers: int | None = None,
                       version: str = "1.0", device_ids: Sequence[int] | None = None,
                       verify_key: str | Path | None = None) -> Deployment:
    """Write what a server needs: ``NAME.mar``, ``NAME-probe.mar`` and ``config.properties`` (when absent).

    ``NAME`` refuses probes and randomized smoothing (``handler.max_probe_cost: 0``,
    ``max_smoothing_samples: 0``: both cost seconds per image, where a prediction with its
    certificates costs a fraction of a millisecond) and names ``NAME-probe`` in its refusal;
    ``NAME-probe`` has its own ``probe_workers`` workers (default 1, or one per GPU with
    ``device_ids``) and queue. ``probe_workers=0`` writes only ``NAME.mar``, serving probes itself.
    ``model_config``/``probe_model_config`` override the two archives' defaults."""
    onnx_path, store = Path(onnx_path), Path(store)
    _check_name(name)
    if probe_workers is not None and (isinstance(probe_workers, bool) or not isinstance(probe_workers, int)
                                      or probe_workers < 0):
        raise PackageError(f"probe_workers must be an integer >= 0, got {probe_workers!r}")
    configs: dict[str, dict[str, Any]] = {}
    if probe_workers == 0:
        configs[name] = model_config_for(model_config, device_ids)
    else:
        probe_name = name + PROBE_SUFFIX
        main = dict(model_config or {})
        main["handler"] = {"max_probe_cost": 0, "max_smoothing_samples": 0, "probe_endpoint": probe_name,
                           **(main.get("handler") or {})}
        probe = dict(probe_model_config or {})
        if probe_workers is not None:
            probe.update(minWorkers=probe_workers, maxWorkers=probe_workers)
        configs[name] = model_config_for(main, device_ids)
        configs[probe_name] = probe_model_config_for(probe, device_ids)
    class_names = _check_export(onnx_path)
    overrides = {name: model_config, name + PROBE_SUFFIX: probe_model_config}
    configs = {model: sized_for_smoothing(onnx_path, config, overrides.get(model)) for model, config in configs.items()}
    key = None if verify_key is None else Path(verify_key)
    _check_signature(onnx_path, key)
    configs = {model: _naming_key(config, key) for model, config in configs.items()}
    archives = {model: _archive(onnx_path, class_names, model, store, config, version, key)
                for model, config in configs.items()}
    properties, written = write_config_properties(store)
    return Deployment(store, archives, configs, properties, written)
