"""Training objectives for randomized smoothing: consistency regularization and SmoothAdv.

The losses are checked against scipy on the same logits; SmoothAdv's attack against the
smoothed loss estimated with many fresh noise draws; the objectives end to end on real runs
(digits at 8 x 8 pixels, patch 4: four tokens keep every run to seconds), including a resume
that must end on the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import special

from specformer_deploy.model.factory import NormalizedClassifier
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.smoothing_objectives import (
    consistency_regularizer,
    consistency_terms,
    gaussian_noise,
    noisy_copies,
    smoothadv_attack,
    smoothadv_step_size,
    warmed_up_eps,
)
from specformer_deploy.training.train import TrainConfig, _criterion, _objective_loss, load_run_model, train

SMALL = dict(img_size=8, patch_size=4, batch_size=64, warmup_epochs=0, noise_sd=0.25, seed=3)


# ------------------------------------------------------------------ consistency: the terms against scipy

def _logits(copies: int, batch: int = 6, classes: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 2, (copies * batch, classes)).astype(np.float32))


def _scipy_terms(logits: np.ndarray, copies: int) -> tuple[float, float]:
    """mean over images of mean_i KL(p_bar || p_i), and of H(p_bar), from scipy's own functions."""
    p = special.softmax(logits.astype(np.float64).reshape(copies, -1, logits.shape[1]), axis=-1)
    p_bar = p.mean(axis=0)
    kl = np.mean([special.rel_entr(p_bar, p[i]).sum(axis=-1) for i in range(copies)], axis=0)
    return float(kl.mean()), float(special.entr(p_bar).sum(axis=-1).mean())


def test_the_kl_term_is_zero_when_the_copies_agree_and_positive_otherwise() -> None:
    one = _logits(1)
    same = one.repeat(3, 1)  # three copies with identical logits
    kl, entropy = consistency_terms(same, 3)
    assert abs(float(kl)) < 1e-6
    assert float(entropy) == pytest.approx(_scipy_terms(one.numpy(), 1)[1], rel=1e-5)
    kl, _ = consistency_terms(_logits(3), 3)
    assert float(kl) > 0.05
    # one image's copies disagreeing is enough
    nudged = same.clone()
    nudged[0, 0] += 1.0
    assert float(consistency_terms(nudged, 3)[0]) > 0


@pytest.mark.parametrize("copies", [2, 4])
def test_the_kl_and_entropy_terms_equal_scipys(copies: int) -> None:
    logits = _logits(copies, seed=copies)
    kl, entropy = consistency_terms(logits, copies)
    expected_kl, expected_entropy = _scipy_terms(logits.numpy(), copies)
    assert float(kl) == pytest.approx(expected_kl, rel=1e-5)
    assert float(entropy) == pytest.approx(expected_entropy, rel=1e-5)
    # H(p_bar) = -sum p_bar log p_bar, written out
    p_bar = special.softmax(logits.double().numpy().reshape(copies, -1, 5), axis=-1).mean(axis=0)
    assert float(entropy) == pytest.approx(float((-(p_bar * np.log(p_bar)).sum(axis=1)).mean()), rel=1e-5)
    assert float(consistency_regularizer(logits, copies, 20.0, 0.5)) == pytest.approx(
        20.0 * expected_kl + 0.5 * expected_entropy, rel=1e-5)


@pytest.mark.parametrize("objective, copies, label_smoothing", [
    ("consistency", 2, 0.0), ("consistency", 2, 0.1), ("smoothadv-consistency", 4, 0.0)])
