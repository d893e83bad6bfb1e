"""Turning one HTTP request into pixels and options, with 4xx errors a person can act on.

The TorchServe handler is a thin shell around this module and ``runtime``; keeping the parsing
here lets it be tested without a server. Accepted bodies:

- image bytes (PNG, JPEG, anything PIL reads), options in request headers or in the other
  fields of a multipart form (``curl -F data=@digit.png -F probe=pgd``);
- JSON ``{"image": "<base64>", ...options}`` or ``{"pixels": [[[...]]], ...options}``.

Options (JSON keys, form fields, or headers of the same name, optionally
prefixed ``x-``): ``delta0`` (float, default 0.01), ``top_k`` (int, default 5), ``certificate``
(bool, default true), ``probe`` (``pgd`` | ``fgsm``), ``eps`` (a number or a fraction like
``8/255``, default 2/255), ``steps`` (int, default 10), ``restarts`` (int, default 1), ``norm``
(``linf`` | ``l2``). Ranges are those of ``runtime.LIMITS``; the endpoint's caps are a
:class:`~specformer_deploy.serving.limits.ServingLimits`.

Randomized smoothing: ``smoothing`` is ``true`` (the defaults) or, in JSON, an object with any
of ``sigma``, ``n``, ``n0``, ``alpha``, ``radius``, ``seed``; the same fields travel flat as
``smoothing_sigma``, ``smoothing_n``, ... (headers, form fields or JSON keys), and any of them
asks for smoothing by itself. ``sigma`` defaults to the noise the model was trained with (its
export's ``specformer.smoothing.sigma``); a model trained without noise needs it given.
``radius`` asks for certify-at-radius (a sequential test) instead of a radius estimate. The
endpoint caps ``n0 + n`` per image (``handler.max_smoothing_samples``).

Every failure the request causes is a :class:`ClientError` (4xx) whose message is ASCII, names
the option, and quotes client values only capped and escaped: the message goes into a JSON
body, never into the HTTP status line.
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specformer_deploy.budgets import BudgetError, parse_epsilon
from specformer_deploy.serving.decode import DecodeMap
from specformer_deploy.serving.images import DecodedImage, ImageError, read_image, read_pixels
from specformer_deploy.serving.limits import ServingLimits
from specformer_deploy.serving.options import ProbeRequest, RequestError, check_options
from specformer_deploy.serving.smoothing import SmoothingError, SmoothingParams

__all__ = ["ClientError", "ParsedRequest", "parse_request", "split_form", "shown", "OPTIONS", "BODY_KEYS"]

SMOOTHING_FIELDS = ("sigma", "n", "n0", "alpha", "radius", "seed")
OPTIONS = ("delta0", "top_k", "certificate", "probe", "eps", "steps", "restarts", "norm", "smoothing") + tuple(
    f"smoothing_{name}" for name in SMOOTHING_FIELDS)
BODY_KEYS = ("data", "body")  # TorchServe's names for the request body (multipart: the image field)
_DEFAULTS: dict[str, Any] = {"delta0": 0.01, "top_k": 5, "certificate": True, "probe": None, "eps": 2 / 255,
                             "steps": 10, "restarts": 1, "norm": "linf", "smoothing": None}
_CHOICES = {"probe": ("pgd", "fgsm"), "norm": ("linf", "l2")}
_SHOWN_CHARS = 60  # how much of a client's value an error message quotes
_MESSAGE_CHARS = 600  # no error message is longer than this
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # heap addresses in library reprs (PIL quotes its BytesIO)


def _ascii(text: str) -> str:
    """Printable ASCII only: non-ASCII and control characters (CR/LF included) become escapes."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else repr(c)[1:-1] for c in escaped)


def shown(value: Any, limit: int = _SHOWN_CHARS) -> str:
    """A client's value as an error message may quote it: repr'd, ASCII, capped, no heap addresses."""
    if isinstance(value, (bytes, bytearray)) and len(value) > limit:
        value = bytes(value[:limit])
        suffix = "..."
    else:
        suffix = ""
    if isinstance(value, str) and len(value) > 4 * limit:
        value, suffix = value[: 4 * limit], "..."
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested containers; ints past the digit limit
        text = f"<a {type(value).__name__}>"
    text = _ascii(_ADDRESS.sub("", text))
    if len(text) > limit:
        return text[:limit] + f"... ({len(text)} characters)"
    return text + suffix


