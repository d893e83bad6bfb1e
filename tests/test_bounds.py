"""Certificates against the exact Jacobian (autograd, float64) and empirical lower bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specformer_deploy.model.heads import attention_layers, layer_heads
from specformer_deploy.robustness.lipschitz import attention_inputs, jacobian_norm, local_lower_bound, unfused_attention
from specformer_deploy.serving.bounds import attention_head_bound, layer_bound, mlp_local_bound, paper_head_bound


def _head(w_q, w_k, w_v, b_q=None, b_k=None, b_v=None):
    """One softmax attention head, ``Q = X w_q + b_q``, with timm's 1/sqrt(D) scale."""
    scale = w_q.shape[1] ** -0.5

    def f(x: torch.Tensor) -> torch.Tensor:
        q = x @ w_q + (b_q if b_q is not None else 0)
        k = x @ w_k + (b_k if b_k is not None else 0)
        v = x @ w_v + (b_v if b_v is not None else 0)
        return torch.softmax(q @ k.T * scale, dim=-1) @ v

    return f


def _exact_norm(f, x: torch.Tensor) -> float:
    jac = torch.func.jacrev(f)(x)
    out_numel = int(np.prod(jac.shape[: jac.dim() - x.dim()]))
    return float(torch.linalg.matrix_norm(jac.detach().reshape(out_numel, x.numel()), ord=2))


def _ball_points(x0: torch.Tensor, delta0: float, rng: np.random.Generator, count: int = 3):
    yield x0
    for _ in range(count):
        d = torch.from_numpy(rng.standard_normal(x0.shape))
        yield x0 + delta0 * float(rng.uniform(0, 1)) ** (1 / x0.numel()) * d / d.norm()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 6), head_dim=st.integers(1, 4), x_scale=st.floats(-3, 1),
       w_scale=st.floats(-1, 1), delta0=st.floats(0, 1), biased=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_head_bound_is_never_below_the_exact_jacobian_norm(n, d, head_dim, x_scale, w_scale, delta0, biased, seed):
    rng = np.random.default_rng(seed)
    t = lambda *shape, s=1.0: torch.from_numpy(rng.standard_normal(shape) * s)  # noqa: E731
    x0 = t(n, d, s=10**x_scale)
    w_q, w_k, w_v = (t(d, head_dim, s=10**w_scale) for _ in range(3))
    b_q, b_k, b_v = (t(head_dim) for _ in range(3)) if biased else (None, None, None)
    f = _head(w_q, w_k, w_v, b_q, b_k, b_v)
    bound = attention_head_bound(x0, w_q, w_k, w_v, delta0, b_q=b_q)
    paper, paper_valid = paper_head_bound(x0, w_q, w_k, w_v, delta0, b_q=b_q)
    for x in _ball_points(x0, delta0, rng):
        exact = _exact_norm(f, x)
        assert exact <= bound * (1 + 1e-9) + 1e-12
        if paper_valid:
            assert exact <= paper * (1 + 1e-9) + 1e-12


def test_the_paper_form_fails_on_small_inputs_and_says_so() -> None:
    """DESIGN.md's example: N=3, d=4, D=2, ||X0||_F ~ 0.003."""
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.standard_normal((3, 4)))
    x0 = x0 * 0.003 / x0.norm()
    w_q, w_k, w_v = (torch.from_numpy(rng.standard_normal((4, 2))) for _ in range(3))
    exact = _exact_norm(_head(w_q, w_k, w_v), x0)
    paper, valid = paper_head_bound(x0, w_q, w_k, w_v, 0.0)
    assert exact > 100 * paper and not valid
    assert attention_head_bound(x0, w_q, w_k, w_v, 0.0) >= exact


def test_layer_bound_on_a_real_vit_layer_sits_above_exact_and_empirical(tiny_model) -> None:
    from specformer_deploy.training.data import load_dataset

    model = tiny_model.double().requires_grad_(False)
    stack = unfused_attention(model)
    stack.__enter__()
    pixels = load_dataset("digits", 16, channels=3).test[0][0].double()
    pairs = list(zip(attention_layers(model), attention_inputs(model, pixels)))
    for layer, (attn, x0) in ((0, pairs[0]), (3, pairs[3])):
        heads = layer_heads(attn)
        width = heads.num_heads * heads.head_dim
        bias = attn.qkv.bias.detach()[:width].view(heads.num_heads, heads.head_dim)
        delta0 = 0.1
        per_head = [attention_head_bound(x0, heads.qkv[0, h].T, heads.qkv[1, h].T, heads.qkv[2, h].T, delta0,
                                         b_q=bias[h]) for h in range(heads.num_heads)]
        bound = layer_bound(per_head, float(torch.linalg.matrix_norm(attn.proj.weight.detach(), ord=2)))
        fn = lambda x, attn=attn: attn(x.unsqueeze(0)).squeeze(0)  # noqa: E731
        exact = _exact_norm(fn, x0)
        empirical = jacobian_norm(fn, x0, iterations=40, generator=torch.Generator().manual_seed(0))
        assert empirical <= exact * (1 + 1e-6)
        assert empirical >= 0.99 * exact  # power iteration converges on this small layer
        assert local_lower_bound(fn, x0, delta0, samples=1, iterations=15) <= bound
        assert exact <= bound, f"layer {layer}: exact {exact} > bound {bound}"
    stack.__exit__(None, None, None)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 4), d=st.integers(2, 6), hidden=st.integers(2, 12), radius=st.floats(0, 2),
       clipped=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mlp_local_bound_between_exact_local_norm_and_global(tokens, d, hidden, radius, clipped, seed) -> None:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((tokens, d))
    w1, b1 = rng.standard_normal((hidden, d)), rng.standard_normal(hidden)
    w2 = rng.standard_normal((d, hidden))
    threshold = np.abs(rng.standard_normal(hidden)) if clipped else None
    result = mlp_local_bound(x0, w1, b1, w2, radius, "clipped-relu" if clipped else "relu", threshold)
    assert result["local"] <= result["global"] * (1 + 1e-12)
    t = lambda a: torch.from_numpy(a)  # noqa: E731

    def mlp(x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ t(w1).T + t(b1))
        if clipped:
            h = torch.minimum(h, t(threshold))
        return h @ t(w2).T

    for x in _ball_points(t(x0), radius, rng, count=4):
        assert _exact_norm(mlp, x) <= result["local"] * (1 + 1e-9) + 1e-12


