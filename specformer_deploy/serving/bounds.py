"""Local Lipschitz certificates for dot-product self-attention (SpecFormer Theorem 4.3) and MLPs.

Needs numpy only, so the serving runtime computes certificates without torch. All norms are
spectral norms of the head's matrices (``w`` is ``[d, D]``: ``Q = X @ w_q``) and Frobenius
norms of the token matrix ``X`` (``[N, d]``), over the ball ``||X - X0||_F <= delta0``, with
``B = ||X0||_F + delta0`` bounding ``||X||_F`` on the whole ball.

Always-valid head bound (``attention_head_bound``), proof. Let ``q_i = x_i W_Q + b_q``,
``K = X W_K`` (a key bias adds ``q_i . b_k`` to every score of row ``i``, which softmax ignores),
``s_i = K q_i / sqrt(D)``, ``P_i = softmax(s_i)`` and ``f_i = P_i^T (X W_V + 1 b_v^T)``. Then

    df_i = dP_i^T X W_V + P_i^T dX W_V            (sum_j dP_ij = 0 removes b_v)
    dP_i = (diag(P_i) - P_i P_i^T) ds_i,           ||diag(p) - p p^T|| <= 1/2
    ds_i = (K dq_i + dK q_i) / sqrt(D)
    ||ds_i|| <= ||W_K|| (||W_Q|| ||X||_F ||dx_i|| + ||q_i|| ||dX||_F) / sqrt(D)
            <= ||W_K|| (2 ||W_Q|| B + ||b_q||) ||dX||_F / sqrt(D)
    ||P_i^T dX W_V|| <= ||W_V|| max_j ||dx_j|| <= ||W_V|| ||dX||_F   (P_i is a convex weight)

so the block row ``J_i`` has ``||J_i|| <= ||W_V|| (||W_Q|| ||W_K|| B^2 / sqrt(D)
+ ||W_K|| ||b_q|| B / (2 sqrt(D)) + 1)`` and ``||J|| <= sqrt(sum_i ||J_i||^2) <= sqrt(N) max_i ||J_i||``.
Without a query bias this is ``sqrt(N) ||W_V|| (||W_Q|| ||W_K|| B^2 / sqrt(D) + 1)``, the form in
DESIGN.md tightened by the factor ``N + 1`` (the proof's ``(N+1)`` bounds ``||ds_i||`` by a
cruder sum; the softmax Jacobian's norm 1/2 gives the ``2 B`` above exactly). Every step holds for
every ``X`` in the ball, so the bound is a Lipschitz constant of the head over the whole ball.

A layer concatenates heads and applies ``W_O``: ``Lip <= ||W_O|| sqrt(sum_h Lip_h^2)``.

The paper's form ``N (N+1) B^2 (||W_V|| ||W_Q|| ||W_K|| + ||W_V||)`` multiplies the ``+1`` term by
``(N+1) B^2`` and is an upper bound only when ``(N+1) B^2 >= 1`` (and, since the paper has no
query bias, when that bias does not push the true value past it); ``paper_head_bound`` reports
whether it is valid for the input at hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["paper_head_bound", "attention_head_bound", "layer_bound", "paper_bound_from_norms",
           "head_bound_from_norms", "layer_certificates", "certificate_arrays", "CertificateConstants",
           "mlp_local_bound"]


def _array(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # a torch tensor, without importing torch here
    return np.asarray(x, dtype=np.float64)


def _spectral(w: ArrayLike) -> float:
    w = _array(w)
    return float(np.linalg.norm(w, 2)) if w.size else 0.0


def paper_bound_from_norms(tokens: int, x_norm: ArrayLike, delta0: float, sigma_q: ArrayLike, sigma_k: ArrayLike,
                           sigma_v: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 4.3 as stated, elementwise over heads/images; and the validity condition ``(N+1)B^2 >= 1``."""
    b = _array(x_norm) + delta0
    sv = _array(sigma_v)
    bound = tokens * (tokens + 1) * b**2 * (sv * _array(sigma_q) * _array(sigma_k) + sv)
    return bound, (tokens + 1) * b**2 >= 1.0


