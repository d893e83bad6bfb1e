"""The robustness probe: a real attack on the served prediction (empirical evidence, no guarantee).

ONNX Runtime has no input-gradient path, so the gradients come from ``model.pt2`` (the same traced
graph), loaded with torch lazily on the first probe and refused unless its outputs match the ONNX
file; the adversarial image is then classified by the ONNX session itself."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from specformer_deploy.artifact.integrity import IntegrityError, load_verified_pt2
from specformer_deploy.artifact.onnx_meta import initializer_arrays, weights_digest
from specformer_deploy.serving.options import ProbeRequest
from specformer_deploy.serving.session import ModelSession

__all__ = ["PROBE_AGREEMENT", "RobustnessProbe"]

logger = logging.getLogger(__name__)

PROBE_SPACE = "model input {shape}, pixels in [0, 1]"
PROBE_KIND = "empirical: no guarantee"
# model.pt2 may run on the session's GPU only if its logits there agree with the ONNX session's on
# the same image to within this fraction of the logit scale (max(1, max|z|)).
PROBE_AGREEMENT = 1e-3


class RobustnessProbe:
    """What it says: whether PGD (or FGSM) found, inside the eps-ball of the request, an image the
    served model labels differently. A flip is proof of non-robustness; no flip proves nothing."""

    def __init__(self, model: ModelSession, arrays: dict[str, np.ndarray] | None = None) -> None:
        """``arrays`` (the ONNX initializers): check ``model.pt2`` now, so a server never starts with
        a probe that would fail or lie; without them it is checked on the first probe."""
        self.model = model
        self.space = PROBE_SPACE.format(shape="x".join(map(str, model.input_shape)))
        self.device: str | None = None  # where model.pt2 runs, once the first probe loaded it
        self._logits_model = None
        self._verified = self._load(arrays) if arrays is not None else None  # checked, on CPU, not yet moved

    def _load(self, arrays: dict[str, np.ndarray] | None = None):
        """``model.pt2`` on CPU after checking it against the ONNX file (``load_verified_pt2``);
        without ``arrays`` the weights are read again and must still match the verified digest."""
        model = self.model
        if arrays is None:
            import onnx

            arrays = initializer_arrays(onnx.load(str(model.path)))
            if model.verified and weights_digest(arrays) != model.meta["integrity"].get("weights_sha256"):
                raise IntegrityError(f"{model.path.name}: the weights changed on disk after it was loaded")
        if model.device == "cpu":
            session = model.session
        else:  # GPU kernels (TF32, other reductions) differ from the CPU trace by more than export parity
            import onnxruntime as ort

            session = ort.InferenceSession(str(model.path), model.options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def onnx_outputs(pixels: np.ndarray) -> list[tuple[str, np.ndarray]]:
            return list(zip(names, session.run(names, {"pixels": pixels})))

        return load_verified_pt2(model.path.with_suffix(".pt2"), arrays, onnx_outputs, model.input_shape)

    def logits_model(self, pixels: np.ndarray | None = None):
        """``model.pt2``'s logits module, loaded and checked on first use (:class:`IntegrityError`
        when missing or different): on the session's GPU when it agrees with the ONNX session there
        (checked on ``pixels[:1]``, or a grey image), else on CPU."""
        if self._logits_model is None:
            model = self._verified if self._verified is not None else self._load()
            device, self._verified = "cpu", None
            if self.model.device != "cpu":
                if pixels is None:
                    pixels = np.full((1, *self.model.input_shape), 0.5, dtype=np.float32)
                moved, why = self.place(model, self.model.device, pixels[:1])
                if moved is None:
                    logger.warning("specformer: the PGD probe runs on cpu, not %s: %s", self.model.device, why)
                    model = self._load()  # .to() moves in place: start again from a clean copy
                else:
                    model, device = moved, self.model.device
            self._logits_model, self.device = model, device
        return self._logits_model

    def place(self, model, device: str, pixels: np.ndarray):
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
        reference = self.model.infer(pixels)[0]
        tolerance = PROBE_AGREEMENT * max(1.0, float(np.abs(reference).max()))
        difference = float(np.abs(logits - reference).max()) if logits.shape == reference.shape else math.inf
        if not difference <= tolerance:  # NaN disagrees too
            return None, (f"model.pt2's logits on {device} differ from ONNX Runtime's by {difference:.3g} "
                          f"(tolerance {tolerance:.3g})")
        logger.info("specformer: the PGD probe runs on %s (model.pt2's logits agree with ONNX Runtime's to %.3g)",
                    device, difference)
        return moved, None

    def attack(self, pixels: np.ndarray, labels: np.ndarray, request: ProbeRequest) -> list[dict[str, Any]]:
        """One ``probe`` block per image: attacked away from its predicted label, one image at a time
        with its own seeded start (an answer does not depend on its batch; on a GPU the start comes
        from that device's generator: reproducible there, not bitwise the CPU's)."""
        import torch

        from specformer_deploy.attacks import fgsm, pgd

        request.validate(self.model.image_size, self.model.channels)
        model = self.logits_model(pixels)
        device = torch.device(self.device or "cpu")
        adversarial = np.empty_like(np.asarray(pixels, dtype=np.float32))
        with torch.inference_mode(False), torch.enable_grad():
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
        adv_logits, _ = self.model.infer(adversarial)
        delta = (adversarial - pixels).reshape(len(pixels), -1)
        names = self.model.class_names
        results = []
        for i, label in enumerate(labels):
            others = np.delete(adv_logits[i], int(label))
            adv_label = int(adv_logits[i].argmax())
            results.append({"attack": request.attack, "space": self.space, "kind": PROBE_KIND,
                            "norm": request.norm, "eps": request.eps,
                            "steps": 1 if request.attack == "fgsm" else request.steps,
                            "restarts": request.restarts, "step_size": request.step_size,
                            "adversarial_label": adv_label, "adversarial_class": names[adv_label],
                            "flipped": adv_label != int(label),
                            "margin": float(adv_logits[i][int(label)] - others.max()),
                            "linf_distance": float(np.abs(delta[i]).max()),
                            "l2_distance": float(np.linalg.norm(delta[i]))})
        return results
