"""Shared output helpers of the benchmarks in tools/ (they are scripts, not a package)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
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
