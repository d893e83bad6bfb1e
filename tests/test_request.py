"""Every client mistake is a 4xx with an ASCII status line and an actionable JSON message.

Fast tests drive ``parse_request`` with the hostile corpus (tests/bad_requests.py) and with
hypothesis; the slow ones drive the real handler's ``handle()`` with TorchServe's own Context,
RequestProcessor and metrics cache on an exported model.
"""

from __future__ import annotations

import base64
import http
import json
import math
import re
import string

import numpy as np
import pytest
from bad_requests import CHANNELS, IMAGE_SIZE, Case, corpus, default_png, multipart, torchserve_view
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specformer_deploy.budgets import madry_step_size
from specformer_deploy.serving.limits import LimitsError, ServingLimits
from specformer_deploy.serving.request import ClientError, ParsedRequest, parse_request, split_form
from specformer_deploy.serving.runtime import ProbeRequest
from specformer_deploy.serving.smoothing import SmoothingParams

PNG = default_png()
CASES = corpus(PNG)
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def _parse(case: Case, limits: ServingLimits | None = None, sigma: float | None = None) -> ParsedRequest:
    request, headers = torchserve_view(case)
    body, form = split_form(request)
    return parse_request(body, headers, IMAGE_SIZE, limits or ServingLimits(), form, smoothing_sigma=sigma,
                         channels=CHANNELS)


def _assert_client_error(err: ClientError, case: Case | None = None) -> None:
    assert 400 <= err.status < 500
    assert err.phrase == http.HTTPStatus(err.status).phrase and err.phrase.isascii()
    assert err.message.isascii() and all(" " <= c <= "~" for c in err.message), err.message
    assert len(err.message) <= 700 and not ADDRESS.search(err.message), err.message
    if case is not None:
        assert err.status == case.status, f"{case.name}: {err.status} {err.message}"
        assert case.mentions.lower() in err.message.lower(), f"{case.name}: {err.message}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_through_parse_request(case: Case) -> None:
    if case.status == 200:
        assert isinstance(_parse(case), ParsedRequest)
        return
    with pytest.raises(ClientError) as info:
        _parse(case)
    _assert_client_error(info.value, case)


def test_multipart_fields_are_options() -> None:
    body, content_type = multipart({"data": PNG, "probe": b"pgd", "eps": b"8/255", "steps": b"3", "restarts": b"2"})
    parsed = _parse(Case("form", body, content_type, status=200))
    assert parsed.probe == ProbeRequest("pgd", 8 / 255, 3, "linf", 2)
    assert np.array_equal(parsed.pixels, _parse(Case("raw", PNG, "image/png", status=200)).pixels)
    with pytest.raises(ClientError, match="unknown option"):
        _parse(Case("form", *multipart({"data": PNG, "temperature": b"2"})))


def test_probe_cost_cap_names_the_cap_and_the_probe_endpoint() -> None:
    limits = ServingLimits(max_probe_cost=100, probe_endpoint="digits-probe")
    request = Case("cost", json.dumps({"image": base64.b64encode(PNG).decode(), "probe": "pgd", "steps": 100,
                                       "restarts": 4}).encode())
    with pytest.raises(ClientError) as info:
        _parse(request, limits)
    assert ("steps x restarts = 400 exceeds this endpoint's cap handler.max_probe_cost = 100 (model-config.yaml)"
            in info.value.message)
    assert "send probes to /predictions/digits-probe" in info.value.message and info.value.reason == "probe_cost"
    assert _parse(request, ServingLimits(max_probe_cost=400)).probe.cost == (100, 4)
    with pytest.raises(ClientError, match="serves no probes"):
        _parse(Case("fgsm", PNG, "image/png", {"X-Probe": "fgsm"}), ServingLimits(max_probe_cost=0))
    assert _parse(Case("none", PNG, "image/png", status=200), ServingLimits(max_probe_cost=0)).probe is None


