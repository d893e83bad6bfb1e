#!/usr/bin/env python
"""Benchmark TorchServe workers: requests/s with W workers against 1, in one run.

Each worker count gets a real ``torchserve --start`` (``tools/serve_local.py``'s
``LocalTorchServe``: the project's config.properties, token auth on) serving the same export
with ``model-config.yaml`` min = max workers = W and one ONNX Runtime thread per worker. The
load is ``tools/load_test.py``'s: N JSON requests at a fixed concurrency, for plain predictions
with certificates and for predictions with a PGD-10 probe (CPU-heavy: the mode where more
workers should pay). Worker counts alternate between rounds so that a noisy machine hits all
alike; the headline is each count's median requests/s relative to 1 worker. The concurrency
must exceed the archive's batch size (8) times the workers, or TorchServe hands every request
to one worker's batch and the others idle (at concurrency 8 two workers gave 1.00x).

On a GPU host pass ``--device-ids 0,1,...``: the archive then asks for one worker per listed
GPU (TorchServe assigns them round-robin) and ``--workers`` is ignored.

    python tools/bench/workers.py --onnx runs/demo/export/model.onnx --workers 1 2
    python tools/bench/workers.py --onnx model.onnx --device-ids 0,1,2,3 --workers 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tools/: load_test, serve_local
from common import emit_json, load_average, machine
from load_test import MODES, default_image, run_load
from serve_local import LocalTorchServe

BENCH_MODES = ("certificate", "probe")


def measure(onnx: str, workers: int, device_ids: list[int] | None, args: argparse.Namespace, root: Path,
            image: bytes) -> dict[str, dict]:
    """Start a server with ``workers`` workers, load it in every mode, stop it."""
    config = {"minWorkers": workers, "maxWorkers": workers}
    server = LocalTorchServe(root, onnx, name="bench", model_config=config, device_ids=device_ids)
    server.start()
    try:
        token = server.key("inference")
        url = f"{server.url}/predictions/bench"
        run_load(url, token, image, args.concurrency * 4, args.concurrency, MODES["certificate"])  # warm-up
        return {mode: run_load(url, token, image, args.requests if mode != "probe" else args.probe_requests,
                               args.concurrency, MODES[mode]) for mode in BENCH_MODES}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="An exported model (model.pt2 beside it).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts (the first is the "
                                                                                 "baseline).")
    parser.add_argument("--device-ids", default=None, help="GPUs for the archive, e.g. 0,1 (one worker per GPU).")
    parser.add_argument("--requests", type=int, default=600, help="Requests per certificate measurement.")
    parser.add_argument("--probe-requests", type=int, default=120, help="Requests per probe measurement.")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="Requests in flight. TorchServe fills a batch (batchSize 8) before another worker "
                             "gets one: keep this above batchSize x workers or the extra workers idle.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", dest="json_target", default=None, help="Write the result as JSON ('-': stdout).")
    args = parser.parse_args()
    console = Console(stderr=True)
    device_ids = [int(i) for i in args.device_ids.split(",")] if args.device_ids else None
    counts = [len(device_ids)] if device_ids else args.workers
    image = default_image()

    samples: dict[int, list[dict[str, dict]]] = {count: [] for count in counts}
    load_before = load_average()
    for round_index in range(args.rounds):
        for count in counts if round_index % 2 == 0 else counts[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                result = measure(args.onnx, count, device_ids, args, Path(tmp), image)
            failures = sum(r["failures"] for r in result.values())
            if failures:
                raise SystemExit(f"{failures} request(s) failed with {count} worker(s): {result}")
            samples[count].append(result)
            console.print(f"round {round_index + 1}/{args.rounds}, {count} worker(s): " + ", ".join(
                f"{mode} {r['requests_per_s']:.1f} req/s" for mode, r in result.items()))

    def median(count: int, mode: str, key: str) -> float:
        return statistics.median(s[mode][key] for s in samples[count])

    table = Table(title=f"TorchServe workers, concurrency {args.concurrency}")
    for column in ("workers", "mode", "requests/s", f"vs {counts[0]} worker(s)", "p50 ms", "p99 ms"):
        table.add_column(column)
    rows = []
    for count in counts:
        for mode in BENCH_MODES:
            rate = median(count, mode, "requests_per_s")
            row = {"workers": count, "mode": mode, "requests_per_s": rate,
                   "ratio": rate / median(counts[0], mode, "requests_per_s"), "p50_ms": median(count, mode, "p50_ms"),
                   "p99_ms": median(count, mode, "p99_ms"), "samples": [s[mode] for s in samples[count]]}
            rows.append(row)
            table.add_row(str(count), mode, f"{rate:.1f}", f"{row['ratio']:.2f}x", f"{row['p50_ms']:.1f}",
                          f"{row['p99_ms']:.1f}")
    console.print(table)
    console.print(f"load average: {load_before} before, {load_average()} after (a shared machine makes these noisy)")
    emit_json({"benchmark": "workers", "onnx": args.onnx, "device_ids": device_ids, "concurrency": args.concurrency,
               "rounds": args.rounds, "rows": rows, "load_average": [load_before, load_average()],
               "environment": machine()},
              args.json_target, console)


if __name__ == "__main__":
    main()
