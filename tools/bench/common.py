"""Shared output helpers of the benchmarks in tools/ (they are scripts, not a package)."""

from __future__ import annotations

import json
import os
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