def test_smoothing_options_in_json_headers_and_form_mean_the_same() -> None:
    image = base64.b64encode(PNG).decode()
    fields = {"sigma": 0.5, "n": 500, "n0": 50, "alpha": 0.01, "radius": 0.2, "seed": 3}
    expected = SmoothingParams(**fields)
    nested = _parse(Case("json", json.dumps({"image": image, "smoothing": fields}).encode()))
    flat = _parse(Case("flat", json.dumps({"image": image, **{f"smoothing_{k}": v
                                                                for k, v in fields.items()}}).encode()))
    headers = _parse(Case("headers", PNG, "image/png",
                          {f"X-Smoothing-{k.title()}": str(v) for k, v in fields.items()}))
    form = _parse(Case("form", *multipart({"data": PNG, "smoothing": b"true",
                                           **{f"smoothing_{k}": str(v).encode() for k, v in fields.items()}})))
    assert nested.smoothing == flat.smoothing == headers.smoothing == form.smoothing == expected
    assert _parse(Case("none", PNG, "image/png", status=200)).smoothing is None
    assert _parse(Case("off", PNG, "image/png", {"X-Smoothing": "false"})).smoothing is None


def test_smoothing_sigma_defaults_to_the_models_training_noise() -> None:
    image = base64.b64encode(PNG).decode()
    asked = Case("default", json.dumps({"image": image, "smoothing": True}).encode())
    assert _parse(asked, sigma=0.25).smoothing == SmoothingParams(sigma=0.25)
    with pytest.raises(ClientError, match="not trained with noise"):
        _parse(asked)
    given_sigma = Case("given", json.dumps({"image": image, "smoothing": {"sigma": 0.12}}).encode())
    assert _parse(given_sigma, sigma=0.25).smoothing.sigma == 0.12


def test_smoothing_cap_names_the_cap_and_counts_n0_plus_n() -> None:
    image = base64.b64encode(PNG).decode()
    request = Case("cap", json.dumps({"image": image, "smoothing": {"sigma": 0.25, "n0": 100, "n": 1000}}).encode())
    with pytest.raises(ClientError) as info:
        _parse(request, ServingLimits(max_smoothing_samples=1099))
    assert ("n0 + n = 1100 samples per image exceeds this endpoint's cap handler.max_smoothing_samples = 1099 "
            "(model-config.yaml)" in info.value.message) and info.value.reason == "smoothing_cost"
    assert _parse(request, ServingLimits(max_smoothing_samples=1100)).smoothing.n == 1000
    with pytest.raises(ClientError, match="serves no smoothing"):
        _parse(request, ServingLimits(max_smoothing_samples=0))
    with pytest.raises(ClientError, match="send smoothing requests to /predictions/digits-probe"):
        _parse(request, ServingLimits(max_smoothing_samples=0, probe_endpoint="digits-probe"))  # what package writes
    default = Case("default", json.dumps({"image": image, "smoothing": {"sigma": 0.25}}).encode())
    assert _parse(default).smoothing == SmoothingParams(sigma=0.25)  # the default cap admits the default CERTIFY
    with pytest.raises(LimitsError, match="max_smoothing_samples"):
        ServingLimits.from_handler_config({"max_smoothing_samples": -1})


def test_request_size_top_k_and_pixel_caps_are_4xx_naming_the_key() -> None:
    with pytest.raises(ClientError) as info:
        _parse(Case("big", PNG, "image/png"), ServingLimits(max_request_bytes=len(PNG) - 1))
    assert info.value.status == 413 and "handler.max_request_bytes" in info.value.message
    assert _parse(Case("fits", PNG, "image/png"), ServingLimits(max_request_bytes=len(PNG))).top_k == 5
    with pytest.raises(ClientError, match="handler.max_top_k = 3"):
        _parse(Case("k", PNG, "image/png", {"X-Top-K": "4"}), ServingLimits(max_top_k=3))
    with pytest.raises(ClientError) as info:
        _parse(Case("pixels", PNG, "image/png"), ServingLimits(max_image_pixels=10))
    assert info.value.status == 413 and "handler.max_image_pixels" in info.value.message


