"""tools/smoothing_study.py: the grid end to end on a tiny budget, reuse, tables from the JSON, the targets."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from specformer_deploy.robustness.statistics import paired_bootstrap
from specformer_deploy.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "specformer-tiny", "--dataset", "digits", "--sigmas", "0.25", "--msvp", "both", "--epochs", "1",
        "--n", "200", "--n0", "20", "--limit", "8", "--radii", "0.1,0.3",
        "--override", "all:batch_size=128", "--bootstrap-resamples", "2000"]
TWO_SEEDS = [*TINY, "--seeds", "0,1"]
HAS_OBJECTIVES = "smoothing_objective" in {f.name for f in fields(TrainConfig)}


def _tool():
    spec = importlib.util.spec_from_file_location("smoothing_study", ROOT / "tools" / "smoothing_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _study(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "smoothing_study.py"), *args],
                            capture_output=True, text=True, timeout=900)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _row(report: str, *first: str) -> list[str]:
    prefix = "| " + " | ".join(first) + " |"
    line = next(line for line in report.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _certified(records: list[dict], r: float) -> float:
    return float(np.mean([not x["abstain"] and x["label"] == x["true_label"] and x["radius"] >= r for x in records]))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    _study("--out", str(out), "--objectives", "gaussian", *TWO_SEEDS)
    return out


@pytest.mark.slow
def test_grid_writes_every_number_and_renders_tables_from_them(study: Path) -> None:
    data = json.loads((study / "results.json").read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["options"]["n"] == 200
    names = sorted(c["run"] for c in data["cells"])
    assert names == sorted(f"gaussian-sigma0.25-{m}-seed{s}" for m in ("msvp", "vanilla") for s in (0, 1))
    for cell in data["cells"]:
        summary = cell["smoothing"]
        assert (study / cell["run"] / "export" / "model.onnx").is_file()
        assert cell["train_seconds"] > 0 and cell["certify_seconds_per_image"] > 0
        assert [r["index"] for r in summary["per_image"]] == list(range(8))
        for r, accuracy in zip((0.1, 0.3), summary["certified_accuracy"]):
            assert accuracy == pytest.approx(_certified(summary["per_image"], r))
        for record in summary["per_image"]:  # Cohen et al.'s radius, recomputed with scipy
            if not record["abstain"]:
                p_lower = stats.beta.ppf(0.001, record["count"], 200 - record["count"] + 1)
                assert record["radius"] == pytest.approx(0.25 * stats.norm.ppf(p_lower), rel=1e-6)
    report = (study / "results.md").read_text()
    by_key = {(c["msvp"], c["seed"]): c["smoothing"]["per_image"] for c in data["cells"]}
    for msvp, text in ((False, "off"), (True, "on")):
        row = _row(report, "gaussian", text)
        values = [100 * _certified(by_key[(msvp, s)], 0.1) for s in (0, 1)]
        assert row[4] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    on = [[int(_certified([x], 0.1)) for x in by_key[(True, s)]] for s in (0, 1)]
    off = [[int(_certified([x], 0.1)) for x in by_key[(False, s)]] for s in (0, 1)]
    expected = paired_bootstrap(on, off, resamples=2000)
    row = _row(report, "0.25", "gaussian", "r = 0.1")
    assert row[4] == f"{100 * (np.mean(on) - np.mean(off)):+.1f}"
    assert row[5] == f"[{100 * expected.low:+.1f}, {100 * expected.high:+.1f}]"
    assert "### Targets" in report and "this study ran on `digits`" in report
    assert (study / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerun_reuses_runs_exports_and_certificates(study: Path) -> None:
    files = sorted(study.glob("*/export/model.onnx")) + sorted(study.glob("*/checkpoint.pt"))
    before = {f: f.stat().st_mtime_ns for f in files}
    result = _study("--out", str(study), "--objectives", "gaussian", *TWO_SEEDS)
    assert "training" not in result.stderr and "exporting" not in result.stderr
    assert result.stderr.count("reusing certification") == 4
    assert {f: f.stat().st_mtime_ns for f in files} == before
    # Another configuration under the same run names is refused, not silently reused.
    clash = _study("--out", str(study), "--objectives", "gaussian", *TWO_SEEDS, "--lambda-msvp", "0.5", ok=False)
    assert clash.returncode != 0 and "was trained with other options" in clash.stderr
    assert "lambda_q" in clash.stderr


@pytest.mark.slow
def test_from_json_renders_an_edited_radius(study: Path, tmp_path: Path) -> None:
    data = json.loads((study / "results.json").read_text())
    for cell in data["cells"]:
        if not cell["msvp"]:
            for record in cell["smoothing"]["per_image"]:
                record.update(label=record["true_label"], abstain=False, radius=0.2)
    (tmp_path / "results.json").write_text(json.dumps(data))
    shutil.copy(study / "results.md", tmp_path / "before.md")
    _study("--from-json", str(tmp_path / "results.json"))
    report = (tmp_path / "results.md").read_text()
    assert report != (tmp_path / "before.md").read_text()
    row = _row(report, "gaussian", "off")
    assert row[4:6] == ["100.0 ± 0.0", "0.0 ± 0.0"]
    msvp_cells = [c["smoothing"]["per_image"] for c in data["cells"] if c["msvp"]]
    gap = 100 * (np.mean([_certified(records, 0.1) for records in msvp_cells]) - 1.0)
    assert _row(report, "0.25", "gaussian", "r = 0.1")[4] == f"{gap:+.1f}"
    assert (tmp_path / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_study_without_predict_says_so_and_keeps_the_certified_columns(study: Path, tmp_path: Path) -> None:
    """``--no-predict`` records no smoothed-clean figure: the table says it was skipped (it does
    not print 0) and the paired differences cover the radii only."""
    data = json.loads((study / "results.json").read_text())
    for cell in data["cells"]:
        cell["smoothing"]["smoothed_clean_accuracy"] = None
        cell["smoothing"]["options"]["predict"] = False
        for record in cell["smoothing"]["per_image"]:
            record.update(predict_label=None, predict_abstain=None)
    (tmp_path / "results.json").write_text(json.dumps(data))
    _study("--from-json", str(tmp_path / "results.json"))
    report = (tmp_path / "results.md").read_text()
    before = (study / "results.md").read_text()
    assert _row(report, "gaussian", "off")[3] == "skipped (--no-predict)"
    assert _row(report, "gaussian", "off")[4:] == _row(before, "gaussian", "off")[4:]
    assert not any(line.startswith("| 0.25 | gaussian | smoothed clean") for line in report.splitlines())
    assert any(line.startswith("| 0.25 | gaussian | smoothed clean") for line in before.splitlines())
    assert _row(report, "0.25", "gaussian", "r = 0.1") == _row(before, "0.25", "gaussian", "r = 0.1")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OBJECTIVES, reason="TrainConfig has no smoothing_objective field yet (issue 14 part B)")
def test_consistency_extends_the_grid_and_reuses_the_gaussian_cells(study: Path) -> None:
    # One seed keeps the smoke test short: consistency training runs several noisy copies per image.
    result = _study("--out", str(study), "--objectives", "gaussian,consistency", *TINY, "--seeds", "0")
    assert result.stderr.count("reusing certification") == 2  # the gaussian cells of seed 0
    data = json.loads((study / "results.json").read_text())
    assert sorted({c["objective"] for c in data["cells"]}) == ["consistency", "gaussian"]
    config = json.loads((study / "consistency-sigma0.25-msvp-seed0" / "config.json").read_text())["train"]
    assert config["smoothing_objective"] == "consistency" and config["noise_sd"] == 0.25
    report = (study / "results.md").read_text()
    assert _row(report, "consistency", "on")[2] == "0"
    assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", _row(report, "consistency", "on")[4])  # one seed: CP interval
    assert _row(report, "0.25", "consistency", "r = 0.1")[3] == "1"


def _record(correct: bool, radius: float | None) -> dict:
    return {"true_label": 1, "label": 1 if correct else 2, "abstain": radius is None, "radius": radius}


def _cell(objective: str, msvp: bool, seed: int, at_158: int, at_1: int) -> dict:
    """Ten images: ``at_158`` certified correct beyond 1.58, ``at_1 - at_158`` between 1.0 and 1.58,
    one certified with a wrong label at a large radius, the rest abstained."""
    records = [_record(True, 2.0)] * at_158 + [_record(True, 1.2)] * (at_1 - at_158) + [_record(False, 3.0)]
    records += [_record(True, None)] * (10 - len(records))
    return {"objective": objective, "sigma": 1.0, "msvp": msvp, "seed": seed, "smoothing": {"per_image": records}}


def test_targets_paragraph_from_a_hand_made_json() -> None:
    tool = _tool()
    results = {"options": {"dataset": "mnist", "objectives": ["gaussian", "consistency"]},
               "cells": [_cell("gaussian", False, 0, 3, 8), _cell("consistency", True, 0, 5, 6),
                         _cell("consistency", True, 1, 4, 8)]}
    text = tool.targets_paragraph(results)
    assert ("At L2 r = 1.58: best certified accuracy 45.0% (consistency, sigma 1, MSVP, mean of 2 seeds); "
            "target 40%: met, 5.0 points above.") in text
    assert re.search(r"Stretch goal 62\.8% \(GloRo's [^)]*48\.2%\): not met, 17\.8 points short\.", text)
    assert ("At L2 r = 1: best certified accuracy 80.0% (gaussian, sigma 1, vanilla, mean of 1 seed); "
            "target 65%: met, 15.0 points above.") in text
    assert "this study ran on" not in text
    results["cells"] = results["cells"][:1]
    results["options"]["dataset"] = "digits"
    text = tool.targets_paragraph(results)
    assert "best certified accuracy 30.0%" in text and "target 40%: not met, 10.0 points short." in text
    assert "this study ran on `digits`" in text


def test_objectives_refuse_fields_train_config_lacks() -> None:
    tool = _tool()
    with pytest.raises(SystemExit, match="no_such_field"):
        tool.resolve_objectives(["gaussian"], [tool.parse_override("gaussian:no_such_field=1")])
    with pytest.raises(SystemExit, match="neither built in"):
        tool.resolve_objectives(["mystery"], [])
    name, values = tool.parse_override("cons-l20:smoothing_objective=consistency,consistency_lambda=20")
    assert (name, values) == ("cons-l20", {"smoothing_objective": "consistency", "consistency_lambda": 20})
    assert tool.resolve_objectives(["gaussian"], [("all", {"batch_size": 64})]) == {"gaussian": {"batch_size": 64}}


def _study_json(objectives: list[str], seeds: list[int], n: int = 1000, overrides: dict | None = None) -> dict:
    options = {"model": "specformer-mnist", "dataset": "mnist", "epochs": 20, "lambda_msvp": 1e-3, "n": n, "n0": 100,
               "alpha": 0.001, "limit": 10, "predict": False, "objectives": objectives, "seeds": seeds,
               "sigmas": [1.0], "objective_overrides": overrides or {o: {} for o in objectives}}
    cells = [{**_cell(o, m, k, 2, 5), "run": f"{o}-sigma1-{'msvp' if m else 'vanilla'}-seed{k}"}
             for o in objectives for m in (False, True) for k in seeds]
    return {"options": options, "cells": cells}


def test_merge_unites_grids_and_refuses_incomparable_studies() -> None:
    """Three seeds of two objectives and one seed of a costlier third make one report; studies
    certified with another n, or naming an objective differently, are refused."""
    tool = _tool()
    three = _study_json(["gaussian", "consistency"], [0, 1, 2])
    one = _study_json(["gaussian", "consistency", "smoothadv"], [0])
    merged = tool.merge_results([three, one])
    assert merged["options"]["objectives"] == ["gaussian", "consistency", "smoothadv"]
    assert merged["options"]["seeds"] == [0, 1, 2]
    runs = [c["run"] for c in merged["cells"]]
    assert len(runs) == len(set(runs)) == 2 * 2 * 3 + 2
    assert three["options"]["objectives"] == ["gaussian", "consistency"]  # inputs untouched
    with pytest.raises(ValueError, match="different n"):
        tool.merge_results([three, _study_json(["smoothadv"], [0], n=10_000)])
    with pytest.raises(ValueError, match="objective 'smoothadv' means"):
        tool.merge_results([one, _study_json(["smoothadv"], [1], overrides={"smoothadv": {"smoothadv_steps": 2}})])
