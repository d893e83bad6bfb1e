"""The serving runtime: one front object that answers predictions with their evidence.

Used by `specformer-deploy certify` and by the TorchServe handler alike, so both front doors give
the same numbers. It composes small units over one :class:`ModelSession` (the ONNX Runtime session
of a verified export): :class:`AttentionBounds` and :class:`MlpBounds` (deterministic, per layer),
:class:`RobustnessProbe` (a real attack, empirical) and :class:`SmoothingCertifier` (randomized
smoothing); each says what it guarantees. Predictions and certificates need onnx, onnxruntime and
numpy only; the probe loads torch lazily.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError
from specformer_deploy.artifact.onnx_meta import initializer_arrays
from specformer_deploy.artifact.sampler import verified_sampler_file
from specformer_deploy.serving.decode import DecodeMap
from specformer_deploy.serving.devices import cuda_unusable_reason, cuda_usable
from specformer_deploy.serving.layer_bounds import AttentionBounds, MlpBounds
from specformer_deploy.serving.options import LIMITS, ProbeRequest, RequestError, check_options
from specformer_deploy.serving.probe import PROBE_AGREEMENT, RobustnessProbe
from specformer_deploy.serving.session import ModelSession, load_export
from specformer_deploy.serving.smoother import SAMPLER_CHOICES, SmoothingCertifier
from specformer_deploy.serving.smoothing import SmoothingParams

__all__ = ["SpecformerRuntime", "IntegrityError", "ProbeRequest", "RequestError", "LIMITS", "cuda_usable",
           "cuda_unusable_reason", "check_options", "PROBE_AGREEMENT"]


class SpecformerRuntime:
    """Load an exported model, verify it, answer requests (DESIGN.md's served JSON).

    ``verify``: refuse (:class:`IntegrityError`) a file whose weights, graph or metadata differ from
    their export-time digests, exactly as `audit` checks them; a changed sampling graph counts too.
    ``check_pt2``: check ``model.pt2`` now (the server's choice) rather than on the first probe.
    ``verify_key``: an Ed25519 public key; the export is refused unless its ``model.sig`` verifies.
    ``sampler``: ``"auto"`` (the export's sampling graph when it has one) or ``"fp32"``;
    ``threads``: ONNX Runtime's threads and the sampler's parallel streams. ``device_id``: a GPU,
    where CUDA is usable (``device`` says what is used, ``cuda_fallback`` why not)."""

    def __init__(self, onnx_path: str | Path, *, device_id: int | None = None, threads: int | None = None,
                 verify: bool = True, check_pt2: bool = False, verify_key: str | Path | None = None,
                 sampler: str = "auto") -> None:
        self.path = Path(onnx_path)
        proto, self.meta = load_export(self.path, verify, verify_key)
        if sampler not in SAMPLER_CHOICES:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CHOICES)}, got {sampler!r}")
        sampler_file = verified_sampler_file(self.path, self.meta) if verify else None  # used or not
        self.model = ModelSession(self.path, self.meta, device_id=device_id, threads=threads, verified=verify)
        self.attention = AttentionBounds(self.meta)
        self.mlp = MlpBounds.of(self.meta, proto)
        self.prober = RobustnessProbe(self.model, initializer_arrays(proto) if check_pt2 else None)
        del proto
        self.smoother = SmoothingCertifier(self.model, sampler, sampler_file, threads)
        model = self.model
        self.session, self.providers, self.device, self.cuda_fallback = (model.session, model.providers,
                                                                         model.device, model.cuda_fallback)
        self.image_size, self.input_shape, self.channels = model.image_size, model.input_shape, model.channels
        self.class_names, self.sampler = model.class_names, self.smoother.sampler

    def answer(self, pixels: np.ndarray, *, delta0: float = 0.01, top_k: int = 5,
               probe: ProbeRequest | None = None, certificate: bool = True,
               smoothing: SmoothingParams | None = None, decodes: list[DecodeMap | None] | None = None,
               timings: dict[str, float] | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
        """One answer per image of the batch.

        ``certificate=False`` leaves out the per-layer blocks (``attention_lipschitz``,
        ``mlp_lipschitz``): the baseline their cost is measured against. ``smoothing`` adds a
        randomized-smoothing certificate per image, its radius also stated in the sent image's own
        coordinates through ``decodes[i]`` (``None``: the pixels were sent); ``probe`` adds a PGD
        probe. ``timings`` receives the seconds spent in ``inference``, ``certificate``, ``smoothing``
        and ``probe``. ``deadline`` (``time.monotonic()``): smoothing stops there."""
        self.check_options(delta0, top_k, probe)
        if smoothing is not None:
            smoothing.validate()
        clock = time.perf_counter()
        mlp = certificate and self.mlp is not None
        outputs = self.model.run(["logits", "attn_input_norms"] + (["mlp_inputs"] if mlp else []), pixels)
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        logits, norms = outputs[0], outputs[1]
        answers = [{"prediction": p} for p in self.model.predictions(logits, top_k)]
        spent = {"inference": time.perf_counter() - clock}
        if certificate:
            clock = time.perf_counter()
            for i, (answer, block) in enumerate(zip(answers, self.attention.blocks(norms, delta0))):
                answer["attention_lipschitz"] = block
                if mlp:
                    answer["mlp_lipschitz"] = self.mlp.block(outputs[2][i], delta0)
            spent["certificate"] = time.perf_counter() - clock
        if smoothing is not None:
            clock = time.perf_counter()
            for i, answer in enumerate(answers):
                answer["smoothing"] = self.smoother.certify(pixels[i], smoothing, decodes[i] if decodes else None,
                                                            deadline=deadline)
            spent["smoothing"] = time.perf_counter() - clock
        if probe is not None:
            clock = time.perf_counter()
            for answer, result in zip(answers, self.prober.attack(pixels, logits.argmax(axis=1), probe)):
                answer["probe"] = result
            spent["probe"] = time.perf_counter() - clock
        if timings is not None:
            timings.update(spent)
        return answers

    def check_options(self, delta0: float, top_k: int, probe: ProbeRequest | None) -> None:
        check_options(delta0, top_k, probe, self.image_size, self.channels)

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, C, S, S]`` pixels -> ``(logits [B, classes], attn_input_norms [B, L])``."""
        return self.model.infer(pixels)

    def probe(self, pixels: np.ndarray, labels: np.ndarray, request: ProbeRequest) -> list[dict[str, Any]]:
        """The probe blocks alone (:meth:`RobustnessProbe.attack`)."""
        return self.prober.attack(pixels, labels, request)

    def smoothing(self, pixels: np.ndarray, params: SmoothingParams, decode: DecodeMap | None = None,
                  deadline: float | None = None) -> dict[str, Any]:
        """The smoothing block of one image alone (:meth:`SmoothingCertifier.certify`)."""
        return self.smoother.certify(pixels, params, decode, deadline)

    def sampling_rate(self) -> float:
        """Noisy images per second the sampler classifies, measured now."""
        return self.smoother.sampling_rate()

    @property
    def smoothing_sigma(self) -> float | None:
        """The noise std the model was trained with (``None``: trained without noise)."""
        return self.smoother.sigma

    @property
    def probe_device(self) -> str | None:
        """Where ``model.pt2`` runs, once the first probe loaded it."""
        return self.prober.device