def test_limits_from_model_config_validate_each_key() -> None:
    assert ServingLimits.from_handler_config(None) == ServingLimits()
    assert ServingLimits() == ServingLimits(max_image_pixels=40_000_000, max_request_bytes=8 * 1024 * 1024,
                                            max_top_k=100, max_probe_cost=100, max_smoothing_samples=10_100,
                                            probe_endpoint=None, threads_per_worker=None)
    read = ServingLimits.from_handler_config({"max_probe_cost": 0, "probe_endpoint": "digits-probe",
                                              "max_top_k": 10, "threads_per_worker": 2, "other": "ignored"})
    assert (read.max_probe_cost, read.probe_endpoint, read.max_top_k, read.threads_per_worker) == (0, "digits-probe",
                                                                                                   10, 2)
    for key, value in [("max_probe_cost", -1), ("max_top_k", 0), ("max_top_k", 101), ("max_request_bytes", "8MB"),
                       ("max_image_pixels", True), ("threads_per_worker", 0.5), ("probe_endpoint", "a/b"),
                       ("probe_endpoint", "")]:
        with pytest.raises(LimitsError, match=f"handler.{key}"):
            ServingLimits.from_handler_config({key: value})


@pytest.mark.parametrize("eps, steps, norm", [(1.0, 1, "linf"), (8 / 255, 10, "linf"), (0.5, 2, "l2"),
                                              (3.0, 1, "l2"), (0.9, 2, "linf")])
def test_probe_step_is_madrys_rule_capped_at_one_for_linf(eps, steps, norm) -> None:
    expected = 2.5 * eps / steps
    if norm == "linf":
        expected = min(expected, 1.0)
    request = ProbeRequest("pgd", eps, steps, norm).validate(IMAGE_SIZE)
    assert request.step_size == pytest.approx(expected) == madry_step_size(eps, steps, norm)


def test_a_step_that_is_zero_in_float32_is_refused_naming_eps_and_steps() -> None:
    eps = 1e-44  # positive in float32, but 2.5 * eps / 100 is not
    assert np.float32(eps) > 0 and np.float32(2.5 * eps / 100) == 0
    with pytest.raises(ClientError) as info:
        _parse(Case("tiny", PNG, "image/png", {"X-Probe": "pgd", "X-Eps": str(eps), "X-Steps": "100"}))
    assert "eps" in info.value.message and "steps 100" in info.value.message


def test_cli_certify_reads_eps_with_the_one_parser(tmp_path) -> None:
    from typer.testing import CliRunner

    from specformer_deploy.cli import app

    (tmp_path / "d.png").write_bytes(PNG)
    result = CliRunner().invoke(app, ["certify", str(tmp_path / "missing.onnx"), str(tmp_path / "d.png"),
                                      "--probe", "pgd", "--eps", "8/0"])
    assert result.exit_code == 2 and "--eps '8/0' divides by zero" in result.output


# -- fuzz -----------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=20)
_option_names = st.sampled_from(["delta0", "top_k", "certificate", "probe", "eps", "steps", "restarts", "norm",
                                 "smoothing", "smoothing_n", "smoothing_sigma", "smoothing_alpha"])
_header_names = st.one_of(_option_names, _option_names.map(lambda n: "X-" + n.replace("_", "-")), st.text())
_header_values = st.one_of(st.text(), st.text(alphabet=string.digits, min_size=4000, max_size=6000),
                           st.sampled_from(["pgd", "fgsm", "l2", "8/255", "1e-45", "nan", "-1", "\r\n", "1/0"]))
_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accepts_or_4xx(body, headers, form=None) -> None:
    try:
        parsed = parse_request(body, headers, IMAGE_SIZE, ServingLimits(), form)
    except ClientError as err:
        _assert_client_error(err)
        return
    assert parsed.pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and math.isfinite(parsed.delta0)


@_fuzz
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(body) -> None:
    _accepts_or_4xx(body, {})


@_fuzz
@given(st.dictionaries(st.one_of(_option_names, st.text()), _json, max_size=5), st.booleans(),
       st.sampled_from(["image", "pixels", None]))
