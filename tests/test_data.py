"""Datasets: the built-in digits split and CIFAR-format directories built here."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from specformer_deploy.training.data import DataError, load_dataset


def _write_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    first = None
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        with (root / f"data_batch_{i}").open("wb") as f:
            pickle.dump({b"data": data, b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]}, f)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, size=(3, 3072), dtype=np.uint8), b"labels": [0, 1, 9]}, f)
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck"]]
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names}, f)
    return first


def test_digits_is_a_fixed_stratified_split() -> None:
    a = load_dataset("digits", 16)
    b = load_dataset("digits", 16)
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.class_names == [str(i) for i in range(10)]
    x, y = a.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 of each digit


def test_cifar10_directory_loads(tmp_path: Path) -> None:
    first = _write_cifar10(tmp_path / "cifar-10-batches-py")
    bundle = load_dataset("cifar10", 32, tmp_path)
    assert (len(bundle.train), len(bundle.test)) == (20, 3)
    assert bundle.class_names[9] == "truck"
    x, y = bundle.test[2]
    assert x.shape == (3, 32, 32) and y == 9
    raw = torch.from_numpy(first[0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(bundle.train.images[0].float() / 255, raw)  # channel-first layout kept
    resized = load_dataset("cifar10", 16, tmp_path)
    assert resized.test[0][0].shape == (3, 16, 16)


def test_missing_and_malformed_data_dirs_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("cifar10", 32)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", 32, tmp_path / "nope")
    with pytest.raises(DataError, match="data_batch_1.*python-pickle layout"):
        load_dataset("cifar10", 32, tmp_path)
    _write_cifar10(tmp_path / "bad")
    (tmp_path / "bad" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR"):
        load_dataset("cifar10", 32, tmp_path / "bad")
    with pytest.raises(DataError, match="missing train/"):
        load_dataset("imagefolder", 32, tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", 32, tmp_path)


def test_imagefolder_loads_rgb_pixels(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("L", (40, 30), color=200).save(tmp_path / split / cls / "a.png")
    bundle = load_dataset("imagefolder", 24, tmp_path)
    assert bundle.class_names == ["cat", "dog"]
    x, y = bundle.test[1]
    assert x.shape == (3, 24, 24) and y == 1
    assert float(x.mean()) == pytest.approx(200 / 255, abs=1e-3)
