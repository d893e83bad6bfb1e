"""A real TorchServe never serves a changed export: its worker refuses at load and answers 503 at once.

One TorchServe per case (one runs on a machine at a time), started with ``torchserve --start`` by
tools/serve_local.py from an archive built by ``package_model`` out of tampered files.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from specformer_deploy.serving import package

pytestmark = [pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from load_test import default_image  # noqa: E402
from serve_local import LocalTorchServe  # noqa: E402
from test_integrity import with_changed_weight, with_pt2_from, with_scaled_norms  # noqa: E402

# case -> (build the tampered export, what the refusal must say)
CASES = {
    "tampered_weights": (lambda summary, d: with_changed_weight(summary["onnx"], d),
                         "weight tensor model.net.head.weight changed after export"),
    "edited_graph": (lambda summary, d: with_scaled_norms(summary["onnx"], d),
                     "the graph (nodes, constants, inputs or outputs) changed after export"),
    "changed_pt2": (lambda summary, d: with_pt2_from(summary, d, weight_delta=0.5),
                    "model.pt2 does not match the ONNX file: model.pt2 tensor model.net.head.weight differs"),
    "missing_pt2": (lambda summary, d: Path(summary["onnx"]), "model.pt2 is missing"),
    "truncated_onnx": (lambda summary, d: Path(summary["onnx"]), "model.onnx is not a readable ONNX file"),
}
# Cases whose archive is damaged after packaging (packaging itself refuses such an export).
AFTER_PACKAGING = {"missing_pt2": ("model.pt2", None),
                   "truncated_onnx": ("model.onnx", lambda data: data[: len(data) // 2])}
INTERNAL_PATH = re.compile(r"/(?:tmp|root|home|work|var|opt|usr)/")


def _rewrite_member(archive: Path, member: str, change) -> Path:
    """Rewrite the .mar (a zip) with ``member`` changed by ``change(bytes)`` (``None``: removed)."""
    with zipfile.ZipFile(archive) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    assert any(info.filename == member for info, _ in entries), f"{member} was not in {archive}"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as target:
        for info, data in entries:
            if info.filename != member:
                target.writestr(info, data)
            elif change is not None:
                target.writestr(info, change(data))
    return archive


def _damaging(build, member: str, change):
    """``build`` (package_model or package_deployment), then ``member`` changed in what it wrote."""

    def wrapped(*args, **kwargs):
        result = build(*args, **kwargs)
        for archive in (result.archives.values() if hasattr(result, "archives") else [result]):
            _rewrite_member(Path(archive), member, change)
        return result

    return wrapped


def _post(server: LocalTorchServe, body: bytes, content_type: str) -> tuple[int, str, dict, float]:
    """``(status, reason phrase, JSON body, seconds)`` of one inference request."""
    request = urllib.request.Request(f"{server.url}/predictions/{server.name}", data=body, method="POST",
                                     headers={"Content-Type": content_type,
                                              "Authorization": f"Bearer {server.key('inference')}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.reason, json.loads(response.read()), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, err.reason, json.loads(err.read()), time.perf_counter() - start


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_model_is_refused_with_a_clear_log_line(case, exported_pair, tmp_path, monkeypatch) -> None:
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    build, reason = CASES[case]
    onnx_path = build(exported_pair["msvp"], tmp_path / "export")
    if case in AFTER_PACKAGING:  # packaging refuses such an export: damage the archives it wrote
        for builder in ("package_deployment", "package_model"):
            if hasattr(package, builder):
                monkeypatch.setattr(package, builder, _damaging(getattr(package, builder), *AFTER_PACKAGING[case]))
    server = LocalTorchServe(tmp_path / "ts", str(onnx_path))
    try:
        server.start(wait=False)
        deadline = time.time() + 180  # a worker that raised would be restarted with back-off, never READY
        while time.time() < deadline and not server.ready():
            time.sleep(1)
        assert server.ready(), "the refusing worker should load (and refuse), not crash and restart"
        png = default_image()
        answers = [_post(server, png, "application/octet-stream"),
                   _post(server, json.dumps({"pixels": [[0.5] * 16] * 16, "probe": "pgd"}).encode(),
                         "application/json")]
        for status, phrase, body, seconds in answers:
            assert (status, phrase) == (503, "Service Unavailable"), body
            assert body == {"error": body["error"], "status": 503} and "prediction" not in body
            assert body["error"].startswith("model failed its integrity check: ") and reason in body["error"]
            assert not INTERNAL_PATH.search(body["error"]), body["error"]  # file names only, never the server's folders
            assert seconds < 5, f"a refusal took {seconds:.1f} s"
        log = (server.root / "logs" / "model_log.log").read_text()
        lines = [line for line in log.splitlines() if "REFUSING TO SERVE model 'digits'" in line]
        assert len(lines) == 1, lines
        assert reason in lines[0] and "run specformer-deploy audit model.onnx" in lines[0]
    finally:
        server.stop()
