"""`specformer-deploy evaluate`: the paper's protocols on a run directory and on its ONNX export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", "evaluate", *args], capture_output=True,
                          text=True, timeout=600)


def test_run_directory_and_onnx_export_give_the_same_table(exported_pair) -> None:
    run, onnx_file = str(exported_pair["msvp"]["run"]), exported_pair["msvp"]["onnx"]
    a = _evaluate(run, "--limit", "40", "--json")
    b = _evaluate(onnx_file, "--limit", "40", "--json")
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    keys = ["clean", "fgsm:2/255", "pgd:2/255:2"]
    assert [k for k in ra if k != "details"] == keys
    assert all(0.0 <= ra[k] <= 1.0 for k in keys) and ra["pgd:2/255:2"] <= ra["clean"]
    assert all(abs(ra[k] - rb[k]) <= 1 / 40 for k in keys)  # same weights; at most one borderline image
    assert ra["details"]["images"] == 40 and ra["details"]["dataset"] == "digits"


def test_custom_attacks_and_the_adversarial_protocol_names(exported_pair) -> None:
    result = _evaluate(str(exported_pair["msvp"]["run"]), "--limit", "16", "--attack", "pgd:8/255:5",
                       "--attack", "pgd-l2:0.5:5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data)[:3] == ["clean", "pgd:8/255:5", "pgd-l2:0.5:5"]
    assert data["pgd:8/255:5"] <= data["clean"]
    table = _evaluate(str(exported_pair["msvp"]["run"]), "--limit", "8", "--protocol", "adversarial")
    assert table.returncode == 0, table.stderr
    assert "CW-20" in table.stdout and "PGD-100" in table.stdout


def test_bad_specs_and_missing_pt2_are_clear_errors(exported_pair, tmp_path: Path) -> None:
    bad = _evaluate(str(exported_pair["msvp"]["run"]), "--attack", "pgd:80:10")
    assert bad.returncode == 2 and "did you mean 80/255" in bad.stderr
    unknown = _evaluate(str(exported_pair["msvp"]["run"]), "--attack", "deepfool:0.1")
    assert unknown.returncode == 2 and "unknown name" in unknown.stderr
    lonely = tmp_path / "model.onnx"
    shutil.copy(exported_pair["msvp"]["onnx"], lonely)
    missing = _evaluate(str(lonely))
    assert missing.returncode == 2 and "model.pt2" in missing.stderr
