"""A real TorchServe, started the way a user starts it, serving a model packaged here."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specformer_deploy.serving.images import decode_image
from specformer_deploy.serving.runtime import ProbeRequest, SpecformerRuntime

pytestmark = [pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bad_requests import Case, corpus, multipart  # noqa: E402
from load_test import default_image, run_load  # noqa: E402
from serve_local import LocalTorchServe  # noqa: E402


@pytest.fixture(scope="module")
def server(exported_pair, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    server = LocalTorchServe(tmp_path_factory.mktemp("torchserve"), exported_pair["msvp"]["onnx"],
                             model_config={"maxBatchDelay": 20})
    try:
        server.start()
        yield server
    finally:
        server.stop()


CORPUS = corpus(default_image())


@pytest.fixture(scope="module")
def png() -> bytes:
    return default_image()


def _json(**payload) -> bytes:
    return json.dumps(payload).encode()


def test_image_bytes_and_json_requests_are_answered(server, png) -> None:
    status, raw = server.post(png, "application/octet-stream")
    assert status == 200 and {"prediction", "attention_lipschitz"} <= set(raw) and "certificate" not in raw
    assert raw["attention_lipschitz"]["space"].startswith("each attention layer's input (norm1 output)")
    status, b64 = server.post(_json(image=base64.b64encode(png).decode(), delta0=0.05, top_k=3))
    assert status == 200 and len(b64["prediction"]["top_k"]) == 3 and b64["attention_lipschitz"]["delta0"] == 0.05
    pixels = decode_image(png, 16, 1)
    status, from_pixels = server.post(_json(pixels=pixels.tolist()))
    assert status == 200 and from_pixels["prediction"]["label"] == raw["prediction"]["label"]
    status, header_opts = server.post(png, "image/png", headers={"X-Delta0": "0.2", "top_k": "2"})
    assert status == 200 and header_opts["attention_lipschitz"]["delta0"] == 0.2
    assert len(header_opts["prediction"]["top_k"]) == 2


def test_served_certificate_equals_certify(server, png, exported_pair) -> None:
    status, served = server.post(_json(image=base64.b64encode(png).decode(), delta0=0.03))
    offline = SpecformerRuntime(exported_pair["msvp"]["onnx"]).answer(decode_image(png, 16, 1)[None], delta0=0.03)[0]
    assert status == 200
    assert served["prediction"]["label"] == offline["prediction"]["label"]
    for a, b in zip(served["attention_lipschitz"]["layers"], offline["attention_lipschitz"]["layers"]):
        assert a["bound"] == pytest.approx(b["bound"], rel=1e-6)
        assert a["paper_bound"] == pytest.approx(b["paper_bound"], rel=1e-6)
        assert a["paper_bound_valid"] == b["paper_bound_valid"]


def test_served_smoothing_equals_certify_for_the_same_seed(server, png, exported_pair, tmp_path) -> None:
    import subprocess

    image = tmp_path / "digit.png"
    image.write_bytes(png)
    for fields in ({"sigma": 0.25, "n0": 50, "n": 600, "alpha": 0.01, "seed": 11},
                   {"sigma": 0.12, "n": 2000, "radius": 0.05, "seed": 2}):
        status, served = server.post(_json(image=base64.b64encode(png).decode(), smoothing=fields))
        assert status == 200, served
        flags = [part for key, value in fields.items() for part in (f"--{key}", str(value))]
        command = [sys.executable, "-m", "specformer_deploy", "certify", str(exported_pair["msvp"]["onnx"]),
                   str(image), "--smoothing", *flags, "--json"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert served["smoothing"] == json.loads(result.stdout)["smoothing"]
        block = served["smoothing"]
        assert block["space"] == "model input 1x16x16, pixels in [0, 1], L2" and block["seed"] == fields["seed"]
        assert block["sent_image"] == "grey 16x16" and block["radius_in_sent_image"] == block["radius"]
    status, headed = server.post(png, "image/png", headers={"X-Smoothing-Sigma": "0.25", "X-Smoothing-N": "600",
                                                            "X-Smoothing-N0": "50", "X-Smoothing-Alpha": "0.01",
                                                            "X-Smoothing-Seed": "11"})
    assert status == 200 and headed["smoothing"]["n"] == 600
    status, refused = server.post(_json(image=base64.b64encode(png).decode(), smoothing=True))
    assert status == 400 and "not trained with noise" in refused["error"]


def test_probe_is_consistent_with_offline_pgd(server, png, exported_pair) -> None:
    status, served = server.post(_json(image=base64.b64encode(png).decode(), probe="pgd", eps="77/255", steps=20))
    assert status == 200, served
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    pixels = decode_image(png, 16, 1)[None]
    label = runtime.infer(pixels)[0].argmax(axis=1)
    offline = runtime.probe(pixels, label, ProbeRequest("pgd", 77 / 255, 20, "linf"))[0]
    probe = served["probe"]
    assert (probe["flipped"], probe["adversarial_label"]) == (offline["flipped"], offline["adversarial_label"])
    assert probe["margin"] == pytest.approx(offline["margin"], rel=1e-4, abs=1e-4)
    assert probe["linf_distance"] <= 77 / 255 + 1e-6


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=10) as response:
        return response.read().decode()


def _no_worker_died(server) -> None:
    logs = server.root / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert "Worker died" not in text and "worker thread exception" not in text.lower()


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_corpus_gets_its_status_and_the_worker_keeps_serving(server, png, case) -> None:
    status, answer = server.post(case.body, case.content_type, case.headers)
    if "status" in answer or status == 200:  # answered by the handler (not refused by the frontend first)
        assert status == case.status, f"{case.name}: {status} {answer}"
        if status != 200:
            assert answer["status"] == status and case.mentions.lower() in answer["error"].lower(), answer
            assert answer["error"].isascii() and not re.search(r"0x[0-9a-fA-F]{6,}", answer["error"]), answer
    else:
        assert 400 <= status < 500 and case.status >= 400, f"{case.name}: {status} {answer}"
    good_status, good = server.post(png, "application/octet-stream")
    assert good_status == 200 and "prediction" in good, f"after {case.name}"
    _no_worker_died(server)


def test_hostile_requests_in_a_batch_fail_alone(server, png) -> None:
    """Good and hostile requests sent together (batchSize 8, maxBatchDelay 20 ms): every good one
    answers 200 with the prediction it gets alone, every bad one its own 4xx."""
    _, alone = server.post(png, "application/octet-stream")
    hostile = [c for c in CORPUS if c.status != 200 and len(c.body) < 2_000_000 and not c.headers]
    good = Case("good", png, "application/octet-stream", status=200)
    batch = [item for pair in zip([good] * len(hostile), hostile) for item in pair]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda c: server.post(c.body, c.content_type, c.headers), batch))
    for case, (status, answer) in zip(batch, results):
        assert status == case.status, f"{case.name}: {status} {answer}"
        if case is good:
            assert answer["prediction"] == alone["prediction"]
    _no_worker_died(server)


def test_multipart_form_fields_are_the_options(server, png) -> None:
    """``curl -F data=@digit.png -F probe=pgd -F eps=8/255 -F steps=3``: the same answer as headers."""
    body, content_type = multipart({"data": png, "probe": b"pgd", "eps": b"8/255", "steps": b"3"})
    status, form = server.post(body, content_type)
    _, headers = server.post(png, "image/png", {"X-Probe": "pgd", "X-Eps": "8/255", "X-Steps": "3"})
    assert status == 200 and form["probe"] == headers["probe"] and form["probe"]["steps"] == 3
    assert form["prediction"] == headers["prediction"]


def test_metrics_endpoint_shows_timings_and_rejections_by_reason(server, png) -> None:
    assert server.post(png, "image/png", {"X-Probe": "pgd", "X-Steps": "2"})[0] == 200
    assert server.post(png, "image/png", {"X-Probe": "pgd", "X-Steps": "100", "X-Restarts": "4"})[0] == 400
    deadline = time.time() + 30
    while time.time() < deadline:
        text = _metrics(server)
        if 'Reason="probe_cost"' in text and "SpecformerProbeTime" in text:
            break
        time.sleep(1)
    for name in ("SpecformerInferenceTime", "SpecformerCertificateTime", "SpecformerProbeTime"):
        assert re.search(rf"^{name}\{{.*ModelName=\"digits\".*\}} [0-9.]+", text, re.M), (name, text[-3000:])
    rejected = re.search(r'^SpecformerRejectedRequests\{.*Reason="probe_cost".*\} ([0-9.]+)', text, re.M)
    assert rejected and float(rejected.group(1)) >= 1, text[-3000:]


def test_request_without_token_is_refused(server, png) -> None:
    status, answer = server.post(png, "application/octet-stream", token=False)
    assert status in (400, 401, 403) and "Token Authorization failed" in json.dumps(answer)


def test_load_run_has_no_failures(server) -> None:
    result = run_load(f"{server.url}/predictions/digits", server.key("inference"), default_image(), 1000, 8,
                      {"certificate": True}, deadline_s=300)
    assert result["failures"] == 0, result["statuses"]
    assert result["ok"] == 1000


def test_killed_worker_recovers(server, png) -> None:
    pid = server.model_status()["workers"][0]["pid"]
    load = threading.Thread(target=run_load, args=(f"{server.url}/predictions/digits", server.key("inference"), png,
                                                   200, 4, {"certificate": True}), kwargs={"deadline_s": 120})
    load.start()
    time.sleep(1.0)
    os.kill(int(pid), signal.SIGKILL)
    load.join(timeout=300)
    deadline = time.time() + 180
    while time.time() < deadline and not (server.ready() and server.model_status()["workers"][0]["pid"] != pid):
        time.sleep(1)
    assert server.model_status()["workers"][0]["pid"] != pid, "no new worker replaced the killed one"
    statuses = [server.post(png, "application/octet-stream")[0] for _ in range(10)]
    assert statuses == [200] * 10
