"""tools/reproduce.py end to end on a tiny budget: several seeds, intervals, every layout, tables from the JSON."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specformer_deploy.artifact.plots import plot_sigma_per_layer, sigma_curves
from specformer_deploy.robustness.evaluate import PROTOCOLS, evaluate_model, load_attack_model
from specformer_deploy.robustness.statistics import Interval, paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("Vanilla", "MSVP (ours)", "L2-MHA", "LNFormer (LipschitzNorm)", "LipsFormer (SCSA)")


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = _load_reproduce()


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _row(report: str, name: str, after: str = "") -> list[str]:
    """Cells of the first table row named ``name`` below the line containing ``after``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    line = next(line for line in lines[start:] if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _cached_evaluations(run: Path) -> dict[str, tuple[Path, dict]]:
    """``{"standard" | "strong": (file, content)}`` of a run's evaluation cache, told apart by their attacks."""
    found = {}
    for path in run.glob("eval-*.json"):
        content = json.loads(path.read_text())
        kind = "standard" if content["key"]["attacks"] == PROTOCOLS["standard"] else "strong"
        found[kind] = (path, content)
    return found


def _interval(low: float, high: float) -> Interval:
    return Interval(difference=(low + high) / 2, low=low, high=high, level=0.95, resamples=100, seeds=3, images=500)


def test_claim_verdict_reads_the_interval_against_the_paper_s_direction() -> None:
    # Paper: robust accuracy up, clean accuracy not down. Hand-made intervals, in accuracy units.
    groups = [("standard", {"clean": _interval(0.004, 0.03), "pgd:0.1:40": _interval(-0.2, -0.05),
                            "pgd:0.3:40": _interval(-0.01, 0.02)}, True),
              ("adversarial", {"clean": _interval(-0.06, -0.001), "pgd:8/255:20": _interval(0.01, 0.1)}, True),
              ("standard (stronger attacks)", {"clean": _interval(-0.5, -0.4), "pgd-l2:1.58:40": _interval(0, 0.1)},
               False)]
    rows = reproduce._claim_rows(groups)
    assert [(training, measure, verdict) for training, measure, _, verdict in rows] == [
        ("standard", "clean", "matches"),
        ("standard", "pgd:0.1:40", "contradicts"),
        ("standard", "pgd:0.3:40", "not distinguishable from 0 at this sample size"),
        ("adversarial", "clean", "contradicts"),
        ("adversarial", "pgd:8/255:20", "matches"),
        # An interval touching 0 does not exclude it; the stronger attacks' clean row is the protocol's.
        ("standard (stronger attacks)", "pgd-l2:1.58:40", "not distinguishable from 0 at this sample size")]
    overall = reproduce.overall_sentence([(f"{t}: {m}", v) for t, m, _, v in rows])
    assert overall == ("Overall: 2 of 6 rows match the paper's claim (standard: clean; adversarial: pgd:8/255:20), "
                       "2 of 6 contradict it (standard: pgd:0.1:40; adversarial: clean), 2 are not distinguishable "
                       "from 0 at this sample size.")
    unclear = "not distinguishable from 0 at this sample size"
    assert reproduce.overall_sentence([("a", "matches"), ("b", "matches")]) == \
        "Overall: all 2 rows match the paper's claim."
    assert reproduce.overall_sentence([("a", unclear)]).startswith("Overall: none of the 1 rows tells MSVP")
    assert reproduce.overall_sentence([("a", "matches"), ("b", unclear)]) == (
        "Overall: 1 of 2 rows match the paper's claim (a), none contradicts it, 1 are not distinguishable from 0 "
        "at this sample size.")
    section = reproduce._claim_section(rows)
    assert "| standard | clean | not down | +1.70 | [+0.40, +3.00] | matches |" in section
    assert "| standard | pgd:0.1:40 | up | -12.50 | [-20.00, -5.00] | contradicts |" in section


def test_sigma_curves_take_max_over_heads_per_seed_then_spread_over_seeds(tmp_path: Path) -> None:
    # Two seeds, two layers, two heads: the per-seed curve is the max over heads of each layer.
    seed_a = {"sigma_q": [[1.0, 3.0], [2.0, 0.5]], "sigma_k": [[1.0, 1.0], [1.0, 1.0]], "sigma_v": [[0, 1], [1, 0]]}
    seed_b = {"sigma_q": [[5.0, 0.0], [1.0, 1.5]], "sigma_k": [[2.0, 0.0], [0.0, 2.0]], "sigma_v": [[1, 1], [1, 1]]}
    mean, low, high = sigma_curves([seed_a, seed_b], "q")
    assert mean.tolist() == [4.0, 1.75] and low.tolist() == [3.0, 1.5] and high.tolist() == [5.0, 2.0]
    mean, low, high = sigma_curves([seed_a], "k")
    assert mean.tolist() == low.tolist() == high.tolist() == [1.0, 1.0]
    # One dict per model (the audit's call) and one list of seeds per model (the reproduction's) both draw.
    single = plot_sigma_per_layer([("a", seed_a)], tmp_path / "single.png")
    spread = plot_sigma_per_layer([("a", [seed_a, seed_b]), ("b", seed_b)], tmp_path / "spread.png")
    assert single.read_bytes()[:4] == spread.read_bytes()[:4] == b"\x89PNG"
    assert single.read_bytes() != spread.read_bytes()
    assert np.isclose(sigma_curves([seed_a, seed_b], "v")[0], [1.0, 1.0]).all()


@pytest.mark.slow
def test_reproduce_with_two_seeds_reports_spread_and_intervals_from_the_json(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    _reproduce("--out", str(out), "--seeds", "0,1", "--epochs", "1", "--adv-epochs", "0", "--no-sweep",
               "--limit", "24", "--strong-attacks", "pgd:0.1:2", "--strong-limit", "8")
    data = json.loads((out / "results.json").read_text())
    assert [spec["spec"] for spec in data["strong_attacks"]] == ["pgd:0.1:2"]
    for name in MODELS:
        for seed in ("0", "1"):
            strong = data["standard"][name][seed], data["strong"][name][seed]
            assert set(strong[1]["correct"]) == {"clean", "pgd:0.1:2"}
            assert all(len(v) == 8 for v in strong[1]["correct"].values())
            # The same images and rule as the standard protocol: clean verdicts agree on the shared images.
            assert strong[1]["correct"]["clean"] == strong[0]["correct"]["clean"][:8]
            assert all(c >= a for c, a in zip(strong[1]["correct"]["clean"], strong[1]["correct"]["pgd:0.1:2"]))
    wall = data["wall_time"]
    assert len(wall["runs"]) == 10 and wall["total_s"] == pytest.approx(wall["train_s"] + wall["evaluate_s"])
    epochs = (out / "std-vanilla" / "metrics.jsonl").read_text().splitlines()
    train_s = sum(json.loads(line)["time_s"] for line in epochs)
    cached = _cached_evaluations(out / "std-vanilla")
    assert set(cached) == {"standard", "strong"}
    assert wall["runs"]["std-vanilla"] == {
        "train_s": pytest.approx(train_s),
        "evaluate_s": pytest.approx(sum(c["evaluation"]["evaluate_s"] for _, c in cached.values()))}
    assert data["machine"]["cpu_count"] >= 1
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
    assert "Stronger attacks (standard training, first 8 test images; PGD step size 2.5·eps/steps, one random " \
           "start; budgets in pixels in [0, 1] of the 1x16x16 model input)" in report  # digits: one grey channel
    assert data["input_shape"] == [1, 16, 16]
    assert "Stronger attacks: MSVP − vanilla, paired, 2 seed(s) × 8 test images" in report
    assert "### Does MSVP's effect match the paper's claim?" in report and "\nOverall: " in report
    strong_row = _row(report, "standard (stronger attacks)", after="Does MSVP's effect")
    strong_interval = paired_bootstrap([data["strong"]["MSVP (ours)"][s]["correct"]["pgd:0.1:2"] for s in ("0", "1")],
                                       [data["strong"]["Vanilla"][s]["correct"]["pgd:0.1:2"] for s in ("0", "1")])
    assert strong_row[1:] == ["pgd:0.1:2", "up", f"{100 * strong_interval.difference:+.2f}",
                              f"[{100 * strong_interval.low:+.2f}, {100 * strong_interval.high:+.2f}]",
                              reproduce.claim_verdict(strong_interval)]
    assert re.search(r"Wall time: [0-9.]+ h \([0-9]+ s: training [0-9]+ s, evaluation [0-9]+ s, summed over 10 runs",
                     report)
    assert f"{data['machine']['cpu_affinity']} of {data['machine']['cpu_count']} CPUs usable" in report

    # The tables are rendered from the JSON: edit it, regenerate without training, see the edit.
    edited = tmp_path / "edited"
    edited.mkdir()
    msvp = data["standard"]["MSVP (ours)"]
    for seed in ("0", "1"):
        msvp[seed]["accuracy"]["clean"] = 0.5
        msvp[seed]["correct"]["clean"] = [1] * 24
    data["standard"]["Vanilla"]["1"]["accuracy"]["clean"] = 0.25
    # A strong-attack verdict per image: MSVP resists every attacked image, vanilla none.
    for seed in ("0", "1"):
        data["strong"]["MSVP (ours)"][seed]["correct"]["pgd:0.1:2"] = [1] * 8
        data["strong"]["MSVP (ours)"][seed]["accuracy"]["pgd:0.1:2"] = 1.0
        data["strong"]["Vanilla"][seed]["correct"]["pgd:0.1:2"] = [0] * 8
        data["strong"]["Vanilla"][seed]["accuracy"]["pgd:0.1:2"] = 0.0
    vanilla_q = [max(map(max, data["sigmas"]["Vanilla"][s]["sigma_q"])) for s in ("0", "1")]
    data["sigmas"]["Vanilla"]["0"]["sigma_q"][0][0] = 9.0
    (edited / "results.json").write_text(json.dumps(data))
    _reproduce("--from-json", str(edited / "results.json"))
    regenerated = (edited / "results.md").read_text()
    assert _row(regenerated, "MSVP (ours)")[1] == "50.00 ± 0.00"
    new_mean, new_sd = 100 * (vanilla_clean[0] + 0.25) / 2, 100 * abs(vanilla_clean[0] - 0.25) / 2 ** 0.5
    assert _row(regenerated, "Vanilla")[1] == f"{new_mean:.2f} ± {new_sd:.2f}"
    vanilla_correct = [data["standard"]["Vanilla"][s]["correct"]["clean"] for s in ("0", "1")]
    gap = 100 * (1 - sum(map(sum, vanilla_correct)) / 48)
    assert re.search(rf"\| clean \| \+{gap:.2f} \|", regenerated)
    assert _row(regenerated, "MSVP (ours)", after="Stronger attacks (")[2] == "100.00 ± 0.00"
    assert _row(regenerated, "Vanilla", after="Stronger attacks (")[2] == "0.00 ± 0.00"
    assert _row(regenerated, "standard (stronger attacks)", after="Does MSVP's effect")[3:] == [
        "+100.00", "[+100.00, +100.00]", "matches"]
    assert _row(regenerated, "Vanilla", after="Figure 2a numbers")[1] == \
        f"{(9.0 + vanilla_q[1]) / 2:.3f} ± {abs(9.0 - vanilla_q[1]) / 2 ** 0.5:.3f}"
    overall = regenerated.split("\nOverall: ")[1].splitlines()[0]
    assert overall.startswith("all ") or "standard (stronger attacks): pgd:0.1:2" in overall.split("contradict")[0]
    assert (edited / "fig2a.png").read_bytes()[:4] == b"\x89PNG"

    # The evaluation cache: a reused run's evaluation is read back (a marker written into the cached
    # file shows up), unless its weights changed (the marker is ignored and the run attacked again).
    msvp_file, msvp_cached = _cached_evaluations(out / "std-msvp-ours")["standard"]
    msvp_cached["evaluation"]["accuracy"]["clean"] = 0.123
    msvp_file.write_text(json.dumps(msvp_cached))
    vanilla_file, vanilla_cached = _cached_evaluations(out / "std-vanilla")["standard"]
    vanilla_cached["evaluation"]["accuracy"]["clean"] = 0.123
    vanilla_file.write_text(json.dumps(vanilla_cached))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "std-vanilla" / "model.safetensors"))
    name = next(k for k in weights if k.endswith("head.weight"))
    weights[name] = weights[name] + 0.05
    save_file(weights, str(out / "std-vanilla" / "model.safetensors"))

    # Seed 0 alone, with adversarial training and the lambda sweep: the single-seed layouts, reusing
    # the standard runs trained above.
    single = _reproduce("--out", str(out), "--seeds", "0", "--epochs", "1", "--adv-epochs", "1", "--adv-steps", "1",
                        "--limit", "24", "--adv-limit", "8")
    assert "reusing" in single.stderr and "training" in single.stderr
    assert f"reusing evaluation {msvp_file}" in single.stderr
    assert f"reusing evaluation {vanilla_file}" not in single.stderr
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["standard"]["MSVP (ours)"]["0"]["accuracy"]["clean"] == 0.123
    assert rerun["wall_time"]["runs"]["std-msvp-ours"]["evaluate_s"] == msvp_cached["evaluation"]["evaluate_s"]
    recomputed = rerun["standard"]["Vanilla"]["0"]
    assert recomputed["accuracy"]["clean"] == sum(recomputed["correct"]["clean"]) / 24 != 0.123
    assert len(list((out / "std-vanilla").glob("eval-*.json"))) == 3
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


def test_a_run_killed_before_its_first_epoch_is_trained_again_not_resumed(tmp_path: Path) -> None:
    """A run directory with no finished epoch (no checkpoint.pt) holds nothing to resume: the
    reproduction trains it from scratch instead of stopping with a resume error."""
    from specformer_deploy.training.train import TrainConfig

    run = tmp_path / "std-vanilla"
    run.mkdir()
    (run / "config.json").write_text("{}")
    cfg = TrainConfig(epochs=1, batch_size=128, warmup_epochs=0, msvp=False, seed=3)
    assert reproduce._run(tmp_path, "std-vanilla", cfg) == run
    assert (run / "checkpoint.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
