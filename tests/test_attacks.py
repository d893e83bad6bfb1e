"""Attacks: parity with torchattacks, budgets, restarts, CW margin, AutoAttack, spec parsing, robust accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from specformer_deploy.attacks import (
    AttackSpec,
    autoattack,
    check_budget,
    cw_linf,
    cw_margin,
    default_step_size,
    fgsm,
    parse_attack,
    pgd,
    run_attack,
)
from specformer_deploy.model.factory import build_model, resolve_model_config
from specformer_deploy.robustness.robust_accuracy import robust_accuracy
from specformer_deploy.training.data import load_dataset

EPS = 8 / 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core machine: extra intra-op threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 32 test digits at 16x16 (many pixels at exactly 0, so the [0, 1] clamp matters), in
    three channels for ``tiny_model`` (a three-channel model)."""
    test = load_dataset("digits", 16, channels=3).test
    x = torch.stack([test[i][0] for i in range(32)])
    y = torch.tensor([test[i][1] for i in range(32)])
    return x, y


def predicted(model, x: torch.Tensor) -> torch.Tensor:
    """Labels the model gets right: a random model is ~10% accurate on real labels."""
    with torch.no_grad():
        return model(x).argmax(dim=1)


def assert_in_budget(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all(), size.max().item()


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs() <= 1e-6).float().mean().item()


# ------------------------------------------------------------------------------------ torchattacks parity

def test_fgsm_matches_torchattacks(tiny_model, digits) -> None:
    x, y = digits
    ours = fgsm(tiny_model, x, y, EPS)
    theirs = torchattacks.FGSM(tiny_model, eps=EPS)(x, y)
    # Their loss is the batch mean, ours the sum: same signs except where the gradient is ~0.
    assert agreement(ours, theirs) >= 0.999
    assert (ours - theirs).abs().max() <= EPS + 1e-6
    assert_in_budget(ours, x, EPS, "linf")


