"""tools/smoothing_study.py: the grid end to end on a tiny budget, reuse, tables from the JSON, the targets,
and every radius stated about the data set's own images (CERTIFY's radius / ||A||_2 of the decode)."""

from __future__ import annotations

import importlib.util
import json
import math
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
from specformer_deploy.serving.decode import decode_norm
from specformer_deploy.serving.smoothing import max_radius_for_n
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


def _certified(records: list[dict], r: float, norm: float = 1.0) -> float:
    """Certified accuracy at ``r`` about the data set's image: each radius divided by ``norm``."""
    return float(np.mean([not x["abstain"] and x["label"] == x["true_label"] and x["radius"] / norm >= r
                          for x in records]))


# specformer-tiny on digits: one grey channel at 16x16, from the 8x8 images (the resize's norm is 2).
DIGITS_NORM = decode_norm((1, 8, 8), (1, 16, 16))


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
        assert cell["input_shape"] == [1, 16, 16] and cell["source_shape"] == [1, 8, 8]
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
    assert "about the 1x8x8 image" in report and "resized from 8x8 to 16x16" in report
    for msvp, text in ((False, "off"), (True, "on")):
        row = _row(report, "gaussian", text)
        values = [100 * _certified(by_key[(msvp, s)], 0.1, DIGITS_NORM) for s in (0, 1)]
        assert row[4] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    on = [[int(_certified([x], 0.1, DIGITS_NORM)) for x in by_key[(True, s)]] for s in (0, 1)]
    off = [[int(_certified([x], 0.1, DIGITS_NORM)) for x in by_key[(False, s)]] for s in (0, 1)]
    expected = paired_bootstrap(on, off, resamples=2000)
    row = _row(report, "0.25", "gaussian", "r = 0.1")
    assert row[4] == f"{100 * (np.mean(on) - np.mean(off)):+.1f}"
    assert row[5] == f"[{100 * expected.low:+.1f}, {100 * expected.high:+.1f}]"
    assert "### Targets" in report and "this study ran on `digits`" in report
    assert "published" not in report  # the published figures are MNIST's
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
def test_finished_run_kept_as_weights_only_is_certified_not_retrained(study: Path, tmp_path: Path) -> None:
    """The committed final models (models/) are runs without checkpoint.pt or export: a rerun exports
    them from the weights and certifies the same answers, and never trains them again."""
    out = tmp_path / "out"
    shutil.copytree(study, out)
    for run in out.glob("gaussian-*"):
        (run / "checkpoint.pt").unlink()
        shutil.rmtree(run / "export")
    result = _study("--out", str(out), "--objectives", "gaussian", *TWO_SEEDS)
    assert "training" not in result.stderr and "resuming" not in result.stderr
    assert "starting it afresh" not in result.stderr
    assert result.stderr.count("exporting") == 4
    before = {c["run"]: c["smoothing"]["per_image"] for c in json.loads((study / "results.json").read_text())["cells"]}
    after = {c["run"]: c["smoothing"]["per_image"] for c in json.loads((out / "results.json").read_text())["cells"]}
    assert after == before
    # Weights saved before the last epoch ended are not a finished run: with no training state to
    # resume from, that run starts afresh (and only that one).
    from safetensors.torch import load_file, save_file
    weights = out / "gaussian-sigma0.25-msvp-seed0" / "model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"epoch": "0"})
    result = _study("--out", str(out), "--objectives", "gaussian", *TWO_SEEDS)
    assert result.stderr.count("starting it afresh") == 1 and result.stderr.count("training") == 1