def test_the_training_loss_is_the_copies_cross_entropy_plus_the_regularizer(objective: str, copies: int,
                                                                             label_smoothing: float) -> None:
    """What `train --smoothing-objective consistency` (or SmoothAdv's variant, on the attacked
    copies) minimizes on a batch of logits, against the paper's formula computed with scipy: mean
    over copies and images of CE (with the run's label smoothing), + lambda * mean_i KL(p_bar || p_i)
    + eta * H(p_bar)."""
    lam, eta = 7.0, 0.3
    cfg = TrainConfig(noise_sd=0.5, smoothing_objective=objective, consistency_lambda=lam, consistency_eta=eta,
                      label_smoothing=label_smoothing, mixup=False)
    assert cfg.copies == copies
    logits = _logits(copies, batch=8, classes=10, seed=11)
    y = torch.arange(8) % 10
    state = SimpleNamespace(cfg=cfg, criterion=_criterion(cfg, None))
    loss = float(_objective_loss(state, logits, y))
    log_p = special.log_softmax(logits.double().numpy(), axis=1)
    labels = np.tile(y.numpy(), copies)
    ce = -(1 - label_smoothing) * log_p[np.arange(len(labels)), labels] - label_smoothing * log_p.mean(axis=1)
    kl, entropy = _scipy_terms(logits.numpy(), copies)
    assert loss == pytest.approx(ce.mean() + lam * kl + eta * entropy, rel=1e-5)


def test_soft_mixup_targets_are_shared_by_the_copies() -> None:
    """With Mixup the target is a distribution per image; each copy is scored against its image's."""
    cfg = TrainConfig(noise_sd=0.5, smoothing_objective="consistency", consistency_lambda=0.0, consistency_eta=0.0)
    from timm.data import Mixup

    criterion = _criterion(cfg, Mixup(num_classes=10))
    logits = _logits(2, batch=4, classes=10, seed=5)
    target = torch.from_numpy(special.softmax(np.random.default_rng(1).normal(size=(4, 10)), axis=1)).float()
    loss = float(_objective_loss(SimpleNamespace(cfg=cfg, criterion=criterion), logits, target))
    log_p = special.log_softmax(logits.double().numpy(), axis=1)
    expected = -(np.tile(target.double().numpy(), (2, 1)) * log_p).sum(axis=1).mean()
    assert loss == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ SmoothAdv's attack

