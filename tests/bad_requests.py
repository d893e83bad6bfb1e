"""A hostile client's corpus: named HTTP requests and the status each must get.

One corpus, three consumers: ``parse_request`` (fast), the handler's ``handle()`` with a real
TorchServe context, and a real TorchServe (tests/test_serving.py). Each case is an HTTP request
(body, content type, headers); :func:`torchserve_view` turns it into what TorchServe's Python
worker hands the handler, decoding JSON and text bodies the way ts/protocol/otf_message_handler
does. A few cases are good requests that once failed (they must answer 200).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from specformer_deploy.serving.images import decode_image

IMAGE_SIZE = 16  # the test models' input size
CHANNELS = 1  # the test models' input channels (digits are grey)
PROBE_CAP = 100  # handler.max_probe_cost the served test model runs with (the default)
SMOOTHING_CAP = 10_100  # handler.max_smoothing_samples (the default): n0 + n per image


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    form: dict[str, bytes] | None = None  # multipart fields; the image is in "data"
    status: int = 400
    mentions: str = ""  # a word the error message must contain (usually the option's name)


def multipart(fields: dict[str, bytes], boundary: str = "specformer-boundary-7MA4YWxk") -> tuple[bytes, str]:
    """What ``curl -F data=@img -F probe=pgd`` sends: one part per field."""
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if name == "data":
            out.write(b'Content-Disposition: form-data; name="data"; filename="digit.png"\r\n'
                      b"Content-Type: image/png\r\n\r\n")
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def default_png() -> bytes:
    """A digit of scikit-learn's built-in set as a PNG (what tools/load_test.py sends too)."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[0]
    image = Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")
    return buffer.getvalue()