def test_fuzz_arbitrary_json(options, as_bytes, kind) -> None:
    payload = dict(options)
    if kind == "pixels":
        payload["pixels"] = np.full((3, IMAGE_SIZE, IMAGE_SIZE), 0.5).tolist()
    elif kind == "image":
        payload["image"] = base64.b64encode(PNG).decode()
    body = json.dumps(payload).encode() if as_bytes else payload
    _accepts_or_4xx(body, {})


@_fuzz
@given(st.dictionaries(_header_names, _header_values, max_size=4),
       st.dictionaries(_option_names, st.binary(max_size=40) | _header_values, max_size=3))
def test_fuzz_arbitrary_headers_and_form_fields(headers, form) -> None:
    _accepts_or_4xx(PNG, headers)
    try:
        body, fields = split_form({"data": bytearray(PNG), **form})
    except ClientError as err:
        _assert_client_error(err)
        return
    _accepts_or_4xx(body, headers, fields)


@_fuzz
@given(st.integers(min_value=1, max_value=30_000), st.sampled_from([b"[", b'{"a":']))
def test_fuzz_deep_nesting(depth, opener) -> None:
    closer = b"]" if opener == b"[" else b"}"
    _accepts_or_4xx(opener * depth + b"0" + closer * depth, {})


# -- the real handler, with TorchServe's own context and metrics cache -----------------------

def _context(model_dir, handler_config: dict, **model_yaml):
    from pathlib import Path

    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.model_name = "digits"
    metrics.set_request_ids("r0")
    return Context("digits", str(model_dir), {"model": {"serializedFile": "model.onnx"}}, 8, None, "0.12.0",
                   metrics=metrics, model_yaml_config={"handler": handler_config, **model_yaml})


def _handle(handler, context, cases: list[Case]):
    from ts.context import RequestProcessor

    views = [torchserve_view(case) for case in cases]
    context.request_processor = [RequestProcessor(headers) for _, headers in views]
    out = handler.handle([request for request, _ in views], context)
    return [(context.get_response_status(i), answer) for i, answer in enumerate(out)]


@pytest.fixture(scope="module")
def handler_and_context(exported_pair):
    from pathlib import Path

    from specformer_handlers.specformer_handler import SpecformerHandler

    context = _context(Path(exported_pair["msvp"]["onnx"]).parent, {"max_probe_cost": 100, "threads_per_worker": 1})
    handler = SpecformerHandler()
    handler.initialize(context)
    return handler, context


@pytest.mark.slow
def test_corpus_through_the_handler_in_one_batch(handler_and_context, caplog) -> None:
    """The whole corpus as one batch: each request gets its own status; good ones are answered
    exactly as the runtime answers them alone; rejections are counted by reason."""
    handler, context = handler_and_context
    good = Case("good", PNG, "image/png", status=200)
    batch = [good, *CASES, good]
    with caplog.at_level("INFO"):
        results = _handle(handler, context, batch)
    runtime = handler.runtime
    alone = runtime.answer(_parse(good).pixels[None])[0]
    for case, ((status, phrase), answer) in zip(batch, results):
        body = json.loads(answer)
        assert status == case.status, f"{case.name}: {status} {body}"
        assert phrase is None or (phrase == http.HTTPStatus(status).phrase), f"{case.name}: {phrase!r}"
        assert answer.isascii()
        if status != 200:
            assert body["status"] == status and case.mentions.lower() in body["error"].lower(), body
            assert not ADDRESS.search(body["error"])
        elif case is good:
            assert body["prediction"] == alone["prediction"]
            for a, b in zip(body["attention_lipschitz"]["layers"], alone["attention_lipschitz"]["layers"]):
                assert a["bound"] == pytest.approx(b["bound"], rel=1e-9)
    rejected = [r.getMessage() for r in caplog.records if "SpecformerRejectedRequests" in r.getMessage()]
    assert any("Reason:probe_cost" in line for line in rejected), rejected
    assert any("Reason:bad_json" in line for line in rejected)
    timings = " ".join(r.getMessage() for r in caplog.records)
    for name in ("SpecformerInferenceTime", "SpecformerCertificateTime", "SpecformerSmoothingTime",
                 "SpecformerProbeTime"):
        assert f"[METRICS]{name}.Milliseconds:" in timings, name


