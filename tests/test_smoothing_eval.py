"""Certified accuracy (`evaluate --smoothing`): the table against a classifier whose smoothed
radii are known in closed form, its intervals against statsmodels, sharding, and (slow) a real
noise-trained model attacked just inside its certified radius."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from specformer_deploy.robustness.smoothing_eval import (
    SmoothingEvalOptions,
    certified_radii,
    certify_images,
    interval,
    parse_radii,
    summarize,
)
from specformer_deploy.serving.sampler import NoiseSampler

SIZE = 4  # [3, 4, 4] pixels: 48 dimensions


def _linear_runtime(w: np.ndarray, b: float, path: Path) -> SimpleNamespace:
    """A real ONNX Runtime session of the two-class linear classifier ``[w.x + b > 0]`` (logits
    ``[0, w.x + b]``). Its smoothed classifier is known in closed form: ``g = f`` and the true
    robust radius of ``g`` at ``x`` is the distance to the hyperplane, ``|w.x + b| / ||w||``."""
    weights = np.stack([np.zeros_like(w), w], axis=1).astype(np.float32)  # [d, 2]
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["scores"]),
             helper.make_node("Add", ["scores", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                              ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                              [numpy_helper.from_array(weights, "W"),
                               numpy_helper.from_array(np.array([0.0, b], dtype=np.float32), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return SimpleNamespace(sampler=NoiseSampler(path, streams=2), class_names=["below", "above"])


@pytest.fixture(scope="module")
def linear_case(tmp_path_factory):
    rng = np.random.default_rng(11)
    w = rng.normal(size=3 * SIZE * SIZE)
    images = rng.uniform(size=(40, 3, SIZE, SIZE)).astype(np.float32)
    b = -float(w @ np.full(w.size, 0.5))
    margin = images.reshape(40, -1).astype(np.float64) @ w + b
    runtime = _linear_runtime(w, b, tmp_path_factory.mktemp("linear") / "linear.onnx")
    return runtime, images, (margin > 0).astype(int), np.abs(margin) / np.linalg.norm(w)


def test_certified_accuracy_of_a_linear_classifier_matches_its_closed_form(linear_case) -> None:
    """Every certified radius is below the true one and, away from the hyperplane and from the
    largest radius n samples can certify, within a few percent of it; so the table sits just below the true fraction of
    images whose distance to the hyperplane is >= r, and PREDICT returns the true label."""
    runtime, images, labels, true_radius = linear_case
    options = SmoothingEvalOptions(sigma=0.25, n=20_000, n0=100, alpha=0.001, radii=(0.0, 0.1, 0.2, 0.3, 0.5))
    records = certify_images(runtime, images, labels, range(len(images)), options)
    table = summarize(records, options)
    radius = np.array([r["radius"] for r in records])
    assert all(r["label"] == y for r, y in zip(records, labels) if not r["abstain"])
    assert (radius <= true_radius + 1e-9).all()
    # Away from the hyperplane (n0 = 100 picks the right class) and from the largest certifiable radius.
    reachable = (true_radius > 0.1) & (true_radius < 0.8 * table["max_radius_for_n"])
    assert reachable.sum() >= 15
    assert (np.abs(radius - true_radius)[reachable] <= 0.05 * true_radius[reachable] + 0.01).all()
    for r, accuracy in zip(options.radii, table["certified_accuracy"]):
        truth = float((true_radius >= r).mean())
        assert truth - 0.1 <= accuracy <= truth, (r, accuracy, truth)
    np.testing.assert_array_equal(certified_radii(records) >= 0, radius > 0)  # every certified label is right
    far = true_radius > 0.05
    assert all(r["predict_label"] == y for r, y, f in zip(records, labels, far) if f)
    assert table["certified_accuracy"][0] <= table["smoothed_clean_accuracy"]
    assert table["base_clean_accuracy"] == 1.0


def test_the_table_does_not_depend_on_how_the_images_are_sharded(linear_case) -> None:
    """Each image's noise comes from (seed, image index): two ranks' shards give the records one
    process gives, so a torchrun table equals a single process's."""
    runtime, images, labels, _ = linear_case
    options = SmoothingEvalOptions(sigma=0.5, n=500, n0=50, radii=(0.0, 0.5))
    count = 10

    def strip(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "seconds"} for r in records]

    whole = certify_images(runtime, images[:count], labels[:count], range(count), options)
    shards = [certify_images(runtime, images[rank:count:2], labels[rank:count:2], range(rank, count, 2), options)
              for rank in (0, 1)]
    merged = sorted(shards[0] + shards[1], key=lambda r: r["index"])
    assert strip(merged) == strip(whole)
    assert summarize(merged, options)["certified_accuracy"] == summarize(whole, options)["certified_accuracy"]
    other_seed = certify_images(runtime, images[:count], labels[:count], range(count),
                                SmoothingEvalOptions(sigma=0.5, n=500, n0=50, radii=(0.0, 0.5), seed=1))
    assert [r["count"] for r in other_seed] != [r["count"] for r in whole]