def head_bound_from_norms(tokens: int, x_norm: ArrayLike, delta0: float, sigma_q: ArrayLike, sigma_k: ArrayLike,
                          sigma_v: ArrayLike, head_dim: int, bias_q_norm: ArrayLike = 0.0) -> np.ndarray:
    """The always-valid head bound (module docstring), elementwise over heads/images."""
    b = _array(x_norm) + delta0
    sq, sk, sv, bq = _array(sigma_q), _array(sigma_k), _array(sigma_v), _array(bias_q_norm)
    root_d = math.sqrt(head_dim)
    return math.sqrt(tokens) * sv * (sq * sk * b**2 / root_d + sk * bq * b / (2 * root_d) + 1.0)


def _check(x0: np.ndarray, delta0: float, *weights: np.ndarray) -> None:
    if x0.ndim != 2:
        raise ValueError(f"x0 must be [N, d] (one image's tokens), got shape {x0.shape}")
    if not (delta0 >= 0 and math.isfinite(delta0)):
        raise ValueError(f"delta0 must be a finite number >= 0, got {delta0}")
    for w in weights:
        if w.ndim != 2 or w.shape[0] != x0.shape[1]:
            raise ValueError(f"weights must be [d, D] with d = {x0.shape[1]} (Q = x0 @ w), got {w.shape}")


def paper_head_bound(x0: ArrayLike, w_q: ArrayLike, w_k: ArrayLike, w_v: ArrayLike, delta0: float,
                     b_q: ArrayLike | None = None) -> tuple[float, bool]:
    """Theorem 4.3 exactly as the paper states it, and whether it is an upper bound for this input.

    Valid when ``(N+1)(||x0||_F + delta0)^2 >= 1``; with a query bias (which the paper does not
    model) it is additionally required to dominate ``attention_head_bound``.
    """
    x0, w_q, w_k, w_v = map(_array, (x0, w_q, w_k, w_v))
    _check(x0, delta0, w_q, w_k, w_v)
    tokens = x0.shape[0]
    bound, valid = paper_bound_from_norms(tokens, np.linalg.norm(x0), delta0, _spectral(w_q), _spectral(w_k),
                                          _spectral(w_v))
    bound, valid = float(bound), bool(valid)
    if b_q is not None and np.any(_array(b_q)):
        valid = valid and bound >= attention_head_bound(x0, w_q, w_k, w_v, delta0, b_q=b_q)
    return bound, valid


def attention_head_bound(x0: ArrayLike, w_q: ArrayLike, w_k: ArrayLike, w_v: ArrayLike, delta0: float,
                         b_q: ArrayLike | None = None) -> float:
    """A local Lipschitz bound of one softmax attention head that holds for every input (proof above)."""
    x0, w_q, w_k, w_v = map(_array, (x0, w_q, w_k, w_v))
    _check(x0, delta0, w_q, w_k, w_v)
    bias = float(np.linalg.norm(_array(b_q))) if b_q is not None else 0.0
    return float(head_bound_from_norms(x0.shape[0], np.linalg.norm(x0), delta0, _spectral(w_q), _spectral(w_k),
                                       _spectral(w_v), w_q.shape[1], bias))


def layer_bound(head_bounds: ArrayLike, sigma_o: float) -> float:
    """Multi-head layer: ``||W_O|| sqrt(sum_h Lip_h^2)`` (heads concatenated, then ``W_O``)."""
    return float(sigma_o * np.sqrt(np.sum(_array(head_bounds) ** 2)))


