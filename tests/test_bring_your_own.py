"""Bring your own model: timm checkpoints trained elsewhere (written by timm's own CheckpointSaver)
are exported, audited, certified and served; checkpoints that do not fit get errors naming why."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

from specformer_deploy.artifact.audit import audit_file
from specformer_deploy.artifact.checkpoint_source import CheckpointExportError, checkpoint_source
from specformer_deploy.artifact.onnx_meta import initializer_arrays, read_metadata
from specformer_deploy.cli import app
from specformer_deploy.model.weights_file import WeightsFileError, read_weights

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 32, 7  # small images keep timm's full-depth tiny models quick on 2 cores
ARCHITECTURES = ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "convit_tiny")
runner = CliRunner()


def _train_elsewhere(name: str, out: Path) -> dict:
    """A few AdamW steps with timm's ModelEmaV3, saved by timm's CheckpointSaver as timm's train.py does
    (args in an argparse.Namespace, the EMA under state_dict_ema): a checkpoint not made by this toolkit."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=SIZE, num_classes=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEmaV3(model, decay=0.5)
    for _ in range(3):
        images, labels = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, CLASSES, (8,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
    args = argparse.Namespace(model=name, img_size=SIZE, num_classes=CLASSES, lr=1e-3, model_ema=True)
    out.mkdir(parents=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(out),
                            recovery_dir=str(out))
    saver.save_checkpoint(epoch=2, metric=51.0)
    return {"path": out / "model_best.pth.tar", "model": model.eval(), "ema": ema.module.eval(), "name": name}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("elsewhere")
    return {name: _train_elsewhere(name, root / name) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Each checkpoint exported through the command line, as the README tells a user to."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, ckpt in checkpoints.items():
        onnx_path = root / name / "model.onnx"
        result = runner.invoke(app, ["export", "--checkpoint", str(ckpt["path"]), "--model", name, "--num-classes",
                                     str(CLASSES), "--img-size", str(SIZE), "--out", str(onnx_path), "--json"])
        assert result.exit_code == 0, result.output
        out[name] = onnx_path
    return out


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_checkpoint_exports_audits_and_certifies(name, checkpoints, exports, tmp_path) -> None:
    onnx_path, ckpt = exports[name], checkpoints[name]
    meta = read_metadata(onnx.load(str(onnx_path)))
    source = meta["source"]
    assert source["kind"] == "checkpoint" and source["model"] == name and source["entry"] == "state_dict"
    assert source["sha256"] == hashlib.sha256(ckpt["path"].read_bytes()).hexdigest()
    assert source["layout"] == "timm checkpoint" and source["epoch"] == 2
    # what only a run of ours knows is absent, not invented
    assert not {"training", "msvp", "smoothing", "spectral_power_iteration"} & set(meta)
    assert meta["parity"]["source"].startswith("seeded random pixels")

    assert audit_file(onnx_path).exit_code == 0
    result = runner.invoke(app, ["audit", str(onnx_path)])
    assert result.exit_code == 0 and "model_best.pth.tar" in result.output

    # The served logits are the timm model's own, normalized with timm's pretrained_cfg of that name:
    # normalization is folded into the graph and the weights are the checkpoint's.
    image = tmp_path / "sent.png"
    image.write_bytes(_png(1))
    result = runner.invoke(app, ["certify", str(onnx_path), str(image), "--json", "--top-k", str(CLASSES)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    from specformer_deploy.serving.images import read_image

    pixels = torch.from_numpy(read_image(image.read_bytes(), SIZE, 3).pixels)[None]
    config = timm.data.resolve_data_config({}, model=ckpt["model"])
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = ckpt["model"]((pixels - mean) / std).softmax(-1)[0]
    assert answer["prediction"]["label"] == int(probabilities.argmax())
    served = {entry["label"]: entry["probability"] for entry in answer["prediction"]["top_k"]}
    assert [served[k] for k in range(CLASSES)] == pytest.approx(probabilities.tolist(), abs=1e-4)
    layers = answer["attention_lipschitz"]["layers"]
    assert len(layers) == 12 and all(layer["bound"] > 0 for layer in layers if layer["applicable"])

    # smoothing needs the sigma: the checkpoint's training noise is unknown
    result = runner.invoke(app, ["certify", str(onnx_path), str(image), "--smoothing", "--n", "100"])
    assert result.exit_code == 2 and "give --sigma" in result.output and "--noise-sd" in result.output
    result = runner.invoke(app, ["certify", str(onnx_path), str(image), "--smoothing", "--sigma", "0.25",
                                 "--n", "200", "--n0", "50", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["smoothing"]["sigma"] == 0.25


@pytest.mark.serving
@pytest.mark.slow
def test_checkpoint_exports_are_served(exports, tmp_path) -> None:
    """The three exports, packaged as `package` packages them, served by one real TorchServe."""
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)")
    sys.path.insert(0, str(ROOT / "tools"))
    from serve_local import LocalTorchServe

    names = {name: name.split("_")[0] for name in ARCHITECTURES}  # vit, deit, convit
    first, *rest = ARCHITECTURES
    server = LocalTorchServe(tmp_path / "ts", str(exports[first]), name=names[first],
                             others={names[n]: str(exports[n]) for n in rest})
    answers = {}
    try:
        server.start()
        for name in ARCHITECTURES:
            answers[name] = server.post(_png(2), content_type="image/png", model=names[name])
    finally:
        server.stop()
    assert sorted(server.models) == sorted(names.values())
    for name, (status, answer) in answers.items():
        assert status == 200, (name, answer)
        assert 0 <= answer["prediction"]["label"] < CLASSES
        assert len(answer["attention_lipschitz"]["layers"]) == 12


def test_ema_weights_are_exported_when_asked(checkpoints, tmp_path) -> None:
    ckpt = checkpoints["vit_tiny_patch16_224"]
    key = "blocks.0.attn.qkv.weight"
    trained, averaged = ckpt["model"].state_dict()[key], ckpt["ema"].state_dict()[key]
    assert not torch.equal(trained, averaged)  # the test can tell the two apart
    onnx_path = tmp_path / "ema" / "model.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(ckpt["path"]), "--model", ckpt["name"], "--ema",
                                 "--num-classes", str(CLASSES), "--img-size", str(SIZE), "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(onnx_path))
    exported = initializer_arrays(proto)[f"model.net.{key}"]
    assert np.array_equal(exported, averaged.numpy())
    meta = read_metadata(proto)
    assert meta["source"]["entry"] == "state_dict_ema" and meta["source"]["ema"] is True


def _plain_copy(ckpt: dict, tmp_path: Path, edit=None, prefix: str = "") -> Path:
    state = {prefix + k: v for k, v in ckpt["model"].state_dict().items()}
    if edit:
        edit(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


def _export_args(path: Path, name: str, tmp_path: Path, classes: int = CLASSES, size: int = SIZE) -> list[str]:
    return ["export", "--checkpoint", str(path), "--model", name, "--num-classes", str(classes), "--img-size",
            str(size), "--out", str(tmp_path / "x" / "model.onnx")]


def test_checkpoints_that_do_not_fit_get_errors_that_name_the_problem(checkpoints, tmp_path) -> None:
    ckpt = checkpoints["vit_tiny_patch16_224"]
    name = ckpt["name"]

    def fails(args: list[str], *needles: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        for needle in needles:
            assert needle in text, text
        assert not (tmp_path / "x" / "model.onnx").exists()

    missing = _plain_copy(ckpt, tmp_path, lambda s: s.pop("blocks.3.attn.proj.weight"))
    fails(_export_args(missing, name, tmp_path), "missing from the file (1): blocks.3.attn.proj.weight")
    extra = _plain_copy(ckpt, tmp_path, lambda s: s.__setitem__("blocks.0.attn.extra_scale", torch.ones(1)))
    fails(_export_args(extra, name, tmp_path), "in the file but not in the model (1): blocks.0.attn.extra_scale")
    fails(_export_args(ckpt["path"], name, tmp_path, classes=10),
          f"classifier has {CLASSES} classes, the model 10 (--num-classes)")
    fails(_export_args(ckpt["path"], name, tmp_path, size=64), "another image size (--img-size)",
          f"fit --img-size {SIZE}")
    fails(_export_args(ckpt["path"], "deit_small_patch16_224", tmp_path), "trained as 'vit_tiny_patch16_224'")
    fails(_export_args(ckpt["path"], name, tmp_path) + ["--in-chans", "1"], "3-channel images", "--in-chans")
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(ckpt["path"].read_bytes()[:5000])
    fails(_export_args(truncated, name, tmp_path), "truncated or not a torch file")
    fails(_export_args(_plain_copy(ckpt, tmp_path), name, tmp_path) + ["--ema"], "plain state dict without EMA")
    fails(_export_args(ckpt["path"], name, tmp_path) + ["--mean", "0.5,0.5"], "--mean needs 3 value(s)")
    fails(_export_args(ckpt["path"], name, tmp_path) + ["--std", "0.5,0,0.5"], "--std values must be positive")
    fails(_export_args(ckpt["path"], name, tmp_path) + ["--smoothing-sampler", "int8"],
          "neither is known for a checkpoint")
    fails(["export", "--checkpoint", str(ckpt["path"]), "--out", str(tmp_path / "x" / "model.onnx")],
          "--checkpoint needs --model, --num-classes, --img-size")
    fails(["export", str(tmp_path), "--num-classes", "3", "--out", str(tmp_path / "x" / "model.onnx")],
          "--num-classes describe a --checkpoint")


def test_weights_that_run_code_when_unpickled_are_refused(tmp_path) -> None:
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "callback": np.random.default_rng}, path)  # a global, not data
    with pytest.raises(WeightsFileError, match="weights_only=True"):
        read_weights(path)


def test_other_layouts_load_the_same_weights(checkpoints, tmp_path) -> None:
    """safetensors, a DDP-wrapped (module.) state dict and a plain one give the trained weights."""
    from safetensors.torch import save_file

    ckpt = checkpoints["deit_tiny_patch16_224"]
    state = ckpt["model"].state_dict()
    safetensors_path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors_path))
    for path in (safetensors_path, _plain_copy(ckpt, tmp_path, prefix="module.")):
        source = checkpoint_source(path, ckpt["name"], CLASSES, SIZE)
        loaded = source.model.net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        assert source.sections["source"]["layout"] in ("safetensors", "state dict")
    with pytest.raises(CheckpointExportError, match="safetensors file, which holds one set of weights"):
        checkpoint_source(safetensors_path, ckpt["name"], CLASSES, SIZE, ema=True)


def test_parity_images_and_class_names_are_recorded(checkpoints, tmp_path) -> None:
    ckpt = checkpoints["convit_tiny"]
    images = tmp_path / "mine"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(_png(10 + i, size=(60 + i, 50)))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(CLASSES)) + "\n")
    source = checkpoint_source(ckpt["path"], ckpt["name"], CLASSES, SIZE, class_names=names, parity_images=images,
                               mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    assert source.parity_pixels.shape == (3, 3, SIZE, SIZE) and source.parity_source.startswith("3 images from mine")
    assert source.class_names[2] == "class 2" and source.normalization_from == "--mean/--std"
    assert source.model_config["std"] == [0.2, 0.2, 0.2]
    names.write_text("a\nb\n")
    with pytest.raises(CheckpointExportError, match=f"has 2 names but --num-classes is {CLASSES}"):
        checkpoint_source(ckpt["path"], ckpt["name"], CLASSES, SIZE, class_names=names)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CheckpointExportError, match="broken.png is not a usable image"):
        checkpoint_source(ckpt["path"], ckpt["name"], CLASSES, SIZE, parity_images=images)


def test_train_pretrained_starts_from_a_timm_checkpoint(checkpoints) -> None:
    """`train --pretrained` (fine-tuning for smoothing, as README says) reads the same checkpoints."""
    from specformer_deploy.model.factory import build_model, load_pretrained, resolve_model_config

    ckpt = checkpoints["vit_tiny_patch16_224"]
    model = build_model(resolve_model_config(ckpt["name"], CLASSES, img_size=SIZE))
    load_pretrained(model, ckpt["path"])
    trained = ckpt["model"].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.net.state_dict().items())
