"""docs/RESULTS.md: every measured block is what its saved JSON renders to, never typed by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "render_results.py"


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600)


def test_the_results_document_matches_its_json() -> None:
    result = _render("--check")
    assert result.returncode == 0, result.stderr


def test_an_edited_json_changes_the_document_and_fails_the_check(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    data = json.loads((docs / "results-digits.json").read_text())
    data["standard"]["Vanilla"]["clean"] = 0.1234
    (docs / "results-digits.json").write_text(json.dumps(data))
    stale = _render("--check", "--doc", str(docs / "RESULTS.md"))
    assert stale.returncode == 1 and "reproduce-digits" in stale.stderr
    assert _render("--doc", str(docs / "RESULTS.md")).returncode == 0
    assert "| Vanilla | 12.34 |" in (docs / "RESULTS.md").read_text()
    assert _render("--check", "--doc", str(docs / "RESULTS.md")).returncode == 0
    assert (docs / "fig2a-digits.png").read_bytes()[:4] == b"\x89PNG"


def test_a_block_without_its_end_or_json_is_a_clear_error(tmp_path: Path) -> None:
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- generated:reproduce-digits:begin -->\nno end\n")
    result = _render("--doc", str(doc))
    assert result.returncode == 2 and "without an end marker: reproduce-digits" in result.stderr
    doc.write_text("<!-- generated:reproduce-digits:begin -->\n<!-- generated:reproduce-digits:end -->\n")
    result = _render("--doc", str(doc))
    assert result.returncode == 2 and "results-digits.json, which does not exist" in result.stderr
