"""Shared output helpers of the benchmarks in tools/ (they are scripts, not a package)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def load_average() -> float | None:
    """The 1-minute load average, recorded beside every figure: these machines are shared."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def emit_json(result: dict[str, Any], target: str | None, console: Any) -> None:
    """``--json -`` prints the result on stdout, ``--json PATH`` writes it; no ``--json``, nothing."""
    if target is None:
        return
    text = json.dumps(result, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")
        console.print(f"JSON written to {target}")


def finish(result: dict[str, Any], started: float, render: Callable[[dict[str, Any], Any], None],
           target: str | None, console: Any) -> dict[str, Any]:
    """Every benchmark's ending: the load average after the run (beside the one before), the wall
    time, the table for a person and the JSON for machines."""
    result.setdefault("load_average_1m", {})["after"] = load_average()
    result["wall_time_s"] = time.perf_counter() - started
    render(result, console)
    emit_json(result, target, console)
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1), interpolated linearly between order statistics as
    ``numpy.percentile``'s default does; tail latencies need the same rule in every benchmark."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of latencies given in seconds, in milliseconds (None when empty)."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(seconds), "p50_ms": percentile(seconds, 0.50) * 1e3, "p99_ms": percentile(seconds, 0.99) * 1e3,
            "max_ms": max(seconds) * 1e3}


# ------------------------------------------------------------------ machine and threads

def file_sha256(path: Path) -> str:
    """A file's SHA-256, the key under which a measurement of that exact file is cached."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), the default thread count of the benchmarks."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: Python, OS, processor, CPUs present and usable."""
    import platform

    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_affinity": usable_cpus()}


def versions(*modules: str) -> dict[str, str]:
    """``{module: __version__}`` of the libraries a figure depends on (each is imported)."""
    import importlib

    return {name: str(getattr(importlib.import_module(name), "__version__", "unknown")) for name in modules}


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads when ``threads`` is given; the count torch then uses."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def blas_thread_env(threads: int | None) -> dict[str, str]:
    """This process's environment for a child, its BLAS/OpenMP thread count pinned when given."""
    env = dict(os.environ)
    if threads is not None:
        env.update({key: str(threads) for key in BLAS_THREAD_VARIABLES})
    return env


def pixel_budget(text: str) -> float:
    """argparse type for a Linf radius or step in pixel space, ``8/255`` or ``0.0314``, in (0, 1].

    Parsed by the toolkit's one epsilon parser, so the benchmarks read budgets as the CLI does."""
    import argparse

    from specformer_deploy.budgets import BudgetError, parse_epsilon

    try:
        value = parse_epsilon(text, "the value")
    except BudgetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: pixels lie in [0, 1]")
    return value


# ------------------------------------------------------------------ timing and statistics

def timed_calls(fn: Callable[[], Any], calls: int = 1, sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``calls`` calls of ``fn``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after, so queued GPU work is counted
    in the block that queued it."""
    if sync is not None:
        sync()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - started, time.process_time() - cpu_started


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes: how far repeated measurements of one figure disagree."""
    return {"median": statistics.median(values), "q25": percentile(values, 0.25), "q75": percentile(values, 0.75),
            "min": min(values), "max": max(values)}