@pytest.mark.slow
def test_from_json_renders_an_edited_radius(study: Path, tmp_path: Path) -> None:
    data = json.loads((study / "results.json").read_text())
    for cell in data["cells"]:
        if not cell["msvp"]:
            for record in cell["smoothing"]["per_image"]:  # 0.4 in the 16x16 grid: 0.2 about the 8x8 image
                record.update(label=record["true_label"], abstain=False, radius=0.4)
    (tmp_path / "results.json").write_text(json.dumps(data))
    shutil.copy(study / "results.md", tmp_path / "before.md")
    _study("--from-json", str(tmp_path / "results.json"))
    report = (tmp_path / "results.md").read_text()
    assert report != (tmp_path / "before.md").read_text()
    row = _row(report, "gaussian", "off")
    # r = 0.3 about the 8x8 image is beyond what n = 200 reaches at sigma 0.25 (0.456 / 2): marked †.
    assert row[4:6] == ["100.0 ± 0.0", "0.0 ± 0.0 †"]
    assert 0.1 < max_radius_for_n(0.25, 200, 0.001) / DIGITS_NORM < 0.3
    msvp_cells = [c["smoothing"]["per_image"] for c in data["cells"] if c["msvp"]]
    gap = 100 * (np.mean([_certified(records, 0.1, DIGITS_NORM) for records in msvp_cells]) - 1.0)
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
def test_a_killed_certification_resumes_from_its_journal(study: Path) -> None:
    """Hours-long certifications (n = 100,000) survive a killed process: each image's record is
    journalled as it is certified, a rerun certifies only the images the journal lacks (a torn last
    line is dropped), and the result equals an uninterrupted run's."""
    from specformer_deploy.robustness.smoothing_eval import SmoothingEvalOptions

    tool = _tool()
    run = study / "gaussian-sigma0.25-msvp-seed0"
    onnx_path = run / "export" / "model.onnx"
    options = SmoothingEvalOptions(sigma=0.25, n=150, n0=20, alpha=0.001, radii=(0.1,), limit=8, seed=0,
                                   dataset="digits", predict=False)

    class Count:
        def __init__(self) -> None:
            self.totals: list[int] = []

        def on_image(self, done: int, total: int) -> None:
            self.totals.append(total)

    whole, digest = tool.certify_cell(run, onnx_path, options, Count())
    cached = run / tool.CACHE_DIR / f"{tool.cache_key(options, digest)}.json"
    journal = cached.with_suffix(".partial.jsonl")
    assert cached.is_file() and not journal.exists()
    cached.unlink()  # as if the process had been killed after five images
    journal.write_text("".join(json.dumps(r) + "\n" for r in whole["per_image"][:5]) + '{"index": 5, "tru')
    counted = Count()
    resumed, _ = tool.certify_cell(run, onnx_path, options, counted)
    assert set(counted.totals) == {3}  # only images 5, 6 and 7 were certified again
    keys = ("index", "label", "abstain", "radius", "count", "p_lower", "base_label")
    assert [{k: r[k] for k in keys} for r in resumed["per_image"]] == \
        [{k: r[k] for k in keys} for r in whole["per_image"]]
    assert resumed["certified_accuracy"] == whole["certified_accuracy"]
    assert cached.is_file() and not journal.exists()


@pytest.mark.slow
def test_another_limit_reuses_the_images_already_certified(study: Path) -> None:
    """A three-seed study on 200 images beside a 500-image cell: the cell's first images are the
    answers a smaller certification would compute (each image's noise comes from its index and the
    seed), so they are reused, not drawn again; a larger limit certifies only the new images."""
    from specformer_deploy.robustness.smoothing_eval import SmoothingEvalOptions

    tool = _tool()
    run = study / "gaussian-sigma0.25-vanilla-seed1"
    onnx_path = run / "export" / "model.onnx"

    class Count:
        def __init__(self) -> None:
            self.totals: list[int] = []

        def on_image(self, done: int, total: int) -> None:
            self.totals.append(total)

    def certify(limit: int, n: int = 120) -> tuple[dict, list[int]]:
        options = SmoothingEvalOptions(sigma=0.25, n=n, n0=20, alpha=0.001, radii=(0.1,), limit=limit, seed=0,
                                       dataset="digits", predict=False)
        counted = Count()
        summary, _ = tool.certify_cell(run, onnx_path, options, counted)
        return summary, counted.totals

    keys = ("index", "label", "abstain", "radius", "count", "p_lower", "base_label")

    def answers(summary: dict) -> list[dict]:
        return [{k: r[k] for k in keys} for r in summary["per_image"]]

    six, totals = certify(6)
    assert set(totals) == {6}
    four, totals = certify(4)
    assert totals == [] and answers(four) == answers(six)[:4] and four["images"] == 4
    eight, totals = certify(8)
    assert set(totals) == {2}  # images 6 and 7 only
    assert answers(eight)[:6] == answers(six)
    # Other options (here n) are other answers: nothing is lent across them.
    _, totals = certify(4, n=130)
    assert set(totals) == {4}


