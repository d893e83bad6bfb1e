"""Signed exports: an edit whose digests were recomputed passes the digest check, never the signature.

Each edit of issue 20 is made with the project's own digest functions, so the integrity check alone
accepts it; with a verify key the runtime, the handler, `audit` and `package` refuse it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest
from test_integrity import with_scaled_norms

from specformer_deploy.artifact.integrity import IntegrityError, digest_problems
from specformer_deploy.artifact.onnx_meta import graph_digest, metadata_digests, read_metadata, write_metadata
from specformer_deploy.artifact.signing import SigningError, generate_keys, sign_export, verify_export
from specformer_deploy.serving.package import PackageError, package_deployment
from specformer_deploy.serving.runtime import SpecformerRuntime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    generate_keys(root / "deployer.pem", root / "deployer.pub")
    generate_keys(root / "intruder.pem", root / "intruder.pub")
    return {name: root / name for name in ("deployer.pem", "deployer.pub", "intruder.pem", "intruder.pub")}


@pytest.fixture
def signed(exported_pair, keys, tmp_path) -> Path:
    """A copy of the MSVP export, signed by the deployer."""
    src = Path(exported_pair["msvp"]["onnx"])
    dst = tmp_path / "signed" / "model.onnx"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".pt2"), dst.with_suffix(".pt2"))
    sign_export(dst, keys["deployer.pem"])
    return dst


def _rewrite(path: Path, edit) -> Path:
    """Apply ``edit(proto, meta)`` and recompute every digest with the project's own functions."""
    proto = onnx.load(str(path))
    meta = read_metadata(proto)
    edit(proto, meta)
    meta["integrity"]["metadata_sha256"] = metadata_digests(meta)
    meta["integrity"]["graph_sha256"] = graph_digest(proto)
    write_metadata(proto, meta)
    onnx.save(proto, str(path))
    assert digest_problems(onnx.load(str(path)), read_metadata(onnx.load(str(path)))) == []  # digests agree
    return path


def _halved(value):
    if isinstance(value, list):
        return [_halved(item) for item in value]
    return value / 2 if isinstance(value, float) else value


def _halve_spectral(proto, meta) -> None:
    """Every stored sigma halved (the served bound drops about 4x with sigma_q sigma_k)."""
    meta["spectral"] = {key: _halved(values) for key, values in meta["spectral"].items()}


def _sigma_1e30(proto, meta) -> None:
    meta["smoothing"] = {"sigma": 1e30, "objective": "gaussian", "noise_copies": 1}


def _scaled_norms(path: Path) -> Path:
    """The graph's attn_input_norms scaled by 0.01 (issue 20's first edit), in place."""
    edited = with_scaled_norms(path, path.parent / "scaled")
    shutil.copy(edited, path)
    return path


EDITS = {"spectral metadata halved": lambda p: _rewrite(p, _halve_spectral),
         "training sigma 1e30": lambda p: _rewrite(p, _sigma_1e30),
         "attn_input_norms scaled in the graph": lambda p: _rewrite(_scaled_norms(p), lambda proto, meta: None)}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_each_edit_with_recomputed_digests_is_refused_when_signing_is_on(edit, signed, keys) -> None:
    verify_export(signed, keys["deployer.pub"])  # the intact signed export verifies
    EDITS[edit](signed)
    with pytest.raises(IntegrityError, match="signature in model.sig does not verify: model.onnx changed"):
        SpecformerRuntime(signed, verify_key=keys["deployer.pub"])
    result = subprocess.run([sys.executable, "-m", "specformer_deploy", "audit", str(signed), "--json",
                             "--verify-key", str(keys["deployer.pub"])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert any("does not verify" in problem for problem in json.loads(result.stdout)["problems"])


def test_a_re_signed_missing_or_unreadable_signature_is_refused(signed, keys, tmp_path) -> None:
    sign_export(signed, keys["intruder.pem"])  # the intruder signs its own (intact) copy
    with pytest.raises(IntegrityError, match="signed by another key"):
        SpecformerRuntime(signed, verify_key=keys["deployer.pub"])
    signed.with_suffix(".sig").unlink()
    with pytest.raises(IntegrityError, match="model.sig is missing"):
        SpecformerRuntime(signed, verify_key=keys["deployer.pub"])
    with pytest.raises(IntegrityError, match="verify key cannot be used"):
        SpecformerRuntime(signed, verify_key=keys["deployer.pem"])  # a private key where a public one belongs
    with pytest.raises(SigningError, match="not an Ed25519|not a PEM"):
        sign_export(signed, keys["deployer.pub"])
    assert SpecformerRuntime(signed).smoothing_sigma is None  # without a key: the digests alone, as before


def test_package_refuses_an_export_its_key_does_not_verify_and_ships_the_key(signed, keys, tmp_path) -> None:
    deployment = package_deployment(signed, "signed", tmp_path / "store", verify_key=keys["deployer.pub"])
    for archive in deployment.archives.values():
        with zipfile.ZipFile(archive) as mar:
            assert {"verify_key.pem", "model.sig"} <= set(mar.namelist())
    assert all(config["handler"]["verify_key"] == "verify_key.pem" for config in deployment.model_configs.values())
    with pytest.raises(PackageError, match="signed by another key"):
        package_deployment(signed, "wrong", tmp_path / "store", verify_key=keys["intruder.pub"])


def test_the_worker_serves_a_signed_export_and_answers_503_for_an_edited_one(signed, keys, tmp_path) -> None:
    from test_request import PNG, Case, _context, _handle

    from specformer_handlers.specformer_handler import SpecformerHandler

    shutil.copy(keys["deployer.pub"], signed.parent / "verify_key.pem")
    handler = SpecformerHandler()
    context = _context(signed.parent, {"verify_key": "verify_key.pem"})
    handler.initialize(context)
    assert handler.refusal is None
    (status, _), _ = _handle(handler, context, [Case("png", PNG, "image/png", status=200)])[0]
    assert status == 200
    EDITS["spectral metadata halved"](signed)
    handler = SpecformerHandler()
    handler.initialize(context)
    (status, _), answer = _handle(handler, context, [Case("png", PNG, "image/png", status=200)])[0]
    assert status == 503 and "signature in model.sig does not verify" in json.loads(answer)["error"]
