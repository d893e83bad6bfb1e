"""The serving runtime and `certify`: certificates equal the mathematics, probes are real attacks."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from specformer_deploy.attacks import pgd
from specformer_deploy.model.heads import attention_layers, layer_heads
from specformer_deploy.robustness.lipschitz import attention_inputs, jacobian_norm, unfused_attention
from specformer_deploy.serving.bounds import attention_head_bound, layer_bound, paper_head_bound
from specformer_deploy.serving.images import ImageError, decode_image, pixels_from_array
from specformer_deploy.serving.runtime import IntegrityError, ProbeRequest, RequestError, SpecformerRuntime
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.train import load_run_model


@pytest.fixture(scope="module")
def runtime(exported_pair) -> SpecformerRuntime:
    return SpecformerRuntime(exported_pair["msvp"]["onnx"])


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", 16).test


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_certificate_equals_the_bounds_on_the_models_own_tokens(runtime, exported_pair, digits_test) -> None:
    model, _ = load_run_model(exported_pair["msvp"]["run"])
    pixels = digits_test[7][0]
    delta0 = 0.05
    answer = runtime.answer(pixels[None].numpy(), delta0=delta0)[0]
    tokens = attention_inputs(model, pixels)
    for layer, (attn, x0) in enumerate(zip(attention_layers(model), tokens)):
        heads = layer_heads(attn)
        width = heads.num_heads * heads.head_dim
        b_q = attn.qkv.bias.detach()[:width].view(heads.num_heads, heads.head_dim)
        weights = [(heads.qkv[0, h].T, heads.qkv[1, h].T, heads.qkv[2, h].T) for h in range(heads.num_heads)]
        sigma_o = float(torch.linalg.matrix_norm(attn.proj.weight.detach().double(), ord=2))
        bound = layer_bound([attention_head_bound(x0, *w, delta0, b_q=b_q[h]) for h, w in enumerate(weights)], sigma_o)
        paper = layer_bound([paper_head_bound(x0, *w, delta0)[0] for w in weights], sigma_o)
        served = answer["attention_lipschitz"]["layers"][layer]
        assert served["bound"] == pytest.approx(bound, rel=1e-4)
        assert served["paper_bound"] == pytest.approx(paper, rel=1e-4)
        assert served["paper_bound_valid"] is True  # real LayerNorm outputs have ||X0||_F >> 1
    block = answer["attention_lipschitz"]
    assert block["space"].startswith("each attention layer's input") and block["kind"] == "deterministic"
    assert "17 tokens x 64" in block["space"]  # the layers' input shape: 16 patches + class token, dim 64
    assert not {"bound", "paper_bound"} & set(block)  # per layer only: no unlabelled maximum
    assert answer["prediction"]["label"] == int(model(pixels[None]).argmax())


def test_certificate_is_never_below_the_empirical_local_constant(runtime, exported_pair, digits_test) -> None:
    model, _ = load_run_model(exported_pair["msvp"]["run"])
    model.requires_grad_(False)
    pixels = digits_test[3][0]
    layers = runtime.answer(pixels[None].numpy(), delta0=0.0)[0]["attention_lipschitz"]["layers"]
    with unfused_attention(model):
        for layer, (attn, x0) in enumerate(zip(attention_layers(model), attention_inputs(model, pixels))):
            fn = lambda x, a=attn: a(x.unsqueeze(0)).squeeze(0)  # noqa: E731
            lower = jacobian_norm(fn, x0, iterations=20, generator=torch.Generator().manual_seed(layer))
            assert 0 < lower <= layers[layer]["bound"]


def test_probe_is_a_real_attack_consistent_with_offline_pgd(runtime, exported_pair, digits_test) -> None:
    pixels = np.stack([digits_test[i][0].numpy() for i in range(4)])
    labels = runtime.infer(pixels)[0].argmax(axis=1)
    strong = runtime.probe(pixels, labels, ProbeRequest("pgd", eps=0.3, steps=20))
    weak = runtime.probe(pixels, labels, ProbeRequest("pgd", eps=1e-4, steps=5))
    assert all(r["flipped"] and r["margin"] < 0 for r in strong)
    assert not any(r["flipped"] for r in weak) and all(r["margin"] > 0 for r in weak)
    assert all(r["linf_distance"] <= 0.3 + 1e-6 for r in strong)
    # offline: the same PGD on the run's own PyTorch model gives the same adversarial label
    model, _ = load_run_model(exported_pair["msvp"]["run"])
    for i in range(4):
        adv = pgd(model, torch.from_numpy(pixels[i: i + 1]), torch.tensor([int(labels[i])]), 0.3, 2.5 * 0.3 / 20, 20,
                  generator=torch.Generator().manual_seed(0))
        assert int(model(adv).argmax()) == strong[i]["adversarial_label"]


def test_tampered_weights_are_refused(exported_pair, tmp_path: Path) -> None:
    proto = onnx.load(exported_pair["msvp"]["onnx"])
    init = next(i for i in proto.graph.initializer if i.name.endswith("head.weight"))
    array = numpy_helper.to_array(init).copy()
    array[0, 0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(IntegrityError, match="SHA-256 does not match"):
        SpecformerRuntime(tmp_path / "bad.onnx")


@pytest.mark.parametrize("options, message", [
    (dict(delta0=-1.0), "delta0"), (dict(delta0=math.inf), "delta0"), (dict(top_k=0), "top_k"),
    (dict(probe=ProbeRequest("pgd", eps=2.0)), "eps must be"), (dict(probe=ProbeRequest("pgd", eps=math.nan)), "eps"),
    (dict(probe=ProbeRequest("pgd", steps=1000)), "steps must be"), (dict(probe=ProbeRequest("cw")), "probe must be"),
    (dict(probe=ProbeRequest("fgsm", norm="l2")), "fgsm is an Linf"), (dict(probe=ProbeRequest(norm="l1")), "norm"),
])
def test_absurd_options_are_clear_errors(runtime, options, message) -> None:
    with pytest.raises(RequestError, match=message):
        runtime.answer(np.zeros((1, *runtime.input_shape), np.float32), **options)


def test_image_decoding_converts_and_refuses_bad_input() -> None:
    gray = np.full((16, 16), 128, np.uint8)
    pixels = decode_image(_png(gray), 16)
    assert pixels.shape == (3, 16, 16) and np.allclose(pixels, 128 / 255)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    assert np.allclose(decode_image(_png(rgba, "RGBA"), 16), 1.0)
    assert decode_image(_png(np.zeros((40, 30, 3), np.uint8)), 16).shape == (3, 16, 16)
    data = _png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for bad, message in [(b"", "empty"), (b"hello world", "not a readable image"),
                         (data[: len(data) // 2], "not a readable image")]:
        with pytest.raises(ImageError, match=message):
            decode_image(bad, 16)
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(data, 16, max_pixels=100)
    with pytest.raises(ImageError, match="NaN"):
        pixels_from_array(np.full((3, 16, 16), np.nan), 16)
    with pytest.raises(ImageError, match="shape"):
        pixels_from_array(np.zeros((3, 8, 8)), 16)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        pixels_from_array(np.full((3, 16, 16), 2.0), 16)


def test_certify_cli_prints_json_and_rejects_bad_images(exported_pair, digits_test, tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(_png((digits_test[i][0].numpy()[0] * 255).round().astype(np.uint8)))
        paths.append(str(path))
    run = lambda *a: subprocess.run([sys.executable, "-m", "specformer_deploy", "certify", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    result = run(exported_pair["msvp"]["onnx"], *paths, "--json", "--probe", "fgsm", "--eps", "0.01")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["image"] for a in answers] == paths
    assert {"prediction", "attention_lipschitz", "probe"} <= set(answers[0])
    assert answers[0]["probe"]["space"] == "model input 1x16x16, pixels in [0, 1]"
    assert answers[0]["probe"]["kind"].startswith("empirical")
    assert len(answers[0]["attention_lipschitz"]["layers"]) == 4
    offline = SpecformerRuntime(exported_pair["msvp"]["onnx"]).answer(
        np.stack([decode_image(Path(p).read_bytes(), 16, 1) for p in paths]), delta0=0.01)
    assert answers[1]["attention_lipschitz"] == offline[1]["attention_lipschitz"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = run(exported_pair["msvp"]["onnx"], str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and "bad.png" in bad.stderr and "not a readable image" in bad.stderr


def test_certify_smoothing_prints_the_runtime_answer_and_what_it_guarantees(runtime, exported_pair, digits_test,
                                                                           tmp_path) -> None:
    from specformer_deploy.serving.smoothing import SmoothingParams

    path = tmp_path / "digit.png"
    path.write_bytes(_png((digits_test[5][0].numpy()[0] * 255).round().astype(np.uint8)))
    run = lambda *a: subprocess.run([sys.executable, "-m", "specformer_deploy", "certify",  # noqa: E731
                                     str(exported_pair["msvp"]["onnx"]), str(path), *a],
                                    capture_output=True, text=True, timeout=300)
    flags = ["--smoothing", "--sigma", "0.12", "--n", "400", "--n0", "40", "--alpha", "0.01", "--seed", "7"]
    result = run(*flags, "--json")
    assert result.returncode == 0, result.stderr
    block = json.loads(result.stdout)["smoothing"]
    params = SmoothingParams(sigma=0.12, n0=40, n=400, alpha=0.01, seed=7)
    expected = runtime.answer(decode_image(path.read_bytes(), 16, 1)[None], smoothing=params)[0]["smoothing"]
    assert block == expected and block["space"] == "model input 1x16x16, pixels in [0, 1], L2"
    assert block["sent_image"] == "grey 16x16" and block["radius_in_sent_image"] == block["radius"]
    text = run(*flags)
    assert text.returncode == 0, text.stderr
    printed = " ".join(text.stdout.split())  # rich wraps long lines
    assert " ".join(block["guarantee"].split()) in printed and "largest radius n samples can certify" in printed
    if not block["abstain"]:  # the one plain sentence about the image as sent
        assert (f"certified: label {block['label']} for every image within L2 {block['radius_in_sent_image']:.3g} "
                f"of digit.png (in its own grey pixels, as sent), with probability 0.99") in printed
    assert ("abstain" in printed) if block["abstain"] else (f"certified L2 radius {block['radius']:.4f}" in printed)
    at_radius = run(*flags, "--radius", "0.05", "--json")
    assert at_radius.returncode == 0, at_radius.stderr
    assert json.loads(at_radius.stdout)["smoothing"]["radius_asked"] == 0.05
    no_sigma = run("--smoothing")  # the test model was trained without noise
    message = " ".join(no_sigma.stderr.split())
    assert no_sigma.returncode == 2 and "not trained with noise" in message and "give --sigma" in message
    bad_alpha = run("--smoothing", "--sigma", "0.1", "--alpha", "2")
    assert bad_alpha.returncode == 2 and "--alpha" in bad_alpha.stderr
