"""The weight average (train --ema-decay): what a run evaluates, saves and exports, and it resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from specformer_deploy.training.train import TrainConfig, train

CFG = TrainConfig(epochs=2, batch_size=32, warmup_epochs=0, msvp=True, ema_decay=0.99, seed=0)


def test_the_saved_weights_are_the_average_and_a_resumed_run_repeats_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    train(CFG, whole, show_progress=False)
    checkpoint = torch.load(whole / "checkpoint.pt", weights_only=False)
    saved = load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(saved[k], checkpoint["ema"][k].cpu()) for k in saved)
    assert any(not torch.equal(checkpoint["ema"][k], checkpoint["model"][k]) for k in saved)  # an average, not a copy
    record = json.loads((whole / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"test_accuracy", "raw_test_accuracy"} <= record.keys()

    split = tmp_path / "split"

    class Stop(Exception):
        pass

    def stop_after_first_epoch(record: dict) -> None:
        raise Stop  # the checkpoint of epoch 1 is written before this runs, as when a run is killed

    try:
        train(CFG, split, show_progress=False, on_epoch_end=stop_after_first_epoch)
    except Stop:
        pass
    train(CFG, split, resume=True, show_progress=False)
    resumed = load_file(str(split / "model.safetensors"))
    assert all(torch.allclose(resumed[k], saved[k], atol=1e-6) for k in saved)


def test_ema_decay_outside_its_range_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="--ema-decay must be in"):
        TrainConfig(ema_decay=1.0).validate()