@pytest.mark.slow
def test_a_validation_split_is_refused_for_runs_that_held_none_out(study: Path) -> None:
    result = _study("--out", str(study), "--objectives", "gaussian", *TINY, "--seeds", "0", "--msvp", "on",
                    "--split", "val", ok=False)
    assert result.returncode != 0 and "held out none (train --val-images N)" in result.stderr


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


ONE_CHANNEL = {"input_shape": [1, 28, 28], "source_shape": [1, 28, 28]}
THREE_CHANNELS = {"input_shape": [3, 28, 28], "source_shape": [1, 28, 28]}


def _cell(objective: str, msvp: bool, seed: int, at_158: int, at_1: int, n: int = 100_000,
          shapes: dict | None = None) -> dict:
    """Ten images: ``at_158`` certified correct beyond 1.58, ``at_1 - at_158`` between 1.0 and 1.58,
    one certified with a wrong label at a large radius, the rest abstained (radii in the model's grid)."""
    records = [_record(True, 2.0)] * at_158 + [_record(True, 1.2)] * (at_1 - at_158) + [_record(False, 3.0)]
    records += [_record(True, None)] * (10 - len(records))
    return {"objective": objective, "sigma": 1.0, "msvp": msvp, "seed": seed, **(shapes or ONE_CHANNEL),
            "smoothing": {"per_image": records, "sigma": 1.0, "n": n, "alpha": 0.001}}


def test_targets_paragraph_from_a_hand_made_json() -> None:
    tool = _tool()
    results = {"options": {"dataset": "mnist", "objectives": ["gaussian", "consistency"]},
               "cells": [_cell("gaussian", False, 0, 3, 8), _cell("consistency", True, 0, 5, 6),
                         _cell("consistency", True, 1, 4, 8)]}
    text = tool.targets_paragraph(results)  # one-channel models on MNIST: CERTIFY's radii as they are
    assert ("At L2 r = 1.58 about the 1x28x28 image: best certified accuracy 45.0% (consistency, sigma 1, MSVP, "
            "mean of 2 seeds); target 40%: met, 5.0 points above.") in text
    assert re.search(r"Stretch goal 62\.8% \(GloRo's [^)]*48\.2%\): not met, 17\.8 points short\.", text)
    assert ("At L2 r = 1 about the 1x28x28 image: best certified accuracy 80.0% (gaussian, sigma 1, vanilla, "
            "mean of 1 seed); target 65%: met, 15.0 points above.") in text
    assert "this study ran on" not in text and "optimistic" in text
    assert "published figures above (theirs" in text and "79.1% at r = 1.58" in text
    # Three-channel models of the same grey images: 2.0 in the 3x28x28 grid is 1.155 about the grey
    # image, 1.2 is 0.693, so nothing reaches 1.0 any more.
    for cell in results["cells"]:
        cell.update(THREE_CHANNELS)
    text = tool.targets_paragraph(results)
    assert ("At L2 r = 1.58 about the 1x28x28 image: best certified accuracy 0.0%" in text
            and "target 40%: not met, 40.0 points short." in text)
    assert "At L2 r = 1 about the 1x28x28 image: best certified accuracy 45.0% (consistency" in text
    assert "target 65%: not met, 20.0 points short." in text
    results["cells"] = [_cell("gaussian", False, 0, 3, 8)]
    results["options"]["dataset"] = "digits"
    text = tool.targets_paragraph(results)
    assert "best certified accuracy 30.0%" in text and "target 40%: not met, 10.0 points short." in text
    assert "this study ran on `digits`" in text and "published" not in text


