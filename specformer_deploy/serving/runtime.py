"""The serving runtime: an ONNX Runtime session that answers predictions with certificates.

Used by `specformer-deploy certify` and by the TorchServe handler alike, so both front doors
give the same numbers. Predictions and certificates need onnx, onnxruntime and numpy only;
the optional robustness probe (a real attack) loads ``model.pt2`` with torch lazily, because
ONNX Runtime has no input-gradient path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError, digest_problems, load_verified_pt2
from specformer_deploy.artifact.onnx_meta import (
    NotAnExportError,
    initializer_arrays,
    input_shape,
    read_metadata,
    require_export_metadata,
    weights_digest,
)
from specformer_deploy.artifact.sampler import SAMPLER_KEY, verified_sampler_file
from specformer_deploy.budgets import madry_step_size
from specformer_deploy.serving.bounds import CertificateConstants, certificate_arrays
from specformer_deploy.serving.decode import DecodeMap, SentImage
from specformer_deploy.serving.sampler import NoiseSampler
from specformer_deploy.serving.smoothing import (
    SamplingDeadline,
    SmoothingParams,
    in_sent_image,
    sigma_problem,
    smoothing_answer,
)

__all__ = ["SpecformerRuntime", "IntegrityError", "ProbeRequest", "RequestError", "LIMITS", "cuda_usable",
           "cuda_unusable_reason", "check_options", "PROBE_AGREEMENT"]

logger = logging.getLogger(__name__)

LIMITS = {"max_steps": 100, "max_restarts": 100, "max_delta0": 1e4, "max_top_k": 100, "max_eps_linf": 1.0,
          "max_batch_probe": 64}

ATTENTION_CERTIFICATE = "local Lipschitz constant of each attention layer (Theorem 4.3 and an always-valid form)"
ATTENTION_SPACE = ("each attention layer's input (norm1 output), {tokens} tokens x {dim}, Frobenius ball of radius "
                   "delta0 around it")
ATTENTION_GUARANTEE = ("for every input within Frobenius distance delta0 of this layer's own input, the layer's output "
                       "moves at most bound times as far (paper_bound: the paper's form, an upper bound only when "
                       "paper_bound_valid); per layer, not a guarantee about the image")
MLP_CERTIFICATE = "local Lipschitz constant of each MLP (units constant on the ball dropped, Huang et al. 2021)"
MLP_SPACE = "each MLP's input (norm2 output), {tokens} tokens x {dim}, Frobenius ball of radius delta0 around it"
MLP_GUARANTEE = ("for every input within Frobenius distance delta0 of this MLP's own input, its output moves at most "
                 "local times as far (global: the weights' bound without dropping units); per layer")
PROBE_SPACE = "model input {shape}, pixels in [0, 1]"
PROBE_KIND = "empirical: no guarantee"

SAMPLER_CHOICES = ("auto", "fp32")

# With a deadline, one smoothing batch lasts at most this long (and an eighth of the time left),
# so sampling stops close to it.
DEADLINE_BATCH_SECONDS = 2.0

# The probe's model.pt2 may run on the session's GPU only if its logits there agree with the
# ONNX session's on the same image to within this fraction of the logit scale (max(1, max|z|)).
PROBE_AGREEMENT = 1e-3


class RequestError(ValueError):
    """A client option outside its documented range; ``option`` names it, the message says why."""

    def __init__(self, message: str, option: str = "options") -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class ProbeRequest:
    """A robustness probe: attack the prediction inside an eps-ball and report whether it flips.

    PGD runs ``restarts`` random starts (seeded per image, so an answer does not depend on its
    batch) and keeps the strongest; its cost is ``steps x restarts`` gradient steps per image."""

    attack: str = "pgd"  # pgd | fgsm
    eps: float = 2 / 255
    steps: int = 10
    norm: str = "linf"  # linf | l2
    restarts: int = 1

    def validate(self, image_size: int, channels: int = 3) -> ProbeRequest:
        if self.attack not in ("pgd", "fgsm"):
            raise RequestError(f"probe must be 'pgd' or 'fgsm', got {self.attack!r}", "probe")
        if self.norm not in ("linf", "l2"):
            raise RequestError(f"norm must be 'linf' or 'l2', got {self.norm!r}", "norm")
        if self.attack == "fgsm" and self.norm != "linf":
            raise RequestError("fgsm is an Linf attack: use norm 'linf' or probe 'pgd'", "norm")
        max_eps = LIMITS["max_eps_linf"] if self.norm == "linf" else math.sqrt(channels * image_size * image_size)
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0 < self.eps <= max_eps):
            raise RequestError(f"eps must be in (0, {max_eps:.4g}] for norm {self.norm} (pixel space [0, 1]), "
                               f"got {self.eps}", "eps")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= LIMITS["max_steps"]):
            raise RequestError(f"steps must be an integer in [1, {LIMITS['max_steps']}], got {self.steps}", "steps")
        if not (isinstance(self.restarts, int) and 1 <= self.restarts <= LIMITS["max_restarts"]):
            raise RequestError(f"restarts must be an integer in [1, {LIMITS['max_restarts']}], got {self.restarts}",
                               "restarts")
        if self.attack == "fgsm" and self.restarts != 1:
            raise RequestError("fgsm has no random start, so restarts must be 1: use probe 'pgd' for restarts",
                               "restarts")
        if np.float32(self.step_size) == 0:  # the attack runs in float32: a zero step never moves a pixel
            raise RequestError(f"eps {self.eps:.3g} with steps {self.steps} gives a PGD step 2.5*eps/steps that is 0 "
                               "in float32: use a larger eps or fewer steps", "eps")
        return self

    @property
    def step_size(self) -> float:
        """Madry et al.'s rule ``2.5 eps / steps``, Linf steps capped at 1 (FGSM takes one full step)."""
        return self.eps if self.attack == "fgsm" else madry_step_size(self.eps, self.steps, self.norm)

    @property
    def cost(self) -> tuple[int, int]:
        """``(steps, restarts)`` of gradient work per image: what an endpoint's probe cost cap counts."""
        return (1, 1) if self.attack == "fgsm" else (self.steps, self.restarts)


