"""`package`: the archives' model-config.yaml, the store's config.properties, and the split deployment
(NAME for cheap requests, NAME-probe for probes) on a real TorchServe."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from specformer_deploy.cli import app
from specformer_deploy.serving.limits import ServingLimits
from specformer_deploy.serving.package import (
    CONFIG_PROPERTIES,
    PackageError,
    _yaml,
    handler_defaults,
    package_deployment,
    write_config_properties,
)

ROOT = Path(__file__).resolve().parents[1]


def _archive_config(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as mar:
        return yaml.safe_load(mar.read("model-config.yaml"))


def test_yaml_round_trips_through_safe_load() -> None:
    config = {"minWorkers": 2, "deviceType": "gpu", "deviceIds": [0, 3], "responseTimeout": 60,
              "handler": {"max_image_pixels": 40_000_000, "probe_endpoint": "digits-probe", "max_probe_cost": 0},
              "note": "a: colon, # hash and 'quotes'", "flag": True, "empty": ""}
    text = _yaml(config)
    assert yaml.safe_load(text) == config
    assert "deviceIds: [0, 3]\n" in text, "lists stay on one line, as TorchServe's own examples write them"


def test_shipped_config_properties_is_the_repository_file() -> None:
    shipped = resources.files("specformer_deploy.serving") / "config.properties"
    assert shipped.read_text() == (ROOT / "model_store" / "config.properties").read_text()
    assert CONFIG_PROPERTIES.read_text() == shipped.read_text()


def test_config_properties_sets_the_token_expiry_explicitly() -> None:
    settings = dict(line.split("=", 1) for line in CONFIG_PROPERTIES.read_text().splitlines()
                    if line and not line.startswith("#") and "=" in line)
    assert settings["token_expiration_min"] == "60"
    assert "/token?type=inference" in CONFIG_PROPERTIES.read_text(), "says how a client gets a new key"


def test_config_properties_is_written_once_and_never_overwritten(tmp_path) -> None:
    path, written = write_config_properties(tmp_path / "store")
    assert written and path.read_text() == CONFIG_PROPERTIES.read_text()
    path.write_text("inference_address=http://127.0.0.1:9999\n")
    again, written = write_config_properties(tmp_path / "store")
    assert again == path and not written
    assert path.read_text() == "inference_address=http://127.0.0.1:9999\n"


def test_handler_defaults_are_the_handlers_own() -> None:
    defaults = handler_defaults()
    limits = ServingLimits().as_dict()
    for key, value in limits.items():
        if value is not None:
            assert defaults[key] == value, key
    assert ServingLimits.from_handler_config(defaults) == ServingLimits(**defaults)


def test_package_writes_two_models_and_a_working_config(exported_pair, tmp_path) -> None:
    onnx = str(exported_pair["msvp"]["onnx"])
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["package", onnx, "--name", "digits", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["probe_name"] == "digits-probe"
    assert {p.name for p in store.iterdir()} == {"digits.mar", "digits-probe.mar", "config.properties"}
    main, probe = _archive_config(store / "digits.mar"), _archive_config(store / "digits-probe.mar")
    assert main == summary["model_config"] and probe == summary["probe_model_config"]
    for key, value in handler_defaults().items():
        assert probe["handler"][key] == value
        if key not in ("max_probe_cost", "max_smoothing_samples"):
            assert main["handler"][key] == value
    assert main["handler"]["max_probe_cost"] == 0 and main["handler"]["probe_endpoint"] == "digits-probe"
    assert main["handler"]["max_smoothing_samples"] == 0  # smoothing costs seconds per image: NAME-probe serves it
    assert "probe_endpoint" not in probe["handler"]
    for config in (main, probe):
        ServingLimits.from_handler_config(config["handler"])  # what the handler will read
    assert main["jobQueueSize"] > probe["jobQueueSize"] >= 1
    assert (store / "config.properties").read_text() == CONFIG_PROPERTIES.read_text()
    assert summary["config_properties_written"] is True
    assert summary["serve_command"].endswith(
        f"--ts-config {store}/config.properties --models digits=digits.mar digits-probe=digits-probe.mar")


def test_package_options_set_the_caps_and_keep_an_edited_config(exported_pair, tmp_path) -> None:
    onnx = str(exported_pair["msvp"]["onnx"])
    store = tmp_path / "store"
    store.mkdir()
    (store / "config.properties").write_text("# the deployer's own\n")
    result = CliRunner().invoke(app, [
        "package", onnx, "--name", "m", "--store", str(store), "--probe-workers", "2", "--queue-size", "300",
        "--probe-queue-size", "7", "--max-probe-cost", "40", "--max-top-k", "3", "--max-image-pixels", "1000",
        "--max-request-bytes", "4096", "--threads-per-worker", "2", "--probe-response-timeout", "30",
        "--max-smoothing-samples", "500"])
    assert result.exit_code == 0, result.output
    assert "kept as it was" in result.output and "serve it with: torchserve --start" in result.output
    assert (store / "config.properties").read_text() == "# the deployer's own\n"
    main, probe = _archive_config(store / "m.mar"), _archive_config(store / "m-probe.mar")
    assert (main["jobQueueSize"], probe["jobQueueSize"], probe["minWorkers"], probe["maxWorkers"]) == (300, 7, 2, 2)
    assert probe["responseTimeout"] == 30 and main["responseTimeout"] == 60
    assert probe["handler"] == {"max_image_pixels": 1000, "max_request_bytes": 4096, "max_top_k": 3,
                                "max_probe_cost": 40, "max_smoothing_samples": 500, "threads_per_worker": 2}
    assert main["handler"] == {"max_image_pixels": 1000, "max_request_bytes": 4096, "max_top_k": 3,
                               "max_probe_cost": 0, "max_smoothing_samples": 0, "threads_per_worker": 2,
                               "probe_endpoint": "m-probe"}


def test_probe_workers_zero_writes_one_archive_that_serves_probes(exported_pair, tmp_path) -> None:
    deployment = package_deployment(exported_pair["msvp"]["onnx"], "solo", tmp_path, probe_workers=0,
                                    model_config={"handler": {"max_probe_cost": 25}})
    assert list(deployment.archives) == ["solo"] and deployment.models_argument == ["solo=solo.mar"]
    handler = _archive_config(tmp_path / "solo.mar")["handler"]
    assert handler["max_probe_cost"] == 25 and "probe_endpoint" not in handler


def test_nothing_is_written_for_a_bad_export_or_option(tmp_path) -> None:
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["package", str(tmp_path / "missing.onnx"), "--name", "x", "--store", str(store)])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not store.exists()
    with pytest.raises(PackageError, match="probe_workers"):
        package_deployment(tmp_path / "missing.onnx", "x", store, probe_workers=-1)
    with pytest.raises(PackageError, match="jobQueueSize"):
        package_deployment(tmp_path / "missing.onnx", "x", store, model_config={"jobQueueSize": 0})


def test_benchmark_percentiles_match_numpy() -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from common import latency_summary, percentile

    rng = np.random.default_rng(3)
    for size in (1, 2, 7, 300):
        values = rng.lognormal(size=size).tolist()
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert percentile(values, q) == pytest.approx(np.percentile(values, 100 * q), rel=1e-12)
    summary = latency_summary([0.010, 0.020, 0.030])
    assert (summary["n"], summary["p50_ms"], summary["max_ms"]) == (3, pytest.approx(20.0), pytest.approx(30.0))
    with pytest.raises(ValueError):
        percentile([], 0.5)


# -- the split deployment on a real TorchServe --------------------------------------------------

@pytest.mark.serving
@pytest.mark.slow
def test_a_full_probe_queue_does_not_touch_cheap_requests(exported_pair, tmp_path) -> None:
    """NAME-probe's queue (2 places) overflows under 12 concurrent 100-step probes; meanwhile every
    cheap request to NAME is answered, and NAME refuses a probe by naming NAME-probe."""
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    sys.path.insert(0, str(ROOT / "tools"))
    from load_test import default_image
    from serve_local import LocalTorchServe

    server = LocalTorchServe(tmp_path, exported_pair["msvp"]["onnx"], probe_workers=1,
                             probe_model_config={"jobQueueSize": 2, "batchSize": 1})
    image = base64.b64encode(default_image()).decode()
    probe = json.dumps({"image": image, "probe": "pgd", "eps": "8/255", "steps": 100}).encode()
    cheap = json.dumps({"image": image}).encode()
    try:
        server.start()
        assert server.models == ["digits", "digits-probe"]
        status, answer = server.post(probe, model="digits-probe")
        assert status == 200 and answer["probe"]["steps"] == 100, answer
        status, refused = server.post(probe)
        assert 400 <= status < 500 and "digits-probe" in refused["error"], refused

        probe_answers: list[tuple[int, dict]] = []
        lock = threading.Lock()

        def send_probe() -> None:
            answer = server.post(probe, model="digits-probe")
            with lock:
                probe_answers.append(answer)

        threads = [threading.Thread(target=send_probe) for _ in range(12)]
        for thread in threads:
            thread.start()
        cheap_statuses = [server.post(cheap)[0] for _ in range(30)]
        for thread in threads:
            thread.join(300)
    finally:
        server.stop()
    assert cheap_statuses == [200] * 30
    statuses = [status for status, _ in probe_answers]
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses
    # TorchServe's own text for a full queue (fixed in its frontend): it names the probe model.
    full = [answer for status, answer in probe_answers if status == 503]
    assert all(a["type"] == "ServiceUnavailableException" and 'Model "digits-probe"' in a["message"] for a in full)


def test_the_probe_archives_timeout_is_sized_for_its_smoothing_cap(exported_pair, tmp_path) -> None:
    """Half of NAME-probe's responseTimeout must hold its cap at the rate the model samples; a
    timeout the deployer sets is kept (the worker then caps smoothing by it)."""
    from specformer_deploy.serving.package import SMOOTHING_TIMEOUT_MARGIN
    from specformer_deploy.serving.runtime import SpecformerRuntime

    onnx = exported_pair["msvp"]["onnx"]
    cap = 20_000_000  # far more than 60 s of sampling on this machine
    deployment = package_deployment(onnx, "big", tmp_path, probe_model_config={"handler": {
        "max_smoothing_samples": cap, "threads_per_worker": 1}})
    timeout = _archive_config(tmp_path / "big-probe.mar")["responseTimeout"]
    rate = SpecformerRuntime(onnx, threads=1).sampling_rate()
    expected = 2 * cap / rate * SMOOTHING_TIMEOUT_MARGIN
    assert timeout > 120 and expected / 4 < timeout < expected * 4, (timeout, expected)
    assert _archive_config(tmp_path / "big.mar")["responseTimeout"] == 60  # NAME serves no smoothing
    assert deployment.model_configs["big-probe"]["responseTimeout"] == timeout
    package_deployment(onnx, "kept", tmp_path, probe_model_config={"responseTimeout": 30, "handler": {
        "max_smoothing_samples": cap}})
    assert _archive_config(tmp_path / "kept-probe.mar")["responseTimeout"] == 30
