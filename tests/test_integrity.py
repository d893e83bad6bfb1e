"""A changed export is refused at load: every digest audit checks, and model.pt2 against the ONNX file.

The tampered files are the ones a user could end up with: an ONNX graph edited after export
(weights and metadata untouched), a model.pt2 with changed weights or a changed graph, a
missing model.pt2. The helpers here also build the archives of tests/test_serving_integrity.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from specformer_deploy.artifact.audit import audit_file
from specformer_deploy.artifact.export import CertifiableModel, write_graph_files
from specformer_deploy.artifact.integrity import (
    PT2_LOGIT_TOLERANCE,
    IntegrityError,
    digest_problems,
    reference_pixels,
    verify_digests,
)
from specformer_deploy.artifact.onnx_meta import read_metadata
from specformer_deploy.serving.images import decode_image
from specformer_deploy.serving.runtime import ProbeRequest, SpecformerRuntime
from specformer_deploy.training.train import load_run_model

ROOT = Path(__file__).resolve().parents[1]


# -- tampered exports (each returns the .onnx path, with its model.pt2 beside it unless said) -------

def _copy_export(src: str | Path, dst_dir: Path, pt2: bool = True) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / "model.onnx")
    if pt2:
        shutil.copy(Path(src).with_suffix(".pt2"), dst_dir / "model.pt2")
    return dst_dir / "model.onnx"


def with_changed_weight(src: str | Path, dst_dir: Path) -> Path:
    """One classifier weight changed in the ONNX file; digests left as exported."""
    out = _copy_export(src, dst_dir)
    proto = onnx.load(str(out))
    init = next(i for i in proto.graph.initializer if i.name.endswith("head.weight"))
    array = numpy_helper.to_array(init).copy()
    array[0, 0] += 1.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(out))
    return out


def with_scaled_norms(src: str | Path, dst_dir: Path, scale: float = 0.01) -> Path:
    """The graph's ``attn_input_norms`` output multiplied by ``scale`` through an inserted Mul node
    (a Constant node, not an initializer: weights and metadata are untouched)."""
    out = _copy_export(src, dst_dir)
    proto = onnx.load(str(out))
    for node in proto.graph.node:
        node.output[:] = ["attn_input_norms_unscaled" if o == "attn_input_norms" else o for o in node.output]
    constant = helper.make_node("Constant", [], ["attn_input_norms_scale"],
                                value=numpy_helper.from_array(np.array(scale, np.float32)))
    proto.graph.node.extend([constant, helper.make_node("Mul", ["attn_input_norms_unscaled", "attn_input_norms_scale"],
                                                        ["attn_input_norms"])])
    onnx.save(proto, str(out))
    return out


class _SkewedLogits(CertifiableModel):
    """The exported wrapper with logits scaled by 1.01: same parameter names and values, other graph."""

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, norms = super().forward(pixels)[:2]
        return logits * 1.01, norms


def with_pt2_from(summary: dict, dst_dir: Path, *, weight_delta: float = 0.0, skew: bool = False) -> Path:
    """The intact ONNX file beside a model.pt2 traced again from the run, with one weight of the
    classifier changed by ``weight_delta`` and/or (``skew``) its logits scaled by 1.01."""
    out = _copy_export(summary["onnx"], dst_dir, pt2=False)
    model, _ = load_run_model(summary["run"])
    with torch.no_grad():
        model.net.head.weight[0, 0] += weight_delta
    wrapper = (_SkewedLogits if skew else CertifiableModel)(model).eval()
    scratch = dst_dir / "retrace"
    scratch.mkdir()
    pixels = torch.from_numpy(reference_pixels((1, 16, 16)))
    write_graph_files(wrapper, pixels, scratch / "model.onnx", dst_dir / "model.pt2")
    shutil.rmtree(scratch)
    return out


def without_pt2(src: str | Path, dst_dir: Path) -> Path:
    return _copy_export(src, dst_dir, pt2=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specformer_deploy", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def msvp(exported_pair) -> dict:
    return exported_pair["msvp"]


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from load_test import default_image

    path = tmp_path_factory.mktemp("image") / "digit.png"
    path.write_bytes(default_image())
    return path


# -- digests: the runtime checks what audit checks ---------------------------------------------------

def test_intact_export_has_no_digest_problem(msvp) -> None:
    proto = onnx.load(msvp["onnx"])
    verdict = verify_digests(proto, read_metadata(proto))
    assert verdict.problems == []
    assert verdict.weights["stored"] == verdict.weights["recomputed"] == msvp["weights_sha256"]
    assert verdict.graph["stored"] == verdict.graph["recomputed"]


def test_edited_graph_is_refused_although_weights_and_metadata_are_intact(msvp, tmp_path) -> None:
    edited = with_scaled_norms(msvp["onnx"], tmp_path)
    proto = onnx.load(str(edited))
    assert digest_problems(proto, read_metadata(proto)) == [
        "the graph (nodes, constants, inputs or outputs) changed after export"]
    # the edit matters: unverified, the file serves input norms 100x too small (certificates too optimistic)
    pixels = reference_pixels((1, 16, 16))
    unverified = SpecformerRuntime(edited, verify=False).infer(pixels)[1]
    np.testing.assert_allclose(unverified, 0.01 * SpecformerRuntime(msvp["onnx"]).infer(pixels)[1], rtol=1e-5)
    with pytest.raises(IntegrityError, match="graph .* changed after export") as caught:
        SpecformerRuntime(edited)
    assert caught.value.problems == ["the graph (nodes, constants, inputs or outputs) changed after export"]


def test_a_graph_edit_with_its_digest_recomputed_is_caught_by_model_pt2s_every_output(msvp, tmp_path) -> None:
    """Digests are integrity, not authenticity: an editor can recompute them. The cross-check with
    ``model.pt2`` compares every output, so scaling ``attn_input_norms`` (which shrinks every served
    attention bound 100x) is refused although the logits are untouched."""
    from specformer_deploy.artifact.onnx_meta import graph_digest, write_metadata

    edited = with_scaled_norms(msvp["onnx"], tmp_path)
    proto = onnx.load(str(edited))
    meta = read_metadata(proto)
    meta["integrity"]["graph_sha256"] = graph_digest(proto)
    write_metadata(proto, {"integrity": meta["integrity"]})
    onnx.save(proto, str(edited))
    assert digest_problems(onnx.load(str(edited)), meta) == []  # the digests no longer tell
    SpecformerRuntime(edited)  # without the cross-check it would load and serve the shrunk bounds
    with pytest.raises(IntegrityError, match=r"model\.pt2's attn_input_norms differ from ONNX Runtime's") as caught:
        SpecformerRuntime(edited, check_pt2=True)
    assert not any("logits differ" in problem for problem in caught.value.problems)


def test_changed_weight_and_metadata_are_named(msvp, tmp_path) -> None:
    changed = with_changed_weight(msvp["onnx"], tmp_path / "weights")
    with pytest.raises(IntegrityError, match=r"SHA-256 does not match.*weight tensor model\.net\.head\.weight "
                                             r"changed after export"):
        SpecformerRuntime(changed)
    relabelled = _copy_export(msvp["onnx"], tmp_path / "meta")
    proto = onnx.load(str(relabelled))
    for prop in proto.metadata_props:
        if prop.key == "specformer.class_names":
            prop.value = json.dumps(list(reversed(json.loads(prop.value))))
    onnx.save(proto, str(relabelled))
    with pytest.raises(IntegrityError, match=r"metadata value specformer\.class_names changed after export"):
        SpecformerRuntime(relabelled)


def test_every_digest_problem_is_one_audit_reports(msvp, tmp_path) -> None:
    """One definition of integrity: the runtime's findings are audit's findings, word for word."""
    for edited in (with_scaled_norms(msvp["onnx"], tmp_path / "graph"),
                   with_changed_weight(msvp["onnx"], tmp_path / "weights")):
        proto = onnx.load(str(edited))
        problems = digest_problems(proto, read_metadata(proto))
        assert problems and set(problems) <= set(audit_file(edited).problems)


# -- model.pt2 against the ONNX file ---------------------------------------------------------------

def test_intact_pt2_is_accepted_and_used_by_the_probe(msvp) -> None:
    runtime = SpecformerRuntime(msvp["onnx"], check_pt2=True)
    pixels = reference_pixels((1, 16, 16))
    labels = runtime.infer(pixels)[0].argmax(axis=1)
    assert len(runtime.probe(pixels, labels, ProbeRequest("pgd", eps=0.01, steps=2))) == 2
    assert runtime.probe_device == "cpu"


def test_pt2_with_a_tiny_weight_change_is_refused(msvp, tmp_path) -> None:
    """A change far below the logit tolerance: only the exact comparison of tensors can see it."""
    onnx_path = with_pt2_from(msvp, tmp_path, weight_delta=1e-6)
    with pytest.raises(IntegrityError, match=r"model\.pt2 does not match the ONNX file: model\.pt2 tensor "
                                             r"model\.net\.head\.weight differs") as caught:
        SpecformerRuntime(onnx_path, check_pt2=True)
    assert not any("logits differ" in p for p in caught.value.problems)


def test_pt2_with_a_changed_graph_is_refused(msvp, tmp_path) -> None:
    """Same tensors, logits scaled by 1.01: only the comparison of logits can see it."""
    onnx_path = with_pt2_from(msvp, tmp_path, skew=True)
    with pytest.raises(IntegrityError, match=r"model\.pt2's logits differ from ONNX Runtime's") as caught:
        SpecformerRuntime(onnx_path, check_pt2=True)
    assert len(caught.value.problems) == 1
    assert PT2_LOGIT_TOLERANCE <= 1e-4  # export's parity tolerance: a 1% skew is far outside it


def test_retraced_intact_pt2_passes(msvp, tmp_path) -> None:
    """The check has no false alarm on a faithful re-trace (same weights, same graph)."""
    SpecformerRuntime(with_pt2_from(msvp, tmp_path), check_pt2=True)


def test_missing_pt2_is_refused_at_load_when_asked_and_at_the_first_probe_otherwise(msvp, tmp_path) -> None:
    onnx_path = without_pt2(msvp["onnx"], tmp_path)
    with pytest.raises(IntegrityError, match="model.pt2 is missing"):
        SpecformerRuntime(onnx_path, check_pt2=True)
    runtime = SpecformerRuntime(onnx_path)  # certify without --probe: predictions need no model.pt2
    pixels = reference_pixels((1, 16, 16))
    assert len(runtime.answer(pixels)) == 2
    with pytest.raises(IntegrityError, match="model.pt2 is missing"):
        runtime.answer(pixels, probe=ProbeRequest())


def test_certify_checks_pt2_only_for_a_probe(msvp, tmp_path, digit_png) -> None:
    onnx_path = with_pt2_from(msvp, tmp_path, weight_delta=0.5)
    plain = _cli("certify", str(onnx_path), str(digit_png), "--json")
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["prediction"]["label"] == SpecformerRuntime(msvp["onnx"]).answer(
        decode_image(digit_png.read_bytes(), 16, 1)[None])[0]["prediction"]["label"]
    probed = _cli("certify", str(onnx_path), str(digit_png), "--probe", "pgd", "--json")
    assert probed.returncode == 2
    assert "model.pt2 does not match the ONNX file" in probed.stderr and "Traceback" not in probed.stderr