def _full_cell(objective: str, msvp: bool, seed: int, radii: list[float | None], n: int, shapes: dict | None
               ) -> dict:
    """A cell as the study writes it, with one image per radius (None: abstained; negative: certified
    with a wrong label at that radius's size)."""
    records = []
    for index, radius in enumerate(radii):
        wrong = radius is not None and radius < 0
        records.append({"index": index, "true_label": 1, "base_label": 1, "label": 2 if wrong else 1,
                        "abstain": radius is None, "radius": None if radius is None else abs(radius),
                        "predict_label": None, "predict_abstain": None, "seconds": 0.5, "certify_s": 0.5})
    options = {"sigma": 1.0, "n": n, "n0": 100, "alpha": 0.001, "radii": [0.5, 1.0], "limit": len(radii), "seed": seed,
               "batch_size": 1000, "dataset": "mnist", "data_dir": None, "predict": False}
    smoothing = {"per_image": records, "sigma": 1.0, "n": n, "n0": 100, "alpha": 0.001, "images": len(radii),
                 "options": options, "dataset": "mnist"}
    return {"objective": objective, "sigma": 1.0, "msvp": msvp, "seed": seed, "run": f"{objective}-{msvp}-{seed}",
            "train_seconds": 60.0, "seconds_per_image": 0.5, **(shapes or {}), "smoothing": smoothing}


RADII_A = [2.9, 2.5, 2.1, 1.9, 1.7, 1.2, 0.9, 0.6, -2.5, None]
RADII_B = [3.0, 2.8, 2.6, 1.75, 1.74, 1.0, 0.8, None, None, None]


def _mnist_study(shapes: dict | None, n: int = 100_000) -> dict:
    options = {"model": "specformer-mnist", "dataset": "mnist", "epochs": 20, "lambda_msvp": 1e-3, "n": n,
               "n0": 100, "alpha": 0.001, "limit": 10, "predict": False, "objectives": ["smoothadv"], "seeds": [0],
               "sigmas": [1.0], "radii": [0.5, 1.0, 1.58, 2.0], "objective_overrides": {"smoothadv": {}}}
    cells = [_full_cell("smoothadv", False, 0, RADII_A, n, shapes),
             _full_cell("smoothadv", True, 0, RADII_B, n, shapes)]
    return {"options": options, "cells": cells}


def _independent(radii: list[float | None], r: float, divide: float) -> str:
    """Certified accuracy (%) at ``r`` about the grey image, from the records by hand."""
    return f"{100 * sum(1 for x in radii if x is not None and x > 0 and x / divide >= r) / len(radii):.1f}"


