"""Per-head views of the attention projections of timm's ViT-family models.

A head's W_Q (likewise W_K, W_V) is the block of ``D_h`` *rows* of the projection weight that
produce that head's queries: timm's fused ``qkv`` Linear has weight ``[3 * H * D_h, d]`` and
``weight.view(3, H, D_h, d)[0, h]`` is head ``h``'s ``W_Q^T``. Transposition does not change
singular values, so the penalty and the reports work on these ``[D_h, d]`` blocks directly.
A head's W_O is the ``[d_out, D_h]`` block of *columns* of ``proj.weight`` that reads its output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerHeads", "UnsupportedAttentionError", "attention_layers", "layer_heads", "query_bias",
           "SUPPORTED_ATTENTION", "inapplicable_reason", "attention_applicability"]


class UnsupportedAttentionError(TypeError):
    """Raised for a model whose attention modules have no known per-head layout."""


def _supported_types() -> dict[str, type]:
    from timm.layers.attention import Attention
    from timm.models.convit import GPSA, MHSA

    from specformer_deploy.model.attention_variants import L2Attention

    return {"timm Attention": Attention, "ConViT GPSA": GPSA, "ConViT MHSA": MHSA, "L2 attention": L2Attention}


SUPPORTED_ATTENTION = ("timm.layers.Attention (ViT, DeiT, ...)", "timm.models.convit.GPSA", "timm.models.convit.MHSA",
                       "specformer_deploy.model.attention_variants (l2, lipnorm, scsa)")


@dataclass
class LayerHeads:
    """The projection weights of one attention layer, split per head (views where possible).

    ``qkv``: ``[3, H, D_h, d]`` (Q, K, V; each head's block as out x in).
    ``o``: ``[H, d_out, D_h]`` (each head's block of W_O).
    ``refs``: ``{q|k|v|o: (param name relative to the module, start, stop)}``, for export/audit.
    ``kind``: ``dot`` (timm), ``gpsa`` (ConViT) or a baseline of ``attention_variants``.
    """

    qkv: torch.Tensor
    o: torch.Tensor
    num_heads: int
    head_dim: int
    refs: dict[str, tuple[str, int, int]]
    kind: str = "dot"

    def slices(self) -> dict[str, tuple[str, int, int]]:
        """Where each projection lives: ``{q|k|v|o: (param name, start, stop)}``.

        Q/K/V are row ranges of an ``[out, in]`` weight, O is a column range of ``proj.weight``.
        """
        return dict(self.refs)

    @property
    def certified(self) -> bool:
        """Whether Theorem 4.3's softmax dot-product analysis applies (GPSA mixes in a constant
        positional attention with weight <= 1, which the same proof covers)."""
        return self.kind in ("dot", "gpsa")


def _o_heads(proj: nn.Linear, num_heads: int, head_dim: int) -> torch.Tensor:
    return proj.weight.view(proj.weight.shape[0], num_heads, head_dim).permute(1, 0, 2)


def layer_heads(attn: nn.Module) -> LayerHeads:
    """Split one attention module's projections into per-head blocks."""
    types = _supported_types()
    if isinstance(attn, (types["timm Attention"], types["ConViT MHSA"])):
        num_heads = attn.num_heads
        weight = attn.qkv.weight
        head_dim = weight.shape[0] // (3 * num_heads)
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedAttentionError("gated attention (timm Attention(gated=True)) is not covered by "
                                            "MSVP's bounds")
        qkv = weight.view(3, num_heads, head_dim, weight.shape[1])
        width = num_heads * head_dim
        refs = {name: ("qkv.weight", i * width, (i + 1) * width) for i, name in enumerate("qkv")}
        refs["o"] = ("proj.weight", 0, width)
        return LayerHeads(qkv, _o_heads(attn.proj, num_heads, head_dim), num_heads, head_dim, refs,
                          getattr(attn, "attention_kind", "dot"))
    if isinstance(attn, types["ConViT GPSA"]):
        num_heads = attn.num_heads
        dim = attn.qk.weight.shape[1]
        head_dim = attn.qk.weight.shape[0] // (2 * num_heads)
        qk = attn.qk.weight.view(2, num_heads, head_dim, dim)
        v = attn.v.weight.view(1, num_heads, head_dim, dim)
        width = num_heads * head_dim
        refs = {"q": ("qk.weight", 0, width), "k": ("qk.weight", width, 2 * width), "v": ("v.weight", 0, width),
                "o": ("proj.weight", 0, width)}
        return LayerHeads(torch.cat([qk, v]), _o_heads(attn.proj, num_heads, head_dim), num_heads, head_dim, refs,
                          "gpsa")
    if isinstance(attn, types["L2 attention"]):
        num_heads, head_dim = attn.num_heads, attn.head_dim
        dim = attn.q.weight.shape[1]
        q = attn.q.weight.view(1, num_heads, head_dim, dim)
        v = attn.v.weight.view(1, num_heads, head_dim, dim)
        width = num_heads * head_dim
        refs = {"q": ("q.weight", 0, width), "k": ("q.weight", 0, width), "v": ("v.weight", 0, width),
                "o": ("proj.weight", 0, width)}  # W_K is W_Q (tied)
        return LayerHeads(torch.cat([q, q, v]), _o_heads(attn.proj, num_heads, head_dim), num_heads, head_dim,
                          refs, "l2")
    raise UnsupportedAttentionError(
        f"attention module {type(attn).__module__}.{type(attn).__name__} is not supported; "
        f"supported: {', '.join(SUPPORTED_ATTENTION)}"
    )


def query_bias(attn: nn.Module, heads: LayerHeads) -> torch.Tensor | None:
    """The query bias as ``[H, D_h]`` (None without one); the always-valid bound needs its norm."""
    param, start, stop = heads.refs["q"]
    module = attn.get_submodule(param.rsplit(".", 1)[0])
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    return bias[start:stop].view(heads.num_heads, heads.head_dim)


def attention_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The attention module of every transformer block, in depth order.

    Accepts a timm model or a wrapper that exposes it as ``.net`` (see ``models``).
    """
    net = getattr(model, "net", model)
    blocks = getattr(net, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedAttentionError(
            f"{type(net).__name__} has no transformer `blocks`; supported attention: {', '.join(SUPPORTED_ATTENTION)}"
        )
    for block in blocks:
        attn = getattr(block, "attn", None)
        if attn is None:
            raise UnsupportedAttentionError(f"block {type(block).__name__} has no `attn` module")
        layer_heads(attn)  # validates the type with a clear error
        yield attn


def _pre_norm_blocks() -> tuple[type, ...]:
    """Blocks computing ``x + ls(attn(norm1(x)))``: the attention input is norm1's output."""
    from timm.models.convit import Block as ConvitBlock
    from timm.models.vision_transformer import Block

    return (Block, ConvitBlock)


def inapplicable_reason(block: nn.Module, attn: nn.Module) -> str | None:
    """Why Theorem 4.3 (and the always-valid form) does not bound this block's attention, or
    ``None`` when it does.

    The proof covers plain softmax dot-product attention ``P X W_V`` (and GPSA) applied to
    norm1's output in a pre-norm block. Normalized queries/keys (``qk_norm``) and a norm inside
    attention (``scale_norm``) change the map the bound is about; in a post-norm block norm1
    follows attention, so the served input norm is not the attention input's. Anything not
    recognised is refused too: an upper bound served for an unknown map is not a bound."""
    from timm.models.vision_transformer import ResPostBlock

    heads = layer_heads(attn)
    if not heads.certified:
        return f"{heads.kind} attention is not softmax dot-product attention: Theorem 4.3 does not apply"
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            return ("qk_norm: queries and keys are normalized (q_norm/k_norm) before the scores, which "
                    "Theorem 4.3's proof does not model")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return ("scale_norm: attention normalizes its output (attn.norm) before the projection, which "
                "Theorem 4.3's proof does not model")
    if isinstance(block, ResPostBlock):
        return ("post-norm block (timm ResPostBlock): norm1 follows attention, so the attention input is the "
                "raw residual stream, not the norm1 output the served input_norm measures")
    if not isinstance(block, _pre_norm_blocks()):
        return (f"block {type(block).__module__}.{type(block).__name__} is not a recognised pre-norm block "
                "x + attn(norm1(x)); the proof is only known to apply to those")
    return None


def attention_applicability(model: nn.Module) -> list[str | None]:
    """:func:`inapplicable_reason` for every transformer block, in depth order."""
    net = getattr(model, "net", model)
    list(attention_layers(model))  # validates blocks and attention types with clear errors
    return [inapplicable_reason(block, block.attn) for block in net.blocks]