def test_warm_up_and_step_follow_salman_et_al() -> None:
    assert [warmed_up_eps(1.0, e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmed_up_eps(0.5, 0, 0) == 0.5
    assert smoothadv_step_size(1.0, 10) == pytest.approx(0.2)


@pytest.fixture(scope="module")
def noise_trained(tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small model trained with Gaussian noise 0.25 (about 75% clean accuracy in 2 epochs) and 24
    test images."""
    run = tmp_path_factory.mktemp("smoothadv") / "run"
    train(TrainConfig(epochs=2, img_size=8, patch_size=4, batch_size=16, warmup_epochs=1, msvp=False, mixup=False,
                      noise_sd=0.25, seed=0), run, show_progress=False)
    model, _ = load_run_model(run)
    test = load_dataset("digits", 8).test
    return model, test.images[:24].float(), test.labels[:24]


def _smoothed_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """-log of the smoothed soft classifier's probability of y per image, with `samples` fresh draws."""
    noise = gaussian_noise(x.shape, 0.25, samples, seed)
    with torch.no_grad():
        p = torch.softmax(model(noisy_copies(x, noise)).double(), dim=1).reshape(samples, len(x), -1).mean(dim=0)
    return -torch.log(p[torch.arange(len(y)), y])


@pytest.mark.slow
def test_smoothadv_stays_in_the_ball_and_raises_the_smoothed_loss(noise_trained) -> None:
    model, x, y = noise_trained
    eps = 0.5
    noise = gaussian_noise(x.shape, 0.25, 4, seed=123)  # the attack's m = 4 draws
    params = [p.detach().clone() for p in model.parameters()]
    adv = smoothadv_attack(model, x, y, noise, eps, steps=5)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no weight gradients, restored
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    moved = (adv - x).flatten(1).norm(dim=1)
    assert float(moved.max()) <= eps + 1e-5 and float(moved.min()) > eps / 2
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # judged with 1,000 fresh draws per image, none of them the attack's
    clean = _smoothed_loss(model, x, y, 1000, seed=7)
    attacked = _smoothed_loss(model, adv, y, 1000, seed=7)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    random = (x + direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * moved.view(-1, 1, 1, 1)).clamp(0, 1)
    randomly_moved = _smoothed_loss(model, random, y, 1000, seed=7)
    assert float(attacked.mean()) > float(clean.mean()) + 0.1, (attacked.mean(), clean.mean())
    assert float((attacked > clean).float().mean()) >= 0.8
    assert float(attacked.mean()) > float(randomly_moved.mean()) + 0.1


@pytest.mark.slow
def test_smoothadv_consistency_trains_on_the_noisy_copies_of_the_attacked_image(noise_trained) -> None:
    """The batch `train --smoothing-objective smoothadv-consistency` feeds the model, against one
    built by hand as Jeong & Shin's train_consistency.py --adv-training builds it: draw the step's m
    noises, attack with them held fixed (radius warmed up by epoch), add the same draws to the
    attacked image. The batch must differ from the clean image's copies (the attack moved it)."""
    from specformer_deploy.training.distributed import DistContext
    from specformer_deploy.training.train import noise_seed, training_batch

    model, x, y = noise_trained
    cfg = TrainConfig(noise_sd=0.25, smoothing_objective="smoothadv-consistency", noise_copies=3, smoothadv_eps=0.5,
                      smoothadv_steps=4, smoothadv_warmup_epochs=4, consistency_lambda=1.0, seed=2)
    cfg.validate()
    step, steps_per_epoch = 7, 5  # epoch 1: radius 2 * 0.5 / 4
    state = SimpleNamespace(cfg=cfg, step=step, steps_per_epoch=steps_per_epoch, ctx=DistContext(device="cpu"),
                            model=model, attack_model=model, mixup=None, device=torch.device("cpu"))
    model.train()
    try:
        batch, target = training_batch(state, x, y)
        assert model.training  # the attack ran in eval mode and gave the model back in training mode
    finally:
        model.eval()
    noise = gaussian_noise(x.shape, 0.25, 3, noise_seed(2, step, 0))
    expected = noisy_copies(smoothadv_attack(model, x, y, noise, 0.25, steps=4), noise)
    assert torch.equal(target, y) and batch.shape == (3 * len(x), *x.shape[1:])
    assert torch.allclose(batch, expected, atol=1e-6)
    assert float((batch - noisy_copies(x, noise)).flatten(1).norm(dim=1).max()) > 0.2


def test_an_export_records_both_objectives_parameters_of_smoothadv_consistency() -> None:
    """A model's metadata names what shaped its radii: SmoothAdv's attack and the consistency weights."""
    from specformer_deploy.artifact.export import _smoothing_section

    train_options = TrainConfig(noise_sd=0.5, smoothing_objective="smoothadv-consistency",
                                consistency_lambda=1.0).to_dict()
    assert _smoothing_section({"train": train_options}) == {"smoothing": {
        "sigma": 0.5, "objective": "smoothadv-consistency", "noise_copies": 4, "smoothadv_eps": 255 / 256,
        "smoothadv_steps": 10, "smoothadv_warmup_epochs": 10, "consistency_lambda": 1.0, "consistency_eta": 0.5}}


def test_a_zero_step_or_zero_radius_attack_returns_x(tiny_model) -> None:
    x = load_dataset("digits", 16).test.images[:4].float().expand(-1, 3, -1, -1)  # tiny_model: 3 channels
    model, y = tiny_model.eval(), torch.tensor([0, 1, 2, 3])
    noise = gaussian_noise(x.shape, 0.25, 2, seed=1)
    assert torch.equal(smoothadv_attack(model, x, y, noise, 0.5, steps=0), x)
    assert torch.equal(smoothadv_attack(model, x, y, noise, 0.0, steps=3), x)


# ------------------------------------------------------------------ the objectives in real runs

def _forward_batches(cfg: TrainConfig, out: Path) -> list[int]:
    """Batch sizes of the training-mode forward passes of a real run."""
    sizes: list[int] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, NormalizedClassifier) and module.training:
            sizes.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg, out, show_progress=False)
    finally:
        handle.remove()
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("objective, options, copies", [
    ("consistency", {}, 2),
    ("smoothadv", {"noise_copies": 2, "smoothadv_steps": 2, "smoothadv_eps": 0.5}, 2),
    ("smoothadv-consistency", {"noise_copies": 2, "smoothadv_steps": 2, "consistency_lambda": 1.0}, 2),
    ("gaussian", {"noise_copies": 3}, 3),
])
def test_each_objective_trains_end_to_end_with_msvp(tmp_path: Path, objective: str, options: dict,
                                                    copies: int) -> None:
    """One epoch per objective (MSVP on, l2 attention for one of them): every training forward pass
    is one batch of m x 64 images, the loss is finite, and config.json records the options."""
    attention = "l2" if objective == "smoothadv" else "dot"
    cfg = TrainConfig(epochs=1, smoothing_objective=objective, attention=attention, **options, **SMALL)
    sizes = _forward_batches(cfg, tmp_path / objective)
    assert sizes and set(sizes) == {copies * 64}
    assert len(sizes) == 1437 // 64  # one training forward per step: the attack runs in eval mode
    metrics = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics[-1]["loss"]) and metrics[-1]["penalty"] > 0  # MSVP's penalty joined the loss
    stored = json.loads((tmp_path / objective / "config.json").read_text())["train"]
    assert stored["smoothing_objective"] == objective and stored["msvp"] is True
    assert {k: stored[k] for k in options} == options


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(record: dict) -> None:
    raise _Interrupt


