"""ReLU-family MLPs: training options, export of MLP inputs, served local vs global MLP bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specformer_deploy.artifact.export import export_run
from specformer_deploy.model.mlp import ClippedReLU, mlp_modules
from specformer_deploy.serving.runtime import SpecformerRuntime
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.train import TrainConfig, load_run_model, train


def test_clipped_relu_threshold_is_used_as_non_negative() -> None:
    act = ClippedReLU(3)
    with torch.no_grad():
        act.threshold.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    out = act(torch.tensor([[3.0, 3.0, 1.0], [-1.0, 0.2, 5.0]]))
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.2, 2.0]]))


def test_sparsity_weight_needs_a_relu_family_mlp(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--sparsity-weight needs --mlp-act"):
        train(TrainConfig(epochs=1, sparsity_weight=1e-3), tmp_path / "x", show_progress=False)


def test_served_mlp_bounds_lie_between_exact_local_norm_and_global(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, mlp_act="clipped-relu", sparsity_weight=1e-3),
          run, show_progress=False)
    summary = export_run(run, run / "export" / "model.onnx")
    runtime = SpecformerRuntime(summary["onnx"])
    pixels = load_dataset("digits", 16).test[11][0]
    radius = 0.05
    layers = runtime.answer(pixels[None].numpy(), delta0=radius)[0]["mlp_lipschitz"]["layers"]
    model, config = load_run_model(run)
    assert config["model"]["mlp_act"] == "clipped-relu"
    taps = []
    hooks = [b.norm2.register_forward_hook(lambda m, a, o: taps.append(o.detach()[0].double()))
             for b in model.net.blocks]
    with torch.no_grad():
        model(pixels[None])
    for h in hooks:
        h.remove()
    rng = np.random.default_rng(0)
    for layer, (mlp, x0) in enumerate(zip(mlp_modules(model), taps)):
        mlp = mlp.double()
        served = layers[layer]
        assert served["local"] <= served["global"] * (1 + 1e-9)
        assert 0 < served["dropped_fraction"] < 1
        for step in range(3):
            direction = torch.from_numpy(rng.standard_normal(x0.shape))
            x = x0 + (0 if step == 0 else radius) * direction / direction.norm()
            jac = torch.func.jacrev(mlp)(x).reshape(x.numel(), x.numel())
            assert float(torch.linalg.matrix_norm(jac, ord=2)) <= served["local"] * (1 + 1e-6)