def _clean(message: str) -> str:
    """A library's message (PIL, json) as a client may read it: ASCII, capped, no heap addresses."""
    text = _ascii(_ADDRESS.sub("", message))
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


class ClientError(ValueError):
    """The client's mistake: an HTTP status (4xx), a message saying what to change, and ``reason``,
    a short fixed label (never client text) for the rejected-requests metric."""

    def __init__(self, status: int, message: str, reason: str = "bad_request") -> None:
        message = _clean(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase: fixed ASCII per status ("Bad Request"), never client text."""
        return http.HTTPStatus(self.status).phrase

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass
class ParsedRequest:
    pixels: np.ndarray  # [C, S, S] float32 in [0, 1], the model's channels and grid
    delta0: float = 0.01
    top_k: int = 5
    certificate: bool = True
    probe: ProbeRequest | None = None
    source: str = "image"
    warnings: list[str] = field(default_factory=list)
    smoothing: SmoothingParams | None = None
    decode: DecodeMap | None = None  # how the sent image became `pixels` (its shape, the map's norm)

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys are answered in one batched runtime call."""
        return (self.delta0, self.top_k, self.certificate, self.probe, self.smoothing)


def _option_error(name: str, message: str) -> ClientError:
    return ClientError(400, f"option {name} {message}", reason="bad_option")


def _number(name: str, value: Any, kind: type) -> Any:
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _option_error(name, f"must be {wanted}, got {shown(value)}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value.strip()) if isinstance(value, str) else int(value)
        else:
            number = float(value)
    except (TypeError, ValueError, OverflowError):  # int() refuses strings past Python's digit limit
        raise _option_error(name, f"must be {wanted}, got {shown(value)}") from None
    if kind is float and not math.isfinite(number):
        raise _option_error(name, f"must be finite, got {shown(value)}")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise _option_error(name, f"must be true or false, got {shown(value)}")


def _choice(name: str, value: Any) -> str:
    choices = _CHOICES[name]
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in choices:
        raise _option_error(name, f"must be one of {', '.join(choices)}, got {shown(value)}")
    return text


def _options(raw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(shown(k, 30) for k in raw if k not in OPTIONS)
    if unknown:
        raise ClientError(400, f"unknown option(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
                               f"known: {', '.join(OPTIONS)}", reason="unknown_option")
    opts = dict(_DEFAULTS)
    for name, value in raw.items():
        if value is None:
            continue
        if name == "delta0":
            opts[name] = _number(name, value, float)
        elif name in ("top_k", "steps", "restarts"):
            opts[name] = _number(name, value, int)
        elif name == "eps":
            try:
                opts[name] = parse_epsilon(value, "option eps")
            except BudgetError as err:
                raise ClientError(400, str(err), reason="bad_option") from None
        elif name == "certificate":
            opts[name] = _boolean(name, value)
        elif name == "smoothing":
            opts[name] = _smoothing_switch(value)
        elif name.startswith("smoothing_"):
            opts[name] = _smoothing_field(name, value)
        else:
            opts[name] = _choice(name, value)
    return opts


def _smoothing_switch(value: Any) -> bool | dict[str, Any]:
    """``smoothing``: true/false, or (JSON) an object of :data:`SMOOTHING_FIELDS`."""
    if not isinstance(value, dict):
        return _boolean("smoothing", value)
    unknown = sorted(shown(k, 30) for k in value if k not in SMOOTHING_FIELDS)
    if unknown:
        raise ClientError(400, f"unknown smoothing field(s) {', '.join(unknown[:5])}; known: "
                               f"{', '.join(SMOOTHING_FIELDS)}", reason="unknown_option")
    return {key: _smoothing_field(f"smoothing.{key}", item) for key, item in value.items() if item is not None}


def _smoothing_field(name: str, value: Any) -> Any:
    """One smoothing field (``name`` is how the client spelled it: ``smoothing_n`` or ``smoothing.n``)."""
    field_name = name.removeprefix("smoothing").lstrip("_.")
    return _number(name, value, int if field_name in ("n", "n0", "seed") else float)


def _smoothing_params(opts: dict[str, Any], sigma_default: float | None,
                      limits: ServingLimits) -> SmoothingParams | None:
    """The request's smoothing settings (``None``: not asked for), before the sample cap is applied;
    an endpoint that serves no smoothing says so (and where it is served) before anything else."""
    switch = opts["smoothing"]
    flat = {name.removeprefix("smoothing_"): opts[name] for name in opts
            if name.startswith("smoothing_") and opts[name] is not None}
    if switch is False:
        if flat:
            raise _option_error("smoothing", f"is false but {', '.join('smoothing_' + k for k in flat)} asks "
                                             "for it: drop one of them")
        return None
    if switch is None and not flat:
        return None
    fields = {**flat, **(switch if isinstance(switch, dict) else {})}
    if limits.max_smoothing_samples == 0:
        raise ClientError(400, f"smoothing refused: {limits.smoothing_refusal(0, 1)}", reason="smoothing_cost")
    if fields.get("sigma") is None:
        if sigma_default is None:
            where = (f"; smoothing is served at /predictions/{limits.probe_endpoint}" if limits.probe_endpoint
                     else "")
            raise _option_error("smoothing.sigma", "is required: this model was not trained with noise (its export "
                                                   "has no specformer.smoothing.sigma), so give the sigma to "
                                                   f"certify with (pixels in [0, 1]){where}")
        fields["sigma"] = sigma_default
    return SmoothingParams(**fields)


def _checked_smoothing(params: SmoothingParams, limits: ServingLimits) -> SmoothingParams:
    """This endpoint's sample cap first (an absurd ``n`` names the cap), then the ranges."""
    refusal = limits.smoothing_refusal(params.n0, params.n)
    if refusal is not None:
        raise ClientError(400, f"smoothing refused: {refusal}", reason="smoothing_cost")
    try:
        return params.validate()
    except SmoothingError as err:  # its message starts with the field's name
        raise ClientError(400, f"option smoothing.{err}", reason="bad_option") from None


def _header_options(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Options sent as headers (``X-Probe: pgd``); other headers, and TorchServe's per-part
    content-type entries (dict values), are not options and are ignored."""
    out = {}
    for key, value in headers.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            continue
        name = key.lower().removeprefix("x-").replace("-", "_")
        if name in OPTIONS:
            out[name] = value
    return out


def split_form(request: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """TorchServe's per-request dict -> ``(body, other fields)``.

    A raw POST arrives as ``{"body": ...}``; ``curl -F data=@img -F probe=pgd`` (multipart) as one
    key per field with bytes values: the fields other than the image are options. (TorchServe
    hands a handler no query parameters: ``?probe=pgd`` is not an option.)"""
    body = next((request[k] for k in BODY_KEYS if request.get(k) is not None), None)
    if body is None:  # e.g. the image sent under another field name: the caller says where it goes
        return None, {}
    form = {}
    for key, value in request.items():
        if key in BODY_KEYS:
            continue
        name = key.decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else str(key)
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise _option_error(shown(name, 30), "is not UTF-8 text") from None
        form[name] = value
    return body, form


def _body_size(body: Any) -> int:
    if isinstance(body, (bytes, str)):
        return len(body)
    try:
        return len(json.dumps(body))  # a JSON body TorchServe already decoded
    except (TypeError, ValueError, RecursionError):
        return 0


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ClientError(400, "JSON body is nested too deeply", reason="bad_json") from None
    except UnicodeDecodeError:
        raise ClientError(400, "JSON body is not UTF-8 text", reason="bad_json") from None
    except json.JSONDecodeError as err:
        raise ClientError(400, f"body looks like JSON but does not parse: {err.msg} at position {err.pos}",
                          reason="bad_json") from None
    except ValueError as err:  # e.g. an integer past Python's digit limit
        raise ClientError(400, f"JSON body holds a value Python cannot read: {err}", reason="bad_json") from None


def parse_request(body: Any, headers: Mapping[str, Any], image_size: int,
                  limits: ServingLimits | None = None, form: Mapping[str, Any] | None = None,
                  smoothing_sigma: float | None = None, channels: int = 3) -> ParsedRequest:
    """Parse one request: TorchServe's body value, its headers, and any other form fields.

    ``smoothing_sigma``: the model's training noise (``SpecformerRuntime.smoothing_sigma``), the
    default sigma of a smoothing request. ``channels``: the model's input channels."""
    limits = limits or ServingLimits()
    try:
        return _parse(body, headers or {}, image_size, limits, form or {}, smoothing_sigma, channels)
    except RecursionError:
        raise ClientError(400, "request is nested too deeply", reason="bad_json") from None


def _parse(body: Any, headers: Mapping[str, Any], image_size: int, limits: ServingLimits,
           form: Mapping[str, Any], smoothing_sigma: float | None, channels: int) -> ParsedRequest:
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if body is None or (isinstance(body, (bytes, str)) and len(body) == 0):
        raise ClientError(400, "empty request body: send image bytes or JSON {\"image\": <base64>} / {\"pixels\": ...}",
                          reason="empty_body")
    size = _body_size(body)
    if size > limits.max_request_bytes:
        raise ClientError(413, f"request body of {size} bytes exceeds this endpoint's cap handler.max_request_bytes "
                               f"= {limits.max_request_bytes} (model-config.yaml)", reason="body_too_large")
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    payload: dict[str, Any] | None = None
    if isinstance(body, dict):
        payload = body
    elif not isinstance(body, bytes):
        raise ClientError(400, "JSON body must be an object like {\"image\": <base64>} or {\"pixels\": ...}",
                          reason="bad_json")
    elif body.lstrip()[:1] in (b"{", b"["):
        payload = _load_json(body)
        if not isinstance(payload, dict):
            raise ClientError(400, "JSON body must be an object like {\"image\": <base64>} or {\"pixels\": ...}",
                              reason="bad_json")
    raw_options = {**_header_options(headers), **form}
    if payload is None:
        opts = _options(raw_options)
        decoded = _decode(body, image_size, channels, limits.max_image_pixels)
        source = "image"
    else:
        has_image, has_pixels = "image" in payload, "pixels" in payload
        if has_image == has_pixels:
            raise ClientError(400, "JSON body needs exactly one of \"image\" (base64 PNG/JPEG) or \"pixels\"",
                              reason="bad_json")
        opts = _options({**raw_options, **{k: v for k, v in payload.items() if k not in ("image", "pixels")}})
        if has_image:
            if not isinstance(payload["image"], str):
                raise ClientError(400, "\"image\" must be a base64 string", reason="bad_image")
            try:
                data = base64.b64decode(payload["image"], validate=True)
            except (binascii.Error, ValueError) as err:
                raise ClientError(400, f"\"image\" is not valid base64: {err}", reason="bad_image") from None
            decoded = _decode(data, image_size, channels, limits.max_image_pixels)
            source = "image"
        else:
            try:
                decoded = read_pixels(payload["pixels"], image_size, channels)
            except ImageError as err:
                raise ClientError(400, str(err), reason="bad_image") from None
            source = "pixels"
    return _checked(decoded, opts, source, image_size, channels, limits, smoothing_sigma)


def _checked(decoded: DecodedImage, opts: dict[str, Any], source: str, image_size: int, channels: int,
             limits: ServingLimits, smoothing_sigma: float | None = None) -> ParsedRequest:
    """Range checks (``runtime.LIMITS``), then this endpoint's caps, all before any work is done."""
    probe = None
    if opts["probe"] is not None:
        probe = ProbeRequest(opts["probe"], opts["eps"], opts["steps"], opts["norm"], opts["restarts"])
    try:
        check_options(opts["delta0"], opts["top_k"], probe, image_size, channels)
    except RequestError as err:
        raise ClientError(400, str(err), reason="bad_option") from None
    if opts["top_k"] > limits.max_top_k:
        raise ClientError(400, f"top_k = {opts['top_k']} exceeds this endpoint's cap handler.max_top_k = "
                               f"{limits.max_top_k} (model-config.yaml)", reason="top_k_cap")
    if probe is not None:
        refusal = limits.probe_cost_refusal(*probe.cost)
        if refusal is not None:
            raise ClientError(400, f"probe refused: {refusal}", reason="probe_cost")
    smoothing = _smoothing_params(opts, smoothing_sigma, limits)
    if smoothing is not None:
        smoothing = _checked_smoothing(smoothing, limits)
    return ParsedRequest(decoded.pixels, opts["delta0"], opts["top_k"], opts["certificate"], probe, source,
                         smoothing=smoothing, decode=decoded.decode)


def _decode(data: bytes, image_size: int, channels: int, max_pixels: int) -> DecodedImage:
    try:
        return read_image(data, image_size, channels, max_pixels=max_pixels)
    except ImageError as err:
        message = str(err)
        too_large = "exceeds the limit" in message or "decompression bomb" in message
        if too_large:
            raise ClientError(413, f"{message} (handler.max_image_pixels in model-config.yaml)",
                              reason="image_too_large") from None
        raise ClientError(400, message, reason="bad_image") from None
