#!/usr/bin/env python
"""Starvation benchmark: do cheap certificate requests stay fast while clients send 100-step probes?

Starts a real ``torchserve --start`` on loopback (``tools/serve_local.py``'s ``LocalTorchServe``:
the archives and config.properties that `specformer-deploy package` writes, token auth on), then:

  1. idle: one client sends ``--requests`` certificate-only requests, one at a time, to NAME;
  2. loaded: ``--probe-clients`` clients send PGD probes of ``--probe-steps`` steps without pause
     (to NAME-probe; with ``--layout shared`` to NAME itself, one worker pool for everything) and,
     once they have run ``--ramp`` seconds, the same client sends certificate-only requests again,
     one at a time, for ``--duration`` seconds (long enough to see many probe batches finish).
     A probe client whose probe is refused (503: the probe queue is full) waits ``--backoff``
     seconds before the next one, as a client should; with 0 the refusals become a request storm
     that measures the client's CPU more than the server.

It prints the certificate requests' idle and loaded p50/p99, the loaded/idle ratios, the probes
answered per second while the certificates were measured, the statuses seen and the load average.
The run is bounded: ``--requests`` idle certificates, a loaded phase of ``--duration`` seconds
(at most 20,000 certificates), ``--drain`` seconds for the probes in flight, and TorchServe is
always stopped.

    python tools/bench/starvation.py --onnx runs/demo/export/model.onnx
    python tools/bench/starvation.py --onnx model.onnx --layout shared --json -   # one pool, for comparison
    python tools/bench/starvation.py --onnx model.onnx --probe-clients 120 --duration 20   # probe queue overflows
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tools/: load_test, serve_local
from common import emit_json, latency_summary, load_average
from load_test import MODES, default_image, timed_request
from serve_local import LocalTorchServe

TARGET_RATIO = 10.0  # loaded p99 within this factor of the idle p99
MAX_LOADED_REQUESTS = 20_000


def _body(image: bytes, options: dict[str, Any]) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), **options}).encode()


def certificate_latencies(url: str, token: str, body: bytes, count: int, stop_at: float) -> tuple[list[float], dict]:
    """Send ``count`` requests one after another (until ``stop_at``); latencies of the 200s and all statuses."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for _ in range(count):
        if time.perf_counter() > stop_at:
            break
        status, seconds = timed_request(url, token, body, "application/json", timeout=120)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status == 200:
            latencies.append(seconds)
    return latencies, statuses


