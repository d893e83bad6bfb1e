"""Digit augmentation: whole-pixel shifts are exact moves with zeros filling in, rotations stay small,
the same seed gives the same batch, and flips are never among the results."""

from __future__ import annotations

import torch

from specformer_deploy.training.augment import shift_and_rotate


def _shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``image`` moved right by dx and down by dy, zeros where nothing moved in (an independent reference)."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        image[..., max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


def test_shifts_are_exact_whole_pixel_moves_within_the_range() -> None:
    images = torch.rand(64, 1, 12, 12) + 0.1  # every pixel > 0: zeros can only come from the padding
    moved = shift_and_rotate(images, 2, 0.0, seed=3)
    seen = set()
    for image, result in zip(images, moved):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if torch.allclose(result, _shifted(image, dx, dy), atol=1e-6)]
        assert len(matches) == 1, "each image is one whole-pixel shift of itself, within 2 pixels"
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary across the batch
    assert torch.equal(moved, shift_and_rotate(images, 2, 0.0, seed=3))
    assert not torch.equal(moved, shift_and_rotate(images, 2, 0.0, seed=4))


def test_rotations_are_small_and_never_flip() -> None:
    bar = torch.zeros(1, 1, 15, 15)
    bar[..., 7, 2:13] = 1.0  # a horizontal bar through the centre
    turned = shift_and_rotate(bar.repeat(32, 1, 1, 1), 0, 10.0, seed=0)
    for image in turned:
        ys, xs = torch.nonzero(image[0] > 0.3, as_tuple=True)
        slope = torch.linalg.lstsq(torch.stack([xs.float(), torch.ones_like(xs.float())], 1),
                                   ys.float()[:, None]).solution[0].item()
        assert abs(slope) <= torch.tan(torch.deg2rad(torch.tensor(11.0))).item()  # at most ~10 degrees
    letter = torch.zeros(1, 1, 15, 15)
    letter[..., 3:12, 4] = 1.0   # an "L": its mirror image is a different shape
    letter[..., 11, 4:11] = 1.0
    mirror = torch.flip(letter, dims=[-1])[0]
    for image in shift_and_rotate(letter.repeat(32, 1, 1, 1), 0, 15.0, seed=2):
        assert (image * letter[0]).sum() > (image * mirror).sum()
    asymmetric = torch.rand(8, 1, 10, 10)
    assert torch.equal(shift_and_rotate(asymmetric, 0, 0.0, seed=1), asymmetric)  # both off: unchanged


def test_a_run_trains_with_shifts_rotations_and_adamw_and_records_them(tmp_path) -> None:
    import json

    import pytest

    from specformer_deploy.training.train import TrainConfig, train

    cfg = TrainConfig(epochs=3, batch_size=32, warmup_epochs=0, msvp=False, translate=1, rotate=10.0,
                      optimizer="adamw", lr=2e-3, weight_decay=0.05, seed=0)
    summary = train(cfg, tmp_path / "run", show_progress=False)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (stored["translate"], stored["rotate"], stored["optimizer"]) == (1, 10.0, "adamw")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.05 and summary["epochs"] == 3  # AdamW with augmented inputs learns
    with pytest.raises(ValueError, match="--optimizer must be sgd or adamw"):
        TrainConfig(optimizer="lamb").validate()
    with pytest.raises(ValueError, match="--rotate must be between 0 and 45"):
        TrainConfig(rotate=90.0).validate()
