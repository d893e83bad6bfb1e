"""The validation split: held-out training images, stratified, the same for every run, never trained on.

Settings are chosen on it and results reported on the test images, so it must be disjoint from
both the images a run trains on and the test set, balanced across classes, and rebuilt identically
wherever it is measured (training's val_accuracy, `evaluate --smoothing --split val`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.validation import ValidationSplitError, dataset_labels, split_indices


def _pixels(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_mnist_split_is_stratified_disjoint_and_the_same_every_time() -> None:
    plain = load_dataset("mnist", 28)
    bundle = load_dataset("mnist", 28, val_images=500)
    assert len(bundle.train) == 3500 and len(bundle.validation) == 500 and len(bundle.test) == 1000
    assert np.bincount(dataset_labels(bundle.validation), minlength=10).tolist() == [50] * 10
    again = load_dataset("mnist", 28, val_images=500)
    assert torch.equal(_pixels(again.validation), _pixels(bundle.validation))
    # every held-out image is a training image of the plain split, and none stays in training
    train = {tuple(x.flatten().tolist()) for x in _pixels(bundle.train)}
    held = [tuple(x.flatten().tolist()) for x in _pixels(bundle.validation)]
    everything = {tuple(x.flatten().tolist()) for x in _pixels(plain.train)}
    assert not train & set(held) and set(held) <= everything
    assert not set(held) & {tuple(x.flatten().tolist()) for x in _pixels(bundle.test)}


def test_split_size_outside_its_range_is_a_clear_error() -> None:
    labels = np.repeat(np.arange(10), 40)
    with pytest.raises(ValidationSplitError, match="--val-images must be between 10"):
        split_indices(labels, 5)
    with pytest.raises(ValidationSplitError, match="between 10 .* and 390"):
        split_indices(labels, 395)
    train, validation = split_indices(labels, 100)
    assert len(set(train) | set(validation)) == 400 and not set(train) & set(validation)


def test_training_reports_validation_accuracy_and_export_records_the_split(tmp_path: Path) -> None:
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.artifact.onnx_meta import read_metadata_file
    from specformer_deploy.robustness.smoothing_eval import SmoothingEvalOptions, _test_images
    from specformer_deploy.serving.runtime import SpecformerRuntime
    from specformer_deploy.training.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, msvp=False, val_images=200, seed=0), run,
          show_progress=False)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["val_accuracy"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["val_size"] == 200 and config["train"]["val_images"] == 200
    onnx_path = Path(export_run(run, run / "export" / "model.onnx")["onnx"])
    assert read_metadata_file(onnx_path)["training"]["val_images"] == 200
    runtime = SpecformerRuntime(onnx_path)
    images, labels, _, _ = _test_images(runtime, SmoothingEvalOptions(sigma=0.25, split="val", limit=200))
    held_out = load_dataset("digits", runtime.image_size, channels=runtime.channels, val_images=200).validation
    assert len(images) == 200 and np.array_equal(images, _pixels(held_out).numpy())
    assert labels.tolist() == dataset_labels(held_out).tolist()


def test_training_subset_is_stratified_fixed_and_leaves_the_validation_split_alone() -> None:
    """A data-size study's smaller training sets: the same images whatever the run, balanced across
    classes, nested inside the training images that remain after the validation split."""
    from specformer_deploy.training.validation import with_training_subset

    full = load_dataset("mnist", 28, val_images=500)
    small = load_dataset("mnist", 28, val_images=500, train_images=1000)
    assert len(small.train) == 1000 and len(small.test) == 1000
    assert torch.equal(_pixels(small.validation), _pixels(full.validation))
    assert np.bincount(dataset_labels(small.train), minlength=10).tolist() == \
        np.round(np.bincount(dataset_labels(full.train), minlength=10) * 1000 / 3500).astype(int).tolist()
    kept = {tuple(x.flatten().tolist()) for x in _pixels(small.train)}
    assert kept <= {tuple(x.flatten().tolist()) for x in _pixels(full.train)}
    assert torch.equal(_pixels(load_dataset("mnist", 28, val_images=500, train_images=1000).train),
                       _pixels(small.train))
    assert with_training_subset(full, 0) is full and with_training_subset(full, 3500) is full
    with pytest.raises(ValidationSplitError, match="--train-images 4000 is more than the 3500"):
        with_training_subset(full, 4000)