def corpus(png: bytes) -> list[Case]:
    good = decode_image(png, IMAGE_SIZE, CHANNELS).tolist()
    b64 = base64.b64encode(png).decode()

    def j(**kw: Any) -> bytes:
        return json.dumps(kw).encode()

    def raw_json(text: str) -> bytes:
        return text.encode("utf-8")

    pixels = json.dumps(good)
    nan = json.dumps({"pixels": [[[float("nan")] * IMAGE_SIZE] * IMAGE_SIZE] * 3}).encode()
    inf = json.dumps({"pixels": [[[float("inf")] * IMAGE_SIZE] * IMAGE_SIZE] * 3}).encode()
    form_body, form_type = multipart({"data": png, "probe": b"pgd", "eps": b"8/255", "steps": b"3"})
    bad_form_body, bad_form_type = multipart({"data": png, "probe": b"pgd", "steps": b"1" * 100_000})
    return [
        # what the hostile client found
        Case("non-ascii json key", raw_json(f'{{"pixels": {pixels}, "temp\u00e9rature": 2}}'), mentions="unknown"),
        Case("non-ascii option value", j(pixels=good, probe="pgd\u00e9\u4e2d"), mentions="probe"),
        Case("non-ascii header value", png, "image/png", {"X-Probe": "pgd\u00e9"}, mentions="probe"),
        Case("cr/lf in a key", raw_json(f'{{"pixels": {pixels}, "a\\r\\nb": 1}}'), mentions="unknown"),
        Case("1 MB option value", j(pixels=good, probe="p" * 1_000_000), mentions="probe"),
        Case("1 MB option name", raw_json(f'{{"pixels": {pixels}, "{"k" * 1_000_000}": 1}}'), mentions="unknown"),
        Case("deep nesting", b"[" * 100_000 + b"]" * 100_000, mentions="nested"),
        Case("deep nesting in an object", b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             mentions="nested"),
        Case("10^5-digit integer", b'{"top_k": 1' + b"0" * 100_000 + b', "pixels": ' + pixels.encode() + b"}"),
        Case("10^5-digit steps header", png, "image/png", {"X-Probe": "pgd", "X-Steps": "9" * 100_000},
             mentions="steps"),
        Case("tiny eps", j(pixels=good, probe="pgd", eps=1e-45), mentions="eps"),
        Case("eps of a subnormal", j(pixels=good, probe="pgd", eps="1e-320"), mentions="eps"),
        Case("probe over the cost cap", j(pixels=good, probe="pgd", steps=100, restarts=4), mentions="max_probe_cost"),
        Case("too many restarts", j(pixels=good, probe="pgd", restarts=1000), mentions="restarts"),
        Case("fgsm restarts", j(pixels=good, probe="fgsm", restarts=3), mentions="restarts"),
        Case("huge top_k", j(pixels=good, top_k=10**30), mentions="top_k"),
        Case("multipart with a 10^5-digit option", bad_form_body, bad_form_type, mentions="steps"),
        Case("not an image (no heap address)", b"hello, I am text", "application/octet-stream",
             mentions="not a readable image"),
        # good requests that once failed
        Case("linf step > 1", j(pixels=good, probe="pgd", eps=1, steps=1), status=200),
        Case("multipart with options", form_body, form_type, status=200),
        Case("restarts within the cap", j(pixels=good, probe="pgd", eps="8/255", steps=5, restarts=2), status=200),
        # the classics
        Case("empty body", b"", "application/octet-stream"),
        Case("truncated png", png[: len(png) // 2], "image/png"),
        Case("decompression bomb", _bomb(), "image/png", status=413, mentions="max_image_pixels"),
        Case("bad json", b'{"image": ', mentions="JSON"),
        Case("json array", b"[1, 2, 3]", mentions="object"),
        Case("json without image", b"{}", mentions="image"),
        Case("image and pixels", j(image=b64, pixels=good), mentions="exactly one"),
        Case("not base64", j(image="!!! not base64 !!!"), mentions="base64"),
        Case("base64 of garbage", j(image=base64.b64encode(b"garbage").decode())),
        Case("image not a string", j(image=123), mentions="base64"),
        Case("nan pixels", nan, mentions="NaN"),
        Case("inf pixels", inf, mentions="NaN"),
        Case("wrong shape", j(pixels=[[0.0] * 8] * 8), mentions="shape"),
        Case("four channels", j(pixels=[good[0]] * 4), mentions="shape"),
        Case("out of range", j(pixels=[[[2.0] * IMAGE_SIZE] * IMAGE_SIZE] * 3), mentions="[0, 1]"),
        Case("string pixels", j(pixels="zeros")),
        Case("unknown option", j(pixels=good, temperature=2), mentions="temperature"),
        Case("negative delta0", j(pixels=good, delta0=-1), mentions="delta0"),
        Case("text delta0", j(pixels=good, delta0="abc"), mentions="delta0"),
        Case("huge delta0", j(pixels=good, delta0=1e9), mentions="delta0"),
        Case("zero top_k", j(pixels=good, top_k=0), mentions="top_k"),
        Case("fractional top_k", j(pixels=good, top_k=1.5), mentions="top_k"),
        Case("unknown probe", j(pixels=good, probe="cw"), mentions="probe"),
        Case("eps too big", j(pixels=good, probe="pgd", eps=2.0), mentions="eps"),
        Case("negative eps", j(pixels=good, probe="pgd", eps=-0.1), mentions="eps"),
        Case("eps divides by zero", j(pixels=good, probe="pgd", eps="8/0"), mentions="eps"),
        Case("too many steps", j(pixels=good, probe="pgd", steps=100000), mentions="steps"),
        Case("zero steps", j(pixels=good, probe="pgd", steps=0), mentions="steps"),
        Case("unknown norm", j(pixels=good, probe="pgd", norm="l1"), mentions="norm"),
        Case("fgsm with l2", j(pixels=good, probe="fgsm", norm="l2"), mentions="fgsm"),
        Case("certificate maybe", j(pixels=good, certificate="maybe"), mentions="certificate"),
        Case("header delta0", png, "image/png", {"X-Delta0": "-1"}, mentions="delta0"),
        # randomized smoothing (the test models were trained without noise: sigma must be given)
        Case("smoothing without sigma", j(pixels=good, smoothing=True), mentions="not trained with noise"),
        Case("smoothing absurd n", j(pixels=good, smoothing={"sigma": 0.25, "n": 10**30}),
             mentions="max_smoothing_samples"),
        Case("smoothing over the cap", j(pixels=good, smoothing={"sigma": 0.25, "n": SMOOTHING_CAP}),
             mentions="max_smoothing_samples"),
        Case("smoothing alpha 1", j(pixels=good, smoothing={"sigma": 0.25, "alpha": 1.0}), mentions="alpha"),
        Case("smoothing alpha 0", j(pixels=good, smoothing={"sigma": 0.25, "alpha": 0}), mentions="alpha"),
        # alpha near 1 made p_lower round to 1: "radius": Infinity, which is not JSON
        Case("smoothing alpha just below 1", j(pixels=good, smoothing={"sigma": 0.25, "alpha": 0.9999999999999999,
                                                                       "n": 500}), mentions="alpha"),
        Case("smoothing alpha above one half", j(pixels=good, smoothing={"sigma": 0.25, "alpha": 0.6}),
             mentions="alpha"),
        # sigma: huge values overflow the model into NaN logits; a float32 zero adds no noise at all
        Case("smoothing sigma 1.7e308", j(pixels=good, smoothing={"sigma": 1.7e308, "n": 500}), mentions="sigma"),
        Case("smoothing sigma 1e38", j(pixels=good, smoothing={"sigma": 1e38, "n": 500}), mentions="at most"),
        Case("smoothing sigma 1e20", j(pixels=good, smoothing={"sigma": 1e20, "n": 500}), mentions="at most"),
        Case("smoothing sigma zero in float32", j(pixels=good, smoothing={"sigma": 1e-46, "n": 500}),
             mentions="float32"),
        Case("smoothing negative radius", j(pixels=good, smoothing={"sigma": 0.25, "radius": -0.5}),
             mentions="radius"),
        Case("smoothing sigma 0", j(pixels=good, smoothing={"sigma": 0}), mentions="sigma"),
        Case("smoothing negative sigma", j(pixels=good, smoothing_sigma=-0.25), mentions="sigma"),
        Case("smoothing zero n", j(pixels=good, smoothing={"sigma": 0.25, "n": 0}), mentions="smoothing.n"),
        Case("smoothing fractional n", j(pixels=good, smoothing={"sigma": 0.25, "n": 10.5}), mentions="smoothing.n"),
        Case("smoothing unknown field", j(pixels=good, smoothing={"sigma": 0.25, "samples": 9}), mentions="samples"),
        Case("smoothing not an object", j(pixels=good, smoothing=[0.25]), mentions="smoothing"),
        Case("smoothing off with a field", j(pixels=good, smoothing=False, smoothing_n=100), mentions="smoothing"),
        Case("header smoothing n", png, "image/png", {"X-Smoothing-Sigma": "0.25", "X-Smoothing-N": "abc"},
             mentions="smoothing_n"),
        Case("smoothing within the cap", j(pixels=good, smoothing={"sigma": 0.25, "n0": 20, "n": 200}), status=200),
        Case("smoothing at a radius", png, "image/png", {"X-Smoothing": "true", "X-Smoothing-Sigma": "0.25",
                                                         "X-Smoothing-N": "300", "X-Smoothing-Radius": "0.1"},
             status=200),
        Case("header steps", png, "image/png", {"X-Probe": "pgd", "X-Steps": "abc"}, mentions="steps"),
        Case("form encoded", png, "application/x-www-form-urlencoded"),
    ]


def _form_fields(case: Case) -> dict[str, bytes]:
    """The fields of a multipart case's body (the corpus builds them with :func:`multipart`)."""
    boundary = case.content_type.split("boundary=", 1)[1].encode()
    fields = {}
    for part in case.body.split(b"--" + boundary)[1:-1]:
        head, _, value = part.strip(b"\r\n").partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        fields[name] = value
    return fields


def torchserve_view(case: Case) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(request dict, headers)`` as TorchServe 0.12's worker hands them to ``handle()``.

    Raw bodies arrive under ``body``: JSON decoded when the content type is application/json and
    it decodes (else the bytes), text/* decoded to str, anything else bytes. Multipart and
    url-encoded forms arrive one key per field with bytes values. Headers carry each parameter's
    content type as a dict under the parameter's name, then the request headers (lower-cased)."""
    if case.content_type.startswith("multipart/form-data"):
        request: dict[str, Any] = {name: bytearray(value) for name, value in _form_fields(case).items()}
        parameter_types = {name: "image/png" if name == "data" else "" for name in request}
    elif case.content_type == "application/x-www-form-urlencoded":  # the frontend splits it into fields
        request = {name: bytearray(value.encode("latin-1"))
                   for name, value in urllib.parse.parse_qsl(case.body.decode("latin-1"))}
        parameter_types = {name: "" for name in request}
    else:
        value: Any = case.body
        if case.content_type == "application/json":
            try:
                value = json.loads(case.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):  # as the frontend: unparsable JSON stays bytes
                value = case.body
        elif case.content_type.startswith("text"):
            value = case.body.decode("utf-8", "replace")
        request = {"body": value}
        parameter_types = {"body": case.content_type}
    headers: dict[str, Any] = {name: {"content-type": kind} for name, kind in parameter_types.items()}
    headers.update({"content-type": case.content_type, **{k.lower(): v for k, v in case.headers.items()}})
    return request, headers
