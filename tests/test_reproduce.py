"""tools/reproduce.py end to end on a tiny budget: several seeds, intervals, every layout, tables from the JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specformer_deploy.robustness.evaluate import PROTOCOLS, evaluate_model, load_attack_model
from specformer_deploy.robustness.statistics import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("Vanilla", "MSVP (ours)", "L2-MHA", "LNFormer (LipschitzNorm)", "LipsFormer (SCSA)")


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_reproduce_with_two_seeds_reports_spread_and_intervals_from_the_json(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    _reproduce("--out", str(out), "--seeds", "0,1", "--epochs", "1", "--adv-epochs", "0", "--no-sweep",
               "--limit", "24")
    data = json.loads((out / "results.json").read_text())
    assert data["options"]["seeds"] == [0, 1]
    for name in MODELS:
        for seed in ("0", "1"):
            run = data["standard"][name][seed]
            assert set(run["accuracy"]) == {"clean", "fgsm:2/255", "pgd:2/255:2"}
            for key, verdicts in run["correct"].items():
                assert len(verdicts) == 24 and set(verdicts) <= {0, 1}
                assert run["accuracy"][key] == pytest.approx(sum(verdicts) / 24)
            # Robust means correct clean and attacked: an attack never turns a wrong answer right.
            assert all(c >= a for c, a in zip(run["correct"]["clean"], run["correct"]["fgsm:2/255"]))
    assert (out / "std-vanilla").is_dir() and (out / "std-vanilla-seed1").is_dir()
    # The per-image verdicts add up to what the evaluate command reports for the same run.
    model, info = load_attack_model(out / "std-vanilla-seed1")
    reference = evaluate_model(model, info, PROTOCOLS["standard"], limit=24)
    assert {k: v for k, v in reference.items() if k != "details"} == data["standard"]["Vanilla"]["1"]["accuracy"]

    report = (out / "results.md").read_text()
    assert "mean ± sample sd over the seeds" in report and "paired two-level percentile bootstrap" in report
    vanilla_clean = [data["standard"]["Vanilla"][s]["accuracy"]["clean"] for s in ("0", "1")]
    mean = 100 * sum(vanilla_clean) / 2
    sd = 100 * abs(vanilla_clean[0] - vanilla_clean[1]) / 2 ** 0.5
    assert _row(report, "Vanilla")[1] == f"{mean:.2f} ± {sd:.2f}"
    expected = paired_bootstrap([data["standard"]["MSVP (ours)"][s]["correct"]["clean"] for s in ("0", "1")],
                                [data["standard"]["Vanilla"][s]["correct"]["clean"] for s in ("0", "1")])
    clean_row = next(line for line in report.splitlines() if line.startswith("| clean | "))
    assert f"[{100 * expected.low:+.2f}, {100 * expected.high:+.2f}]" in clean_row
    assert "MSVP − vanilla, paired, 2 seed(s) × 24 test images" in report

    # The tables are rendered from the JSON: edit it, regenerate without training, see the edit.
    edited = tmp_path / "edited"
    edited.mkdir()
    msvp = data["standard"]["MSVP (ours)"]
    for seed in ("0", "1"):
        msvp[seed]["accuracy"]["clean"] = 0.5
        msvp[seed]["correct"]["clean"] = [1] * 24
    data["standard"]["Vanilla"]["1"]["accuracy"]["clean"] = 0.25
    (edited / "results.json").write_text(json.dumps(data))
    _reproduce("--from-json", str(edited / "results.json"))
    regenerated = (edited / "results.md").read_text()
    assert _row(regenerated, "MSVP (ours)")[1] == "50.00 ± 0.00"
    new_mean, new_sd = 100 * (vanilla_clean[0] + 0.25) / 2, 100 * abs(vanilla_clean[0] - 0.25) / 2 ** 0.5
    assert _row(regenerated, "Vanilla")[1] == f"{new_mean:.2f} ± {new_sd:.2f}"
    vanilla_correct = [data["standard"]["Vanilla"][s]["correct"]["clean"] for s in ("0", "1")]
    gap = 100 * (1 - sum(map(sum, vanilla_correct)) / 48)
    assert re.search(rf"\| clean \| \+{gap:.2f} \|", regenerated)
    assert (edited / "fig2a.png").read_bytes()[:4] == b"\x89PNG"

    # Seed 0 alone, with adversarial training and the lambda sweep: the single-seed layouts, reusing
    # the standard runs trained above.
    single = _reproduce("--out", str(out), "--seeds", "0", "--epochs", "1", "--adv-epochs", "1", "--adv-steps", "1",
                        "--limit", "24", "--adv-limit", "8")
    assert "reusing" in single.stderr and "training" in single.stderr
    report = (out / "results.md").read_text()
    for layout in ("Table 1 layout", "Table 2 layout", "Table 3 layout", "Table 5 layout", "Figure 2a"):
        assert layout in report
    for model in MODELS:
        assert f"| {model} |" in report
    assert " ± " not in _row(report, "Vanilla")[1]
    data = json.loads((out / "results.json").read_text())
    assert set(data["adversarial"]["Vanilla"]["0"]["accuracy"]) == {"clean", "cw:8/255:20", "pgd:8/255:20",
                                                                    "pgd:8/255:100"}
    assert sorted(data["sweep"]) == sorted(["1e-06", "1e-05", "0.0001", "0.001"])
    assert data["step_time"]["Vanilla"]["0"] > 0
    assert "Adversarial training: MSVP − vanilla, paired, 1 seed(s) × 8 test images" in report
    assert (out / "fig2a.png").read_bytes()[:4] == b"\x89PNG"
