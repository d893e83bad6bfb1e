"""Export parity and metadata, and audit's verdicts on intact, tampered and foreign files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from specformer_deploy.artifact.audit import audit_file
from specformer_deploy.artifact.integrity import digest_problems
from specformer_deploy.artifact.onnx_meta import (
    PREFIX,
    NotAnExportError,
    head_blocks,
    oriented,
    read_metadata,
    require_export,
    require_export_metadata,
)
from specformer_deploy.model.heads import attention_layers, layer_heads
from specformer_deploy.training.msvp import exact_spectral_norms
from specformer_deploy.training.train import load_run_model

# The metadata contract: serving, audit, package and evaluate read these entries, clients may too.
# A run trained with Gaussian noise (`train --noise-sd`) adds one more, "smoothing" (tested below).
METADATA_KEYS = {"attention_weights", "bias_q_norm", "class_names", "embed_dim", "exporter", "format_version",
                 "head_dim", "heads", "image_size", "input_shape", "integrity", "io", "layers", "mlp", "model", "msvp",
                 "normalization", "num_classes", "package_version", "parity", "source", "spectral",
                 "spectral_power_iteration", "tokens", "training"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", *args], capture_output=True, text=True,
                          timeout=600)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_and_pt2_match_pytorch_on_new_inputs(exported_pair) -> None:
    summary = exported_pair["msvp"]
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-4 and summary["parity"]["predictions_equal"]
    onnx_path = Path(summary["onnx"])
    assert not list(onnx_path.parent.glob("*.data")), "the ONNX file must be self-contained"
    model, _ = load_run_model(summary["run"])
    pixels = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # a batch size never traced
    logits_ort, norms_ort = _session(onnx_path).run(["logits", "attn_input_norms"], {"pixels": pixels.numpy()})
    with torch.no_grad():
        logits = model(pixels)
    np.testing.assert_allclose(logits_ort, logits.numpy(), atol=1e-4, rtol=0)
    # attn_input_norms against an independent hook on each block's first LayerNorm
    taps = []
    hooks = [b.norm1.register_forward_hook(lambda m, a, o: taps.append(o.flatten(1).norm(dim=1)))
             for b in model.net.blocks]
    with torch.no_grad():
        model(pixels)
    for h in hooks:
        h.remove()
    assert norms_ort.shape == (5, 4)
    np.testing.assert_allclose(norms_ort, torch.stack(taps, 1).numpy(), rtol=1e-5)
    # model.pt2: same weights, and input gradients identical to the original model's
    program = torch.export.load(summary["pt2"]).module()
    x = pixels.clone().requires_grad_(True)
    x_ref = pixels.clone().requires_grad_(True)
    logits_pt2, _ = program(x)
    torch.testing.assert_close(logits_pt2, model(x_ref), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(logits_pt2[:, 3].sum(), x)
    (g_ref,) = torch.autograd.grad(model(x_ref)[:, 3].sum(), x_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_metadata_round_trips_through_onnxruntime(exported_pair) -> None:
    summary = exported_pair["msvp"]
    custom = _session(Path(summary["onnx"])).get_modelmeta().custom_metadata_map
    meta = {k[len(PREFIX):]: json.loads(v) for k, v in custom.items() if k.startswith(PREFIX)}
    assert meta == read_metadata(onnx.load(summary["onnx"]))
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["image_size"] == 16
    assert meta["input_shape"] == [1, 16, 16] and meta["model"]["in_chans"] == 1  # digits are grey: one channel
    assert meta["io"]["pixels"] == "[batch, 1, H, W] float32 in [0, 1]"
    assert (meta["layers"], meta["heads"], meta["head_dim"], meta["tokens"]) == (4, 4, 16, [17] * 4)
    assert meta["msvp"]["enabled"] is True and meta["msvp"]["lambda_q"] == 1e-2
    assert meta["integrity"]["weights_sha256"] == summary["weights_sha256"]
    model, _ = load_run_model(summary["run"])
    exact = exact_spectral_norms(model)
    np.testing.assert_allclose(np.array(meta["spectral"]["sigma_v"]), exact[:, 2].numpy(), rtol=1e-6)
    power = np.array(meta["spectral_power_iteration"]["sigma_q"])
    # u^T W v with unit u, v never exceeds sigma_max, and one iteration per step keeps it close.
    assert (power <= exact[:, 0].numpy() * (1 + 1e-5)).all()
    assert (power >= 0.85 * exact[:, 0].numpy()).all()
    assert meta["attention_weights"][2]["q"]["initializer"] == "model.net.blocks.2.attn.qkv.weight"


def test_export_writes_exactly_the_contracted_metadata_keys(exported_pair) -> None:
    for summary in (exported_pair["vanilla"], exported_pair["msvp"]):
        keys = [p.key for p in onnx.load(summary["onnx"], load_external_data=False).metadata_props]
        assert {k for k in keys if k.startswith(PREFIX)} == {PREFIX + k for k in METADATA_KEYS}
        integrity = read_metadata(onnx.load(summary["onnx"]))["integrity"]
        assert set(integrity) == {"weights_sha256", "tensor_sha256", "graph_sha256", "metadata_sha256"}
        assert set(integrity["metadata_sha256"]) == METADATA_KEYS - {"integrity"}


def test_a_noise_trained_export_records_its_sigma_under_the_digests(exported_pair, tmp_path: Path) -> None:
    """`train --noise-sd` -> `export` writes specformer.smoothing = {"sigma": s} (the one key a noise-trained
    run adds), digested like every entry: `audit` shows the sigma, and a changed or removed sigma is an
    inconsistent file. Runs without noise carry no such key and `audit` says so."""
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = tmp_path / "noisy"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, noise_sd=0.25, seed=5), run, show_progress=False)
    # fp32: the sampler entry that `auto` adds for noise-trained runs is tested in test_sampler.py
    onnx_path = Path(export_run(run, run / "export" / "model.onnx", smoothing_sampler="fp32")["onnx"])
    keys = {p.key for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert {k for k in keys if k.startswith(PREFIX)} == {PREFIX + k for k in METADATA_KEYS | {"smoothing"}}
    meta = read_metadata(onnx.load(str(onnx_path)))
    assert meta["smoothing"] == {"sigma": 0.25, "objective": "gaussian", "noise_copies": 1}
    assert set(meta["integrity"]["metadata_sha256"]) == (METADATA_KEYS | {"smoothing"}) - {"integrity"}
    report = audit_file(onnx_path)
    assert report.exit_code == 0 and report.to_dict()["model"]["smoothing"] == meta["smoothing"]
    assert any("trained with Gaussian pixel noise sigma 0.25" in note and "objective gaussian" in note
               for note in report.notes)
    cli = _cli("audit", str(onnx_path))
    assert cli.returncode == 0 and "noise sigma 0.25" in cli.stdout

    def changed(proto: onnx.ModelProto) -> None:
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "smoothing":
                prop.value = json.dumps({"sigma": 0.5})

    def removed(proto: onnx.ModelProto) -> None:
        kept = [p for p in proto.metadata_props if p.key != PREFIX + "smoothing"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)

    for name, edit in (("changed", changed), ("removed", removed)):
        tampered = audit_file(_rewrite(onnx_path, tmp_path / f"{name}.onnx", edit))
        assert tampered.exit_code == 1, name
        assert tampered.problems == ["metadata value specformer.smoothing changed after export"], name
    plain = audit_file(exported_pair["vanilla"]["onnx"])
    assert plain.to_dict()["model"]["smoothing"] is None
    assert any("trained without Gaussian noise" in note for note in plain.notes)


def test_an_export_names_the_smoothing_objective_that_trained_it(tmp_path: Path) -> None:
    """A consistency-trained model says so, with the weights of its two terms: the objective
    shapes the certified radii a user should expect at this sigma."""
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = tmp_path / "consistency"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, noise_sd=0.5, seed=5,
                      smoothing_objective="consistency", consistency_lambda=10.0), run, show_progress=False)
    onnx_path = Path(export_run(run, run / "export" / "model.onnx")["onnx"])
    meta = read_metadata(onnx.load(str(onnx_path)))
    assert meta["smoothing"] == {"sigma": 0.5, "objective": "consistency", "noise_copies": 2,
                                 "consistency_lambda": 10.0, "consistency_eta": 0.5}
    report = audit_file(onnx_path)
    assert report.exit_code == 0
    assert any("objective consistency (consistency_eta 0.5, consistency_lambda 10.0, noise_copies 2)" in note
               for note in report.notes)


def test_require_export_returns_the_metadata_or_says_what_is_missing(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])
    assert require_export(src, need_pt2=True) == read_metadata(onnx.load(str(src)))
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(src, lonely)
    assert require_export(lonely, need_pt2=False)["heads"] == 4
    with pytest.raises(NotAnExportError, match=r"lonely\.pt2 is missing"):
        require_export(lonely, need_pt2=True)
    with pytest.raises(NotAnExportError, match="does not exist"):
        require_export(tmp_path / "absent.onnx", need_pt2=False)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(NotAnExportError, match="not a readable ONNX file"):
        require_export(truncated, need_pt2=False)
    bare = _rewrite(src, tmp_path / "bare.onnx", lambda proto: proto.metadata_props.__delitem__(slice(None)))
    with pytest.raises(NotAnExportError, match="has no specformer metadata"):
        require_export(bare, need_pt2=False)
    partial = {k: v for k, v in require_export(src, need_pt2=False).items() if k != "spectral"}
    with pytest.raises(NotAnExportError, match="has no specformer metadata"):
        require_export_metadata(partial, src)


def test_head_blocks_read_transposed_initializers_as_out_in(exported_pair) -> None:
    proto = onnx.load(exported_pair["msvp"]["onnx"])
    meta = read_metadata(proto)
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    layer = meta["attention_weights"][1]
    stored_t = dict(arrays)
    flipped = {}
    for key in "qkvo":
        ref = dict(layer[key])
        stored_t[ref["initializer"] + ".T"] = arrays[ref["initializer"]].T
        flipped[key] = {**ref, "initializer": ref["initializer"] + ".T", "transposed": not ref["transposed"]}
        assert np.array_equal(oriented(stored_t[flipped[key]["initializer"]], flipped[key]),
                              oriented(arrays[ref["initializer"]], ref))
    plain = head_blocks(arrays, layer, meta["heads"], meta["head_dim"])
    via_t = head_blocks(stored_t, flipped, meta["heads"], meta["head_dim"])
    for key in "qkvo":
        np.testing.assert_array_equal(plain[key], via_t[key])
    model, _ = load_run_model(exported_pair["msvp"]["run"])
    qkv = model.net.blocks[1].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(plain["k"][2], qkv[meta["embed_dim"] + 2 * meta["head_dim"]:][:meta["head_dim"]])


def test_intact_file_is_consistent_and_sigmas_match_torch(exported_pair) -> None:
    summary = exported_pair["msvp"]
    report = audit_file(summary["onnx"])
    assert report.exit_code == 0 and report.verdict == "consistent", report.problems
    model, _ = load_run_model(summary["run"])
    exact = exact_spectral_norms(model).double().numpy()
    for i, name in enumerate("qkvo"):
        np.testing.assert_allclose(np.array(report.sigmas[f"sigma_{name}"]), exact[:, i], rtol=1e-5)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def test_changed_weight_is_named_with_its_layer_and_head(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])
    meta = read_metadata(onnx.load(str(src)))
    dim, head_dim = meta["embed_dim"], meta["head_dim"]

    def edit(proto: onnx.ModelProto) -> None:
        init = next(i for i in proto.graph.initializer if i.name == "model.net.blocks.1.attn.qkv.weight")
        array = numpy_helper.to_array(init).copy()
        array[dim + 2 * head_dim, 0] = 5.0  # first row of head 2's W_K
        init.CopyFrom(numpy_helper.from_array(array, init.name))

    tampered = _rewrite(src, tmp_path / "tampered.onnx", edit)
    report = audit_file(tampered)
    assert report.exit_code == 1
    text = "\n".join(report.problems)
    assert "model.net.blocks.1.attn.qkv.weight changed" in text and "layer 1 attention" in text
    assert "sigma_k of layer 1 head 2" in text
    assert "sigma_q of" not in text  # other heads and projections are untouched
    cli = _cli("audit", str(tampered))
    assert cli.returncode == 1 and "net.blocks.1.attn.qkv.weight" in cli.stdout


def test_changed_metadata_value_is_named(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])

    def edit(proto: onnx.ModelProto) -> None:
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "training":
                value = json.loads(prop.value)
                value["clean_accuracy"] = 0.999
                prop.value = json.dumps(value)

    report = audit_file(_rewrite(src, tmp_path / "meta.onnx", edit))
    assert report.exit_code == 1
    assert report.problems == ["metadata value specformer.training changed after export"]

    def reshape(proto: onnx.ModelProto) -> None:  # a grey model passed off as a colour one
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "input_shape":
                prop.value = json.dumps([3, 16, 16])

    report = audit_file(_rewrite(src, tmp_path / "shape.onnx", reshape))
    assert report.exit_code == 1 and report.model["input_shape"] == [3, 16, 16]
    assert report.problems == ["metadata value specformer.input_shape changed after export"]
    assert audit_file(src).model["input_shape"] == [1, 16, 16]


def test_changed_sigma_in_metadata_is_caught_by_recomputation(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])

    def edit(proto: onnx.ModelProto) -> None:
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "spectral":
                value = json.loads(prop.value)
                value["sigma_v"][3][1] *= 0.5
                prop.value = json.dumps(value)

    report = audit_file(_rewrite(src, tmp_path / "sigma.onnx", edit))
    assert report.exit_code == 1
    assert any(p.startswith("sigma_v of layer 3 head 1: metadata") for p in report.problems)


def test_truncated_and_random_files_exit_2(exported_pair, tmp_path: Path) -> None:
    data = Path(exported_pair["msvp"]["onnx"]).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for path in (truncated, noise, tmp_path / "missing.onnx"):
        report = audit_file(path)
        assert report.exit_code == 2 and report.verdict == "unreadable", path
    cli = _cli("audit", str(truncated), "--json")
    assert cli.returncode == 2
    assert "not a readable ONNX file" in json.loads(cli.stdout)["problems"][0]


def test_plain_timm_onnx_reports_sigmas_but_verifies_nothing(tmp_path: Path, tiny_model) -> None:
    net = tiny_model.net.eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 16, 16),), str(path), input_names=["x"], external_data=False,
                      optimize=False)
    report = audit_file(path, heads=4)
    assert report.exit_code == 2 and report.verdict == "unverifiable"
    assert "nothing could be verified" in report.problems[0]
    expected = torch.stack([torch.linalg.matrix_norm(layer_heads(a).qkv.double(), ord=2)
                            for a in attention_layers(net)])
    np.testing.assert_allclose(np.array(report.sigmas["sigma_q"]), expected[:, 0].detach().numpy(), rtol=1e-6)


def test_msvp_model_has_lower_sigmas_and_the_plot_is_a_png(exported_pair, tmp_path: Path) -> None:
    vanilla = audit_file(exported_pair["vanilla"]["onnx"])
    msvp = audit_file(exported_pair["msvp"]["onnx"])
    for name in ("q", "k", "v"):
        assert max(map(max, msvp.sigmas[f"sigma_{name}"])) < max(map(max, vanilla.sigmas[f"sigma_{name}"])), name
    plot = tmp_path / "fig2a.png"
    cli = _cli("audit", exported_pair["msvp"]["onnx"], "--compare", exported_pair["vanilla"]["onnx"],
               "--plot", str(plot))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(plot) as image:
        image.verify()
        assert image.size[0] > 800


def test_audit_runs_without_torch(exported_pair) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from specformer_deploy.artifact.audit import audit_file\n"
            f"r = audit_file({exported_pair['msvp']['onnx']!r})\n"
            "print(r.exit_code, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]


def test_export_errors_are_clear(tmp_path: Path, exported_pair) -> None:
    missing = _cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx"))
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(Path(exported_pair["msvp"]["run"]) / "config.json", incomplete / "config.json")
    result = _cli("export", str(incomplete), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2 and "model.safetensors" in result.stderr
    wrong = _cli("export", str(exported_pair["msvp"]["run"]), "--out", str(tmp_path / "m.txt"))
    assert wrong.returncode == 2 and ".onnx" in wrong.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_changed_query_bias_is_caught_as_a_certificate_input(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])
    head_dim = read_metadata(onnx.load(str(src)))["head_dim"]

    def edit(proto: onnx.ModelProto) -> None:
        init = next(i for i in proto.graph.initializer if i.name == "model.net.blocks.0.attn.qkv.bias")
        array = numpy_helper.to_array(init).copy()
        array[head_dim + 1] += 3.0  # head 1's query bias
        init.CopyFrom(numpy_helper.from_array(array, init.name))

    report = audit_file(_rewrite(src, tmp_path / "bias.onnx", edit))
    assert report.exit_code == 1
    assert any(p.startswith("||b_q|| of layer 0 head 1:") for p in report.problems)


def test_changed_output_projection_is_caught_as_a_certificate_input(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])

    def edit(proto: onnx.ModelProto) -> None:
        init = next(i for i in proto.graph.initializer if i.name == "model.net.blocks.2.attn.proj.weight")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2.0, init.name))

    report = audit_file(_rewrite(src, tmp_path / "proj.onnx", edit))
    assert report.exit_code == 1
    assert any(p.startswith("||W_O|| of layer 2: metadata") for p in report.problems)
    assert not any(p.startswith("||W_O|| of layer 1") for p in report.problems)


def test_audit_finds_the_digest_problems_the_serving_worker_refuses(exported_pair, tmp_path: Path) -> None:
    src = Path(exported_pair["msvp"]["onnx"])

    def edit(proto: onnx.ModelProto) -> None:
        init = next(i for i in proto.graph.initializer if i.name == "model.net.blocks.0.attn.proj.bias")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "class_names":
                prop.value = json.dumps(["cat"] + json.loads(prop.value)[1:])

    tampered = _rewrite(src, tmp_path / "both.onnx", edit)
    proto = onnx.load(str(tampered))
    refused = digest_problems(proto, read_metadata(proto))
    assert refused == ["weight tensor model.net.blocks.0.attn.proj.bias changed after export",
                       "metadata value specformer.class_names changed after export"]
    report = audit_file(tampered)
    assert report.exit_code == 1 and report.problems == refused  # the bias moves no sigma


@pytest.mark.slow
def test_an_export_made_before_channels_were_recorded_is_a_three_channel_model(tmp_path: Path) -> None:
    """Older exports carry no ``input_shape`` (and no digest of it): they were all three-channel,
    and keep being served as such, a grey image replicated into them (decode norm sqrt(3))."""
    import io

    from PIL import Image

    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.serving.images import read_image
    from specformer_deploy.serving.runtime import SpecformerRuntime
    from specformer_deploy.serving.smoothing import SmoothingParams
    from specformer_deploy.training.train import TrainConfig, train

    train(TrainConfig(epochs=1, warmup_epochs=0, in_chans=3, seed=1), tmp_path / "run", show_progress=False)
    src = Path(export_run(tmp_path / "run", tmp_path / "run" / "export" / "model.onnx")["onnx"])
    assert read_metadata(onnx.load(str(src)))["input_shape"] == [3, 16, 16]  # --in-chans 3 on grey digits

    def make_old(proto: onnx.ModelProto) -> None:
        kept = [p for p in proto.metadata_props if p.key != PREFIX + "input_shape"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        for prop in proto.metadata_props:
            if prop.key == PREFIX + "integrity":
                integrity = json.loads(prop.value)
                integrity["metadata_sha256"].pop("input_shape")
                prop.value = json.dumps(integrity)

    old = _rewrite(src, tmp_path / "old.onnx", make_old)
    report = audit_file(old)
    assert report.exit_code == 0, report.problems
    assert report.model["input_shape"] == [3, 16, 16] and any("3 channels" in note for note in report.notes)
    runtime = SpecformerRuntime(old)
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buffer, format="PNG")
    decoded = read_image(buffer.getvalue(), runtime.image_size, runtime.channels)
    assert decoded.pixels.shape == (3, 16, 16) and decoded.decode.norm == pytest.approx(np.sqrt(3))
    block = runtime.answer(decoded.pixels[None], smoothing=SmoothingParams(sigma=0.25, n=200),
                           decodes=[decoded.decode])[0]["smoothing"]
    assert block["space"] == "model input 3x16x16, pixels in [0, 1], L2"
    assert block["radius_in_sent_image"] == pytest.approx(block["radius"] / np.sqrt(3))
