"""The paper's baselines: each trains, exports with parity, audits, and has its defining property."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specformer_deploy.artifact.audit import audit_file
from specformer_deploy.artifact.export import export_run
from specformer_deploy.model.attention_variants import CenterNorm, L2Attention, LipNormAttention, ScaledCosineAttention
from specformer_deploy.model.factory import ModelError, build_model, resolve_model_config
from specformer_deploy.model.heads import attention_layers, layer_heads
from specformer_deploy.serving.runtime import SpecformerRuntime
from specformer_deploy.training.msvp import MSVP
from specformer_deploy.training.train import TrainConfig, train


@pytest.mark.parametrize("kind", ["l2", "lipnorm", "scsa"])
def test_variant_trains_exports_with_parity_and_audits(kind: str, tmp_path: Path) -> None:
    summary = train(TrainConfig(epochs=1, batch_size=64, warmup_epochs=0, attention=kind), tmp_path / "run",
                    show_progress=False)
    assert np.isfinite(summary["loss"])
    exported = export_run(tmp_path / "run", tmp_path / "run" / "export" / "model.onnx")
    assert exported["parity"]["max_abs_logit_diff"] <= 1e-4 and exported["parity"]["predictions_equal"]
    report = audit_file(exported["onnx"])
    assert report.exit_code == 0, report.problems
    assert all(row["q"]["max"] > 0 for row in report.layers)  # projection norms are reported
    runtime = SpecformerRuntime(exported["onnx"])
    answer = runtime.answer(np.random.default_rng(0).random((1, *runtime.input_shape), dtype=np.float32))[0]
    layers = answer["attention_lipschitz"]["layers"]
    assert all(layer["applicable"] is False and kind in layer["reason"] and "bound" not in layer for layer in layers)


def test_variants_keep_msvp_working_and_l2_ties_queries_and_keys() -> None:
    model = build_model(resolve_model_config("specformer-tiny", 10, attention="l2"))
    heads = layer_heads(next(iter(attention_layers(model))))
    assert heads.kind == "l2"
    assert torch.equal(heads.qkv[0], heads.qkv[1])  # W_K = W_Q
    assert MSVP(model).sigmas().shape == (4, 3, 4)


def test_l2_scores_depend_only_on_distances() -> None:
    torch.manual_seed(0)
    attn = L2Attention(16, num_heads=2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q = attn.q(x).view(2, 5, 2, 8).transpose(1, 2)
    expected = torch.softmax(-torch.cdist(q, q).square() * attn.scale, dim=-1)
    torch.testing.assert_close(attn.attention(x), expected)
    shift = torch.randn(1, 1, 16, dtype=torch.float64)  # the same translation of every token
    torch.testing.assert_close(attn.attention(x + shift), attn.attention(x))


def test_lipnorm_scores_stay_bounded_at_any_input_scale() -> None:
    torch.manual_seed(0)
    attn = LipNormAttention(16, num_heads=2, qkv_bias=True)
    for scale in (1e-2, 1.0, 1e3):
        assert float(attn.scores(scale * torch.randn(2, 7, 16)).abs().max()) <= 1.0 + 1e-5


def test_scsa_is_cosine_attention_and_centernorm_only_centres() -> None:
    torch.manual_seed(0)
    attn = ScaledCosineAttention(16, num_heads=2, qkv_bias=False)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(attn.attention(5.0 * x), attn.attention(x))  # invariant to q, k scale
    norm = CenterNorm(16)
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=-1), torch.zeros(2, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm(2.0 * x), 2.0 * y)  # no variance normalisation
    model = build_model(resolve_model_config("specformer-tiny", 10, attention="scsa"))
    block = model.net.blocks[0]
    assert isinstance(block.norm1, CenterNorm) and isinstance(model.net.norm, CenterNorm)
    assert torch.allclose(block.ls1.gamma, torch.full((64,), 0.1))  # weighted residual shortcut


def test_variants_need_timm_attention_blocks() -> None:
    with pytest.raises(ModelError, match="replaces timm's Attention"):
        build_model(resolve_model_config("convit_tiny", 10, img_size=32, patch_size=4, attention="l2"))
    with pytest.raises(ModelError, match="--attention must be one of"):
        build_model(resolve_model_config("specformer-tiny", 10, attention="linear"))
