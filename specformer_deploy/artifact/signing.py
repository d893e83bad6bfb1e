"""Signed exports: authenticity, where the digests give only integrity.

The digests in the metadata catch a file changed by accident or by someone who does not recompute
them; anyone can recompute them. A signature made with a private key the deployer holds cannot be
recomputed: ``sign_export`` writes ``model.sig`` beside ``model.onnx``, an Ed25519 signature over
the SHA-256 of every byte of ``model.onnx`` and ``model.pt2``, and ``verify_export`` checks it
against the public key. Any edit to either file (weights, graph, metadata, with or without
recomputed digests) breaks it. Keys are PEM files (``generate_keys`` writes a pair).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from specformer_deploy.artifact.integrity import IntegrityError

__all__ = ["SIGNATURE_FORMAT", "SigningError", "generate_keys", "sign_export", "verify_export", "signature_path"]

SIGNATURE_FORMAT = "specformer-deploy signature 1 (Ed25519 over the SHA-256 of model.onnx and model.pt2)"
SIGNED_FILES = (".onnx", ".pt2")


class SigningError(ValueError):
    """A key that cannot be read or is not an Ed25519 key; the message names the file."""


def signature_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".sig")


def _file_digests(onnx_path: Path) -> dict[str, str]:
    digests = {}
    for suffix in SIGNED_FILES:
        path = onnx_path.with_suffix(suffix)
        if not path.is_file():
            raise IntegrityError(f"{path.name} is missing: the signature covers model.onnx and model.pt2")
        with path.open("rb") as handle:
            digests[suffix.lstrip(".")] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def _message(digests: dict[str, str]) -> bytes:
    return json.dumps({"format": SIGNATURE_FORMAT, "sha256": digests}, sort_keys=True).encode()


def _load_key(path: str | Path, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except FileNotFoundError:
        raise SigningError(f"{kind} key {path} does not exist") from None
    except (ValueError, TypeError) as err:
        raise SigningError(f"{path} is not a PEM {kind} key: {err}") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise SigningError(f"{path} is a {type(key).__name__}, not an Ed25519 {kind} key")
    return key


def generate_keys(private_path: str | Path, public_path: str | Path) -> None:
    """A new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private_path, public_path = Path(private_path), Path(public_path)
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def sign_export(onnx_path: str | Path, private_key: str | Path) -> Path:
    """Write ``model.sig`` beside ``model.onnx``: what was signed and the signature. Returns its path."""
    onnx_path = Path(onnx_path)
    key = _load_key(private_key, private=True)
    digests = _file_digests(onnx_path)
    record = {"format": SIGNATURE_FORMAT, "sha256": digests,
              "signature": base64.b64encode(key.sign(_message(digests))).decode()}
    out = signature_path(onnx_path)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out


def verify_export(onnx_path: str | Path, public_key: str | Path) -> dict[str, str]:
    """The signed SHA-256 of each file when ``model.sig`` is a valid signature of today's
    ``model.onnx`` and ``model.pt2`` by ``public_key``'s owner; :class:`IntegrityError` otherwise."""
    from cryptography.exceptions import InvalidSignature

    onnx_path = Path(onnx_path)
    key = _load_key(public_key, private=False)
    sig = signature_path(onnx_path)
    if not sig.is_file():
        raise IntegrityError(f"{sig.name} is missing: a verify key is configured, so only a signed export is "
                             "served (export --sign-key)")
    try:
        record = json.loads(sig.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{sig.name} is not a signature written by export --sign-key: {err}") from None
    digests = _file_digests(onnx_path)
    try:
        key.verify(signature, _message(digests))
    except InvalidSignature:
        changed = [name for name, digest in digests.items() if (record.get("sha256") or {}).get(name) != digest]
        what = f"model.{' and model.'.join(changed)} changed after signing" if changed else "signed by another key"
        raise IntegrityError(f"the signature in {sig.name} does not verify: {what}") from None
    return digests