class CertificateConstants:
    """What the certificates need from the export metadata, as arrays, read once per model."""

    def __init__(self, meta: dict[str, Any]) -> None:
        spectral = meta["spectral"]
        self.tokens = np.asarray(meta["tokens"], dtype=np.float64)  # [L]
        self.head_dim = int(meta["head_dim"])
        self.sigma_q, self.sigma_k, self.sigma_v = (np.asarray(spectral[f"sigma_{n}"], dtype=np.float64) for n in "qkv")
        bias = meta.get("bias_q_norm")
        self.bias_q = np.asarray(bias, dtype=np.float64) if bias is not None else np.zeros_like(self.sigma_q)
        self.sigma_o = np.asarray(spectral["sigma_o_full"], dtype=np.float64)  # [L]
        # Theorem 4.3 covers softmax dot-product attention only (and ConViT's GPSA, see heads.py).
        self.certified = np.array([layer.get("certified", True) for layer in meta.get("attention_weights", [])]
                                  or [True] * len(self.tokens))
        self.kinds = [layer.get("attention", "dot") for layer in meta.get("attention_weights", [])] or \
            ["dot"] * len(self.tokens)
        self._fold_heads()

    def _fold_heads(self) -> None:
        """Fold the heads into a few numbers per layer, so that serving a certificate costs a
        handful of array operations per batch instead of one per head (it is paid per request).

        With ``a = sv sq sk / sqrt(D)``, ``c = sv sk |b_q| / (2 sqrt(D))``, ``v = sv`` per head, the
        always-valid head bound is ``sqrt(N) (a B^2 + c B + v)``, so ``sum_h bound_h^2 = N poly(B)``
        with a quartic whose coefficients are sums of products of non-negative numbers (no
        cancellation). The paper's ``sum_h`` is ``(N (N+1) B^2)^2 sum_h p_h^2``, ``p = sv sq sk + sv``.
        Its validity holds for every head exactly when ``B`` reaches a per-layer threshold:
        ``(N+1) B^2 >= 1``, and, for heads with a query bias, ``paper_h - bound_h = alpha B^2 -
        beta B - gamma >= 0`` with ``beta, gamma >= 0``, i.e. ``B`` at least its positive root
        (never when ``alpha <= 0`` and ``gamma > 0``).
        """
        n = self.tokens[:, None]
        root_d = math.sqrt(self.head_dim)
        a = self.sigma_v * self.sigma_q * self.sigma_k / root_d
        c = self.sigma_v * self.sigma_k * self.bias_q / (2 * root_d)
        v = self.sigma_v
        self.bound_poly = np.stack([(a * a).sum(1), 2 * (a * c).sum(1), (c * c + 2 * a * v).sum(1),
                                    2 * (c * v).sum(1), (v * v).sum(1)])  # [5, L], highest power first
        p = self.sigma_v * self.sigma_q * self.sigma_k + self.sigma_v
        self.paper_norm = np.sqrt((p * p).sum(1))  # [L]
        alpha, beta, gamma = n * (n + 1) * p - np.sqrt(n) * a, np.sqrt(n) * c, np.sqrt(n) * v
        with np.errstate(divide="ignore", invalid="ignore"):
            root = (beta + np.sqrt(beta**2 + 4 * alpha * gamma)) / (2 * alpha)
        root = np.where(alpha > 0, root, np.where(gamma + beta > 0, np.inf, 0.0))
        root = np.where(self.bias_q == 0, 0.0, root)
        self.paper_valid_from = np.maximum(1.0 / np.sqrt(self.tokens + 1), root.max(1))  # [L]


