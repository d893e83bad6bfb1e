"""MSVP against independent computations: exact SVD, a manual split of the weights, autograd."""

from __future__ import annotations

import pytest
import torch

from specformer_deploy.model.factory import ModelError, build_model, resolve_model_config
from specformer_deploy.model.heads import UnsupportedAttentionError, attention_layers, layer_heads
from specformer_deploy.training.msvp import MSVP, MSVPConfig, exact_spectral_norms, power_iteration_


def test_power_iteration_matches_svd_on_random_matrices() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 16, 48, generator=gen, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(12, 48, generator=gen, dtype=torch.float64), dim=-1)
    power_iteration_(w, u, v, 2000)
    sigma = torch.einsum("bm,bmn,bn->b", u, w, v)
    exact = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_name", ["tiny_model", "small_convit"])
def test_power_iteration_matches_svd_on_model_weights(model_name: str, request) -> None:
    model = request.getfixturevalue(model_name)
    msvp = MSVP(model, MSVPConfig(n_power_iterations=500), generator=torch.Generator().manual_seed(0)).train()
    estimate = msvp.sigmas().detach()
    exact = torch.stack([torch.linalg.matrix_norm(layer_heads(a).qkv.detach().double(), ord=2).float()
                         for a in attention_layers(model)])
    assert estimate.shape == exact.shape
    torch.testing.assert_close(estimate, exact, rtol=2e-3, atol=0)
    # exact_spectral_norms is what reports use: Q/K/V rows equal the per-head SVD, O is extra.
    torch.testing.assert_close(exact_spectral_norms(model)[:, :3], exact, rtol=1e-5, atol=0)


def test_head_blocks_produce_the_heads_queries_keys_values(tiny_model) -> None:
    """Row blocks of the fused qkv weight are the heads' projections (not column blocks)."""
    attn = next(iter(attention_layers(tiny_model)))
    heads = layer_heads(attn)
    x = torch.randn(2, 5, attn.qkv.in_features)
    fused = attn.qkv(x).reshape(2, 5, 3, heads.num_heads, heads.head_dim)
    bias = attn.qkv.bias.view(3, heads.num_heads, heads.head_dim) if attn.qkv.bias is not None else None
    d = attn.qkv.in_features
    for t in range(3):
        for h in range(heads.num_heads):
            manual = attn.qkv.weight[t * d + h * heads.head_dim: t * d + (h + 1) * heads.head_dim]
            assert torch.equal(heads.qkv[t, h], manual)
            expected = x @ manual.T + (bias[t, h] if bias is not None else 0)
            torch.testing.assert_close(fused[:, :, t, h], expected)


def test_output_blocks_recompose_the_projection(tiny_model) -> None:
    attn = next(iter(attention_layers(tiny_model)))
    heads = layer_heads(attn)
    outs = torch.randn(3, heads.num_heads, heads.head_dim)
    full = attn.proj(outs.reshape(3, -1))
    summed = sum(outs[:, h] @ heads.o[h].T for h in range(heads.num_heads)) + attn.proj.bias
    torch.testing.assert_close(full, summed)


def test_gpsa_blocks_match_its_projections(small_convit) -> None:
    from timm.models.convit import GPSA

    attn = next(a for a in attention_layers(small_convit) if isinstance(a, GPSA))
    heads = layer_heads(attn)
    x = torch.randn(2, 4, attn.qk.in_features)
    qk = attn.qk(x).reshape(2, 4, 2, heads.num_heads, heads.head_dim)
    v = attn.v(x).reshape(2, 4, heads.num_heads, heads.head_dim)
    for h in range(heads.num_heads):
        torch.testing.assert_close(qk[:, :, 0, h], x @ heads.qkv[0, h].T)
        torch.testing.assert_close(qk[:, :, 1, h], x @ heads.qkv[1, h].T)
        torch.testing.assert_close(v[:, :, h], x @ heads.qkv[2, h].T)


def test_penalty_gradient_is_the_analytic_one(tiny_model) -> None:
    """d/dW lambda sigma^2 = 2 lambda sigma u v^T, placed in each head's row block."""
    tiny_model.train()
    config = MSVPConfig(lambda_q=1e-3, lambda_k=2e-3, lambda_v=3e-3, n_power_iterations=1)
    msvp = MSVP(tiny_model, config, generator=torch.Generator().manual_seed(0)).train()
    tiny_model.zero_grad()
    penalty = msvp.penalty()
    penalty.backward()
    lambdas = [1e-3, 2e-3, 3e-3]
    total = 0.0
    for index, attn in enumerate(attention_layers(tiny_model)):
        heads = layer_heads(attn)
        u, v = msvp.vectors(index)
        w = heads.qkv.detach()
        sigma = torch.einsum("thm,thmn,thn->th", u, w, v)
        expected = torch.zeros_like(w)
        for t in range(3):
            expected[t] = 2 * lambdas[t] * sigma[t, :, None, None] * u[t, :, :, None] * v[t, :, None, :]
            total += lambdas[t] * float(sigma[t].square().sum())
        torch.testing.assert_close(attn.qkv.weight.grad.view_as(w), expected, rtol=1e-5, atol=1e-9)
    assert float(penalty.detach()) == pytest.approx(total, rel=1e-5)


def test_eval_mode_does_not_move_the_vectors(tiny_model) -> None:
    msvp = MSVP(tiny_model).eval()
    before = {k: v.clone() for k, v in msvp.state_dict().items()}
    msvp.penalty()
    assert all(torch.equal(before[k], v) for k, v in msvp.state_dict().items())
    msvp.train()
    msvp.penalty()
    assert any(not torch.equal(before[k], v) for k, v in msvp.state_dict().items())


def test_vectors_are_state_and_round_trip(tiny_model) -> None:
    msvp = MSVP(tiny_model)
    state = msvp.state_dict()
    assert sorted(state) == sorted([f"u_{i}" for i in range(4)] + [f"v_{i}" for i in range(4)])
    assert state["u_0"].shape == (3, 4, 16) and state["v_0"].shape == (3, 4, 64)
    other = MSVP(tiny_model, generator=torch.Generator().manual_seed(123))
    other.load_state_dict(state)
    torch.testing.assert_close(other.sigmas(update=False), msvp.sigmas(update=False))


def test_bad_lambdas_are_rejected() -> None:
    with pytest.raises(ValueError, match="lambda_k"):
        MSVPConfig(lambda_k=-1.0)
    with pytest.raises(ValueError, match="n_power_iterations"):
        MSVPConfig(n_power_iterations=0)


def test_unsupported_attention_names_the_supported_ones() -> None:
    cfg = resolve_model_config("eva02_tiny_patch14_224", num_classes=10, img_size=28, patch_size=14)
    with pytest.raises(UnsupportedAttentionError, match="timm.layers.Attention"):
        build_model(cfg)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown model 'no_such_vit'"):
        resolve_model_config("no_such_vit", num_classes=10)
