"""GPU placement: `package --device-ids`, the handler's and the runtime's CUDA checks, and a
GPU-configured archive served by a real TorchServe on a host without GPUs (it serves on CPU)."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specformer_deploy.cli import app
from specformer_deploy.serving.images import decode_image
from specformer_deploy.serving.package import PackageError, model_config_for, parse_device_ids
from specformer_deploy.serving.runtime import ProbeRequest, SpecformerRuntime

ROOT = Path(__file__).resolve().parents[1]


def _archive_config(archive: Path) -> str:
    with zipfile.ZipFile(archive) as mar:
        return mar.read("model-config.yaml").decode()


# -- package --device-ids ----------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("", "comma-separated list of GPU indices"),
    ("0,,1", "comma-separated list of GPU indices"),
    ("all", "'all' is not a non-negative integer GPU index"),
    ("-1", "'-1' is not a non-negative integer GPU index"),
    ("0,1.5", "'1.5' is not a non-negative integer GPU index"),
    ("0,gpu1", "'gpu1' is not a non-negative integer GPU index"),
    ("1,0,1", "lists GPU 1 more than once"),
])
def test_bad_device_ids_are_refused_with_a_clear_message(value, message, tmp_path) -> None:
    with pytest.raises(PackageError, match="--device-ids"):
        parse_device_ids(value)
    result = CliRunner().invoke(app, ["package", str(tmp_path / "model.onnx"), "--name", "digits",
                                      "--store", str(tmp_path), f"--device-ids={value}"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir()), "nothing is written for a bad --device-ids"


def test_device_ids_parse_and_set_one_worker_per_gpu() -> None:
    assert parse_device_ids("0") == [0]
    assert parse_device_ids(" 2 , 0 ") == [2, 0]
    assert model_config_for()["deviceType"] == "cpu" and "deviceIds" not in model_config_for()
    gpu = model_config_for(None, [0, 1])
    assert (gpu["deviceType"], gpu["deviceIds"], gpu["minWorkers"], gpu["maxWorkers"]) == ("gpu", [0, 1], 2, 2)
    explicit = model_config_for({"minWorkers": 3, "maxWorkers": 3}, [0, 1])
    assert (explicit["minWorkers"], explicit["maxWorkers"]) == (3, 3)
    with pytest.raises(PackageError):
        model_config_for({"minWorkers": 0, "maxWorkers": 0})


def test_zero_workers_is_refused() -> None:
    result = CliRunner().invoke(app, ["package", "model.onnx", "--name", "digits", "--device-ids", "0",
                                      "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.output


def test_package_writes_device_type_and_ids_into_the_archive(exported_pair, tmp_path) -> None:
    onnx = str(exported_pair["msvp"]["onnx"])
    runner = CliRunner()
    result = runner.invoke(app, ["package", onnx, "--name", "gpu", "--store", str(tmp_path), "--device-ids", "0,1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["device_type"], summary["device_ids"], summary["workers"]) == ("gpu", [0, 1], 2)
    config = _archive_config(Path(summary["archive"]))
    assert "deviceType: gpu\n" in config and "deviceIds: [0, 1]\n" in config
    assert "minWorkers: 2\n" in config and "maxWorkers: 2\n" in config

    result = runner.invoke(app, ["package", onnx, "--name", "gpu3", "--store", str(tmp_path), "--device-ids", "0,1",
                                 "--workers", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workers"] == 3
    assert "maxWorkers: 3\n" in _archive_config(tmp_path / "gpu3.mar")

    result = runner.invoke(app, ["package", onnx, "--name", "cpu", "--store", str(tmp_path), "--json"])
    summary = json.loads(result.stdout)
    assert (summary["device_type"], summary["device_ids"], summary["workers"]) == ("cpu", None, 1)
    config = _archive_config(tmp_path / "cpu.mar")
    assert "deviceType: cpu\n" in config and "deviceIds" not in config


# -- runtime and handler on a host without a usable CUDA provider ------------------------------

@pytest.fixture(scope="module")
def png() -> bytes:
    sys.path.insert(0, str(ROOT / "tools"))
    from load_test import default_image

    return default_image()


@pytest.fixture(scope="module")
def pixels(png) -> np.ndarray:
    return decode_image(png, 16, 1)[None]


def test_runtime_asked_for_a_gpu_serves_on_cpu_and_says_why(exported_pair, pixels, monkeypatch) -> None:
    import specformer_deploy.serving.devices as devices

    monkeypatch.setattr(devices, "cuda_unusable_reason", lambda: "no NVIDIA device (test)")
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"], device_id=1)
    assert (runtime.device, runtime.providers, runtime.cuda_fallback) == ("cpu", ["CPUExecutionProvider"],
                                                                          "no NVIDIA device (test)")
    cpu = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    assert cpu.device == "cpu" and cpu.cuda_fallback is None
    assert runtime.answer(pixels, delta0=0.03) == cpu.answer(pixels, delta0=0.03)


def test_probe_model_is_placed_only_where_it_agrees_with_onnx(exported_pair, pixels) -> None:
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    model = runtime.prober.logits_model()
    assert runtime.probe_device == "cpu"  # a CPU session never tries another device
    placed, why = runtime.prober.place(model, "cpu", pixels)
    assert placed is model and why is None

    class Shifted(torch.nn.Module):
        def forward(self, x):
            return model(x) + 0.5

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("Expected all tensors to be on the same device")

    placed, why = runtime.prober.place(Shifted(), "cpu", pixels)
    assert placed is None and "differ from ONNX Runtime's by 0.5" in why
    placed, why = runtime.prober.place(Broken(), "cpu", pixels)
    assert placed is None and "failed: RuntimeError: Expected all tensors" in why


def test_probe_of_a_gpu_session_falls_back_to_cpu_and_logs_why(exported_pair, pixels, monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    request = ProbeRequest("pgd", 77 / 255, 5)
    cpu = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    labels = cpu.infer(pixels)[0].argmax(axis=1)
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    runtime.model.device = "cuda:0"  # as if ONNX Runtime ran on GPU 0 while torch has no CUDA
    with caplog.at_level(logging.WARNING, logger="specformer_deploy.serving.probe"):
        result = runtime.probe(pixels, labels, request)
    assert runtime.probe_device == "cpu"
    assert "the PGD probe runs on cpu, not cuda:0: torch has no usable CUDA here" in caplog.text
    assert result == cpu.probe(pixels, labels, request)


def _load_handler():
    spec = importlib.util.spec_from_file_location("specformer_handler_under_test",
                                                  ROOT / "handlers" / "specformer_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SpecformerHandler


@pytest.mark.parametrize("gpu_id, device_type, expected", [
    (0, "gpu", "gpu_id 0 was assigned but ONNX Runtime has no usable CUDA provider here"),
    (None, "gpu", "model-config.yaml asks for GPUs (deviceType gpu, deviceIds [0])"),
    (None, "cpu", None),
])
def test_handler_serves_on_cpu_with_one_warning_line(exported_pair, monkeypatch, caplog, gpu_id, device_type,
                                                     expected) -> None:
    import specformer_deploy.serving.devices as devices

    monkeypatch.setattr(devices, "cuda_unusable_reason", lambda: "no NVIDIA device (test)")
    onnx = Path(exported_pair["msvp"]["onnx"])
    context = SimpleNamespace(system_properties={"model_dir": str(onnx.parent), "gpu_id": gpu_id},
                              manifest={"model": {"serializedFile": onnx.name}},
                              model_yaml_config={"deviceType": device_type, "deviceIds": [0], "handler": {}})
    handler = _load_handler()()
    with caplog.at_level(logging.INFO):
        handler.initialize(context)
    assert handler.runtime.device == "cpu"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "specformer" in r.getMessage()]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and "serving on CPU" in warnings[0]
    assert any("loaded model.onnx on cpu with CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_handler_gives_the_probes_torch_ops_the_worker_thread_budget(exported_pair) -> None:
    """Several workers each running torch with one thread per core oversubscribe the machine
    (2 workers served probes 5.6x slower than 1 before the handler set this)."""
    import torch

    onnx = Path(exported_pair["msvp"]["onnx"])
    context = SimpleNamespace(system_properties={"model_dir": str(onnx.parent), "gpu_id": None},
                              manifest={"model": {"serializedFile": onnx.name}},
                              model_yaml_config={"handler": {"threads_per_worker": 1}})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _load_handler()().initialize(context)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- a real TorchServe -------------------------------------------------------------------------

@pytest.mark.serving
@pytest.mark.slow
def test_gpu_archive_is_served_on_a_host_without_gpus(exported_pair, png, pixels, tmp_path) -> None:
    """On a host where TorchServe finds no GPU (nvidia-smi), a `--device-ids 0` archive loads,
    TorchServe ignores its deviceIds (and logs so), the worker gets no gpu_id and serves on CPU."""
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    sys.path.insert(0, str(ROOT / "tools"))
    from serve_local import LocalTorchServe

    onnx = exported_pair["msvp"]["onnx"]
    server = LocalTorchServe(tmp_path, onnx, device_ids=[0])
    try:
        server.start()
        config = _archive_config(tmp_path / "store" / "digits.mar")
        assert "deviceType: gpu\n" in config and "deviceIds: [0]\n" in config and "minWorkers: 1\n" in config
        image = base64.b64encode(png).decode()
        status, served = server.post(json.dumps({"image": image, "delta0": 0.03}).encode())
        assert status == 200, served
        status, probed = server.post(json.dumps({"image": image, "probe": "pgd", "eps": "77/255", "steps": 5}).encode())
        assert status == 200, probed
        described = server.model_status()
        workers = described["workers"]
        logs = tmp_path / "logs"
        model_log, ts_log = (logs / "model_log.log").read_text(), (logs / "ts_log.log").read_text()
    finally:
        server.stop()
    offline = SpecformerRuntime(onnx)
    expected = offline.answer(pixels, delta0=0.03)[0]
    label = np.array([expected["prediction"]["label"]])
    expected_probe = offline.probe(pixels, label, ProbeRequest("pgd", 77 / 255, 5, "linf"))[0]
    if any(w["gpu"] for w in workers):  # a GPU host: CUDA results agree closely, not bitwise (unverified here)
        tolerance = 1e-3
    else:
        tolerance = 1e-6
        assert described["deviceType"] == "cpu" and len(workers) == 1  # TorchServe found no GPU: CPU model
        assert "Invalid deviceId:0, ignore deviceIds list" in ts_log
        assert "model-config.yaml asks for GPUs (deviceType gpu, deviceIds [0])" in model_log
        assert "serving on CPU" in model_log and "loaded model.onnx on cpu with CPUExecutionProvider" in model_log
        assert probed["probe"]["adversarial_label"] == expected_probe["adversarial_label"]
        assert probed["probe"]["margin"] == pytest.approx(expected_probe["margin"], rel=1e-4, abs=1e-4)
    assert served["prediction"]["label"] == expected["prediction"]["label"]
    assert served["prediction"]["probability"] == pytest.approx(expected["prediction"]["probability"], rel=tolerance)
    for a, b in zip(served["attention_lipschitz"]["layers"], expected["attention_lipschitz"]["layers"]):
        assert a["bound"] == pytest.approx(b["bound"], rel=tolerance)
        assert a["paper_bound"] == pytest.approx(b["paper_bound"], rel=tolerance)