def certificate_arrays(input_norms: ArrayLike, delta0: float, constants: CertificateConstants,
                       with_heads: bool = False) -> dict[str, np.ndarray]:
    """Per-image, per-layer certificates for a batch at once: ``input_norms`` is ``[B, L]``.

    Returns ``bound``, ``paper_bound`` (``[B, L]``) and ``paper_bound_valid`` (``[B, L]`` bool),
    the formulas of ``head_bound_from_norms`` and ``paper_bound_from_norms`` summed over heads
    (through the per-layer coefficients of ``CertificateConstants``); ``with_heads`` adds
    ``head_bounds`` (``[B, L, H]``).
    """
    c = constants
    b = _array(input_norms) + delta0  # [B, L]
    poly = c.bound_poly
    sum_squares = (((poly[0] * b + poly[1]) * b + poly[2]) * b + poly[3]) * b + poly[4]
    out = {"bound": c.sigma_o * np.sqrt(c.tokens * sum_squares),
           "paper_bound": c.sigma_o * c.tokens * (c.tokens + 1) * (b * b) * c.paper_norm,
           "paper_bound_valid": b >= c.paper_valid_from}
    if with_heads:
        root_d = math.sqrt(c.head_dim)
        b3 = b[:, :, None]
        out["head_bounds"] = np.sqrt(c.tokens)[None, :, None] * c.sigma_v * (
            c.sigma_q * c.sigma_k * b3**2 / root_d + c.sigma_k * c.bias_q * b3 / (2 * root_d) + 1.0)
    return out


def layer_certificates(input_norms: ArrayLike, delta0: float, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer certificates for one image from its ``attn_input_norms`` and the export metadata."""
    constants = CertificateConstants(meta)
    norms = _array(input_norms).reshape(1, -1)
    arrays = certificate_arrays(norms, delta0, constants, with_heads=True)
    return [{"layer": layer, "tokens": int(constants.tokens[layer]), "input_norm": float(norms[0, layer]),
             "bound": float(arrays["bound"][0, layer]), "paper_bound": float(arrays["paper_bound"][0, layer]),
             "paper_bound_valid": bool(arrays["paper_bound_valid"][0, layer]),
             "head_bounds": arrays["head_bounds"][0, layer].tolist()} for layer in range(norms.shape[1])]


def mlp_local_bound(x0: ArrayLike, w1: ArrayLike, b1: ArrayLike, w2: ArrayLike, radius: float,
                    activation: str = "relu", threshold: ArrayLike | None = None) -> dict[str, Any]:
    """Local Lipschitz bound of a token-wise MLP ``w2 act(w1 x + b1)`` over ``||X - X0||_F <= radius``.

    ``x0`` is ``[N, d]``; ``w1`` is ``[hidden, d]`` and ``w2`` is ``[d_out, hidden]`` (PyTorch layout).
    A unit whose pre-activation interval ``w_i . x0_t + b_i +- ||w_i|| radius`` keeps it constant
    (ReLU: upper end <= 0; clipped ReLU: also lower end >= its threshold) has zero derivative on
    the whole ball, so its row of ``w1`` and column of ``w2`` are dropped for that token; the other
    units have slopes in [0, 1], so ``||w2_S|| ||w1_S||`` bounds that token's Jacobian. The MLP acts
    on tokens independently, so its Jacobian is block diagonal and the bound is the max over tokens.
    Returns the local and global (``||w2|| ||w1||``) bounds and how many units were dropped.
    """
    x0, w1, b1, w2 = map(_array, (x0, w1, b1, w2))
    if activation not in ("relu", "clipped-relu"):
        raise ValueError(f"local MLP bounds need a ReLU or clipped-ReLU MLP, got {activation!r}")
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite number >= 0, got {radius}")
    centre = x0 @ w1.T + b1  # [N, hidden]
    spread = np.linalg.norm(w1, axis=1) * radius
    constant = centre + spread <= 0
    if activation == "clipped-relu":
        if threshold is None:
            raise ValueError("clipped-relu needs the per-unit thresholds")
        constant |= centre - spread >= _array(threshold)
    local = 0.0
    for active in ~constant:
        if active.any():
            local = max(local, _spectral(w2[:, active]) * _spectral(w1[active]))
    return {"local": local, "global": _spectral(w2) * _spectral(w1),
            "dropped_fraction": float(constant.mean()), "units": int(w1.shape[0]), "tokens": int(x0.shape[0])}

