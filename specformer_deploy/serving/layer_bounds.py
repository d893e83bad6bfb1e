"""Deterministic per-layer evidence: the attention layers' local Lipschitz bounds (SpecFormer's
Theorem 4.3 and an always-valid form) and the ReLU-family MLPs' local bounds (Huang et al. 2021).

Each is one small unit over the session's outputs (``attn_input_norms``, ``mlp_inputs``); each
block it writes names its guarantee and its space. Both are per-layer statements about a Frobenius
ball around that layer's own input, never about the image."""

from __future__ import annotations

from typing import Any

import numpy as np

from specformer_deploy.artifact.onnx_meta import initializer_arrays, oriented
from specformer_deploy.serving.bounds import CertificateConstants, certificate_arrays, mlp_local_bound

__all__ = ["AttentionBounds", "MlpBounds"]

ATTENTION_CERTIFICATE = "local Lipschitz constant of each attention layer (Theorem 4.3 and an always-valid form)"
ATTENTION_SPACE = ("each attention layer's input (norm1 output), {tokens} tokens x {dim}, Frobenius ball of radius "
                   "delta0 around it")
ATTENTION_GUARANTEE = ("for every input within Frobenius distance delta0 of this layer's own input, the layer's output "
                       "moves at most bound times as far (paper_bound: the paper's form, an upper bound only when "
                       "paper_bound_valid); per layer, not a guarantee about the image")
MLP_CERTIFICATE = "local Lipschitz constant of each MLP (units constant on the ball dropped, Huang et al. 2021)"
MLP_SPACE = "each MLP's input (norm2 output), {tokens} tokens x {dim}, Frobenius ball of radius delta0 around it"
MLP_GUARANTEE = ("for every input within Frobenius distance delta0 of this MLP's own input, its output moves at most "
                 "local times as far (global: the weights' bound without dropping units); per layer")


def _shape_of_layers(meta: dict[str, Any], constants: CertificateConstants) -> dict[str, str]:
    tokens = sorted({int(t) for t in constants.tokens})
    return {"tokens": "/".join(map(str, tokens)), "dim": str(meta.get("embed_dim", "d"))}


class AttentionBounds:
    """Guarantee: for every input within Frobenius distance ``delta0`` of an applicable attention
    layer's own input tokens, that layer's output moves at most ``bound`` times as far. A layer the
    proof does not cover (decided at export) is served with ``applicable: false`` and the reason."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.constants = CertificateConstants(meta)
        self.space = ATTENTION_SPACE.format(**_shape_of_layers(meta, self.constants))
        self.reasons = self.inapplicable()

    def inapplicable(self) -> list[str | None]:
        """Per layer: why the attention bound does not apply (``None``: it does), decided at export.

        Exports without the ``applicable`` field (older files) keep their behaviour: every
        softmax dot-product (or GPSA) layer is bounded, other kinds are not."""
        entries = self.meta.get("attention_weights") or []
        if not entries:
            return [None] * len(self.constants.tokens)
        reasons = []
        for entry in entries:
            if "applicable" in entry:
                reasons.append(None if entry["applicable"] else str(entry.get("reason") or "not recognised"))
            elif entry.get("certified", True):
                reasons.append(None)
            else:
                reasons.append(f"{entry.get('attention')} attention is not softmax dot-product attention: "
                               "Theorem 4.3 does not apply")
        return reasons

    def blocks(self, norms: np.ndarray, delta0: float, with_heads: bool = False) -> list[dict[str, Any]]:
        """The ``attention_lipschitz`` block of each image (``norms`` is ``[B, L]``), the batch at once;
        no maximum over layers is served (each bound is about its own layer). ``with_heads`` adds the
        per-head bounds."""
        arrays = certificate_arrays(norms, delta0, self.constants, with_heads=with_heads)
        tokens = self.constants.tokens.astype(int).tolist()
        bound, paper = arrays["bound"].tolist(), arrays["paper_bound"].tolist()
        valid, inputs = arrays["paper_bound_valid"].tolist(), norms.tolist()
        heads = arrays["head_bounds"].tolist() if with_heads else None
        out = []
        for i in range(len(bound)):
            layers = []
            for l in range(len(tokens)):
                layer: dict[str, Any] = {"layer": l, "tokens": tokens[l], "input_norm": inputs[i][l]}
                if self.reasons[l] is None:
                    layer.update(bound=bound[i][l], paper_bound=paper[i][l], paper_bound_valid=valid[i][l],
                                 applicable=True)
                    if with_heads:
                        layer["head_bounds"] = heads[i][l]
                else:
                    layer.update(applicable=False, reason=self.reasons[l])
                layers.append(layer)
            out.append({"certificate": ATTENTION_CERTIFICATE, "space": self.space, "kind": "deterministic",
                        "guarantee": ATTENTION_GUARANTEE, "delta0": delta0, "layers": layers,
                        "spectral": "exact SVD at export, sha256 verified"})
        return out


class MlpBounds:
    """Guarantee: for every input within Frobenius distance ``delta0`` of a ReLU-family MLP's own
    input, its output moves at most ``local`` times as far (``global``: the weights' bound without
    dropping the units that are constant on the ball). Only exports whose MLPs allow it have one."""

    def __init__(self, meta: dict[str, Any], proto) -> None:
        info = meta["mlp"]
        self.activation = info["activation"]
        self.space = MLP_SPACE.format(**_shape_of_layers(meta, CertificateConstants(meta)))
        arrays = initializer_arrays(proto)
        self.layers = []
        for entry in info["layers"]:
            fc1 = oriented(arrays[entry["fc1"]["initializer"]], entry["fc1"])
            self.layers.append({
                "w1": fc1.astype(np.float64),
                "w2": oriented(arrays[entry["fc2"]["initializer"]], entry["fc2"]).astype(np.float64),
                "b1": arrays[entry["fc1_bias"]].astype(np.float64) if entry["fc1_bias"] else np.zeros(fc1.shape[0]),
                "threshold": np.maximum(arrays[entry["threshold"]], 0.0) if entry["threshold"] else None})

    @classmethod
    def of(cls, meta: dict[str, Any], proto) -> MlpBounds | None:
        """The unit when the export's MLPs have local bounds (ReLU family), else ``None``."""
        return cls(meta, proto) if (meta.get("mlp") or {}).get("local_bounds") else None

    def block(self, mlp_inputs: np.ndarray, delta0: float) -> dict[str, Any]:
        """The ``mlp_lipschitz`` block of one image (``mlp_inputs`` is ``[L, N, d]``)."""
        layers = [{"layer": layer, **mlp_local_bound(tokens, w["w1"], w["b1"], w["w2"], delta0, self.activation,
                                                     w["threshold"])}
                  for layer, (w, tokens) in enumerate(zip(self.layers, mlp_inputs))]
        return {"certificate": MLP_CERTIFICATE, "space": self.space, "kind": "deterministic",
                "guarantee": MLP_GUARANTEE, "delta0": delta0, "layers": layers}
