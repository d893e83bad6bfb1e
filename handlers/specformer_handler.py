"""TorchServe handler: predictions with labelled certificates (per-layer Lipschitz bounds, randomized
smoothing on request) and an on-demand PGD probe.

Thin on purpose: request parsing lives in ``specformer_deploy.serving.request``, the model and the
mathematics in ``specformer_deploy.serving.runtime`` (the same code `specformer-deploy certify` runs),
so the server's numbers equal the command line's. Each request gets its own status: a bad
request in a batch fails alone with a 4xx JSON error, its neighbours are answered.

Devices: a worker that TorchServe gives a ``gpu_id`` (archives packaged with ``--device-ids``)
runs ONNX Runtime's CUDA provider on that GPU; where CUDA is not usable it serves on CPU and
logs one warning line saying why. The device actually used is logged at start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

TORCHSERVE_RESPONSE_TIMEOUT = 120  # s: TorchServe's default when model-config.yaml sets none
DEADLINE_FRACTION = 0.75  # of responseTimeout: smoothing stops there, before TorchServe kills the worker

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:;,'\"()]+)+[\\/]([^\s\\/:;,'\"()]+)")


def _without_paths(message: str) -> str:
    """``message`` with every absolute path cut to its file name (a 503 must not show the server's
    folders to a client)."""
    return _PATH.sub(lambda match: match.group(1), message)


class SpecformerHandler(BaseHandler):
    """Serves an ONNX export of specformer-deploy with ONNX Runtime."""

    def initialize(self, context: Any) -> None:
        from specformer_deploy.serving.limits import ServingLimits
        from specformer_deploy.serving.runtime import IntegrityError, SpecformerRuntime

        properties = context.system_properties
        model_dir = Path(properties.get("model_dir"))
        manifest = context.manifest or {}
        serialized = (manifest.get("model") or {}).get("serializedFile") or "model.onnx"
        gpu_id = properties.get("gpu_id")  # TorchServe's pick among model-config.yaml's deviceIds; None on CPU
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        options = model_yaml.get("handler") or {}
        self.limits = ServingLimits.from_handler_config(options)  # a bad cap fails the load, naming its key
        threads = self.limits.threads_per_worker or max(1, (os.cpu_count() or 1) // 2)
        # The probe's torch ops get the same thread budget as ONNX Runtime: torch's default (one
        # thread per core in every worker) oversubscribes the cores as soon as there are several
        # workers (tools/bench/workers.py measures what that costs).
        import torch

        torch.set_num_threads(threads)
        # A file that fails its integrity check fails it on every retry: raising here would make
        # TorchServe restart the worker forever while requests wait. The worker loads, refuses,
        # and answers every request 503 at once (see handle()).
        self.refusal: str | None = None
        try:
            key = options.get("verify_key")  # package --verify-key: the public key inside the archive
            self.runtime = SpecformerRuntime(model_dir / serialized, device_id=None if gpu_id is None else int(gpu_id),
                                             threads=threads, check_pt2=True,
                                             verify_key=None if key is None else model_dir / str(key))
        except (IntegrityError, FileNotFoundError) as err:
            self.refusal = _without_paths(str(err))  # the client sees file names, never the server's folders
            logger.error("specformer: REFUSING TO SERVE model %r: %s; run specformer-deploy audit %s",
                         getattr(context, "model_name", None), err, serialized)
            self.initialized = True
            return
        runtime = self.runtime
        # One warning line when a GPU was asked for and the worker serves on CPU all the same.
        if gpu_id is not None and runtime.device == "cpu":
            logger.warning("specformer: gpu_id %s was assigned but ONNX Runtime has no usable CUDA provider here "
                           "(%s); serving on CPU", gpu_id, runtime.cuda_fallback)
        elif gpu_id is None and str(model_yaml.get("deviceType", "")).lower() == "gpu":
            logger.warning("specformer: model-config.yaml asks for GPUs (deviceType gpu, deviceIds %s) but TorchServe "
                           "assigned this worker no gpu_id (it found no GPU with nvidia-smi, or the deviceIds are "
                           "not among them); serving on CPU", model_yaml.get("deviceIds"))
        logger.info("specformer: loaded %s on %s with %s (gpu_id %s, %d threads); weights, graph, metadata and "
                    "model.pt2 verified against their export",
                    serialized, runtime.device, runtime.providers[0], gpu_id, threads)
        self.response_timeout = int(model_yaml.get("responseTimeout") or TORCHSERVE_RESPONSE_TIMEOUT)
        self.size_smoothing()
        self.initialized = True

    def size_smoothing(self) -> None:
        """Measure what a smoothing sample costs on this worker and cap n0 + n at what finishes in
        half of ``responseTimeout`` (an endpoint that serves no smoothing measures nothing)."""
        if self.limits.max_smoothing_samples <= 0:
            return
        self.limits = dataclasses.replace(self.limits, samples_per_second=self.runtime.sampling_rate(),
                                          response_timeout=self.response_timeout)
        logger.info("specformer: smoothing samples %.4g images/s here: n0 + n up to %d fits in half of "
                    "responseTimeout %d s", self.limits.samples_per_second, self.limits.smoothing_time_budget,
                    self.response_timeout)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        if self.refusal is not None:  # never a prediction from a model that failed its integrity check
            message = f"model failed its integrity check: {self.refusal}"
            return [self._error(context, index, 503, message, "integrity") for index in range(len(data))]
        from specformer_deploy.serving.request import ClientError, parse_request, split_form
        from specformer_deploy.serving.smoothing import SamplingDeadline, SamplingError

        # Smoothing stops here at the latest (a 503), well before TorchServe's responseTimeout would
        # kill the worker and every request queued behind it.
        deadline = time.monotonic() + DEADLINE_FRACTION * self.response_timeout
        answers: list[Any] = [None] * len(data)
        groups: dict[tuple, list[tuple[int, Any]]] = {}
        for index, request in enumerate(data):
            try:
                body, form = split_form(request or {})
                if body is None and request:
                    raise ClientError(400, "no request body found: send image bytes with Content-Type "
                                           "application/octet-stream or image/png|jpeg, JSON with Content-Type "
                                           "application/json, or a multipart form with the image in field data",
                                      reason="empty_body")
                headers = context.get_all_request_header(index) or {}
                parsed = parse_request(body, headers, self.runtime.image_size, self.limits, form,
                                       smoothing_sigma=self.runtime.smoothing_sigma, channels=self.runtime.channels)
                groups.setdefault(parsed.group_key, []).append((index, parsed))
            except ClientError as err:
                answers[index] = self._error(context, index, err.status, err.message, err.reason)
            except Exception as err:  # never let one request take the batch down
                logger.exception("specformer: unexpected error parsing request %d", index)
                answers[index] = self._error(context, index, 500, f"internal error: {type(err).__name__}",
                                             "internal")
        for (delta0, top_k, certificate, probe, smoothing), members in groups.items():
            import numpy as np

            try:
                pixels = np.stack([parsed.pixels for _, parsed in members])
                timings: dict[str, float] = {}
                results = self.runtime.answer(pixels, delta0=delta0, top_k=top_k, probe=probe,
                                              certificate=certificate, smoothing=smoothing,
                                              decodes=[parsed.decode for _, parsed in members], timings=timings,
                                              deadline=deadline)
                for (index, _), result in zip(members, results):
                    answers[index] = json.dumps(result, allow_nan=False)  # strict JSON: never NaN or Infinity
                    context.set_response_content_type(index, "application/json")
                self._record_times(context, timings)
            except SamplingDeadline as err:  # the worker lives on; the client can retry with fewer samples
                logger.warning("specformer: smoothing stopped at its deadline for %d request(s)", len(members))
                for index, _ in members:
                    answers[index] = self._error(context, index, 503, f"smoothing stopped: {err}", "deadline")
            except SamplingError as err:  # e.g. NaN logits under noise: no certificate, and the client is told why
                logger.error("specformer: smoothing refused for %d request(s): %s", len(members), err)
                for index, _ in members:
                    answers[index] = self._error(context, index, 500, f"smoothing failed: {err}", "sampling")
            except Exception as err:  # the server's own fault: 500 for this group, the others are answered
                logger.exception("specformer: inference failed for %d request(s)", len(members))
                for index, _ in members:
                    answers[index] = self._error(context, index, 500, f"internal error: {type(err).__name__}",
                                                 "internal")
        return answers

    @staticmethod
    def _record_times(context: Any, timings: dict[str, float]) -> None:
        """Milliseconds per batch group: SpecformerInferenceTime, ...CertificateTime, ...SmoothingTime,
        ...ProbeTime."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            for part, seconds in timings.items():
                metrics.add_time(f"Specformer{part.capitalize()}Time", round(seconds * 1000.0, 3), None, "ms", [])
        except Exception:  # a metric never costs a client its answer
            logger.exception("specformer: could not record timing metrics")

    @staticmethod
    def _error(context: Any, index: int, status: int, message: str, reason: str) -> str:
        """A JSON error body; the status line carries only the fixed ASCII phrase of ``status``
        (client text in it breaks TorchServe's frontend), and ``reason`` (a fixed label) is counted
        in SpecformerRejectedRequests."""
        import http

        context.set_response_status(code=status, phrase=http.HTTPStatus(status).phrase, idx=index)
        context.set_response_content_type(index, "application/json")
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            from ts.metrics.dimension import Dimension

            try:
                metrics.add_counter("SpecformerRejectedRequests", 1, None,
                                    [Dimension("Reason", reason), Dimension("Status", str(status))])
            except Exception:  # a metric never costs a client its answer
                logger.exception("specformer: could not count a rejected request")
        return json.dumps({"error": message, "status": status})  # ensure_ascii: the body is ASCII too