def _grey_png(side: int) -> bytes:
    import io

    from PIL import Image

    grey = Image.open(io.BytesIO(PNG)).convert("L").resize((side, side), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    return buffer.getvalue()


def test_smoothing_radius_is_stated_in_the_sent_image_through_the_handler(handler_and_context) -> None:
    """A grey PNG of the model's size: both radii equal. Twice the size: the grid's radius divided
    by the decode's exact norm, in the coordinates of the image that was sent."""
    from specformer_deploy.serving.decode import decode_norm

    handler, context = handler_and_context

    def request(side: int) -> Case:
        body = {"image": base64.b64encode(_grey_png(side)).decode(), "smoothing": {"sigma": 0.25, "n": 500, "n0": 50}}
        return Case(f"{side} px", json.dumps(body).encode(), status=200)

    same, double = request(IMAGE_SIZE), request(2 * IMAGE_SIZE)
    (status_a, _), answer_a = _handle(handler, context, [same])[0]
    (status_b, _), answer_b = _handle(handler, context, [double])[0]
    assert status_a == status_b == 200
    a, b = json.loads(answer_a)["smoothing"], json.loads(answer_b)["smoothing"]
    assert a["space"] == f"model input {CHANNELS}x{IMAGE_SIZE}x{IMAGE_SIZE}, pixels in [0, 1], L2"
    assert a["sent_image"] == f"grey {IMAGE_SIZE}x{IMAGE_SIZE}" and a["decode_norm"] == 1.0
    assert a["radius_in_sent_image"] == a["radius"]
    norm = decode_norm((1, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE), (CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    assert b["sent_image"] == f"grey {2 * IMAGE_SIZE}x{2 * IMAGE_SIZE}" and b["decode_norm"] == pytest.approx(norm)
    assert norm < 0.6  # a 2x shrink: the sent image's radius is about twice the grid's
    assert b["radius_in_sent_image"] == pytest.approx(b["radius"] / norm)
    assert f"{2 * IMAGE_SIZE}x{2 * IMAGE_SIZE}" in b["sent_image_space"]


@pytest.mark.slow
def test_probe_restarts_keep_the_strongest_and_do_not_depend_on_the_batch(handler_and_context) -> None:
    runtime = handler_and_context[0].runtime
    pixels = np.stack([_parse(Case("g", PNG, "image/png")).pixels,
                       np.full((CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 0.5, dtype=np.float32)])
    labels = runtime.infer(pixels)[0].argmax(axis=1)
    one = runtime.probe(pixels, labels, ProbeRequest("pgd", 0.05, 5, "linf", 1))
    four = runtime.probe(pixels, labels, ProbeRequest("pgd", 0.05, 5, "linf", 4))
    alone = runtime.probe(pixels[1:], labels[1:], ProbeRequest("pgd", 0.05, 5, "linf", 4))
    assert alone[0] == four[1]  # seeded per image: the batch does not change an answer
    for a, b in zip(one, four):
        assert b["restarts"] == 4 and a["restarts"] == 1
        # The first restart is the single run and restarts keep the highest cross-entropy, which can
        # sit at a slightly larger margin than the single run's: never by more than a hair.
        assert b["flipped"] or b["margin"] <= a["margin"] + 1e-3
        assert b["linf_distance"] <= 0.05 + 1e-6


@pytest.mark.slow
def test_a_bad_handler_config_is_a_load_error_naming_the_key(exported_pair) -> None:
    from pathlib import Path

    from specformer_handlers.specformer_handler import SpecformerHandler

    context = _context(Path(exported_pair["msvp"]["onnx"]).parent, {"max_probe_cost": "lots"})
    with pytest.raises(LimitsError, match="handler.max_probe_cost"):
        SpecformerHandler().initialize(context)


def test_a_smoothing_request_to_the_cheap_endpoint_is_told_where_smoothing_is_served() -> None:
    """Before asking for a sigma, an endpoint that serves no smoothing says so and names NAME-probe."""
    cheap = ServingLimits(max_smoothing_samples=0, probe_endpoint="digits-probe")
    body = json.dumps({"pixels": np.full((IMAGE_SIZE, IMAGE_SIZE), 0.5).tolist(), "smoothing": True}).encode()
    with pytest.raises(ClientError) as caught:
        parse_request(body, {}, IMAGE_SIZE, cheap, channels=CHANNELS)
    _assert_client_error(caught.value)
    assert "serves no smoothing" in caught.value.message and "/predictions/digits-probe" in caught.value.message
    named = ServingLimits(probe_endpoint="digits-probe")  # serves smoothing, but the model has no training sigma
    with pytest.raises(ClientError) as caught:
        parse_request(body, {}, IMAGE_SIZE, named, channels=CHANNELS)
    assert "smoothing.sigma is required" in caught.value.message
    assert "/predictions/digits-probe" in caught.value.message


def test_the_smoothing_cap_follows_what_a_sample_costs_and_the_response_timeout() -> None:
    limits = ServingLimits(max_smoothing_samples=10_100, samples_per_second=26.0, response_timeout=120,
                           probe_endpoint="vit-probe")
    assert limits.smoothing_time_budget == 1560  # 26 images/s x 60 s
    assert limits.smoothing_refusal(100, 1460) is None
    refusal = limits.smoothing_refusal(100, 10_000)  # the default request on a paper-vit-s-sized model
    assert "26 images/s" in refusal and "n <= 1460 with n0 = 100" in refusal and "responseTimeout 120 s" in refusal
    assert "GPU" in refusal
    assert ServingLimits(max_smoothing_samples=10_100).smoothing_refusal(100, 10_000) is None  # not measured


class _Slow:
    """The worker's real ONNX Runtime session, made slow: 2 ms per image (500 images/s at most)."""

    def __init__(self, session, seconds_per_image: float = 0.002) -> None:
        self.session, self.seconds_per_image = session, seconds_per_image

    def run(self, names, feeds):
        import time

        time.sleep(self.seconds_per_image * len(feeds["pixels"]))
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.slow
def test_a_slow_model_refuses_what_would_outlast_its_timeout_and_stops_at_its_deadline(exported_pair) -> None:
    """Measured at load: a request that cannot finish in half of responseTimeout is a 400 at once,
    one that fits is answered, and a batch that together outlasts it stops at the deadline (503)
    with the worker alive, never TorchServe's "Worker died"."""
    import time
    from pathlib import Path

    from specformer_handlers.specformer_handler import SpecformerHandler

    context = _context(Path(exported_pair["msvp"]["onnx"]).parent, {"threads_per_worker": 1}, responseTimeout=4)
    handler = SpecformerHandler()
    handler.initialize(context)
    handler.runtime.sampler.session = _Slow(handler.runtime.sampler.session)  # the session smoothing samples with
    handler.size_smoothing()
    budget = handler.limits.smoothing_time_budget
    assert budget is not None and 200 < budget <= 1000  # at most 500 images/s x 2 s

    def request(n: int) -> Case:
        body = {"image": base64.b64encode(PNG).decode(), "smoothing": {"sigma": 0.25, "n0": 20, "n": n}}
        return Case(f"n {n}", json.dumps(body).encode(), status=200)

    started = time.monotonic()
    (status, _), answer = _handle(handler, context, [request(10_000)])[0]
    assert status == 400 and "would outlast this model's time" in json.loads(answer)["error"]
    assert time.monotonic() - started < 1.0  # refused before any sampling
    (status, _), answer = _handle(handler, context, [request(budget // 2)])[0]
    assert status == 200 and json.loads(answer)["smoothing"]["n"] == budget // 2
    started = time.monotonic()
    results = _handle(handler, context, [request(budget - 20)] * 3)  # each fits alone; together ~3x half the timeout
    assert time.monotonic() - started < 4.0  # stopped before responseTimeout
    assert all(status == 503 and "deadline" in json.loads(answer)["error"] for (status, _), answer in results)
    (status, _), _ = _handle(handler, context, [request(budget // 2)])[0]
    assert status == 200  # the worker lives on
