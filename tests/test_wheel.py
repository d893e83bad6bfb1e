"""A wheel built from the repository, installed outside it, packages a model and serves it.

Installing torch into a fresh environment is too slow for a test, so the wheel goes into its own
directory (``pip install --no-deps --target SITE``) and runs with ``PYTHONPATH=SITE`` on top of the
project's virtual environment (its dependencies), from a working directory outside the repository.
TorchServe passes its own environment, PYTHONPATH included, to the Python workers it starts.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _repository_copy(target: Path) -> Path:
    """The repository's files as git sees them (tracked and new, ignored ones left out), links kept."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source, copy = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), copy)
        else:
            shutil.copy2(source, copy)
    return target




def _environment(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:  # exited meanwhile, or another user's
        return {}


def _call(url: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err).encode()


def test_wheel_installed_elsewhere_packages_and_serves(exported_pair, tmp_path) -> None:
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    source = _repository_copy(tmp_path / "source")
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = wheels.glob("specformer_deploy-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    shipped = site / "specformer_deploy" / "serving" / "config.properties"
    assert shipped.is_file() and not shipped.is_symlink()
    assert shipped.read_text() == (ROOT / "model_store" / "config.properties").read_text()

    tmp = work / "tmp"
    tmp.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "TMPDIR": str(tmp), "JAVA_TOOL_OPTIONS": f"-Djava.io.tmpdir={tmp}",
           "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs")}
    where = subprocess.run([sys.executable, "-c", "import json, specformer_deploy, specformer_handlers; "
                            "print(json.dumps([specformer_deploy.__file__, specformer_handlers.__file__]))"],
                           cwd=work, env=env, check=True, capture_output=True, text=True)
    for module_file in json.loads(where.stdout):
        assert Path(module_file).resolve().is_relative_to(site.resolve()), module_file

    onnx = str(exported_pair["msvp"]["onnx"])
    packaged = subprocess.run([sys.executable, "-m", "specformer_deploy", "package", onnx, "--name", "digits",
                               "--store", "store"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert packaged.returncode == 0, packaged.stderr
    [hint] = [line for line in packaged.stderr.splitlines() if line.startswith("serve it with: ")]
    command = shlex.split(hint.removeprefix("serve it with: "))
    assert command[0] == "torchserve" and "store/config.properties" in command
    # The deployer's one edit: free ports instead of 8080-8082 on this shared machine.
    config = work / "store" / "config.properties"
    sys.path.insert(0, str(ROOT / "tools"))
    from serve_local import _free_ports

    ports = dict(zip(("inference", "management", "metrics"), _free_ports(3)))
    text = config.read_text()
    for kind, default in (("inference", 8080), ("management", 8081), ("metrics", 8082)):
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{ports[kind]}")
    config.write_text(text)

    started = datetime.now(timezone.utc)
    (work / "logs").mkdir()
    try:
        with open(work / "logs" / "start.log", "wb") as log:
            subprocess.run(command, cwd=work, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=120)
        inference, management = (f"http://127.0.0.1:{ports[k]}" for k in ("inference", "management"))
        deadline = time.time() + 240
        ready = False
        while time.time() < deadline and not ready:
            time.sleep(1)
            if not (work / "key_file.json").exists():
                continue
            keys = json.loads((work / "key_file.json").read_text())
            described = [_call(f"{management}/models/{m}", keys["management"]["key"]) for m in ("digits",
                                                                                                "digits-probe")]
            ready = all(status == 200 and all(w["status"] == "READY" for w in json.loads(body)[0]["workers"])
                        for status, body in described)
        assert ready, f"torchserve did not become ready; logs in {work / 'logs'}"

        sys.path.insert(0, str(ROOT / "tools"))
        from load_test import default_image

        image = base64.b64encode(default_image()).decode()
        status, body = _call(f"{inference}/predictions/digits", keys["inference"]["key"],
                             json.dumps({"image": image}).encode())
        assert status == 200, body
        assert {"prediction", "attention_lipschitz"} <= set(json.loads(body))
        status, body = _call(f"{inference}/predictions/digits-probe", keys["inference"]["key"],
                             json.dumps({"image": image, "probe": "pgd", "eps": "8/255", "steps": 5}).encode())
        assert status == 200 and json.loads(body)["probe"]["steps"] == 5, body

        # TorchServe hands its environment to the workers: each one imports the library from SITE.
        environments = [_environment(p) for p in psutil.process_iter(["cmdline"])
                        if any("model_service_worker" in part for part in p.info["cmdline"] or [])]
        ours = [e for e in environments if e.get("TMPDIR") == str(tmp)]
        assert len(ours) == 2, "one worker per model"
        for environment in ours:
            assert str(site) in environment["PYTHONPATH"].split(os.pathsep)

        # config.properties sets token_expiration_min=60: the keys say when they expire.
        expires = datetime.fromisoformat(keys["inference"]["expiration time"][:19]).replace(tzinfo=timezone.utc)
        assert 59 * 60 <= (expires - started).total_seconds() <= 61 * 60
    finally:
        subprocess.run(["torchserve", "--stop"], cwd=work, env=env, capture_output=True, timeout=120)