def test_pgd_without_random_start_matches_torchattacks(tiny_model, digits) -> None:
    x, y = digits
    ours = pgd(tiny_model, x, y, EPS, 2 / 255, 10, random_start=False)
    theirs = torchattacks.PGD(tiny_model, eps=EPS, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert agreement(ours, theirs) >= 0.999
    assert (ours - theirs).abs().max() <= 2 * EPS + 1e-6


# ------------------------------------------------------------------------------------ budgets

@pytest.mark.parametrize("spec", ["fgsm:8/255", "pgd:8/255:3", "pgd:8/255:3:2", "pgd-l2:0.5:3:2", "cw:8/255:3:2",
                                  "pgd:1:2", "pgd-l2:27.7:2"])
def test_adversarial_examples_stay_in_ball_and_box(tiny_model, digits, spec: str) -> None:
    x, y = digits
    parsed = parse_attack(spec, input_shape=tuple(x.shape[1:]))
    adv = run_attack(tiny_model, parsed, x, y, generator=torch.Generator().manual_seed(1))
    assert_in_budget(adv, x, parsed.eps, parsed.norm)


def test_pgd_keeps_the_old_call_and_the_model_state(tiny_model, digits) -> None:
    x, y = digits
    tiny_model.train()
    adv = pgd(tiny_model, x, y, EPS, 2 / 255, 2)  # positional, as train.py calls it
    assert tiny_model.training  # mode is the caller's business
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert_in_budget(adv, x, EPS, "linf")

    def broken(logits, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(tiny_model.eval(), x, y, EPS, 2 / 255, 2, loss_fn=broken)
    assert all(p.requires_grad for p in tiny_model.parameters())  # restored after an error too


def test_budget_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_budget(8, 0.1, 10)
    with pytest.raises(ValueError, match="diameter"):
        check_budget(28.0, 1.0, 10, "l2", (3, 16, 16))
    check_budget(27.7, 5.0, 10, "l2", (3, 16, 16))  # L2 steps may exceed 1
    with pytest.raises(ValueError, match="steps"):
        check_budget(0.1, 0.1, 0)
    with pytest.raises(ValueError, match="random_start"):
        pgd(torch.nn.Identity(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0.1, 0.1, 1,
            random_start=False, restarts=2)


# ------------------------------------------------------------------------------------ restarts

@pytest.mark.parametrize("norm,eps", [("linf", 5 / 255), ("l2", 0.4)])
def test_restarts_never_do_worse_than_one_run(tiny_model, digits, norm: str, eps: float) -> None:
    x, _ = digits
    y = predicted(tiny_model, x)
    step = default_step_size(eps, 3, norm)
    single = pgd(tiny_model, x, y, eps, step, 3, norm=norm, generator=torch.Generator().manual_seed(7))
    multi = pgd(tiny_model, x, y, eps, step, 3, norm=norm, generator=torch.Generator().manual_seed(7), restarts=4)
    assert_in_budget(multi, x, eps, norm)
    with torch.no_grad():
        logits_1, logits_4 = tiny_model(single), tiny_model(multi)
    fooled_1, fooled_4 = logits_1.argmax(1) != y, logits_4.argmax(1) != y
    assert 0 < int(fooled_1.sum()) < len(y), "the budget should fool some examples, not all"
    assert (fooled_4 | ~fooled_1).all()  # an example broken by one run stays broken
    assert fooled_4.sum() >= fooled_1.sum()
    loss_1 = F.cross_entropy(logits_1, y, reduction="none")
    loss_4 = F.cross_entropy(logits_4, y, reduction="none")
    robust = ~fooled_4
    assert (loss_4[robust] >= loss_1[robust] - 1e-5).all()
    assert (loss_4[robust] > loss_1[robust] + 1e-4).any()  # the extra restarts did find higher losses


# ------------------------------------------------------------------------------------ CW

def test_cw_margin_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    assert torch.allclose(cw_margin(logits, torch.tensor([0, 1])), torch.tensor([-2.0, 3.0]))


def test_cw_linf_increases_the_margin(tiny_model, digits) -> None:
    x, _ = digits
    y = predicted(tiny_model, x)
    adv = cw_linf(tiny_model, x, y, 2 / 255, steps=10, random_start=False)
    assert_in_budget(adv, x, 2 / 255, "linf")
    with torch.no_grad():
        before, after = cw_margin(tiny_model(x), y), cw_margin(tiny_model(adv), y)
    assert (before < 0).all()  # correctly classified by construction
    assert (after > before).float().mean() >= 0.95
    assert after.mean() > before.mean()


# ------------------------------------------------------------------------------------ AutoAttack

def test_autoattack_uses_the_real_number_of_classes(digits, monkeypatch) -> None:
    """A 5-class model: torchattacks' default n_classes=10 would make APGD-T index past the logits.

    Images 24..31 at 8/255 are chosen so that three survive APGD-CE and APGD-T breaks them, which
    exercises the targeted attack with 4 target classes in well under a second (the full standard
    AutoAttack, once images reach Square's 5000 queries, takes ~20 s on CPU even for 4 images).
    """
    from torchattacks.attacks.apgdt import APGDT

    torch.manual_seed(0)
    model = build_model(resolve_model_config("specformer-tiny", num_classes=5)).eval()
    x = digits[0][24:32]
    y = predicted(model, x)
    seen: list[tuple[int, int]] = []
    forward = APGDT.forward

    def spy(self, images, labels):
        seen.append((len(images), self.n_target_classes))
        return forward(self, images, labels)

    monkeypatch.setattr(APGDT, "forward", spy)
    rng = torch.get_rng_state()
    adv = autoattack(model, x, y, EPS)  # n_classes read from the model
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks' manual_seed does not leak out
    assert_in_budget(adv, x, EPS, "linf")
    assert all(targets == 4 for _, targets in seen)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).sum() >= 1
    with pytest.raises(ValueError, match="real number"):
        autoattack(model, x, y, EPS, n_classes=10)


def test_autoattack_on_eight_images(tiny_model, digits) -> None:
    x = digits[0][:8]
    y = predicted(tiny_model, x)
    adv = run_attack(tiny_model, parse_attack("autoattack:8/255"), x, y, num_classes=10)
    assert_in_budget(adv, x, EPS, "linf")
    with torch.no_grad():
        assert (tiny_model(adv).argmax(1) != y).all()  # a random model has no robustness at 8/255


# ------------------------------------------------------------------------------------ specs

def test_parse_attack_defaults_and_round_trip() -> None:
    spec = parse_attack("pgd:8/255")
    assert (spec.name, spec.norm, spec.steps, spec.restarts) == ("pgd", "linf", 10, 1)
    assert math.isclose(spec.eps, 8 / 255)
    assert math.isclose(spec.resolved_step_size, 2.5 * (8 / 255) / 10)
    assert parse_attack("CW:0.0314").steps == 20 and parse_attack("cw:0.0314").norm == "linf"
    assert parse_attack("fgsm:2/255").resolved_step_size == 2 / 255
    l2 = parse_attack("pgd-l2:0.5:20:5")
    assert (l2.norm, l2.steps, l2.restarts) == ("l2", 20, 5)
    assert parse_attack("autoattack-l2:0.5").norm == "l2"
    for text in ["pgd:8/255:20", "pgd-l2:0.5:20:5", "cw:0.0314:20", "fgsm:2/255", "autoattack:4/255"]:
        assert parse_attack(str(parse_attack(text))) == parse_attack(text)
    assert "PGD-20" in parse_attack("pgd:8/255:20").label and "8/255" in parse_attack("pgd:8/255:20").label
    assert AttackSpec("cw", 8 / 255).steps == 20


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("pgdx:8/255", "unknown name 'pgdx'"),
    ("pgd", "missing EPS"),
    ("pgd:8", "did you mean 8/255"),
    ("pgd:1.5", r"outside \(0, 1\]"),
    ("pgd:0", "> 0"),
    ("pgd:-0.1", "> 0"),
    ("pgd:8/0", "divides by zero"),
    ("pgd:eight", "EPS must be a number or a fraction like 8/255, got 'eight'"),
    ("pgd:inf", "finite"),
    ("pgd:8/255:0", "steps"),
    ("pgd:8/255:-3", "steps"),
    ("pgd:8/255:2.5", "whole number"),
    ("pgd:8/255:100000", "steps"),
    ("pgd:8/255:10:0", "restarts"),
    ("pgd:8/255:10:2:1", "too many fields"),
    ("fgsm:8/255:5", "no steps"),
    ("autoattack:8/255:100", "no steps"),
    ("pgd-l2:28", "diameter"),
])
def test_parse_attack_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_attack(text, input_shape=(3, 16, 16))


