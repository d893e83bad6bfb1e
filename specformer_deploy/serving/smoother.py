"""The randomized-smoothing unit of a served model: its sampling graph, its measured rate, and one
certificate per image (:mod:`specformer_deploy.serving.smoothing` holds the statistics)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError
from specformer_deploy.artifact.sampler import SAMPLER_KEY
from specformer_deploy.serving.decode import DecodeMap, SentImage
from specformer_deploy.serving.devices import cuda_session
from specformer_deploy.serving.sampler import NoiseSampler
from specformer_deploy.serving.session import ModelSession
from specformer_deploy.serving.smoothing import (
    SamplingDeadline,
    SmoothingParams,
    in_sent_image,
    sigma_problem,
    smoothing_answer,
)

__all__ = ["SAMPLER_CHOICES", "SmoothingCertifier"]

SAMPLER_CHOICES = ("auto", "fp32")
# With a deadline, one smoothing batch lasts at most this long (and an eighth of the time left),
# so sampling stops close to it.
DEADLINE_BATCH_SECONDS = 2.0


class SmoothingCertifier:
    """Guarantee (Cohen et al. 2019): with probability at least 1 - alpha over the noise, the
    smoothed classifier of the sampling graph named in each answer returns the certified label for
    every input within L2 ``radius`` of the image, in the model grid and, through the decode, in the
    image the client sent (``radius_in_sent_image``)."""

    def __init__(self, model: ModelSession, choice: str = "auto", sampler_file: Path | None = None,
                 threads: int | None = None) -> None:
        """``choice``: ``"auto"`` (the export's reduced-precision sampling graph when it has one, its
        SHA-256 checked at load into ``sampler_file``) or ``"fp32"`` (the export itself); ``threads``
        is the number of parallel streams (default: every core)."""
        if choice not in SAMPLER_CHOICES:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CHOICES)}, got {choice!r}")
        self.model = model
        block = model.meta.get("smoothing")
        trained = block.get("sigma") if isinstance(block, dict) else None
        if trained is not None and sigma_problem(trained) is not None:  # the default of every smoothing request
            raise IntegrityError(f"{model.path.name}: the export's training noise specformer.smoothing.sigma "
                                 f"{sigma_problem(trained)}")
        self.sigma = float(trained) if trained is not None else None
        self.sampler = self._noise_sampler(choice, sampler_file, threads)
        self.samples_per_second: float | None = None  # set by sampling_rate()

    def _noise_sampler(self, choice: str, sampler_file: Path | None, threads: int | None) -> NoiseSampler:
        model = self.model
        block = model.meta.get(SAMPLER_KEY) if choice == "auto" else None
        if block and sampler_file is None:  # not verified at load (verify=False): still found, not trusted
            sampler_file = model.path.parent / Path(block["file"]).name
        path, precision, digest = ((sampler_file, block["precision"], block["sha256"]) if block
                                   else (model.path, "fp32", None))
        session = None
        if model.device != "cpu":
            session = (model.session if path == model.path
                       else cuda_session(path, model.options, int(model.device[5:]))[0])
        return NoiseSampler(path, precision=precision, sha256=digest, streams=threads, session=session,
                            device=model.device if session is not None else "cpu")

    def sampling_rate(self, batch_size: int = 1_000, min_seconds: float = 0.2) -> float:
        """Noisy images per second the sampler classifies, measured now: batches grow from 1 until
        one takes ``min_seconds`` (or reaches ``batch_size``), the faster of two runs at that size
        counts. What a smoothing request's cost is judged by."""
        rng = np.random.default_rng(0)
        size = 1
        while True:
            pixels = rng.random((size, *self.model.input_shape), dtype=np.float32)
            seconds = min(self._timed_run(pixels) for _ in range(2))
            if seconds >= min_seconds or size >= batch_size:
                self.samples_per_second = size / max(seconds, 1e-9)
                return self.samples_per_second
            size = min(batch_size, size * 4)

    def _timed_run(self, pixels: np.ndarray) -> float:
        started = time.perf_counter()
        self.sampler.classify(pixels)
        return time.perf_counter() - started

    def certify(self, pixels: np.ndarray, params: SmoothingParams, decode: DecodeMap | None = None,
                deadline: float | None = None) -> dict[str, Any]:
        """The ``smoothing`` block for one image ``[C, S, S]`` (pixels in [0, 1]): CERTIFY, or
        certify-at-radius when ``params.radius`` is given. ``decode``: how the sent image became
        these pixels (``None``: the pixels were sent). ``deadline`` (``time.monotonic()``): sampling
        stops there with :class:`SamplingDeadline`."""
        pixels = np.asarray(pixels, dtype=np.float32)
        expected = self.model.input_shape
        if decode is None:
            decode = DecodeMap(SentImage(*expected), expected)
        if tuple(decode.model_shape) != expected:
            raise ValueError(f"decode map ends in {decode.model_shape}, the model takes {expected}")
        if pixels.shape != expected:
            raise ValueError(f"smoothing takes one image of shape {expected}, got {pixels.shape}")
        if deadline is not None and self.samples_per_second:  # the deadline is checked between batches, so
            # one batch lasts a small part of the time left (the samples do not depend on the batching)
            seconds = min(DEADLINE_BATCH_SECONDS, max(deadline - time.monotonic(), 0.0) / 8)
            batch = max(1, min(params.batch_size, int(self.samples_per_second * seconds)))
            params = dataclasses.replace(params, batch_size=batch)
        sampler = self.sampler
        if deadline is None:
            classify = sampler
        else:
            def classify(batch: np.ndarray) -> np.ndarray:
                if time.monotonic() > deadline:
                    raise SamplingDeadline("sampling reached its deadline before the response timeout: ask for "
                                           "fewer samples (smoothing n), or send fewer smoothing requests at once")
                return sampler.classify(batch)

        answer = smoothing_answer(classify, pixels, len(self.model.class_names), params)
        answer["sampler"] = sampler.describe()
        return in_sent_image(answer, decode)
