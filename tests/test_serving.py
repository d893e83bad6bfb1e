"""A real TorchServe, started the way a user starts it, serving a model packaged here."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from specformer_deploy.serving.images import decode_image
from specformer_deploy.serving.runtime import ProbeRequest, SpecformerRuntime

pytestmark = [pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
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


@pytest.fixture(scope="module")
def png() -> bytes:
    return default_image()


def _json(**payload) -> bytes:
    return json.dumps(payload).encode()


def test_image_bytes_and_json_requests_are_answered(server, png) -> None:
    status, raw = server.post(png, "application/octet-stream")
    assert status == 200 and {"prediction", "certificate"} <= set(raw)
    status, b64 = server.post(_json(image=base64.b64encode(png).decode(), delta0=0.05, top_k=3))
    assert status == 200 and len(b64["prediction"]["top_k"]) == 3 and b64["certificate"]["delta0"] == 0.05
    pixels = decode_image(png, 16)
    status, from_pixels = server.post(_json(pixels=pixels.tolist()))
    assert status == 200 and from_pixels["prediction"]["label"] == raw["prediction"]["label"]
    status, header_opts = server.post(png, "image/png", headers={"X-Delta0": "0.2", "top_k": "2"})
    assert status == 200 and header_opts["certificate"]["delta0"] == 0.2 and len(header_opts["prediction"]["top_k"]) == 2


def test_served_certificate_equals_certify(server, png, exported_pair) -> None:
    status, served = server.post(_json(image=base64.b64encode(png).decode(), delta0=0.03))
    offline = SpecformerRuntime(exported_pair["msvp"]["onnx"]).answer(decode_image(png, 16)[None], delta0=0.03)[0]
    assert status == 200
    assert served["prediction"]["label"] == offline["prediction"]["label"]
    for a, b in zip(served["certificate"]["layers"], offline["certificate"]["layers"]):
        assert a["bound"] == pytest.approx(b["bound"], rel=1e-6)
        assert a["paper_bound"] == pytest.approx(b["paper_bound"], rel=1e-6)
        assert a["paper_bound_valid"] == b["paper_bound_valid"]


def test_probe_is_consistent_with_offline_pgd(server, png, exported_pair) -> None:
    status, served = server.post(_json(image=base64.b64encode(png).decode(), probe="pgd", eps="77/255", steps=20))
    assert status == 200, served
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    pixels = decode_image(png, 16)[None]
    label = runtime.infer(pixels)[0].argmax(axis=1)
    offline = runtime.probe(pixels, label, ProbeRequest("pgd", 77 / 255, 20, "linf"))[0]
    probe = served["probe"]
    assert (probe["flipped"], probe["adversarial_label"]) == (offline["flipped"], offline["adversarial_label"])
    assert probe["margin"] == pytest.approx(offline["margin"], rel=1e-4, abs=1e-4)
    assert probe["linf_distance"] <= 77 / 255 + 1e-6


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_requests(png: bytes) -> list[tuple[str, bytes, str, dict]]:
    good = decode_image(png, 16).tolist()
    b64 = base64.b64encode(png).decode()
    j = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    nan = json.dumps({"pixels": [[[float("nan")] * 16] * 16] * 3}).encode()
    inf = json.dumps({"pixels": [[[float("inf")] * 16] * 16] * 3}).encode()
    return [
        ("empty body", b"", "application/octet-stream", {}),
        ("not an image", b"hello, I am text", "application/octet-stream", {}),
        ("truncated png", png[: len(png) // 2], "image/png", {}),
        ("decompression bomb", _bomb(), "image/png", {}),
        ("bad json", b'{"image": ', "application/json", {}),
        ("json array", b"[1, 2, 3]", "application/json", {}),
        ("json without image", b"{}", "application/json", {}),
        ("image and pixels", j(image=b64, pixels=good), "application/json", {}),
        ("not base64", j(image="!!! not base64 !!!"), "application/json", {}),
        ("base64 of garbage", j(image=base64.b64encode(b"garbage").decode()), "application/json", {}),
        ("image not a string", j(image=123), "application/json", {}),
        ("nan pixels", nan, "application/json", {}),
        ("inf pixels", inf, "application/json", {}),
        ("wrong shape", j(pixels=[[0.0] * 8] * 8), "application/json", {}),
        ("four channels", j(pixels=[good[0]] * 4), "application/json", {}),
        ("out of range", j(pixels=[[[2.0] * 16] * 16] * 3), "application/json", {}),
        ("string pixels", j(pixels="zeros"), "application/json", {}),
        ("unknown option", j(pixels=good, temperature=2), "application/json", {}),
        ("negative delta0", j(pixels=good, delta0=-1), "application/json", {}),
        ("text delta0", j(pixels=good, delta0="abc"), "application/json", {}),
        ("huge delta0", j(pixels=good, delta0=1e9), "application/json", {}),
        ("zero top_k", j(pixels=good, top_k=0), "application/json", {}),
        ("fractional top_k", j(pixels=good, top_k=1.5), "application/json", {}),
        ("unknown probe", j(pixels=good, probe="cw"), "application/json", {}),
        ("eps too big", j(pixels=good, probe="pgd", eps=2.0), "application/json", {}),
        ("negative eps", j(pixels=good, probe="pgd", eps=-0.1), "application/json", {}),
        ("eps divides by zero", j(pixels=good, probe="pgd", eps="8/0"), "application/json", {}),
        ("too many steps", j(pixels=good, probe="pgd", steps=100000), "application/json", {}),
        ("zero steps", j(pixels=good, probe="pgd", steps=0), "application/json", {}),
        ("unknown norm", j(pixels=good, probe="pgd", norm="l1"), "application/json", {}),
        ("fgsm with l2", j(pixels=good, probe="fgsm", norm="l2"), "application/json", {}),
        ("certificate maybe", j(pixels=good, certificate="maybe"), "application/json", {}),
        ("header delta0", png, "image/png", {"X-Delta0": "-1"}),
        ("header steps", png, "image/png", {"X-Probe": "pgd", "X-Steps": "abc"}),
        ("form encoded", png, "application/x-www-form-urlencoded", {}),
    ]


def test_bad_inputs_get_4xx_and_the_worker_keeps_serving(server, png) -> None:
    corpus = _bad_requests(png)
    assert len(corpus) >= 30
    for name, body, content_type, headers in corpus:
        status, answer = server.post(body, content_type, headers)
        assert 400 <= status < 500, f"{name}: {status} {answer}"
        assert status != 503
        message = answer.get("error") or answer.get("message") or answer.get("raw", "")
        assert len(message) > 10, f"{name}: no actionable message in {answer}"
        good_status, good = server.post(png, "application/octet-stream")
        assert good_status == 200 and "prediction" in good, f"after {name}"


def test_a_bad_request_in_a_batch_fails_alone(server, png) -> None:
    good = _json(image=base64.b64encode(png).decode())
    bad = _json(image="!!!")
    bodies = [good if i % 2 == 0 else bad for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda b: server.post(b), bodies))
    assert [status for status, _ in results] == [200 if i % 2 == 0 else 400 for i in range(16)]


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
