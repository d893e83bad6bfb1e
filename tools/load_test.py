"""Bounded load test of a local TorchServe endpoint; also the serving benchmark.

Sends N requests at a fixed concurrency to ``http://127.0.0.1:PORT/predictions/NAME`` (loopback
only: any other host is refused) and reports requests/s, p50/p99 latency and failures.
``--compare`` measures prediction only, prediction + certificate and + probe in one run,
interleaving the three modes in rounds so that a noisy machine affects them alike, and prints
each mode's throughput relative to prediction only (target for the certificate: >= 0.95x).

    python tools/load_test.py --key-file key_file.json --name digits --requests 1000 --concurrency 8
    python tools/load_test.py --key-file key_file.json --name digits --compare --requests 600
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import percentile  # tools/bench/common.py: one quantile rule for every benchmark

MODES = {
    "prediction": {"certificate": False},
    "certificate": {"certificate": True},
    "probe": {"certificate": True, "probe": "pgd", "eps": 8 / 255, "steps": 10},
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_image(index: int = 0, dataset: str = "digits", size: int = 16) -> bytes:
    """A PNG of an image of a built-in test set (digits at 16x16 by default), so no file is needed."""
    import numpy as np
    from PIL import Image

    from specformer_deploy.training.data import load_dataset

    pixels = load_dataset(dataset, size).test[index][0].numpy().transpose(1, 2, 0)
    if pixels.shape[-1] == 1:  # grey data: a grey PNG
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed_request(url: str, token: str, body: bytes, content_type: str, timeout: float) -> tuple[int, float]:
    """One POST: its HTTP status (0 when no answer came) and its wall time in seconds."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        status = 0
    return status, time.perf_counter() - start


def run_load(url: str, token: str, image: bytes, requests: int, concurrency: int, options: dict[str, Any],
             timeout: float = 60.0, deadline_s: float = 600.0) -> dict[str, Any]:
    """Send ``requests`` JSON requests (image + options) with ``concurrency`` threads; bounded in time."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load-test {host}: only loopback addresses ({', '.join(LOOPBACK)})")
    body = json.dumps({"image": base64.b64encode(image).decode(), **options}).encode()
    stop_at = time.perf_counter() + deadline_s
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    def one(_: int) -> None:
        if time.perf_counter() > stop_at:
            status, seconds = -1, 0.0  # not sent: the run's time bound was reached
        else:
            status, seconds = timed_request(url, token, body, "application/json", timeout)
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(seconds)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ok = statuses.get(200, 0)
    def pick(q: float) -> float | None:
        return percentile(latencies, q) * 1e3 if latencies else None

    return {"requests": requests, "concurrency": concurrency, "ok": ok, "failures": requests - ok,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": wall,
            "requests_per_s": ok / wall if wall else 0.0, "p50_ms": pick(0.50), "p99_ms": pick(0.99)}


def compare(url: str, token: str, image: bytes, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """The three modes in interleaved rounds; throughput relative to prediction only."""
    per_round = max(concurrency, requests // rounds)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for index in range(rounds):
        order = list(MODES) if index % 2 == 0 else list(reversed(MODES))
        for mode in order:
            count = per_round if mode != "probe" else max(concurrency, per_round // 10)
            runs[mode].append(run_load(url, token, image, count, concurrency, MODES[mode]))
    summary: dict[str, Any] = {}
    for mode, results in runs.items():
        summary[mode] = {"requests_per_s": statistics.median(r["requests_per_s"] for r in results),
                         "p50_ms": statistics.median(r["p50_ms"] for r in results if r["p50_ms"] is not None),
                         "p99_ms": statistics.median(r["p99_ms"] for r in results if r["p99_ms"] is not None),
                         "failures": sum(r["failures"] for r in results),
                         "requests": sum(r["requests"] for r in results)}
    base = summary["prediction"]["requests_per_s"]
    for mode in summary:
        summary[mode]["throughput_vs_prediction"] = summary[mode]["requests_per_s"] / base if base else None
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address (loopback only)")
    parser.add_argument("--name", default="digits", help="model name")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key_file.json")
    parser.add_argument("--image", type=Path, help="image file (default: a digit from the built-in test set)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--mode", choices=list(MODES), default="certificate")
    parser.add_argument("--compare", action="store_true", help="measure the three modes in one run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --compare")
    parser.add_argument("--deadline", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.requests < 1 or args.requests > 100_000 or not (1 <= args.concurrency <= 64):
        parser.error("--requests must be in [1, 100000] and --concurrency in [1, 64]")
    token = json.loads(args.key_file.read_text())["inference"]["key"]
    image = args.image.read_bytes() if args.image else default_image()
    url = f"{args.url.rstrip('/')}/predictions/{args.name}"
    if args.compare:
        result = compare(url, token, image, args.requests, args.concurrency, args.rounds)
    else:
        result = run_load(url, token, image, args.requests, args.concurrency, MODES[args.mode],
                          deadline_s=args.deadline)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.compare:
        for mode, row in result.items():
            print(f"{mode:12s} {row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  p99 "
                  f"{row['p99_ms']:7.2f} ms  {row['throughput_vs_prediction']:.3f}x of prediction only  "
                  f"failures {row['failures']}/{row['requests']}")
    else:
        print(f"{result['ok']}/{result['requests']} ok, {result['requests_per_s']:.1f} req/s, p50 "
              f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, statuses {result['statuses']}")
    failures = result["failures"] if not args.compare else sum(r["failures"] for r in result.values())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