def _counting(runtime) -> tuple[SimpleNamespace, dict[str, int]]:
    """``runtime`` on one stream, with a counter of the images its sampler has classified."""
    counted = {"images": 0}
    sampler = runtime.sampler

    class CountingSampler:
        streams = 1

        def classify(self, batch):
            counted["images"] += batch.shape[0]
            return sampler.classify(batch)

        __call__ = classify

    return SimpleNamespace(sampler=CountingSampler(), class_names=runtime.class_names), counted


def test_skipping_predict_keeps_certify_and_saves_its_samples(linear_case) -> None:
    """A study that skips PREDICT gets the same CERTIFY records (its noise streams are separate)
    for n0 + n forward passes per image instead of n0 + 2n, and no smoothed-clean figure."""
    runtime, images, labels, _ = linear_case
    counting, counted = _counting(runtime)
    options = SmoothingEvalOptions(sigma=0.5, n=400, n0=40, radii=(0.0, 0.5))
    skipped = SmoothingEvalOptions(sigma=0.5, n=400, n0=40, radii=(0.0, 0.5), predict=False)
    count = 6
    full = certify_images(counting, images[:count], labels[:count], range(count), options)
    full_passes, counted["images"] = counted["images"], 0
    fast = certify_images(counting, images[:count], labels[:count], range(count), skipped)
    assert full_passes == count * (40 + 2 * 400 + 1)
    assert counted["images"] == count * (40 + 400 + 1)
    keys = ("label", "abstain", "radius", "count", "base_label")
    assert [{k: r[k] for k in keys} for r in fast] == [{k: r[k] for k in keys} for r in full]
    assert all(r["predict_label"] is None for r in fast)
    table = summarize(fast, skipped)
    assert table["smoothed_clean_accuracy"] is None and table["predict_abstained"] is None
    assert table["certified_accuracy"] == summarize(full, options)["certified_accuracy"]


def test_a_long_certification_records_each_image_as_soon_as_it_is_done(linear_case) -> None:
    """At n = 100,000 an image is minutes of work on a CPU: the journal (``on_record``) must hear of
    the first image after its own samples, not after a group's, so a killed run loses one image.
    Short certifications still group images to fill the n0 selection batches."""
    runtime, images, labels, _ = linear_case
    counting, passes = _counting(runtime)
    heard: list[int] = []

    def hear(_: dict) -> None:
        heard.append(passes["images"])

    long = SmoothingEvalOptions(sigma=0.5, n=100_000, n0=100, radii=(0.0,), predict=False)
    certify_images(counting, images[:3], labels[:3], range(3), long, on_record=hear)
    assert heard == [(100 + 100_000 + 1) * k for k in (1, 2, 3)]
    heard.clear()
    passes["images"] = 0
    short = SmoothingEvalOptions(sigma=0.5, n=1_000, n0=100, radii=(0.0,), predict=False)
    certify_images(counting, images[:3], labels[:3], range(3), short, on_record=hear)
    assert heard == [3 * (100 + 1_000 + 1)] * 3  # one group of three: batches shared, records together


def test_intervals_are_statsmodels_clopper_pearson() -> None:
    from statsmodels.stats.proportion import proportion_confint

    for count, total in ((0, 50), (1, 50), (37, 50), (50, 50), (180, 200)):
        low, high = proportion_confint(count, total, alpha=0.05, method="beta")
        np.testing.assert_allclose(interval(count, total), [low, high], atol=1e-10)


def test_radii_are_parsed_or_refused() -> None:
    assert parse_radii("0, 0.25,0.5") == (0.0, 0.25, 0.5)
    for bad in ("", "0.5,0.25", "0,0", "-0.1", "nan", "a,b"):
        with pytest.raises(ValueError, match="--radii"):
            parse_radii(bad)


# ------------------------------------------------------------------ a real noise-trained model

SIGMA = 0.25