# ------------------------------------------------------------------------------------ robust accuracy

def test_robust_accuracy(tiny_model, digits) -> None:
    x = digits[0][:20]
    y = predicted(tiny_model, x)
    y[:4] = (y[:4] + 1) % 10  # four clean mistakes
    calls: list[tuple[int, int | None, int]] = []
    clean = robust_accuracy(tiny_model, (x, y), None, batch_size=8, progress=lambda *a: calls.append(a))
    assert (clean.correct, clean.clean_correct, clean.total) == (16, 16, 20) and float(clean) == 0.8
    assert [c[:2] for c in calls] == [(8, 20), (16, 20), (20, 20)] and calls[-1][2] == 16

    fgsm_result = robust_accuracy(tiny_model, (x[4:], y[4:]), "fgsm:8/255", batch_size=16)
    with torch.no_grad():
        expected = int((tiny_model(fgsm(tiny_model, x[4:], y[4:], EPS)).argmax(1) == y[4:]).sum())
    assert fgsm_result.correct == expected

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    attacked = robust_accuracy(tiny_model, loader, parse_attack("pgd:2/255:3"))
    assert attacked.total == 20 and attacked.clean_correct == 16 and attacked.correct <= 16
    as_dataset = robust_accuracy(tiny_model, torch.utils.data.TensorDataset(x, y), "pgd:2/255:3", batch_size=7)
    assert as_dataset.correct == attacked.correct  # same seed, same batches
    assert attacked.to_dict()["spec"] == "pgd:2/255:3"

    with pytest.warns(UserWarning, match="train mode"):
        robust_accuracy(tiny_model.train(), (x, y), None)
