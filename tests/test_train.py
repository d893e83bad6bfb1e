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

from specformer_deploy.model.factory import ModelError, NormalizedClassifier
from specformer_deploy.training.checkpoint import CheckpointError
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.msvp import MSVP
from specformer_deploy.training.train import TrainConfig, load_run_model, train

QUICK = dict(epochs=2, batch_size=32, warmup_epochs=1)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_few_steps_on_digits_lower_the_loss(tiny_model) -> None:
    bundle = load_dataset("digits", 16, channels=3)
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
    """SIGKILL a real training process after its first epoch, resume it, compare with an uninterrupted run
    (with Gaussian noise augmentation on: its noise is a function of the seed and the saved step)."""
    args = ["--epochs", "3", "--seed", "7", "--lambda-q", "1e-3", "--noise-sd", "0.1"]
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
    va = load_file(str(tmp_path / "ref" / "msvp_vectors.safetensors"))
    vb = load_file(str(killed / "msvp_vectors.safetensors"))
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
    with pytest.raises(ModelError, match="does not fit the model"):
        train(TrainConfig(epochs=1, img_size=32, pretrained=str(run / "model.safetensors")), tmp_path / "b",
              show_progress=False)
    start = train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, lr=1e-9,
                              pretrained=str(run / "model.safetensors")), tmp_path / "c", show_progress=False)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=0.02)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    unknown = _cli("train", "--model", "no_such_vit", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "unknown model 'no_such_vit'" in unknown.stderr
    missing = _cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "y" / "checkpoint.pt").exists()
    both = _cli("train", "--config", str(tmp_path / "x" / "config.json"), "--resume", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "pass one of them" in both.stderr
    helptext = _cli("train", "--help")
    assert helptext.returncode == 0 and "--lambda-q" in helptext.stdout and "--adversarial" in helptext.stdout


def test_adversarial_training_trains_on_pgd_examples(tmp_path: Path) -> None:
    """Watch every training-mode forward pass of a PGD-AT epoch (a global forward pre-hook on
    the real run): each batch is a batch of distinct training images, each moved by at most eps
    (Linf) and by nearly eps somewhere, and the move raises the loss under that step's weights
    more than random noise of the same size does. Standard training, or noise instead of PGD,
    fails this."""
    eps = 8 / 255
    bundle = load_dataset("digits", 16)
    clean, labels = bundle.train.images, bundle.train.labels
    seen: list[dict[str, torch.Tensor]] = []
    busy = False

    def record(module: torch.nn.Module, args: tuple) -> None:
        nonlocal busy
        if busy or not isinstance(module, NormalizedClassifier) or not module.training:
            return
        busy = True
        try:
            x = args[0].detach()
            distance, index = torch.cdist(x.flatten(1), clean.flatten(1), p=float("inf")).min(dim=1)
            source, y = clean[index], labels[index]
            noise = (source + eps * torch.randint(0, 2, source.shape).mul(2).sub(1)).clamp(0, 1)
            module.eval()
            with torch.no_grad():
                losses = [float(F.cross_entropy(module(batch), y)) for batch in (x, source, noise)]
            module.train()
            seen.append({"distance": distance, "index": index, "losses": torch.tensor(losses)})
        finally:
            busy = False

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(TrainConfig(epochs=1, batch_size=64, warmup_epochs=0, adversarial=True, adv_eps=eps, adv_steps=2,
                          seed=4), tmp_path / "adv", show_progress=False)
    finally:
        handle.remove()
    assert len(seen) == len(clean) // 64  # one forward pass per optimizer step, full batches
    distance = torch.cat([s["distance"] for s in seen])
    assert float(distance.max()) <= eps + 1e-6
    assert float(distance.min()) > eps / 2
    index = torch.cat([s["index"] for s in seen])
    assert index.unique().numel() == index.numel()  # an epoch of distinct images, each perturbed once
    losses = torch.stack([s["losses"] for s in seen])  # [steps, (pgd, clean, noise)]
    assert bool((losses[:, 0] > losses[:, 1]).all()) and bool((losses[:, 0] > losses[:, 2]).all()), losses


def _training_inputs(cfg: TrainConfig, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training-mode input of a real run (a global forward pre-hook), one row per forward
    pass, and each input minus its nearest training image (L2)."""
    clean = load_dataset("digits", 16).train.images.flatten(1)
    inputs: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, NormalizedClassifier) and module.training:
            inputs.append(args[0].detach().flatten(1))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg, out, show_progress=False)
    finally:
        handle.remove()
    seen = torch.stack(inputs)
    flat = seen.flatten(0, 1)
    return seen, flat - clean[torch.cdist(flat, clean).argmin(dim=1)]


def test_noise_training_feeds_the_model_images_plus_gaussian_noise_of_std_sigma(tmp_path: Path) -> None:
    """`--noise-sd 0.2` (Mixup off, so each input is one training image): what the model sees
    minus the image it came from is N(0, 0.2^2) per pixel (std, mean, excess kurtosis, and the
    Gaussian's tail mass beyond 2 sigma), unclipped (pixels leave [0, 1]); `--noise-sd 0` feeds the
    images untouched. Uniform noise, clipping, a wrong scale or noise on one batch only fail."""
    from scipy import stats

    sigma = 0.2
    common = dict(epochs=1, batch_size=64, warmup_epochs=0, mixup=False, seed=2)
    seen, noisy = _training_inputs(TrainConfig(noise_sd=sigma, **common), tmp_path / "noisy")
    assert seen.shape[0] == 1437 // 64  # one forward pass per optimizer step
    per_step = noisy.reshape(seen.shape[0], -1).std(dim=1)
    assert float((per_step / sigma - 1).abs().max()) < 0.02  # every step, not just on average
    values = noisy.flatten().double().numpy()
    assert abs(values.std() / sigma - 1) < 0.005 and abs(values.mean()) < 0.002
    assert abs(stats.kurtosis(values)) < 0.05  # Gaussian: 0; uniform: -1.2
    assert abs((abs(values) > 2 * sigma).mean() - 2 * stats.norm.sf(2)) < 0.003
    assert float(seen.min()) < -0.5 and float(seen.max()) > 1.5  # not clipped to [0, 1]
    _, plain = _training_inputs(TrainConfig(noise_sd=0.0, **common), tmp_path / "plain")
    assert float(plain.abs().max()) == 0.0
    config = json.loads((tmp_path / "noisy" / "config.json").read_text())
    assert config["train"]["noise_sd"] == sigma


def test_a_run_repeated_from_its_config_json_ends_with_the_same_weights(tmp_path: Path) -> None:
    """`train --config runs/a/config.json --out runs/b` repeats run a (Mixup, noise, MSVP and the
    data order included); an option on the command line overrides the file's. The real command, run
    in this process (typer's CliRunner) to spare two interpreter start-ups."""
    from typer.testing import CliRunner

    from specformer_deploy.cli import app

    def cli(*args: str) -> None:
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code == 0, (result.output, result.exception)

    cli("--out", str(tmp_path / "a"), "--epochs", "1", "--seed", "5", "--lambda-q", "1e-3", "--mixup-alpha", "0.4",
        "--noise-sd", "0.1", "--device", "cpu")
    config = str(tmp_path / "a" / "config.json")
    cli("--config", config, "--out", str(tmp_path / "b"))
    cli("--config", config, "--seed", "6", "--out", str(tmp_path / "c"))

    def run(name: str) -> tuple[dict, dict, dict]:
        options = json.loads((tmp_path / name / "config.json").read_text())["train"]
        return (options, load_file(str(tmp_path / name / "model.safetensors")),
                load_file(str(tmp_path / name / "msvp_vectors.safetensors")))

    (a, weights_a, vectors_a), (b, weights_b, vectors_b), (c, weights_c, _) = run("a"), run("b"), run("c")
    assert a == b and (a["epochs"], a["seed"], a["lambda_q"], a["mixup_alpha"], a["noise_sd"]) == (1, 5, 1e-3, 0.4, 0.1)
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(vectors_a[k], vectors_b[k]) for k in vectors_a)
    assert c == {**a, "seed": 6}
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_options_files_accept_yaml_and_refuse_what_they_cannot_mean(tmp_path: Path) -> None:
    from specformer_deploy.training.config import ConfigFileError, read_options_file

    options = tmp_path / "options.yaml"
    options.write_text("# a sweep point\nbatch-size: 64\nlr: 5e-2\nmixup: null\nmsvp: false\ndata_dir: /data\n")
    assert read_options_file(options) == {"batch_size": 64, "lr": 0.05, "mixup": None, "msvp": False,
                                          "data_dir": "/data"}
    cases = {"epochs: 2\nbogus: 1\n": "unknown option\\(s\\) bogus; known options are model, ",
             "epochs: '2'\n": "epochs must be of type",
             "lr: true\n": "lr must be of type",
             "- epochs\n": "must hold a mapping",
             "train: {epochs: 2}\nextra_section: 1\n": "unknown section\\(s\\) extra_section",
             "format_version: 99\ntrain: {epochs: 2}\n": "format_version 99",
             "epochs: [\n": "not readable YAML"}
    for text, message in cases.items():
        options.write_text(text)
        with pytest.raises(ConfigFileError, match=message):
            read_options_file(options)
    with pytest.raises(ConfigFileError, match="does not exist"):
        read_options_file(tmp_path / "missing.yaml")


def test_train_command_options_are_the_train_config_fields() -> None:
    """The command is generated from TrainConfig: same names, same defaults, and the flags the
    README uses (a field added to the dataclass is an option without touching the CLI)."""
    from typer.main import get_command

    from specformer_deploy.cli import app
    from specformer_deploy.model.factory import DEFAULT_MODEL
    from specformer_deploy.training.config import command_line_fields

    params = {p.name: p for p in get_command(app).commands["train"].params}
    fields = {f.name: f.default for f, _ in command_line_fields()}
    assert set(params) == set(fields) | {"config", "out", "resume", "json_output"}
    assert {name: params[name].default for name in fields} == fields
    assert TrainConfig().model == DEFAULT_MODEL and TrainConfig() == TrainConfig(**fields)
    flags = {name: (p.opts, p.secondary_opts) for name, p in params.items()}
    assert flags["msvp"] == (["--msvp"], ["--no-msvp"]) and flags["mixup"] == (["--mixup"], ["--no-mixup"])
    assert flags["compile"] == (["--compile"], []) and flags["adversarial"] == (["--adversarial"], [])
    assert flags["json_output"] == (["--json"], []) and flags["batch_size"] == (["--batch-size"], [])
    assert flags["lambda_q"] == (["--lambda-q"], []) and flags["data_dir"] == (["--data-dir"], [])
