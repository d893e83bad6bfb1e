"""Training on the built-in data: the loss falls, MSVP lowers sigma, a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from specformer_deploy.training.checkpoint import CheckpointError
from specformer_deploy.training.data import load_dataset
from specformer_deploy.model.factory import ModelError
from specformer_deploy.training.msvp import MSVP
from specformer_deploy.training.train import TrainConfig, load_run_model, train

QUICK = dict(epochs=2, batch_size=32, warmup_epochs=1)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_few_steps_on_digits_lower_the_loss(tiny_model) -> None:
    bundle = load_dataset("digits", 16)
    x = torch.stack([bundle.train[i][0] for i in range(64)])
    y = torch.tensor([bundle.train[i][1] for i in range(64)])
    msvp = MSVP(tiny_model).train()
    tiny_model.train()
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.02, momentum=0.9)
    with torch.no_grad():
        before = float(F.cross_entropy(tiny_model(x), y))
    for _ in range(20):
        opt.zero_grad()
        (F.cross_entropy(tiny_model(x), y) + msvp.penalty()).backward()
        opt.step()
    with torch.no_grad():
        after = float(F.cross_entropy(tiny_model(x), y))
    assert after < 0.95 * before


def test_msvp_ends_with_lower_max_sigma_than_vanilla(tmp_path: Path) -> None:
    common = dict(QUICK, lambda_q=1e-2, lambda_k=1e-2, lambda_v=1e-2, seed=3)
    vanilla = train(TrainConfig(msvp=False, **common), tmp_path / "vanilla", show_progress=False)
    penalized = train(TrainConfig(msvp=True, **common), tmp_path / "msvp", show_progress=False)
    for name in ("q", "k", "v"):
        assert penalized["max_sigma"][name] < vanilla["max_sigma"][name], name
    lines = (tmp_path / "msvp" / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 2 and set(record) >= {"loss", "test_accuracy", "time_s", "max_sigma"}
    assert len(record["max_sigma"]["q"]) == 4  # one value per layer


def test_run_directory_is_complete_and_safe_to_load(tmp_path: Path) -> None:
    summary = train(TrainConfig(**QUICK), tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lambda_q"] == 1e-4 and config["model"]["name"] == "specformer-tiny"
    assert config["data"]["class_names"] == [str(i) for i in range(10)]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["msvp"]) == {f"{p}_{i}" for p in "uv" for i in range(4)}
    vectors = load_file(str(run / "msvp_vectors.safetensors"))
    assert torch.equal(vectors["u_0"], state["msvp"]["u_0"])
    model, _ = load_run_model(run)
    bundle = load_dataset("digits", 16)
    x = bundle.test.images[:360].float()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == bundle.test.labels).float().mean())
    assert acc == pytest.approx(summary["test_accuracy"])
    assert not list(run.glob("*.tmp"))


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL a real training process after its first epoch, resume it, compare with an uninterrupted run."""
    args = ["--epochs", "3", "--seed", "7", "--lambda-q", "1e-3"]
    reference = _cli("train", "--out", str(tmp_path / "ref"), *args)
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "specformer_deploy", "train", "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if (killed / "checkpoint.pt").exists() and metrics.exists() and metrics.read_text().count("\n") >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] < 3
    resumed = _cli("train", "--out", str(killed), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 3
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va, vb = load_file(str(tmp_path / "ref" / "msvp_vectors.safetensors")), load_file(str(killed / "msvp_vectors.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 3


def test_existing_run_and_truncated_checkpoint_are_clear_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0), run, show_progress=False)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(TrainConfig(epochs=1), run, show_progress=False)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(TrainConfig(), run, resume=True, show_progress=False)


def test_pretrained_weights_load_and_mismatch_is_clear(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0), run, show_progress=False)
    with pytest.raises(ModelError, match="not found"):
        train(TrainConfig(epochs=1, pretrained=str(tmp_path / "missing.pt")), tmp_path / "a", show_progress=False)
    with pytest.raises(ModelError, match="do not match the model"):
        train(TrainConfig(epochs=1, img_size=32, pretrained=str(run / "model.safetensors")), tmp_path / "b",
              show_progress=False)
    start = train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, lr=1e-9, pretrained=str(run / "model.safetensors")),
                  tmp_path / "c", show_progress=False)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=0.02)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    unknown = _cli("train", "--model", "no_such_vit", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "unknown model 'no_such_vit'" in unknown.stderr
    missing = _cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "y" / "checkpoint.pt").exists()
    helptext = _cli("train", "--help")
    assert helptext.returncode == 0 and "--lambda-q" in helptext.stdout and "--adversarial" in helptext.stdout


def test_adversarial_training_runs_pgd(tmp_path: Path) -> None:
    summary = train(TrainConfig(epochs=1, batch_size=64, warmup_epochs=0, adversarial=True, adv_steps=2),
                    tmp_path / "adv", show_progress=False)
    config = json.loads((tmp_path / "adv" / "config.json").read_text())
    assert config["train"]["adversarial"] is True and summary["adversarial"] is True
    assert 0.0 <= summary["test_accuracy"] <= 1.0
