"""Datasets: the built-in `digits`, CIFAR-10/100 from local pickles, and image folders.

Every dataset yields ``(pixels, label)`` with pixels float32 in [0, 1], shape ``[3, S, S]``
at the model's image size. Nothing is downloaded; a missing or malformed directory is a
``DataError`` that says what layout was expected.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DataError", "DatasetBundle", "DATASETS", "load_dataset", "resize_batch"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


class DataError(ValueError):
    """Data that is missing or not in the expected layout; the message names the layout."""


@dataclass
class DatasetBundle:
    train: Dataset
    test: Dataset
    class_names: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resize_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` pixels to ``size x size`` (antialiased bilinear), clamped to [0, 1]."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    out = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


class TensorImages(Dataset):
    """Images held in memory as uint8 ``[N, 3, H, W]`` (or float in [0, 1]) with an optional transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images = images
        self.labels = labels.long()
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float().div(255.0) if image.dtype == torch.uint8 else image
        image = resize_batch(image.unsqueeze(0), self.size)[0]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _crop_flip(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
                       v2.RandomHorizontalFlip()])


def _digits(size: int) -> DatasetBundle:
    """scikit-learn's handwritten digits (1,797 8x8 images): a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    images = resize_batch(images, size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=digits.target,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    names = [str(i) for i in range(10)]
    # No flips or crops: a mirrored digit is another symbol, and 8x8 sources leave no margin.
    return DatasetBundle(TensorImages(images[train_idx], labels[train_idx], size),
                         TensorImages(images[test_idx], labels[test_idx], size), names, "digits")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise DataError(f"{path} is not a readable CIFAR python-pickle batch: {err}") from err


def _cifar_arrays(batch: dict, label_key: bytes, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks the {b'data'!r} / {label_key!r} entries of a CIFAR batch")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected data of shape [N, 3072] (3x32x32 uint8), got {data.shape}")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _cifar(data_dir: Path, size: int, hundred: bool) -> DatasetBundle:
    if hundred:
        train_files, test_files, meta_file = ["train"], ["test"], "meta"
        label_key, names_key, layout = b"fine_labels", b"fine_label_names", "cifar-100-python: train, test, meta"
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file = ["test_batch"], "batches.meta"
        label_key, names_key = b"labels", b"label_names"
        layout = "cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta"
    root = data_dir
    for sub in ("cifar-100-python", "cifar-10-batches-py"):
        if (data_dir / sub).is_dir():
            root = data_dir / sub
    missing = [f for f in train_files + test_files + [meta_file] if not (root / f).is_file()]
    if missing:
        raise DataError(f"{data_dir} is not a CIFAR-{'100' if hundred else '10'} directory: missing "
                        f"{', '.join(missing)} (expected the python-pickle layout {layout})")
    parts = [_cifar_arrays(_unpickle(root / f), label_key, root / f) for f in train_files]
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_x, test_y = _cifar_arrays(_unpickle(root / test_files[0]), label_key, root / test_files[0])
    meta = _unpickle(root / meta_file)
    if names_key not in meta:
        raise DataError(f"{root / meta_file} lacks {names_key!r}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    top = int(max(train_y.max(), test_y.max()))
    if top >= len(names):
        raise DataError(f"{root}: label {top} but only {len(names)} class names")
    return DatasetBundle(TensorImages(train_x, train_y, size, _crop_flip(size)), TensorImages(test_x, test_y, size),
                         names, "cifar100" if hundred else "cifar10")


def _imagefolder(data_dir: Path, size: int) -> DatasetBundle:
    from torchvision import datasets
    from torchvision.transforms import v2

    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise DataError(f"{data_dir} is not an image folder dataset: missing {split}/ "
                            "(expected train/<class>/*.jpg and val/<class>/*.jpg, as Imagenette/ImageNet)")
    to_pixels = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_pixels])
    test_tf = v2.Compose([v2.Resize(int(size * 1.14), antialias=True), v2.CenterCrop(size), *to_pixels])
    try:
        train = datasets.ImageFolder(str(data_dir / "train"), transform=train_tf, loader=_rgb_loader)
        test = datasets.ImageFolder(str(data_dir / "val"), transform=test_tf, loader=_rgb_loader)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{data_dir}: {err}") from err
    if train.classes != test.classes:
        raise DataError(f"{data_dir}: train/ and val/ have different class folders")
    return DatasetBundle(train, test, list(train.classes), "imagefolder")


def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_dataset(name: str, size: int, data_dir: str | Path | None = None) -> DatasetBundle:
    """Load a dataset by name at image size ``size``."""
    if name == "digits":
        return _digits(size)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs --data-dir (nothing is downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    if name in ("cifar10", "cifar100"):
        return _cifar(path, size, hundred=name == "cifar100")
    return _imagefolder(path, size)
