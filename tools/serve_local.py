"""Run a model on a local TorchServe the way a user would, and send it one image.

Packages the exported model exactly as `specformer-deploy package` does (NAME.mar for predictions
and certificates, NAME-probe.mar for probes with its own worker and queue, and the shipped
config.properties with token authorization on), starts ``torchserve --start`` with both models,
waits for every worker through the management API, posts one image with the inference key (to
NAME-probe with --probe), prints the answer and always stops TorchServe. Used by ``make demo``;
the tests drive the same class.

    python tools/serve_local.py --onnx runs/demo/export/model.onnx --name digits [--image digit.png]
    python tools/serve_local.py --onnx runs/demo/export/model.onnx --probe            # PGD probe, NAME-probe
    python tools/serve_local.py --onnx runs/demo/export/model.onnx --probe-workers 0  # one model for all
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


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen, so the OS cannot
    hand the same port out twice (one at a time, a closed port came back for gRPC and TorchServe
    stopped on "Address already in use")."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalTorchServe:
    """A TorchServe process group rooted in ``root`` (model store, config, logs, key_file.json).

    ``probe_workers=0`` (the default here) packages one archive, NAME.mar, that serves probes
    itself; ``probe_workers >= 1`` packages what `specformer-deploy package` writes by default:
    NAME.mar, which refuses probes, and NAME-probe.mar with that many workers."""

    def __init__(self, root: Path, onnx_path: str, name: str = "digits", free_ports: bool = True,
                 model_config: dict | None = None, device_ids: list[int] | None = None, probe_workers: int = 0,
                 probe_model_config: dict | None = None, others: dict[str, str] | None = None) -> None:
        """``others``: more models (name -> exported .onnx) packaged into the same store and served beside
        NAME by the same TorchServe, each the way NAME is."""
        self.root = Path(root).resolve()
        self.others = {name: str(Path(path).resolve()) for name, path in (others or {}).items()}
        self.onnx = str(Path(onnx_path).resolve())
        self.name = name
        self.model_config = model_config or {}
        self.probe_model_config = probe_model_config or {}
        self.device_ids = device_ids
        self.probe_workers = probe_workers
        self.models: list[str] = [name]
        self.free_ports = free_ports
        # gRPC listens too (7070/7071 by default): a second server must not collide there either
        free = _free_ports(5) if free_ports else [8080, 8081, 8082, 7070, 7071]
        self.ports = dict(zip(("inference", "management", "metrics"), free[:3]))
        self.grpc_ports = free[3:]
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.mgmt = f"http://127.0.0.1:{self.ports['management']}"

    @property
    def probe_name(self) -> str:
        """The model that serves probes: NAME-probe when it was packaged, else NAME."""
        return self.models[-1]

    def start(self, wait: bool = True) -> None:
        from specformer_deploy.serving.package import package_deployment

        deployment = package_deployment(self.onnx, self.name, self.root / "store", model_config=self.model_config,
                                        probe_model_config=self.probe_model_config, device_ids=self.device_ids,
                                        probe_workers=self.probe_workers)
        models_argument = list(deployment.models_argument)
        for name, onnx_path in self.others.items():
            other = package_deployment(onnx_path, name, self.root / "store", model_config=self.model_config,
                                       probe_model_config=self.probe_model_config, device_ids=self.device_ids,
                                       probe_workers=self.probe_workers)
            models_argument += [m for m in other.models_argument if m not in models_argument]
        self.models = [m.split("=")[0] for m in models_argument]
        config = deployment.config_properties.read_text()
        for kind, port in self.ports.items():
            default = {"inference": 8080, "management": 8081, "metrics": 8082}[kind]
            config = config.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
        if self.free_ports:
            config += f"\ngrpc_inference_port={self.grpc_ports[0]}\ngrpc_management_port={self.grpc_ports[1]}\n"
        (self.root / "config.properties").write_text(config)
        # torchserve --start daemonizes Java, which inherits stdout/stderr: give it a file, not a pipe.
        (self.root / "logs").mkdir(exist_ok=True)
        with open(self.root / "logs" / "start.log", "wb") as log:
            subprocess.run([str(BIN / "torchserve"), "--start", "--ncs", "--model-store", str(deployment.store),
                            "--ts-config", str(self.root / "config.properties"),
                            "--models", *models_argument],
                           cwd=self.root, env=self.environment(), check=True, stdout=log, stderr=subprocess.STDOUT,
                           timeout=120)
        if not wait:
            return
        deadline = time.time() + 240
        while time.time() < deadline:
            if (self.root / "key_file.json").exists() and self.ready():
                return
            time.sleep(1)
        raise RuntimeError(f"torchserve did not become ready in 240 s; logs in {self.root / 'logs'}; the last "
                           f"lines of model_log.log:\n{self.log_tail('model_log.log')}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last ``lines`` lines of one of TorchServe's logs (the logs go when a test's directory does)."""
        path = self.root / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"

    def environment(self) -> dict[str, str]:
        """The environment of ``torchserve --start/--stop``: logs and temporary files under ``root``.

        torchserve keeps its pid in ``$TMPDIR/.model_server.pid`` (with a shared one a second server
        refuses to start and ``--stop`` stops whichever server wrote the file last) and its workers'
        sockets in Java's ``java.io.tmpdir`` (``.ts.sock.9000`` and up, the same names in every
        server): both go to ``root/tmp`` so that servers side by side never meet."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        java_options = f"{os.environ.get('JAVA_TOOL_OPTIONS', '')} -Djava.io.tmpdir={tmp}".strip()
        return {**os.environ, "LOG_LOCATION": str(self.root / "logs"), "METRICS_LOCATION": str(self.root / "logs"),
                "TMPDIR": str(tmp), "JAVA_TOOL_OPTIONS": java_options, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}

    def stop(self) -> None:
        subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=self.root, env=self.environment(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def key(self, kind: str) -> str:
        return json.loads((self.root / "key_file.json").read_text())[kind]["key"]

    def model_status(self, model: str | None = None) -> dict:
        request = urllib.request.Request(f"{self.mgmt}/models/{model or self.name}",
                                         headers={"Authorization": f"Bearer {self.key('management')}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())[0]

    def ready(self) -> bool:
        """Every model's workers are READY."""
        try:
            workers = [self.model_status(model)["workers"] for model in self.models]
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError):
            return False
        return all(w and all(worker["status"] == "READY" for worker in w) for w in workers)

    def post(self, body: bytes, content_type: str = "application/json", headers: dict | None = None,
             token: bool = True, model: str | None = None) -> tuple[int, dict]:
        """POST to /predictions/MODEL (default: NAME); returns the status and the JSON answer."""
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {self.key('inference')}"
        request = urllib.request.Request(f"{self.url}/predictions/{model or self.name}", data=body, method="POST",
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
    parser.add_argument("--probe", action="store_true", help="ask for a PGD probe too (sent to NAME-probe)")
    parser.add_argument("--smoothing", action="store_true",
                        help="ask for a randomized-smoothing certificate too (sent to NAME-probe)")
    parser.add_argument("--sigma", type=float, help="smoothing noise std (default: the model's training noise)")
    parser.add_argument("--probe-workers", type=int, default=1,
                        help="workers of NAME-probe (default 1); 0: one model, NAME, serves probes too")
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
    if args.probe_workers < 0:
        parser.error("--probe-workers must be >= 0")
    server = LocalTorchServe(args.root, args.onnx, args.name, free_ports=False, device_ids=device_ids,
                             probe_workers=args.probe_workers)
    try:
        print(f"starting torchserve (store, logs and key_file.json in {args.root}) ...", file=sys.stderr)
        server.start()
        headers = {"X-Probe": "pgd", "X-Eps": "8/255"} if args.probe else {}
        if args.smoothing:
            headers["X-Smoothing"] = "true"
            if args.sigma is not None:
                headers["X-Smoothing-Sigma"] = str(args.sigma)
        model = server.probe_name if args.probe or args.smoothing else server.name
        status, answer = server.post(image, "application/octet-stream", headers, model=model)
        print(f"POST {server.url}/predictions/{model} -> {status}", file=sys.stderr)
        print(json.dumps(answer, indent=2))
        if status == 200 and isinstance(answer, dict) and "smoothing" in answer:
            from specformer_deploy.serving.smoothing import statement

            print(statement(answer["smoothing"], args.image.name if args.image else "the built-in test digit"))
        return 0 if status == 200 else 1
    finally:
        server.stop()
        print("torchserve stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
