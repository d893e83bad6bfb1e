"""tools/reproduce.py end to end on a tiny budget: every table and the figure are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_writes_the_paper_layouts(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--out", str(out), "--epochs", "1",
                             "--adv-epochs", "1", "--adv-steps", "1", "--limit", "24", "--adv-limit", "8"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "results.md").read_text()
    for layout in ("Table 1 layout", "Table 2 layout", "Table 3 layout", "Table 5 layout", "Figure 2a"):
        assert layout in report
    for model in ("Vanilla", "MSVP (ours)", "L2-MHA", "LNFormer (LipschitzNorm)", "LipsFormer (SCSA)"):
        assert f"| {model} |" in report
    data = json.loads((out / "results.json").read_text())
    assert set(data["standard"]["Vanilla"]) == {"clean", "fgsm:2/255", "pgd:2/255:2"}
    assert set(data["adversarial"]["Vanilla"]) == {"clean", "cw:8/255:20", "pgd:8/255:20", "pgd:8/255:100"}
    assert sorted(data["sweep"]) == sorted(["1e-06", "1e-05", "0.0001", "0.001"])
    assert data["step_time"]["Vanilla"] > 0
    assert (out / "fig2a.png").read_bytes()[:4] == b"\x89PNG"