@pytest.mark.slow
@pytest.mark.parametrize("objective, options, other_seed", [
    ("consistency", {"mixup": True}, True),
    ("smoothadv", {"noise_copies": 2, "smoothadv_steps": 2, "smoothadv_warmup_epochs": 2}, False),
])
def test_a_resumed_run_ends_on_the_uninterrupted_weights(tmp_path: Path, objective: str, options: dict,
                                                         other_seed: bool) -> None:
    """Two epochs straight against one epoch, an interruption, and --resume: the noise (and
    SmoothAdv's warmed-up radius) follow the saved step, so the weights are equal bit for bit.
    A run with another seed (once: it costs a third run) ends elsewhere, so the check can fail."""
    cfg = dict(epochs=2, smoothing_objective=objective, **options, **SMALL)
    train(TrainConfig(**cfg), tmp_path / "straight", show_progress=False)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**cfg), tmp_path / "cut", show_progress=False, on_epoch_end=_stop_after_first_epoch)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train(TrainConfig(**cfg), tmp_path / "cut", resume=True, show_progress=False)
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    if not other_seed:
        return
    other = TrainConfig(**{**cfg, "seed": 4})
    train(other, tmp_path / "other", show_progress=False)
    different = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert not all(torch.equal(straight[k], different[k]) for k in straight)


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("options, message", [
    ({"smoothing_objective": "macer", "noise_sd": 0.25},
     "must be one of gaussian, consistency, smoothadv, smoothadv-consistency"),
    ({"smoothing_objective": "smoothadv-consistency", "noise_sd": 0.0}, "needs --noise-sd SIGMA > 0"),
    ({"smoothing_objective": "smoothadv-consistency", "noise_sd": 0.5, "adversarial": True}, "drop --adversarial"),
    ({"smoothing_objective": "smoothadv-consistency", "noise_sd": 0.5, "noise_copies": 1},
     "smoothadv-consistency compares noisy copies and needs --noise-copies >= 2"),
    ({"smoothing_objective": "consistency"}, "needs --noise-sd SIGMA > 0"),
    ({"smoothing_objective": "smoothadv", "noise_sd": 0.0}, "needs --noise-sd SIGMA > 0"),
    ({"smoothing_objective": "smoothadv", "noise_sd": 0.5, "adversarial": True}, "drop --adversarial"),
    ({"smoothing_objective": "consistency", "noise_sd": 0.5, "noise_copies": 1}, "needs --noise-copies >= 2"),
    ({"noise_copies": 0, "noise_sd": 0.5}, "--noise-copies must be an integer from 1 to 64"),
    ({"noise_copies": 500, "noise_sd": 0.5}, "--noise-copies must be an integer from 1 to 64"),
    ({"noise_copies": 2}, "needs --noise-sd > 0"),
    ({"smoothing_objective": "consistency", "noise_sd": 0.5, "consistency_lambda": -1.0}, "--consistency-lambda"),
    ({"smoothing_objective": "consistency", "noise_sd": 0.5, "consistency_eta": float("nan")}, "--consistency-eta"),
    ({"smoothing_objective": "smoothadv", "noise_sd": 0.5, "smoothadv_eps": 0.0}, "--smoothadv-eps"),
    ({"smoothing_objective": "smoothadv", "noise_sd": 0.5, "smoothadv_steps": 0}, "--smoothadv-steps"),
    ({"smoothing_objective": "smoothadv", "noise_sd": 0.5, "smoothadv_warmup_epochs": -1}, "--smoothadv-warmup"),
])
def test_nonsense_options_are_refused_with_a_message_that_names_them(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        TrainConfig(**options).validate()


def test_paper_defaults_and_hard_labels_for_smoothadv() -> None:
    consistency = TrainConfig(noise_sd=0.5, smoothing_objective="consistency")
    smoothadv = TrainConfig(noise_sd=0.5, smoothing_objective="smoothadv")
    consistency.validate()
    smoothadv.validate()
    assert (consistency.copies, consistency.consistency_lambda, consistency.consistency_eta) == (2, 20.0, 0.5)
    assert (smoothadv.copies, smoothadv.smoothadv_steps, smoothadv.smoothadv_warmup_epochs) == (4, 10, 10)
    assert smoothadv.smoothadv_eps == 255 / 256 and TrainConfig(noise_sd=0.5).copies == 1
    assert consistency.use_mixup and not smoothadv.use_mixup  # SmoothAdv attacks and trains on hard labels
    assert _criterion(smoothadv, None).label_smoothing == 0.0
    both = TrainConfig(noise_sd=0.5, smoothing_objective="smoothadv-consistency")
    both.validate()
    assert (both.copies, both.smoothadv_steps, both.smoothadv_eps, both.hard_labels, both.use_mixup) == (
        4, 10, 255 / 256, True, False)


def test_the_cli_refuses_an_objective_without_noise(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "specformer_deploy", "train", "--smoothing-objective", "consistency",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs --noise-sd SIGMA > 0" in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()
    helptext = subprocess.run([sys.executable, "-m", "specformer_deploy", "train", "--help"], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "400"}).stdout
    words = " ".join(helptext.replace("│", " ").split())
    for text in ("--smoothing-objective", "Jeong & Shin", "Salman et al.", "--noise-copies", "--consistency-lambda",
                 "--consistency-eta", "--smoothadv-eps", "--smoothadv-steps", "--smoothadv-warmup-epochs"):
        assert text in words, text


@pytest.mark.slow
def test_consistency_under_torchrun_keeps_the_replicas_equal(tmp_path: Path) -> None:
    """Two CPU processes (gloo): each rank's m copies go through one DDP forward, the KL and
    entropy terms' gradients are averaged with the cross-entropy's, and the replicas end the
    epoch with identical weights (rank 0's drift report is exactly 0)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", "-m",
               "specformer_deploy", "train", "--epochs", "1", "--img-size", "8", "--patch-size", "4", "--batch-size",
               "64", "--warmup-epochs", "0", "--noise-sd", "0.25", "--smoothing-objective", "consistency", "--device",
               "cpu", "--out", str(out), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # rank 0 alone prints the summary
    assert summary["world_size"] == 2 and summary["smoothing_objective"] == "consistency"
    assert summary["noise_copies"] == 2 and math.isfinite(summary["loss"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["replicas"]["max_weight_drift"] == 0.0
    stored = json.loads((out / "config.json").read_text())
    assert stored["distributed"]["world_size"] == 2 and stored["train"]["smoothing_objective"] == "consistency"
