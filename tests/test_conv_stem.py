"""The convolutional stem (issue 22's small-data lever): timm's blocks behind early convolutions train,
export with parity, audit, and keep every attention certificate applicable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specformer_deploy.artifact.audit import audit_file
from specformer_deploy.artifact.export import export_run
from specformer_deploy.model.factory import ModelError, build_model, resolve_model_config
from specformer_deploy.model.stems import ConvStem
from specformer_deploy.serving.runtime import SpecformerRuntime
from specformer_deploy.training.config import TrainConfig
from specformer_deploy.training.train import train


def test_stem_reduces_like_the_patchify_convolution_it_replaces() -> None:
    stem = ConvStem(img_size=28, patch_size=4, in_chans=1, embed_dim=128)
    tokens = stem(torch.rand(3, 1, 28, 28))
    assert tokens.shape == (3, 49, 128) and stem.num_patches == 49 and stem.grid_size == (7, 7)
    strides = [m.stride[0] for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 1]  # two 3x3 stride-2 convolutions, then the 1x1 projection
    with pytest.raises(ValueError, match="power-of-two patch size"):
        ConvStem(img_size=28, patch_size=7, in_chans=1, embed_dim=128)
    config = resolve_model_config("specformer-mnist", 10, in_chans=1)
    config.kwargs["embed_layer"] = "no-such-stem"
    with pytest.raises(ModelError, match="unknown stem 'no-such-stem'"):
        build_model(config)


@pytest.mark.slow
def test_conv_stem_run_exports_audits_and_serves_applicable_certificates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(model="specformer-mnist-convstem", dataset="digits", epochs=1, batch_size=64, warmup_epochs=0,
                      train_images=256),
          run, show_progress=False)
    exported = export_run(run, run / "export" / "model.onnx")
    assert exported["parity"]["predictions_equal"] and exported["parity"]["max_abs_logit_diff"] <= 1e-4
    assert audit_file(exported["onnx"]).exit_code == 0
    runtime = SpecformerRuntime(exported["onnx"])
    answer = runtime.answer(torch.rand(1, *runtime.input_shape).numpy(), delta0=0.01)[0]
    layers = answer["attention_lipschitz"]["layers"]
    assert len(layers) == 6 and all(layer["applicable"] and layer["tokens"] == 50 for layer in layers)