class ProbeLoad:
    """``clients`` threads, each sending probes back to back until :meth:`stop`, pausing ``backoff``
    seconds after a refusal (a full probe queue answers 503 at once)."""

    def __init__(self, url: str, token: str, body: bytes, clients: int, backoff: float) -> None:
        self.url, self.token, self.body, self.backoff = url, token, body, backoff
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.finished: list[tuple[float, int]] = []  # (time answered, status)
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stopping.is_set():
            status, _ = timed_request(self.url, self.token, self.body, "application/json", timeout=300)
            with self.lock:
                self.finished.append((time.perf_counter(), status))
            if status != 200:
                self.stopping.wait(self.backoff)  # as a client does after a 503 (queue full)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float) -> int:
        """Stop sending; wait up to ``timeout`` s for the probes in flight. Returns the clients still waiting."""
        self.stopping.set()
        deadline = time.perf_counter() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
        return sum(thread.is_alive() for thread in self.threads)

    def between(self, start: float, end: float) -> dict[str, Any]:
        """Probes answered in [start, end): statuses and the rate of 200s."""
        with self.lock:
            window = [status for when, status in self.finished if start <= when < end]
        statuses: dict[str, int] = {}
        for status in window:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        ok = statuses.get("200", 0)
        return {"answered": len(window), "ok": ok, "statuses": statuses,
                "ok_per_s": ok / (end - start) if end > start else None}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    image = default_image()
    probe_workers = 1 if args.layout == "split" else 0
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalTorchServe(Path(tmp), args.onnx, name="bench", probe_workers=probe_workers)
        console.print(f"starting torchserve ({args.layout} layout) ...")
        server.start()
        try:
            token = server.key("inference")
            cheap_url = f"{server.url}/predictions/{server.name}"
            probe_url = f"{server.url}/predictions/{server.probe_name}"
            cheap = _body(image, MODES["certificate"])
            probe = _body(image, {"certificate": False, "probe": "pgd", "eps": "8/255", "steps": args.probe_steps})
            # Warm-up: both workers have run their first request (ONNX Runtime and torch initialisation).
            certificate_latencies(cheap_url, token, cheap, 20, float("inf"))
            status, _ = timed_request(probe_url, token, probe, "application/json", timeout=300)
            if status != 200:
                raise SystemExit(f"the warm-up probe got HTTP {status}; logs in {server.root / 'logs'}")

            console.print(f"idle: {args.requests} certificate requests, one at a time")
            idle, idle_statuses = certificate_latencies(cheap_url, token, cheap, args.requests, float("inf"))

            console.print(f"loaded: {args.probe_clients} clients sending {args.probe_steps}-step probes")
            load = ProbeLoad(probe_url, token, probe, args.probe_clients, args.backoff)
            load_before = load_average()
            load.start()
            time.sleep(args.ramp)
            started = time.perf_counter()
            loaded, loaded_statuses = certificate_latencies(cheap_url, token, cheap, MAX_LOADED_REQUESTS,
                                                            started + args.duration)
            ended = time.perf_counter()
            load_during = load_average()
            probes = load.between(started, ended)
            still_waiting = load.stop(timeout=args.drain)
        finally:
            server.stop()
    idle_summary, loaded_summary = latency_summary(idle), latency_summary(loaded)
    if not idle or not loaded:
        raise SystemExit(f"no certificate answered: idle statuses {idle_statuses}, loaded {loaded_statuses}")
    ratio_p99 = loaded_summary["p99_ms"] / idle_summary["p99_ms"]
    return {
        "benchmark": "starvation", "onnx": args.onnx, "layout": args.layout,
        "probe_clients": args.probe_clients, "probe_steps": args.probe_steps, "backoff_s": args.backoff,
        "idle": {**idle_summary, "statuses": idle_statuses},
        "loaded": {**loaded_summary, "statuses": loaded_statuses, "seconds": ended - started},
        "ratio_p50": loaded_summary["p50_ms"] / idle_summary["p50_ms"], "ratio_p99": ratio_p99,
        "target_ratio_p99": TARGET_RATIO, "target_met": ratio_p99 <= TARGET_RATIO,
        "probes": {**probes, "clients_still_waiting_at_stop": still_waiting},
        "load_average": {"before_load": load_before, "during_load": load_during, "after": load_average()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="An exported model (model.pt2 beside it).")
    parser.add_argument("--layout", choices=("split", "shared"), default="split",
                        help="split: probes go to NAME-probe (what `package` writes); shared: one model serves all.")
    parser.add_argument("--requests", type=int, default=300, help="Idle certificate requests (1..5000).")
    parser.add_argument("--probe-clients", type=int, default=16, help="Clients sending probes (1..128).")
    parser.add_argument("--probe-steps", type=int, default=100, help="PGD steps per probe (1..100).")
    parser.add_argument("--backoff", type=float, default=1.0, help="Seconds a probe client waits after a refusal "
                                                                   "(0..60).")
    parser.add_argument("--ramp", type=float, default=5.0, help="Seconds of probe load before measuring.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of loaded measurement (1..600).")
    parser.add_argument("--drain", type=float, default=120.0, help="Seconds to wait for probes in flight at the end.")
    parser.add_argument("--json", dest="json_target", default=None, help="Write the result as JSON ('-': stdout).")
    args = parser.parse_args()
    if not (1 <= args.requests <= 5000 and 1 <= args.probe_clients <= 128 and 1 <= args.probe_steps <= 100
            and 1 <= args.duration <= 600 and 0 <= args.ramp <= 600 and 0 <= args.drain <= 600
            and 0 <= args.backoff <= 60):
        parser.error("--requests must be in [1, 5000], --probe-clients in [1, 128], --probe-steps in [1, 100], "
                     "--duration in [1, 600], --ramp and --drain in [0, 600], --backoff in [0, 60]")
    console = Console(stderr=True)
    result = run(args, console)
    idle, loaded = result["idle"], result["loaded"]
    console.print(f"certificates idle:   p50 {idle['p50_ms']:.1f} ms, p99 {idle['p99_ms']:.1f} ms ({idle['n']} ok)")
    console.print(f"certificates loaded: p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms "
                  f"({loaded['n']} ok, statuses {loaded['statuses']})")
    console.print(f"loaded/idle: p50 {result['ratio_p50']:.2f}x, p99 {result['ratio_p99']:.2f}x "
                  f"(target <= {TARGET_RATIO:.0f}x: {'met' if result['target_met'] else 'NOT met'})")
    probes = result["probes"]
    console.print(f"probes ({result['probe_clients']} clients, {result['probe_steps']} steps): "
                  f"{probes['ok_per_s']:.2f}/s answered while measuring, statuses {probes['statuses']}")
    console.print(f"load average: {result['load_average']}")
    emit_json(result, args.json_target, console)
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
