"""Attention the proof does not cover is served as not applicable, with the reason, never a number.

Theorem 4.3 (and the always-valid form) bounds softmax dot-product attention applied to norm1's
output in a pre-norm block. Each test builds a real timm model outside that class (``qk_norm``,
``scale_norm``, a post-norm ``ResPostBlock``), exports it through the same path as ``export``,
and reads the answer the server gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import ResPostBlock

from specformer_deploy.artifact.export import export_run
from specformer_deploy.artifact.onnx_meta import read_metadata
from specformer_deploy.model.factory import ModelConfig, build_model
from specformer_deploy.model.heads import attention_applicability
from specformer_deploy.serving.runtime import SpecformerRuntime

SMALL = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}

# (timm architecture, kwargs, a word the served reason must contain)
UNCOVERED = {
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}, "qk_norm"),
    "scale_norm": ("vit_tiny_patch16_224", {"scale_attn_norm": True}, "scale_norm"),
    "post_norm": ("vit_base_patch16_rpn_224", {}, "post-norm"),
}


def _run_with(base_run: Path, target: Path, arch: str, kwargs: dict) -> Path:
    """A run directory whose model is ``arch(**kwargs)`` (fresh weights: what is tested is the
    architecture, not what it learned), with the data and train sections of a real run."""
    config = json.loads((base_run / "config.json").read_text())
    model_cfg = dict(config["model"])
    model_cfg.update(name=arch, arch=arch, kwargs={**SMALL, **kwargs})
    config["model"] = model_cfg
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(model_cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / "model.safetensors"))
    shutil.copy(base_run / "metrics.jsonl", target / "metrics.jsonl")
    return target


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_attention_is_served_as_not_applicable(case: str, exported_pair, tmp_path: Path) -> None:
    arch, kwargs, word = UNCOVERED[case]
    run = _run_with(exported_pair["vanilla"]["run"], tmp_path / case, arch, kwargs)
    exported = export_run(run, run / "export" / "model.onnx")
    entries = read_metadata(onnx.load(exported["onnx"]))["attention_weights"]
    assert all(entry["applicable"] is False and word in entry["reason"] for entry in entries)
    runtime = SpecformerRuntime(exported["onnx"])  # the metadata is digest-covered: it verifies
    answer = runtime.answer(np.random.default_rng(0).random((2, *runtime.input_shape), dtype=np.float32))[0]
    block = answer["attention_lipschitz"]
    assert len(block["layers"]) == SMALL["depth"]
    for layer in block["layers"]:
        assert layer["applicable"] is False and word in layer["reason"]
        assert not {"bound", "paper_bound", "paper_bound_valid"} & set(layer)  # never a number
    assert not {"bound", "paper_bound"} & set(block)  # no top-level maximum either


def test_plain_pre_norm_attention_stays_applicable(exported_pair) -> None:
    entries = read_metadata(onnx.load(exported_pair["msvp"]["onnx"]))["attention_weights"]
    assert all(entry["applicable"] is True and entry["reason"] is None for entry in entries)
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    pixels = np.full((1, *runtime.input_shape), 0.5, dtype=np.float32)
    layers = runtime.answer(pixels)[0]["attention_lipschitz"]["layers"]
    assert all(layer["applicable"] is True and layer["bound"] > 0 for layer in layers)


def test_only_the_uncovered_layer_is_refused() -> None:
    """Applicability is per layer: one post-norm block among pre-norm ones is refused alone."""
    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**SMALL, "depth": 3})
    post = timm.create_model("vit_base_patch16_rpn_224", num_classes=10, **{**SMALL, "depth": 1})
    assert isinstance(post.blocks[0], ResPostBlock)  # timm's post-norm block: x + norm1(attn(x))
    net.blocks[1] = post.blocks[0]
    reasons = attention_applicability(net)
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] is not None and "post-norm" in reasons[1]


def test_an_unrecognised_block_is_refused() -> None:
    class Wrapped(torch.nn.Module):  # same attention module, a block this code does not know
        def __init__(self, block: torch.nn.Module) -> None:
            super().__init__()
            self.attn, self.norm1 = block.attn, block.norm1

    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, **SMALL)
    net.blocks[0] = Wrapped(net.blocks[0])
    reason = attention_applicability(net)[0]
    assert reason is not None and "not a recognised pre-norm block" in reason


def test_older_exports_without_the_field_keep_their_behaviour(exported_pair) -> None:
    """An export written before ``applicable`` existed: dot-product layers are bounded as before."""
    runtime = SpecformerRuntime(exported_pair["msvp"]["onnx"])
    for entry in runtime.meta["attention_weights"]:
        entry.pop("applicable"), entry.pop("reason")
    runtime.attention.reasons = runtime.attention.inapplicable()
    pixels = np.full((1, *runtime.input_shape), 0.5, dtype=np.float32)
    layers = runtime.answer(pixels)[0]["attention_lipschitz"]["layers"]
    assert all(layer["applicable"] is True and layer["bound"] > 0 for layer in layers)