def test_mlp_bound_drops_units_that_are_off_on_the_whole_ball() -> None:
    w1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    b1 = np.array([0.0, -10.0])  # unit 1 is off for every x within radius 1 of x0
    w2 = np.array([[1.0, 100.0], [0.0, 0.0]])
    result = mlp_local_bound(np.array([[1.0, 1.0]]), w1, b1, w2, 1.0)
    assert result["local"] == pytest.approx(1.0) and result["global"] == pytest.approx(100.0, rel=1e-3)
    assert result["dropped_fraction"] == 0.5


def test_bad_shapes_and_radii_are_clear_errors() -> None:
    w = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"x0 must be \[N, d\]"):
        attention_head_bound(np.ones(4), w, w, w, 0.1)
    with pytest.raises(ValueError, match="weights must be"):
        attention_head_bound(np.ones((3, 5)), w, w, w, 0.1)
    with pytest.raises(ValueError, match="delta0"):
        paper_head_bound(np.ones((3, 4)), w, w, w, -1.0)
    with pytest.raises(ValueError, match="delta0"):
        attention_head_bound(np.ones((3, 4)), w, w, w, math.inf)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 4), heads=st.integers(1, 6),
       scale_q=st.sampled_from([1e-3, 1e-1, 1.0, 30.0]), scale_k=st.sampled_from([1e-3, 1.0, 30.0]),
       bias=st.sampled_from([0.0, 1e-3, 1.0, 10.0, 1e3]), max_tokens=st.sampled_from([3, 200]))
def test_batched_certificates_equal_the_per_head_formulas(seed, layers, heads, scale_q, scale_k, bias,
                                                          max_tokens) -> None:
    """The served form (heads folded into per-layer coefficients and a validity threshold) gives
    what the per-head formulas give, for inputs on both sides of the paper bound's validity."""
    from specformer_deploy.serving.bounds import (
        CertificateConstants,
        certificate_arrays,
        head_bound_from_norms,
        paper_bound_from_norms,
    )

    rng = np.random.default_rng(seed)
    scales = {"q": scale_q, "k": scale_k, "v": 1.0}
    sigmas = {n: (rng.uniform(0.0, 2.0, (layers, heads)) * scales[n]).tolist() for n in "qkv"}
    bias_q = (rng.uniform(0, 1, (layers, heads)) * bias * (rng.uniform(size=(layers, heads)) > 0.3)).tolist()
    tokens = rng.integers(1, max_tokens, layers).tolist()
    head_dim = int(rng.integers(1, 65))
    sigma_o = rng.uniform(0.1, 3.0, layers).tolist()
    meta = {"spectral": {**{f"sigma_{n}": v for n, v in sigmas.items()}, "sigma_o_full": sigma_o},
            "tokens": tokens, "head_dim": head_dim, "bias_q_norm": bias_q}
    constants = CertificateConstants(meta)
    # Input norms from tiny (paper bound invalid) to large, plus the validity threshold itself.
    norms = np.exp(rng.uniform(np.log(1e-4), np.log(1e3), (7, layers)))
    delta0 = float(rng.choice([0.0, 0.01, 0.5]))
    arrays = certificate_arrays(norms, delta0, constants, with_heads=True)
    outcomes: set[tuple[bool, bool]] = set()
    for l in range(layers):
        args = [np.array(sigmas[n][l]) for n in "qkv"]
        for i in range(len(norms)):
            per_head = head_bound_from_norms(tokens[l], norms[i, l], delta0, *args, head_dim, np.array(bias_q[l]))
            paper, valid = paper_bound_from_norms(tokens[l], norms[i, l], delta0, *args)
            valid_all = bool(np.all(valid & ((np.array(bias_q[l]) == 0) | (paper >= per_head))))
            assert arrays["bound"][i, l] == pytest.approx(layer_bound(per_head, sigma_o[l]), rel=1e-12)
            assert arrays["paper_bound"][i, l] == pytest.approx(layer_bound(paper, sigma_o[l]), rel=1e-12)
            np.testing.assert_allclose(arrays["head_bounds"][i, l], per_head, rtol=1e-12)
            b = norms[i, l] + delta0
            if abs(b - constants.paper_valid_from[l]) > 1e-9 * max(b, 1.0):  # not on the boundary itself
                assert bool(arrays["paper_bound_valid"][i, l]) == valid_all
                outcomes.add((valid_all, bool(np.all(valid))))
    # Examples where only the query bias makes the paper's bound invalid count in the suite below.
    _VALIDITY_OUTCOMES.update(outcomes)


_VALIDITY_OUTCOMES: set[tuple[bool, bool]] = set()


def test_batched_certificate_examples_cover_every_validity_case() -> None:
    """Guards the test above: it saw valid bounds, ones invalid for small inputs, and ones that
    only the query bias made invalid (the case the per-layer threshold's root handles)."""
    test_batched_certificates_equal_the_per_head_formulas()
    assert _VALIDITY_OUTCOMES >= {(True, True), (False, False), (False, True)}