def test_a_three_channel_model_of_grey_images_states_radii_about_the_grey_image() -> None:
    """3x28x28 models of 1x28x28 images: every table cell is the per-image radius / sqrt(3) against r;
    the same records of a one-channel model render unchanged; an old JSON without shapes is read as
    three-channel `specformer-mnist` and says it inferred that."""
    tool = _tool()
    three = tool.render(_mnist_study(THREE_CHANNELS))
    header = _row(three, "objective", "MSVP")
    assert header[4:9] == ["r = 0.5", "r = 1", "r = 1.5", "r = 1.58", "r = 2"]  # the published columns
    for text, radii in (("off", RADII_A), ("on", RADII_B)):
        row = _row(three, "smoothadv", text)
        for r, cell in zip((0.5, 1.0, 1.5, 1.58, 2.0), row[4:9]):
            assert cell.split(" [")[0] == _independent(radii, r, math.sqrt(3)), (text, r, cell)
    # r = 1 about the grey image needs sqrt(3) in the grid: 2.9, 2.5, 2.1 and 1.9 (not the wrong label's 2.5).
    assert _row(three, "smoothadv", "off")[5].startswith("40.0 [")
    assert "R / 1.732" in three and "sqrt(3)" in three and "about the 1x28x28 image" in three
    # MSVP − vanilla at r = 1 is computed from the divided radii too (A: 4 of 10, B: 5 of 10).
    assert _row(three, "1", "smoothadv", "r = 1")[4] == "+10.0"

    one = tool.render(_mnist_study(ONE_CHANNEL))
    for text, radii in (("off", RADII_A), ("on", RADII_B)):
        row = _row(one, "smoothadv", text)
        for r, cell in zip((0.5, 1.0, 1.5, 1.58, 2.0), row[4:9]):
            assert cell.split(" [")[0] == _independent(radii, r, 1.0)
    assert "as they are" in one and "sqrt(3)" not in one and "predates" not in one

    legacy = tool.render(_mnist_study(None))
    assert [_row(legacy, "smoothadv", t) for t in ("off", "on")] == [_row(three, "smoothadv", t) for t in ("off", "on")]
    assert "predates recorded shapes" in legacy and "model input 3x28x28" in legacy

    # n = 1,000 reaches 2.463 in the 3x28x28 grid, 1.422 about the grey image: r = 1.5 is beyond it.
    capped = tool.render(_mnist_study(THREE_CHANNELS, n=1000))
    reach = max_radius_for_n(1.0, 1000, 0.001)
    assert f"{reach:.3f} in the model's 3x28x28 input, {reach / math.sqrt(3):.3f} in the 1x28x28 image" in capped
    assert _row(capped, "smoothadv", "off")[6].endswith("†") and not _row(capped, "smoothadv", "off")[5].endswith("†")


def test_published_figures_sit_beside_ours_labelled_as_theirs() -> None:
    tool = _tool()
    report = tool.render(_mnist_study(THREE_CHANNELS))
    assert "### Published figures beside ours (1x28x28, pixels in [0, 1])" in report
    assert "theirs, not measured here" in report and "Jeong & Shin 2020" in report
    assert _row(report, "published (theirs)", "smoothadv", "1")[4:] == ["90.7", "80.8", "64.4", "61.4", "43.3"]
    assert _row(report, "published (theirs)", "gaussian", "0.5")[4:] == ["96.9", "89.8", "67.8", "61.8", "0.0 †"]
    assert _row(report, "published (theirs)", "smoothadv + consistency", "0.5")[8] == "0.0 †"
    ours = _row(report, "measured here", "smoothadv, MSVP", "1")
    assert "4,000 train images" in ours[3] and "n = 100,000" in ours[3] and "3x28x28 input" in ours[3]
    assert ours[5] == _independent(RADII_B, 1.0, math.sqrt(3))
    digits = _mnist_study(THREE_CHANNELS)
    digits["options"]["dataset"] = "digits"
    for cell in digits["cells"]:
        cell.update(input_shape=[3, 16, 16], source_shape=[1, 8, 8])
    assert "published" not in tool.render(digits)


def test_the_n10k_study_restated_about_the_grey_image() -> None:
    """The issue's check: the n = 10,000 SmoothAdv sigma 1.0 MSVP model (3-channel, on MNIST) certifies
    76.6 / 53.2 / 27.2 / 22.8% at r = 0.5 / 1 / 1.5 / 1.58 about the 1x28x28 image."""
    tool = _tool()
    report = tool.render(json.loads((ROOT / "docs" / "smoothing-mnist-n10k.json").read_text()))
    row = _row(report, "smoothadv", "on")
    assert [cell.split(" [")[0] for cell in row[4:8]] == ["76.6", "53.2", "27.2", "22.8"]
    assert row[8].endswith("†")  # r = 2 is beyond n = 10,000's 1.847 about the grey image


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