def check_options(delta0: float, top_k: int, probe: ProbeRequest | None, image_size: int, channels: int = 3) -> None:
    """Reject options outside their documented ranges (``LIMITS``) before any work is done."""
    if not (isinstance(delta0, (int, float)) and math.isfinite(delta0) and 0 <= delta0 <= LIMITS["max_delta0"]):
        raise RequestError(f"delta0 must be a number in [0, {LIMITS['max_delta0']:g}], got {delta0}", "delta0")
    if not (isinstance(top_k, int) and 1 <= top_k <= LIMITS["max_top_k"]):
        raise RequestError(f"top_k must be an integer in [1, {LIMITS['max_top_k']}], got {top_k}", "top_k")
    if probe is not None:
        probe.validate(image_size, channels)


def cuda_unusable_reason() -> str | None:
    """Why ONNX Runtime cannot use CUDA here (``None`` when it has a CUDA provider *and* this
    machine has an NVIDIA device node)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return f"this onnxruntime build has no CUDAExecutionProvider (it has {', '.join(available)}; install " \
               "onnxruntime-gpu)"
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return "no NVIDIA device (/dev/nvidia*) on this machine"
    return None


def cuda_usable() -> bool:
    """True when ONNX Runtime has a CUDA provider *and* this machine has an NVIDIA device."""
    return cuda_unusable_reason() is None


class SpecformerRuntime:
    """Load an exported model, verify its digests, answer requests.

    ``device_id`` asks for ONNX Runtime's CUDA provider on that GPU; where CUDA is not usable the
    session runs on CPU and ``cuda_fallback`` says why. ``device`` is what is actually used
    (``"cuda:N"`` or ``"cpu"``)."""

    def __init__(self, onnx_path: str | Path, *, device_id: int | None = None, threads: int | None = None,
                 verify: bool = True, check_pt2: bool = False, verify_key: str | Path | None = None,
                 sampler: str = "auto") -> None:
        """``verify``: refuse (:class:`IntegrityError`) a file whose weights, graph or metadata
        differ from their export-time digests, exactly as `audit` checks them. ``check_pt2``: also
        load ``model.pt2`` now and refuse it unless it matches the ONNX file (the server's choice,
        so a worker never starts with a probe that would fail or lie); without it ``model.pt2`` is
        loaded and checked the same way on the first probe, and torch is never imported before.
        ``verify_key``: an Ed25519 public key; the export is refused unless its ``model.sig`` verifies.
        ``sampler``: the graph smoothing samples with, ``"auto"`` (the export's reduced-precision
        sampling graph when it has one, its SHA-256 checked here) or ``"fp32"`` (the export itself);
        ``threads`` is also the sampler's number of parallel streams (default: every core)."""
        import onnx
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        if verify_key is not None:  # authenticity first: nothing of an unsigned or re-signed file is read
            from specformer_deploy.artifact.signing import SigningError, verify_export

            try:
                verify_export(self.path, verify_key)
            except SigningError as err:
                raise IntegrityError(f"the verify key cannot be used: {err}") from None
        try:
            proto = onnx.load(str(self.path))
        except Exception as err:  # protobuf raises several types for a corrupt file
            raise IntegrityError(f"{self.path} is not a readable ONNX file: {err}") from err
        self.meta = read_metadata(proto)
        try:
            require_export_metadata(self.meta, self.path)
        except NotAnExportError as err:
            raise IntegrityError(str(err)) from None
        self.verified = verify
        if verify:
            self._verify(proto)
        if sampler not in SAMPLER_CHOICES:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CHOICES)}, got {sampler!r}")
        # checked even when not used: a changed sampling graph is a changed export
        sampler_file = verified_sampler_file(self.path, self.meta) if verify else None
        self._mlp = self._mlp_weights(proto)
        arrays = initializer_arrays(proto) if check_pt2 else None
        del proto
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session, self.cuda_fallback = None, None
        if device_id is not None:
            self.session, self.cuda_fallback = self._cuda_session(options, int(device_id))
        if self.session is None:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.device = f"cuda:{device_id}" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.sampler = self._noise_sampler(sampler, sampler_file, threads, options)
        self.image_size = int(self.meta["image_size"])
        self.input_shape = input_shape(self.meta)  # (channels, S, S); (3, S, S) for older exports
        self.channels = self.input_shape[0]
        self.constants = CertificateConstants(self.meta)
        # Every block names its space by shape: the layers' token matrices, the model's pixels.
        tokens = sorted({int(t) for t in self.constants.tokens})
        shape_of_layers = dict(tokens="/".join(map(str, tokens)), dim=self.meta.get("embed_dim", "d"))
        self.attention_space = ATTENTION_SPACE.format(**shape_of_layers)
        self.mlp_space = MLP_SPACE.format(**shape_of_layers)
        self.probe_space = PROBE_SPACE.format(shape="x".join(map(str, self.input_shape)))
        self._reasons = self._inapplicable()
        self.class_names = list(self.meta["class_names"])
        block = self.meta.get("smoothing")
        trained = block.get("sigma") if isinstance(block, dict) else None
        if trained is not None and sigma_problem(trained) is not None:  # the default of every smoothing request
            raise IntegrityError(f"{self.path.name}: the export's training noise specformer.smoothing.sigma "
                                 f"{sigma_problem(trained)}")
        self._probe_model = None
        self.samples_per_second: float | None = None  # set by sampling_rate()
        self.probe_device: str | None = None  # where model.pt2 runs, once the first probe loaded it
        self._verified_pt2 = self._load_pt2(arrays) if check_pt2 else None  # checked, on CPU, not yet moved

    def _noise_sampler(self, choice: str, sampler_file: Path | None, threads: int | None, options) -> NoiseSampler:
        """The export's sampling graph (``choice`` auto) or the export itself, on every core or on
        this runtime's GPU."""
        block = self.meta.get(SAMPLER_KEY) if choice == "auto" else None
        if block and sampler_file is None:  # not verified at load (verify=False): still found, not trusted
            sampler_file = self.path.parent / Path(block["file"]).name
        path, precision, digest = ((sampler_file, block["precision"], block["sha256"]) if block
                                   else (self.path, "fp32", None))
        session = None
        if self.device != "cpu":
            session = self.session if path == self.path else self._cuda_session(options, int(self.device[5:]),
                                                                              path)[0]
        return NoiseSampler(path, precision=precision, sha256=digest, streams=threads, session=session,
                            device=self.device if session is not None else "cpu")

    def _cuda_session(self, options, device_id: int, path: Path | None = None):
        """``(session on GPU device_id, None)``, or ``(None, why not)``."""
        import onnxruntime as ort

        reason = cuda_unusable_reason()
        if reason is not None:
            return None, reason
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu >= 1.21)
            try:
                ort.preload_dlls()
            except Exception as err:  # noqa: BLE001 - the session below reports what is really missing
                logger.debug("onnxruntime.preload_dlls failed: %s", err)
        try:
            session = ort.InferenceSession(str(path or self.path), options, providers=[
                ("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001
            return None, f"ONNX Runtime's CUDA provider failed on device {device_id}: {type(err).__name__}: {err}"
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return None, (f"ONNX Runtime could not start its CUDA provider on device {device_id} (CUDA or cuDNN "
                          "libraries missing?) and fell back to CPU")
        return session, None

    def _verify(self, proto) -> None:
        """Every digest `audit` verifies (weights, graph, metadata), via the same code."""
        problems = digest_problems(proto, self.meta)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise IntegrityError(f"SHA-256 does not match the export's: {shown} ({self.path.name} changed after "
                                 "export)", problems)

    def _load_pt2(self, arrays: dict[str, np.ndarray] | None = None):
        """``model.pt2`` on CPU after checking it against this ONNX file (``load_verified_pt2``).

        ``arrays`` are the ONNX initializers; without them they are read again from the file,
        whose weights must still match the digest verified at load (when ``verify`` was asked)."""
        if arrays is None:
            import onnx

            arrays = initializer_arrays(onnx.load(str(self.path)))
            if self.verified and weights_digest(arrays) != self.meta["integrity"].get("weights_sha256"):
                raise IntegrityError(f"{self.path.name}: the weights changed on disk after it was loaded")
        if self.device == "cpu":
            session = self.session
        else:  # GPU kernels (TF32, other reductions) differ from the CPU trace by more than export parity
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

        names = [output.name for output in session.get_outputs()]

        def onnx_outputs(pixels: np.ndarray) -> list[tuple[str, np.ndarray]]:
            return list(zip(names, session.run(names, {"pixels": pixels})))

        return load_verified_pt2(self.path.with_suffix(".pt2"), arrays, onnx_outputs, self.input_shape)

    def _mlp_weights(self, proto) -> list[dict[str, Any]] | None:
        """fc1/fc2 weights (and thresholds) of ReLU-family MLPs, read once for local MLP bounds."""
        info = self.meta.get("mlp") or {}
        if not info.get("local_bounds"):
            return None
        arrays = initializer_arrays(proto)

        def oriented(ref: dict[str, Any]) -> np.ndarray:
            from specformer_deploy.artifact import onnx_meta

            return onnx_meta.oriented(arrays[ref["initializer"]], ref)

        layers = []
        for entry in info["layers"]:
            fc1 = oriented(entry["fc1"])
            layers.append({"w1": fc1.astype(np.float64), "w2": oriented(entry["fc2"]).astype(np.float64),
                           "b1": arrays[entry["fc1_bias"]].astype(np.float64) if entry["fc1_bias"] else
                           np.zeros(fc1.shape[0]),
                           "threshold": np.maximum(arrays[entry["threshold"]], 0.0) if entry["threshold"] else None})
        return layers

    def mlp_certificate(self, mlp_inputs: np.ndarray, radius: float) -> list[dict[str, Any]]:
        """Local vs global Lipschitz bounds of each MLP over the Frobenius ball of ``radius``."""
        from specformer_deploy.serving.bounds import mlp_local_bound

        activation = self.meta["mlp"]["activation"]
        out = []
        for layer, (weights, tokens) in enumerate(zip(self._mlp or [], mlp_inputs)):
            result = mlp_local_bound(tokens, weights["w1"], weights["b1"], weights["w2"], radius, activation,
                                     weights["threshold"])
            out.append({"layer": layer, **result})
        return out

    # -- inference -------------------------------------------------------------------------
    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, C, S, S]`` pixels -> ``(logits [B, classes], attn_input_norms [B, L])``."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        logits, norms = self.session.run(["logits", "attn_input_norms"], {"pixels": pixels})
        return logits, norms

    def predictions(self, logits: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """Softmax probabilities and the top-k classes of each image (``logits`` is ``[B, C]``)."""
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        k = max(1, min(top_k, probs.shape[1]))
        order = np.argsort(-probs, axis=1)[:, :k]
        names = self.class_names
        out = []
        for row, ranked in zip(probs.tolist(), order.tolist()):
            label = ranked[0]
            out.append({"label": label, "class": names[label], "probability": row[label],
                        "top_k": [{"label": i, "class": names[i], "probability": row[i]} for i in ranked]})
        return out

    def _inapplicable(self) -> list[str | None]:
        """Per layer: why the attention bound does not apply (``None``: it does), decided at export.

        Exports without the ``applicable`` field (older files) keep their behaviour: every
        softmax dot-product (or GPSA) layer is bounded, other kinds are not."""
        entries = self.meta.get("attention_weights") or []
        if not entries:
            return [None] * len(self.constants.tokens)
        reasons = []
        for entry in entries:
            if "applicable" in entry:
                reasons.append(None if entry["applicable"] else str(entry.get("reason") or "not recognised"))
            elif entry.get("certified", True):
                reasons.append(None)
            else:
                reasons.append(f"{entry.get('attention')} attention is not softmax dot-product attention: "
                               "Theorem 4.3 does not apply")
        return reasons

    def certificates(self, norms: np.ndarray, delta0: float, with_heads: bool = False) -> list[dict[str, Any]]:
        """The ``attention_lipschitz`` block of each image (``norms`` is ``[B, L]``), for the batch at once.

        Each applicable layer's ``bound`` is its local Lipschitz constant over the Frobenius ball of
        radius ``delta0`` around that layer's own input tokens: a per-layer statement, never an
        image-level one, so no maximum over layers is served. A layer the proof does not cover is
        served with ``applicable: false`` and the reason, never a number. ``with_heads`` adds the
        per-head bounds."""
        arrays = certificate_arrays(norms, delta0, self.constants, with_heads=with_heads)
        tokens = self.constants.tokens.astype(int).tolist()
        bound, paper = arrays["bound"].tolist(), arrays["paper_bound"].tolist()
        valid, inputs = arrays["paper_bound_valid"].tolist(), norms.tolist()
        heads = arrays["head_bounds"].tolist() if with_heads else None
        reasons = self._reasons
        out = []
        for i in range(len(bound)):
            layers = []
            for l in range(len(tokens)):
                layer: dict[str, Any] = {"layer": l, "tokens": tokens[l], "input_norm": inputs[i][l]}
                if reasons[l] is None:
                    layer.update(bound=bound[i][l], paper_bound=paper[i][l], paper_bound_valid=valid[i][l],
                                 applicable=True)
                    if with_heads:
                        layer["head_bounds"] = heads[i][l]
                else:
                    layer.update(applicable=False, reason=reasons[l])
                layers.append(layer)
            out.append({"certificate": ATTENTION_CERTIFICATE, "space": self.attention_space, "kind": "deterministic",
                        "guarantee": ATTENTION_GUARANTEE, "delta0": delta0, "layers": layers,
                        "spectral": "exact SVD at export, sha256 verified"})
        return out

    def mlp_block(self, mlp_inputs: np.ndarray, delta0: float) -> dict[str, Any]:
        """The ``mlp_lipschitz`` block of one image (``mlp_inputs`` is ``[L, N, d]``)."""
        return {"certificate": MLP_CERTIFICATE, "space": self.mlp_space, "kind": "deterministic",
                "guarantee": MLP_GUARANTEE, "delta0": delta0, "layers": self.mlp_certificate(mlp_inputs, delta0)}

    def answer(self, pixels: np.ndarray, *, delta0: float = 0.01, top_k: int = 5,
               probe: ProbeRequest | None = None, certificate: bool = True,
               smoothing: SmoothingParams | None = None, decodes: list[DecodeMap | None] | None = None,
               timings: dict[str, float] | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
        """One answer per image of the batch (DESIGN.md's served JSON).

        ``certificate=False`` leaves out the deterministic per-layer blocks (``attention_lipschitz``,
        ``mlp_lipschitz``): the baseline their cost is measured against. ``smoothing`` (a
        ``SmoothingParams``) adds a randomized-smoothing certificate per image, its radius stated in
        the model grid and, through ``decodes[i]`` (how image ``i`` was decoded; ``None``: the pixels
        are what was sent), in the sent image's own coordinates; ``probe`` adds a PGD probe.
        ``timings``, when given, receives the seconds spent in ``inference``, ``certificate``,
        ``smoothing`` and ``probe`` (the server's metrics). ``deadline`` (``time.monotonic()``):
        smoothing stops there with :class:`SamplingDeadline` instead of running on."""
        self.check_options(delta0, top_k, probe)
        if smoothing is not None:
            smoothing.validate()
        clock = time.perf_counter()
        mlp = certificate and self._mlp is not None
        names = ["logits", "attn_input_norms"] + (["mlp_inputs"] if mlp else [])
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        outputs = self.session.run(names, {"pixels": pixels})
        logits, norms = outputs[0], outputs[1]
        answers = [{"prediction": p} for p in self.predictions(logits, top_k)]
        spent = {"inference": time.perf_counter() - clock}
        if certificate:
            clock = time.perf_counter()
            for answer, cert in zip(answers, self.certificates(norms, delta0)):
                answer["attention_lipschitz"] = cert
            if mlp:
                for i, answer in enumerate(answers):
                    answer["mlp_lipschitz"] = self.mlp_block(outputs[2][i], delta0)
            spent["certificate"] = time.perf_counter() - clock
        if smoothing is not None:
            clock = time.perf_counter()
            for i, answer in enumerate(answers):
                answer["smoothing"] = self.smoothing(pixels[i], smoothing, decodes[i] if decodes else None,
                                                     deadline=deadline)
            spent["smoothing"] = time.perf_counter() - clock
        if probe is not None:
            clock = time.perf_counter()
            labels = logits.argmax(axis=1)
            for i, result in enumerate(self.probe(pixels, labels, probe)):
                answers[i]["probe"] = result
            spent["probe"] = time.perf_counter() - clock
        if timings is not None:
            timings.update(spent)
        return answers

    def check_options(self, delta0: float, top_k: int, probe: ProbeRequest | None) -> None:
        check_options(delta0, top_k, probe, self.image_size, self.channels)

    # -- probe -----------------------------------------------------------------------------
    def _logits_model(self, pixels: np.ndarray | None = None):
        """``model.pt2``'s logits module, loaded and checked against the ONNX file on first use
        (raises :class:`IntegrityError` when it is missing or does not match): on the session's GPU
        when it agrees with the ONNX session there (checked on ``pixels[:1]``, or a grey image),
        else on CPU."""
        if self._probe_model is None:
            model = self._verified_pt2 if self._verified_pt2 is not None else self._load_pt2()
            device = "cpu"
            self._verified_pt2 = None
            if self.device != "cpu":
                if pixels is None:
                    pixels = np.full((1, *self.input_shape), 0.5, dtype=np.float32)
                moved, why = self._probe_model_on(model, self.device, pixels[:1])
                if moved is None:
                    logger.warning("specformer: the PGD probe runs on cpu, not %s: %s", self.device, why)
                    model = self._load_pt2()  # .to() moves in place: start again from a clean copy
                else:
                    model, device = moved, self.device
            self._probe_model, self.probe_device = model, device
        return self._probe_model

    def _probe_model_on(self, model, device: str, pixels: np.ndarray):
        """``(model moved to device, None)`` when its logits there agree with the ONNX session's on
        ``pixels`` (within ``PROBE_AGREEMENT`` of the logit scale), else ``(None, why not)``."""
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            return None, "torch has no usable CUDA here (torch.cuda.is_available() is False)"
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        try:
            with torch.inference_mode(False):  # parameters made under inference mode cannot take gradients
                moved = model.to(device)
            with torch.no_grad():
                logits = moved(torch.from_numpy(pixels).to(device)).float().cpu().numpy()
        except Exception as err:  # noqa: BLE001 - e.g. device constants baked into the exported graph
            return None, f"running model.pt2 on {device} failed: {type(err).__name__}: {err}"
        reference = self.infer(pixels)[0]
        tolerance = PROBE_AGREEMENT * max(1.0, float(np.abs(reference).max()))
        difference = float(np.abs(logits - reference).max()) if logits.shape == reference.shape else math.inf
        if not difference <= tolerance:  # NaN disagrees too
            return None, (f"model.pt2's logits on {device} differ from ONNX Runtime's by {difference:.3g} "
                          f"(tolerance {tolerance:.3g})")
        logger.info("specformer: the PGD probe runs on %s (model.pt2's logits agree with ONNX Runtime's to %.3g)",
                    device, difference)
        return moved, None

    def probe(self, pixels: np.ndarray, labels: np.ndarray, request: ProbeRequest) -> list[dict[str, Any]]:
        """Attack each image away from its predicted label with gradients from ``model.pt2``; the
        adversarial image is then classified by the ONNX model itself."""
        import torch

        from specformer_deploy.attacks import fgsm, pgd

        request.validate(self.image_size, self.channels)
        model = self._logits_model(pixels)
        device = torch.device(self.probe_device or "cpu")
        adversarial = np.empty_like(np.asarray(pixels, dtype=np.float32))
        with torch.inference_mode(False), torch.enable_grad():
            # One image at a time with its own seeded start: the answer for an image does not
            # depend on which other requests share its batch. (On a GPU the start comes from that
            # device's generator: reproducible there, not bitwise the CPU's.)
            for i in range(len(pixels)):
                x = torch.from_numpy(np.ascontiguousarray(pixels[i: i + 1], dtype=np.float32)).to(device)
                y = torch.from_numpy(np.asarray(labels[i: i + 1], dtype=np.int64)).to(device)
                if request.attack == "fgsm":
                    adv = fgsm(model, x, y, request.eps)
                else:
                    adv = pgd(model, x, y, request.eps, request.step_size, request.steps, norm=request.norm,
                              random_start=True, generator=torch.Generator(device=device).manual_seed(0),
                              restarts=request.restarts)
                adversarial[i] = adv.detach().cpu().numpy()[0]
        adv_logits, _ = self.infer(adversarial)
        delta = (adversarial - pixels).reshape(len(pixels), -1)
        results = []
        for i, label in enumerate(labels):
            others = np.delete(adv_logits[i], int(label))
            adv_label = int(adv_logits[i].argmax())
            results.append({"attack": request.attack, "space": self.probe_space, "kind": PROBE_KIND,
                            "norm": request.norm, "eps": request.eps,
                            "steps": 1 if request.attack == "fgsm" else request.steps,
                            "restarts": request.restarts,
                            "step_size": request.step_size, "adversarial_label": adv_label,
                            "adversarial_class": self.class_names[adv_label], "flipped": adv_label != int(label),
                            "margin": float(adv_logits[i][int(label)] - others.max()),
                            "linf_distance": float(np.abs(delta[i]).max()),
                            "l2_distance": float(np.linalg.norm(delta[i]))})
        return results

    # -- randomized smoothing --------------------------------------------------------------
    @property
    def smoothing_sigma(self) -> float | None:
        """The Gaussian noise std the model was trained with (metadata ``smoothing.sigma``), or
        ``None`` for a model trained without noise (its smoothed accuracy is then poor)."""
        block = self.meta.get("smoothing")
        sigma = block.get("sigma") if isinstance(block, dict) else None
        return float(sigma) if sigma is not None else None

    def sampling_rate(self, batch_size: int = 1_000, min_seconds: float = 0.2) -> float:
        """Noisy images per second that this session classifies, measured now: batches grow from 1
        until one takes ``min_seconds`` (or reaches ``batch_size``, smoothing's batch), the faster of
        two runs at that size counts. What a smoothing request's cost is judged by."""
        rng = np.random.default_rng(0)
        size = 1
        while True:
            pixels = rng.random((size, *self.input_shape), dtype=np.float32)
            seconds = min(self._timed_run(pixels) for _ in range(2))
            if seconds >= min_seconds or size >= batch_size:
                self.samples_per_second = size / max(seconds, 1e-9)
                return self.samples_per_second
            size = min(batch_size, size * 4)

    def _timed_run(self, pixels: np.ndarray) -> float:
        started = time.perf_counter()
        self.sampler.classify(pixels)
        return time.perf_counter() - started

    def smoothing(self, pixels: np.ndarray, params: SmoothingParams, decode: DecodeMap | None = None,
                  deadline: float | None = None) -> dict[str, Any]:
        """The randomized-smoothing block for one image ``[C, S, S]`` (pixels in [0, 1]): CERTIFY, or
        certify-at-radius when ``params.radius`` is given, on this runtime's own ONNX session.

        Radii are stated in the model grid and in the sent image (``decode``: how it became these
        pixels; ``None``: the pixels themselves were sent)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        expected = self.input_shape
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

        answer = smoothing_answer(classify, pixels, len(self.class_names), params)
        answer["sampler"] = sampler.describe()
        return in_sent_image(answer, decode)
