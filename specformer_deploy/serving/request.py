"""Turning one HTTP request into pixels and options, with 4xx errors a person can act on.

The TorchServe handler is a thin shell around this module and ``runtime``; keeping the parsing
here lets it be tested without a server. Accepted bodies:

- image bytes (PNG, JPEG, anything PIL reads), options in request headers;
- JSON ``{"image": "<base64>", ...options}`` or ``{"pixels": [[[...]]], ...options}``.

Options (JSON keys, or headers of the same name, optionally prefixed ``x-``): ``delta0``
(float, default 0.01), ``top_k`` (int, default 5), ``certificate`` (bool, default true),
``probe`` (``pgd`` | ``fgsm``), ``eps`` (float, default 2/255), ``steps`` (int, default 10),
``norm`` (``linf`` | ``l2``). Limits are those of ``runtime.LIMITS`` and ``max_image_pixels``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from specformer_deploy.serving.images import ImageError, MAX_IMAGE_PIXELS, decode_image, pixels_from_array
from specformer_deploy.serving.runtime import ProbeRequest, RequestError, check_options

__all__ = ["ClientError", "ParsedRequest", "parse_request", "parse_fraction", "OPTIONS"]

OPTIONS = ("delta0", "top_k", "certificate", "probe", "eps", "steps", "norm")
_DEFAULTS: dict[str, Any] = {"delta0": 0.01, "top_k": 5, "certificate": True, "probe": None, "eps": 2 / 255,
                             "steps": 10, "norm": "linf"}


class ClientError(ValueError):
    """The client's mistake: an HTTP status (4xx) and a message saying what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass
class ParsedRequest:
    pixels: np.ndarray  # [3, S, S] float32 in [0, 1]
    delta0: float = 0.01
    top_k: int = 5
    certificate: bool = True
    probe: ProbeRequest | None = None
    source: str = "image"
    warnings: list[str] = field(default_factory=list)

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys are answered in one batched runtime call."""
        return (self.delta0, self.top_k, self.certificate, self.probe)


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ClientError(400, f"option {name} must be a number, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value) if not isinstance(value, str) else int(value.strip())
        else:
            number = float(value)
    except (TypeError, ValueError):
        raise ClientError(400, f"option {name} must be {'an integer' if kind is int else 'a number'}, "
                               f"got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise ClientError(400, f"option {name} must be finite, got {value!r}")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ClientError(400, f"option {name} must be true or false, got {value!r}")


def parse_fraction(name: str, value: Any) -> float:
    """Numbers, or strings like ``8/255`` (how epsilons are usually written)."""
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            result = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise ClientError(400, f"option {name} must be a number or a fraction like 8/255, got {value!r}") from None
        if not math.isfinite(result):
            raise ClientError(400, f"option {name} must be finite, got {value!r}")
        return result
    return _number(name, value, float)


def _options(raw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ClientError(400, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    opts = dict(_DEFAULTS)
    for name, value in raw.items():
        if value is None:
            continue
        if name == "delta0":
            opts[name] = _number(name, value, float)
        elif name in ("top_k", "steps"):
            opts[name] = _number(name, value, int)
        elif name == "eps":
            opts[name] = parse_fraction(name, value)
        elif name == "certificate":
            opts[name] = _boolean(name, value)
        else:
            if not isinstance(value, str):
                raise ClientError(400, f"option {name} must be a string, got {value!r}")
            opts[name] = value.strip().lower()
    return opts


def _header_options(headers: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in headers.items():
        name = key.lower().removeprefix("x-").replace("-", "_")
        if name in OPTIONS:
            out[name] = value
    return out


def parse_request(body: Any, headers: Mapping[str, str], image_size: int,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> ParsedRequest:
    """Parse one request (TorchServe's ``data`` or ``body`` value plus its headers)."""
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if body is None or (isinstance(body, (bytes, str)) and len(body) == 0):
        raise ClientError(400, "empty request body: send image bytes or JSON {\"image\": <base64>} / {\"pixels\": ...}")
    if isinstance(body, str):
        body = body.encode("utf-8")
    payload: dict[str, Any] | None = None
    if isinstance(body, dict):
        payload = body
    elif isinstance(body, (list, int, float)):
        raise ClientError(400, "JSON body must be an object like {\"image\": <base64>} or {\"pixels\": ...}")
    elif isinstance(body, bytes) and body.lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ClientError(400, f"body looks like JSON but does not parse: {err}") from None
        if not isinstance(payload, dict):
            raise ClientError(400, "JSON body must be an object like {\"image\": <base64>} or {\"pixels\": ...}")
    if payload is None:
        opts = _options(_header_options(headers))
        pixels = _decode(body, image_size, max_pixels)
        source = "image"
    else:
        has_image, has_pixels = "image" in payload, "pixels" in payload
        if has_image == has_pixels:
            raise ClientError(400, "JSON body needs exactly one of \"image\" (base64 PNG/JPEG) or \"pixels\"")
        raw = {k: v for k, v in payload.items() if k not in ("image", "pixels")}
        opts = _options({**_header_options(headers), **raw})
        if has_image:
            if not isinstance(payload["image"], str):
                raise ClientError(400, "\"image\" must be a base64 string")
            try:
                data = base64.b64decode(payload["image"], validate=True)
            except (binascii.Error, ValueError) as err:
                raise ClientError(400, f"\"image\" is not valid base64: {err}") from None
            pixels = _decode(data, image_size, max_pixels)
            source = "image"
        else:
            try:
                pixels = pixels_from_array(payload["pixels"], image_size)
            except ImageError as err:
                raise ClientError(400, str(err)) from None
            source = "pixels"
    probe = None
    if opts["probe"] is not None:
        probe = ProbeRequest(opts["probe"], opts["eps"], opts["steps"], opts["norm"])
    try:
        check_options(opts["delta0"], opts["top_k"], probe, image_size)
    except RequestError as err:
        raise ClientError(400, str(err)) from None
    return ParsedRequest(pixels, opts["delta0"], opts["top_k"], opts["certificate"], probe, source)


def _decode(data: bytes, image_size: int, max_pixels: int) -> np.ndarray:
    try:
        return decode_image(data, image_size, max_pixels=max_pixels)
    except ImageError as err:
        message = str(err)
        status = 413 if ("exceeds the limit" in message or "decompression bomb" in message) else 400
        raise ClientError(status, message) from None