def _cli(*args: str, torchrun: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "specformer_deploy"]
    if torchrun:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
                  f"--master-port={port}", "-m", "specformer_deploy"]
    result = subprocess.run([*prefix, *args, "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def noisy_export(tmp_path_factory) -> Path:
    """A tiny ViT trained with Gaussian noise (sigma 0.25) on digits, exported (about 75% clean test
    accuracy in 12 short epochs: small batches and no MSVP or Mixup fit fastest)."""
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = tmp_path_factory.mktemp("smoothing") / "run"
    train(TrainConfig(epochs=12, batch_size=16, warmup_epochs=1, lr=0.1, msvp=False, mixup=False, noise_sd=SIGMA,
                      seed=0), run, show_progress=False)
    export_run(run, run / "export" / "model.onnx")
    return run


@pytest.mark.slow
def test_pgd_just_inside_the_certified_radius_never_changes_the_smoothed_label(noisy_export: Path) -> None:
    """A check that catches a radius in the wrong space or scale: for up to 20 test images with a
    certified radius r > 0, PGD-L2 on the base model from x at radius 0.9 r, then PREDICT at the
    adversarial point with the same sigma: the certified label or an abstention, never another.
    Certified accuracy at radius 0 is at most the smoothed classifier's clean accuracy, and
    torchrun's sharded table is the single process's."""
    import torch

    from specformer_deploy.attacks import pgd
    from specformer_deploy.serving.runtime import SpecformerRuntime
    from specformer_deploy.serving.smoothing import SmoothingParams, predict
    from specformer_deploy.training.train import load_run_model

    onnx_path = noisy_export / "export" / "model.onnx"
    args = ["evaluate", str(onnx_path), "--smoothing", str(SIGMA), "--num-samples", "500", "--n0", "50", "--limit",
            "40", "--radii", "0,0.25,0.5"]
    table = _cli(*args)
    assert table["trained_sigma"] == SIGMA and table["images"] == 40
    assert table["certified_accuracy"][0] <= table["smoothed_clean_accuracy"]
    certified = [r for r in table["per_image"] if not r["abstain"] and r["radius"] > 0][:20]
    assert len(certified) >= 10, table["per_image"]

    model, _ = load_run_model(noisy_export)
    runtime = SpecformerRuntime(onnx_path)

    def classify(batch: np.ndarray) -> np.ndarray:
        return runtime.session.run(["logits"], {"pixels": batch})[0].argmax(axis=1)

    from specformer_deploy.training.data import load_dataset

    test = load_dataset("digits", 16).test
    moved, flipped_base = [], 0
    for record in certified:
        x = test[record["index"]][0][None]
        y = torch.tensor([record["label"]])
        x_adv = pgd(model, x, y, 0.9 * record["radius"], None, 20, norm="l2",
                    generator=torch.Generator().manual_seed(record["index"]))
        moved.append(float((x_adv - x).flatten().norm()))
        with torch.no_grad():
            flipped_base += int(model(x_adv).argmax(1).item() != record["label"])
        answer = predict(classify, x_adv[0].numpy(), 10, SmoothingParams(sigma=SIGMA, n=1000, seed=record["index"]))
        assert answer["abstain"] or answer["label"] == record["label"], (record, answer, flipped_base)
    radii = np.array([r["radius"] for r in certified])
    assert (np.array(moved) <= 0.9 * radii + 1e-5).all() and (np.array(moved) >= 0.5 * radii).all()

    sharded = _cli(*args, torchrun=2)
    assert sharded["world_size"] == 2

    def strip(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "seconds"} for r in records]

    assert strip(sharded["per_image"]) == strip(table["per_image"])
    assert sharded["certified_accuracy"] == table["certified_accuracy"]


def test_the_results_section_is_regenerated_from_json_alone(linear_case, tmp_path: Path) -> None:
    """tools/certified_accuracy.py: the section between the markers is rebuilt from the saved JSON,
    the same from the evaluate outputs as from its own --json, and the paired MSVP-vanilla p-value is
    statsmodels' exact McNemar test."""
    from statsmodels.stats.contingency_tables import mcnemar

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import certified_accuracy as tool

    runtime, images, labels, _ = linear_case
    paths = []
    for kind, sigma in (("vanilla", 0.25), ("msvp", 0.25)):
        options = SmoothingEvalOptions(sigma=sigma, n=300, n0=30, radii=(0.0, 0.1, 0.2), seed=kind == "msvp")
        table = summarize(certify_images(runtime, images, labels, range(len(images)), options), options,
                          msvp=kind == "msvp", dataset="linear", model=f"{kind}.onnx")
        paths.append(tmp_path / f"{kind}.json")
        paths[-1].write_text(json.dumps(table))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# head\n\n{tool.BEGIN}\nstale\n{tool.END}\n\ntail\n")
    assert tool.main([*map(str, paths), "--results", str(results), "--json", str(tmp_path / "all.json")]) == 0
    first = results.read_text()
    assert first.startswith("# head") and first.endswith("\ntail\n") and "stale" not in first
    assert tool.main(["--from-json", str(tmp_path / "all.json"), "--results", str(results)]) == 0
    assert results.read_text() == first
    vanilla, msvp = (json.loads(p.read_text()) for p in paths)
    row = next(line for line in first.splitlines() if "MSVP - vanilla" in line)
    a, b = certified_radii(vanilla["per_image"]) >= 0.1, certified_radii(msvp["per_image"]) >= 0.1
    expected = mcnemar([[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]],
                       exact=True).pvalue
    assert f"(p {expected:.2g})" in row.split("|")[4]
    assert f"| 0.25 | vanilla | {100 * vanilla['certified_accuracy'][0]:.1f} [" in first
