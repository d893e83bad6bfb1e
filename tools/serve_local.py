"""Run a model on a local TorchServe the way a user would, and send it one image.

Packages the exported model into a model store, starts ``torchserve --start`` with the
project's ``model_store/config.properties`` (token authorization on), waits for the worker
through the management API, posts one image with the inference key, prints the answer and
always stops TorchServe. Used by ``make demo``; the tests drive the same class.

    python tools/serve_local.py --onnx runs/demo/export/model.onnx --name digits [--image digit.png]
    python tools/serve_local.py --onnx runs/demo/export/model.onnx --device-ids 0,1   # GPU workers
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTorchServe:
    """A TorchServe process group rooted in ``root`` (model store, config, logs, key_file.json)."""

    def __init__(self, root: Path, onnx_path: str, name: str = "digits", free_ports: bool = True,
                 model_config: dict | None = None, device_ids: list[int] | None = None) -> None:
        self.root = Path(root).resolve()
        self.onnx = str(Path(onnx_path).resolve())
        self.name = name
        self.model_config = model_config or {}
        self.device_ids = device_ids
        self.ports = ({"inference": _free_port(), "management": _free_port(), "metrics": _free_port()} if free_ports
                      else {"inference": 8080, "management": 8081, "metrics": 8082})
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.mgmt = f"http://127.0.0.1:{self.ports['management']}"

    def start(self, wait: bool = True) -> None:
        store = self.root / "store"
        from specformer_deploy.serving.package import package_model

        package_model(self.onnx, self.name, store, model_config=self.model_config, device_ids=self.device_ids)
        config = (ROOT / "model_store" / "config.properties").read_text()
        for kind, port in self.ports.items():
            default = {"inference": 8080, "management": 8081, "metrics": 8082}[kind]
            config = config.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
        (self.root / "config.properties").write_text(config)
        env = {**os.environ, "LOG_LOCATION": str(self.root / "logs"), "METRICS_LOCATION": str(self.root / "logs"),
               "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        # torchserve --start daemonizes Java, which inherits stdout/stderr: give it a file, not a pipe.
        (self.root / "logs").mkdir(exist_ok=True)
        with open(self.root / "logs" / "start.log", "wb") as log:
            subprocess.run([str(BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store), "--ts-config",
                            str(self.root / "config.properties"), "--models", f"{self.name}={self.name}.mar"],
                           cwd=self.root, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if not wait:
            return
        deadline = time.time() + 240
        while time.time() < deadline:
            if (self.root / "key_file.json").exists() and self.ready():
                return
            time.sleep(1)
        raise RuntimeError(f"torchserve did not become ready; logs in {self.root / 'logs'}")

    def stop(self) -> None:
        subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=self.root, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)

    def key(self, kind: str) -> str:
        return json.loads((self.root / "key_file.json").read_text())[kind]["key"]

    def model_status(self) -> dict:
        request = urllib.request.Request(f"{self.mgmt}/models/{self.name}",
                                         headers={"Authorization": f"Bearer {self.key('management')}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())[0]

    def ready(self) -> bool:
        try:
            workers = self.model_status()["workers"]
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError):
            return False
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    def post(self, body: bytes, content_type: str = "application/json", headers: dict | None = None,
             token: bool = True) -> tuple[int, dict]:
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {self.key('inference')}"
        request = urllib.request.Request(f"{self.url}/predictions/{self.name}", data=body, method="POST",
                                         headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                return err.code, json.loads(text)
            except json.JSONDecodeError:
                return err.code, {"raw": text.decode(errors="replace")}




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="exported model (model.pt2 beside it)")
    parser.add_argument("--name", default="digits")
    parser.add_argument("--root", type=Path, default=Path("runs/torchserve"), help="store, logs and key_file.json")
    parser.add_argument("--image", type=Path, help="image to send (default: a digit of the built-in test set)")
    parser.add_argument("--probe", action="store_true", help="ask for a PGD probe too")
    parser.add_argument("--device-ids", help="package for these GPUs, e.g. 0,1 (as `specformer-deploy package`)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    from load_test import default_image

    image = args.image.read_bytes() if args.image else default_image()
    args.root.mkdir(parents=True, exist_ok=True)
    from specformer_deploy.serving.package import PackageError, parse_device_ids

    try:
        device_ids = parse_device_ids(args.device_ids) if args.device_ids is not None else None
    except PackageError as err:
        parser.error(str(err))
    server = LocalTorchServe(args.root, args.onnx, args.name, free_ports=False, device_ids=device_ids)
    try:
        print(f"starting torchserve (store, logs and key_file.json in {args.root}) ...", file=sys.stderr)
        server.start()
        headers = {"X-Probe": "pgd", "X-Eps": "8/255"} if args.probe else {}
        status, answer = server.post(image, "application/octet-stream", headers)
        print(f"POST {server.url}/predictions/{args.name} -> {status}", file=sys.stderr)
        print(json.dumps(answer, indent=2))
        return 0 if status == 200 else 1
    finally:
        server.stop()
        print("torchserve stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
