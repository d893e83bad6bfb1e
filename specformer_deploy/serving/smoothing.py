"""Randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019): a certified L2 radius in pixel space.

The smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, with
``f`` any base classifier (here: the exported model's logits argmax on ONNX Runtime). If the top
class has probability ``p_A > 1/2`` under the noise, ``g`` returns that class for every image
within L2 distance ``sigma * Phi^-1(p_A)``; this module estimates a lower bound of ``p_A`` from
samples, so the radius holds with probability ``1 - alpha`` over the sampling.

Noise is added to the pixels in [0, 1] before any normalisation (normalisation is inside the
model), without clipping: the theorem is about the Gaussian convolution of ``f`` as a function on
all of R^d. numpy and scipy only, so the server and the CLI use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from specformer_deploy.serving.decode import DecodeMap, shape_text

__all__ = ["SmoothingParams", "SmoothingError", "Classify", "certify", "predict", "certify_at_radius",
           "smoothing_answer", "certified_accuracy", "clopper_pearson_lower", "clopper_pearson_upper",
           "max_radius_for_n", "sequential_looks", "sample_counts", "CERTIFICATE", "SPACE", "GUARANTEE",
           "PREDICT_GUARANTEE", "model_space", "sent_image_space", "in_sent_image", "statement", "MAX_SIGMA",
           "MAX_ALPHA", "SamplingError", "SamplingDeadline", "sigma_problem", "sample_counts_many", "certify_many"]

Classify = Callable[[np.ndarray], np.ndarray]
"""float32 ``[B, C, S, S]`` pixels -> int64 labels ``[B]``."""

CERTIFICATE = "randomized smoothing (Cohen et al. 2019)"
SPACE = "pixels in [0, 1], L2"
GUARANTEE = ("With probability at least 1 - alpha over the noise samples, the smoothed classifier (the label the "
             "base classifier, the graph named in `sampler` when given, gives most often under Gaussian pixel noise "
             "of std sigma) returns `label` for every model input "
             "within L2 distance `radius` of this one (in `space`), and so for every image within "
             "`radius_in_sent_image` of the image that was sent (in `sent_image_space`, when given); an abstention "
             "certifies nothing.")
PREDICT_GUARANTEE = ("With probability at least 1 - alpha over the noise samples, `label` is the smoothed "
                     "classifier's label at this image (no radius is certified); an abstention says nothing.")

FIRST_LOOK = 32  # certify-at-radius: samples at the first look; later looks double up to n
MAX_SAMPLES = 10**9
# Noise beyond a few times the pixel range drowns every image (and huge values overflow the model
# into NaN logits, whose argmax would be "certified"); a server may cap it lower.
MAX_SIGMA = 10.0
# A one-sided lower bound at a failure probability above 1/2 promises nothing, and near 1 it rounds
# p_lower to 1 and the radius to infinity.
MAX_ALPHA = 0.5


class SamplingError(RuntimeError):
    """The base classifier returned something no certificate can rest on (non-finite logits)."""


class SamplingDeadline(SamplingError):
    """Sampling was stopped at its deadline: no certificate, and the worker lives on."""


class SmoothingError(ValueError):
    """A smoothing parameter outside its range; ``field`` names it and the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def sigma_problem(sigma: Any, cap: float = MAX_SIGMA) -> str | None:
    """Why ``sigma`` is not a usable noise std (``None`` when it is): finite, > 0 in float32 (the
    noise is drawn in float32: a smaller sigma adds no noise at all) and at most ``cap``."""
    if not _is_number(sigma):
        return f"must be a finite number (noise std in [0, 1] pixels), got {sigma!r}"
    if sigma > cap:
        return f"must be at most {cap:g} (noise std in [0, 1] pixels; larger noise drowns every image), got {sigma!r}"
    if not (np.float32(sigma) > 0):
        return f"must be > 0 in float32 (the noise is drawn in float32; {sigma!r} adds no noise), got {sigma!r}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(float(value))


@dataclass(frozen=True)
class SmoothingParams:
    """What one smoothing certificate costs and promises: ``n0 + n`` forward passes at most."""

    sigma: float  # noise std in pixel space ([0, 1] pixels)
    n0: int = 100  # selection samples
    n: int = 10_000  # estimation samples (or the most a sequential test may use)
    alpha: float = 0.001  # failure probability
    radius: float | None = None  # given: certify-at-radius (sequential test); None: CERTIFY
    batch_size: int = 1_000
    seed: int = 0

    def validate(self) -> SmoothingParams:
        """``self``, or :class:`SmoothingError` naming the first field out of range."""
        problem = sigma_problem(self.sigma)
        if problem is not None:
            raise SmoothingError("sigma", problem)
        for name in ("n0", "n"):
            value = getattr(self, name)
            if not (_is_int(value) and 1 <= value <= MAX_SAMPLES):
                raise SmoothingError(name, f"must be an integer in [1, {MAX_SAMPLES:.0e}], got {value!r}")
        if not (_is_number(self.alpha) and 0 < self.alpha <= MAX_ALPHA):
            raise SmoothingError("alpha", f"must be a number in (0, {MAX_ALPHA:g}] (the failure probability of a "
                                          f"lower bound; e.g. 0.001), got {self.alpha!r}")
        if self.radius is not None and not (_is_number(self.radius) and self.radius >= 0):
            raise SmoothingError("radius", f"must be a finite number >= 0 (L2, pixels in [0, 1]) or absent, "
                                           f"got {self.radius!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise SmoothingError("batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise SmoothingError("seed", f"must be an integer >= 0, got {self.seed!r}")
        return self


# ------------------------------------------------------------------ bounds

def clopper_pearson_lower(count: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper–Pearson lower bound of a binomial proportion ``count / n``:
    ``P(bound > p) <= alpha`` for every true ``p``."""
    return 0.0 if count <= 0 else float(stats.beta.ppf(alpha, count, n - count + 1))


def clopper_pearson_upper(count: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper–Pearson upper bound: ``P(bound < p) <= alpha``."""
    return 1.0 if count >= n else float(stats.beta.ppf(1 - alpha, count + 1, n - count))


def model_space(shape: tuple[int, ...]) -> str:
    """The space a radius about the model's input is stated in, with its shape."""
    return f"model input {shape_text(*shape)}, pixels in [0, 1], L2"


def sent_image_space(decode: DecodeMap) -> str:
    """The space of the image that was sent, named by its kind, size and shape."""
    return f"the sent image, {decode.sent.description} ({shape_text(*decode.sent.shape)}), pixels in [0, 1], L2"


def in_sent_image(block: dict[str, Any], decode: DecodeMap) -> dict[str, Any]:
    """``block`` with every radius also stated about the image that was sent.

    The decode is linear, ``x_model = A x_sent``: for ``||d|| < R / ||A||_2`` in the sent image,
    ``||A d|| <= ||A||_2 ||d|| < R``, so a radius ``R`` in the model grid is ``R / ||A||_2`` there."""
    norm = decode.norm
    out = dict(block)
    out.update(sent_image=decode.sent.description, sent_image_space=sent_image_space(decode),
               decode_norm=norm)

    def scaled(value: float | None) -> float | None:
        return None if value is None else float(value / norm)

    out["radius_in_sent_image"] = scaled(block.get("radius"))
    out["max_radius_for_n_in_sent_image"] = scaled(block.get("max_radius_for_n"))
    if "radius_asked" in block:
        out["radius_asked_in_sent_image"] = scaled(block["radius_asked"])
    return out


def statement(block: dict[str, Any], image: str) -> str:
    """The certificate in one plain sentence about the image a person holds (``image``: its name)."""
    kind = str(block.get("sent_image", "")).split(" ")[0] or "model-grid"
    confidence = f"{1 - float(block['alpha']):.10g}"
    if block["abstain"]:
        return (f"not certified: the smoothed classifier abstains on {image} (no label is shown to win under "
                f"noise sigma {block['sigma']:g} with probability {confidence})")
    radius = block.get("radius_in_sent_image", block["radius"])
    if "radius_asked" in block:
        asked = block.get("radius_asked_in_sent_image", block["radius_asked"])
        verdict = {True: "robust", False: "not certifiable", None: "undecided"}[block["robust"]]
        return (f"{verdict} at L2 {asked:.3g} of {image} (in its own {kind} pixels, as sent): label {block['label']}, "
                f"certified radius {radius:.3g}, with probability {confidence}")
    return (f"certified: label {block['label']} for every image within L2 {radius:.3g} of {image} (in its own "
            f"{kind} pixels, as sent), with probability {confidence}")


_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def _radius(sigma: float, p_lower: float) -> float:
    """Cohen et al.'s ``sigma Phi^-1(p_lower)``; a bound that rounds to 1 is lowered to the largest
    double below it (a smaller lower bound stays valid), so a radius is always a finite number."""
    return float(sigma * stats.norm.ppf(min(p_lower, _BELOW_ONE))) if p_lower > 0.5 else 0.0


def max_radius_for_n(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` samples can ever certify: all ``n`` agree, ``p_lower = alpha^(1/n)``."""
    return _radius(sigma, alpha ** (1.0 / n))


# ------------------------------------------------------------------ sampling

def sample_counts(classify: Classify, x: np.ndarray, num_classes: int, samples: int, sigma: float,
                  rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """How often ``classify`` returns each class on ``samples`` noisy copies of ``x`` (int64 ``[C]``).

    Noise is drawn in float32 into one preallocated buffer, scaled and shifted in place, so the
    forward pass is the cost. The generator's float32 stream does not depend on how it is cut into
    batches: the same seed gives the same samples at any ``batch_size``. A ``classify`` with
    ``device_counts`` (a sampler on a GPU) draws the noise on its device itself."""
    on_device = getattr(classify, "device_counts", None)
    if on_device is not None:
        return np.asarray(on_device(x, samples, sigma, rng, num_classes, batch_size), dtype=np.int64)
    x = np.asarray(x, dtype=np.float32)
    counts = np.zeros(num_classes, dtype=np.int64)
    buffer = np.empty((min(batch_size, samples), *x.shape), dtype=np.float32)
    done = 0
    while done < samples:
        batch = buffer[: min(len(buffer), samples - done)]
        rng.standard_normal(dtype=np.float32, out=batch)
        batch *= np.float32(sigma)
        batch += x
        labels = np.asarray(classify(batch)).reshape(-1)
        if len(labels) != len(batch):
            raise ValueError(f"classify returned {len(labels)} labels for a batch of {len(batch)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"classify returned a label outside [0, {num_classes}): {labels.min()}..{labels.max()}")
        counts += np.bincount(labels.astype(np.int64, copy=False), minlength=num_classes)
        done += len(batch)
    return counts


def sample_counts_many(classify: Classify, jobs: Sequence[tuple[np.ndarray, int, np.random.Generator]],
                       num_classes: int, sigma: float, batch_size: int) -> list[np.ndarray]:
    """:func:`sample_counts` for several images at once: ``jobs`` are ``(x, samples, rng)``, and each
    batch is filled from as many images as fit, so images with few samples still make full batches.

    Image ``i``'s noise comes from its own ``rng`` in the same order as :func:`sample_counts` would
    draw it, and a label depends only on its own sample, so each image's counts are the ones
    :func:`sample_counts` gives it alone (given a classifier whose labels do not depend on the batch)."""
    if not jobs:
        return []
    shape = np.shape(jobs[0][0])
    counts = [np.zeros(num_classes, dtype=np.int64) for _ in jobs]
    total = sum(samples for _, samples, _ in jobs)
    buffer = np.empty((max(1, min(batch_size, total)), *shape), dtype=np.float32)
    owners = np.empty(len(buffer), dtype=np.int64)
    job, left, fill = 0, jobs[0][1], 0

    def flush(size: int) -> None:
        labels = np.asarray(classify(buffer[:size])).reshape(-1)
        if len(labels) != size:
            raise ValueError(f"classify returned {len(labels)} labels for a batch of {size}")
        if size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"classify returned a label outside [0, {num_classes}): {labels.min()}..{labels.max()}")
        for owner in np.unique(owners[:size]):
            counts[owner] += np.bincount(labels[owners[:size] == owner].astype(np.int64), minlength=num_classes)

    while job < len(jobs):
        if left == 0:
            job += 1
            left = jobs[job][1] if job < len(jobs) else 0
            continue
        x, _, rng = jobs[job]
        take = min(left, len(buffer) - fill)
        part = buffer[fill: fill + take]
        rng.standard_normal(dtype=np.float32, out=part)
        part *= np.float32(sigma)
        part += np.asarray(x, dtype=np.float32)
        owners[fill: fill + take] = job
        fill, left = fill + take, left - take
        if fill == len(buffer):
            flush(fill)
            fill = 0
    if fill:
        flush(fill)
    return counts


def certify_many(classify: Classify, images: Sequence[np.ndarray], num_classes: int,
                 params: Sequence[SmoothingParams]) -> list[dict[str, Any]]:
    """CERTIFY for several images (``params[i]`` for image ``i``: its own seed), their samples sharing
    batches (:func:`sample_counts_many`): each answer is the one :func:`certify` gives alone."""
    for p in params:
        p.validate()
    if len({(p.sigma, p.batch_size) for p in params}) > 1:
        raise ValueError("certify_many: every image must use the same sigma and batch_size")
    if not params:
        return []
    sigma, batch = params[0].sigma, params[0].batch_size
    rngs = [np.random.default_rng(p.seed) for p in params]
    selection = sample_counts_many(classify, [(x, p.n0, r) for x, p, r in zip(images, params, rngs)], num_classes,
                                   sigma, batch)
    estimation = sample_counts_many(classify, [(x, p.n, r) for x, p, r in zip(images, params, rngs)], num_classes,
                                    sigma, batch)
    return [_certified(p, np.shape(x), chosen, counts) for x, p, chosen, counts in
            zip(images, params, selection, estimation)]


def _answer(params: SmoothingParams, shape: tuple[int, ...], *, label: int | None, count: int,
            p_lower: float | None, radius: float | None, max_radius: float | None, samples_used: int,
            guarantee: str = GUARANTEE, **extra: Any) -> dict[str, Any]:
    return {"certificate": CERTIFICATE, "space": model_space(shape), "guarantee": guarantee,
            "sigma": float(params.sigma),
            "alpha": float(params.alpha), "n0": int(params.n0), "n": int(params.n), "seed": int(params.seed),
            "label": label, "abstain": label is None, "count": int(count), "p_lower": p_lower, "radius": radius,
            "max_radius_for_n": max_radius, "samples_used": int(samples_used), **extra}


# ------------------------------------------------------------------ Cohen et al.'s algorithms

def certify(classify: Classify, x: np.ndarray, num_classes: int, params: SmoothingParams) -> dict[str, Any]:
    """CERTIFY: ``n0`` samples pick the top class ``cA``; ``n`` fresh samples count ``nA``.

    ``p_lower`` is the one-sided ``(1 - alpha)`` Clopper–Pearson bound of ``nA / n``; the answer
    abstains when ``p_lower <= 1/2``, else certifies ``sigma * Phi^-1(p_lower)``. Selection and
    estimation use disjoint samples, so ``cA`` is fixed before ``nA`` is drawn and the bound holds."""
    params.validate()
    rng = np.random.default_rng(params.seed)
    selection = sample_counts(classify, x, num_classes, params.n0, params.sigma, rng, params.batch_size)
    counts = sample_counts(classify, x, num_classes, params.n, params.sigma, rng, params.batch_size)
    return _certified(params, np.shape(x), selection, counts)


def _certified(params: SmoothingParams, shape: tuple[int, ...], selection: np.ndarray, counts: np.ndarray
               ) -> dict[str, Any]:
    """CERTIFY's answer from its two sets of counts: the top class of ``selection``, bounded on ``counts``."""
    top = int(selection.argmax())
    count = int(counts[top])
    p_lower = clopper_pearson_lower(count, params.n, params.alpha)
    return _answer(params, shape, label=None if p_lower <= 0.5 else top, count=count, p_lower=p_lower,
                   radius=_radius(params.sigma, p_lower),
                   max_radius=max_radius_for_n(params.sigma, params.n, params.alpha),
                   samples_used=params.n0 + params.n)


def predict(classify: Classify, x: np.ndarray, num_classes: int, params: SmoothingParams) -> dict[str, Any]:
    """PREDICT: ``n`` samples; return the top class unless the two-sided binomial test of the top
    two counts (``nA`` of ``nA + nB`` at 1/2) fails to reject at ``alpha``. With probability at
    least ``1 - alpha`` a returned label is ``g(x)``. ``n0`` is not used; no radius is certified."""
    params.validate()
    rng = np.random.default_rng(params.seed)
    counts = sample_counts(classify, x, num_classes, params.n, params.sigma, rng, params.batch_size)
    order = np.argsort(-counts, kind="stable")
    top = int(order[0])
    count, runner_up = int(counts[top]), int(counts[order[1]]) if num_classes > 1 else 0
    p_value = float(stats.binomtest(count, count + runner_up, 0.5).pvalue) if count + runner_up else 1.0
    return _answer(params, np.shape(x), label=top if p_value <= params.alpha else None, count=count, p_lower=None,
                   radius=None, max_radius=None, samples_used=params.n, guarantee=PREDICT_GUARANTEE,
                   runner_up=int(order[1]) if num_classes > 1 else None, runner_up_count=runner_up, p_value=p_value)


def sequential_looks(n: int, first: int = FIRST_LOOK) -> list[int]:
    """Cumulative sample counts at which certify-at-radius looks: ``first``, doubling, ending at ``n``."""
    looks, k = [], min(first, n)
    while k < n:
        looks.append(k)
        k *= 2
    return looks + [n]


def certify_at_radius(classify: Classify, x: np.ndarray, num_classes: int, params: SmoothingParams
                      ) -> dict[str, Any]:
    """Is ``g`` certifiably constant within L2 radius ``R = params.radius``? Stops as soon as it knows.

    ``n0`` samples pick ``cA``. Then fresh samples are drawn up to the looks ``n_1 < ... < n_K = n``
    (:func:`sequential_looks`, fixed in advance); at look ``k`` with ``nA_k`` of ``n_k`` samples
    for ``cA`` and ``p_R = Phi(R / sigma)``:

    - ``robust = True`` when the one-sided ``(1 - alpha/K)`` Clopper–Pearson lower bound exceeds
      ``p_R`` (then ``p_A > p_R >= 1/2`` and Cohen et al.'s radius ``sigma Phi^-1(p_A)`` exceeds R);
    - ``robust = False`` when the one-sided ``(1 - alpha/K)`` upper bound falls below ``p_R`` (this
      certificate cannot reach R at any budget; it does *not* say an adversarial image exists);
    - otherwise the next look; after ``n_K`` the answer is ``robust = None`` (undecided).

    Proof of the ``1 - alpha`` guarantee. Each look's bound is an exact one-sided Clopper–Pearson
    bound for the fixed sample size ``n_k``, so ``P(L_k > p_A) <= alpha/K`` and
    ``P(U_k < p_A) <= alpha/K`` whatever ``p_A`` is. If ``p_A <= p_R`` ("robust" is false), a wrong
    ``True`` needs some look with ``L_k > p_R >= p_A``: by the union bound over the K looks its
    probability is at most ``K * alpha/K = alpha``, however the stopping rule depends on the data.
    If ``p_A > p_R``, a wrong ``False`` needs some ``U_k < p_R < p_A``: again at most ``alpha``.
    The same union bound makes the reported ``p_lower`` (the bound at the look where the test
    stopped) a valid ``1 - alpha`` lower bound, so ``radius = sigma Phi^-1(p_lower)`` is certified."""
    params.validate()
    if params.radius is None:
        raise SmoothingError("radius", "certify_at_radius needs a radius (use certify for the radius estimate)")
    rng = np.random.default_rng(params.seed)
    selection = sample_counts(classify, x, num_classes, params.n0, params.sigma, rng, params.batch_size)
    top = int(selection.argmax())
    looks = sequential_looks(params.n)
    level = params.alpha / len(looks)
    p_radius = float(stats.norm.cdf(params.radius / params.sigma))
    count, drawn, robust = 0, 0, None
    for look in looks:
        counts = sample_counts(classify, x, num_classes, look - drawn, params.sigma, rng, params.batch_size)
        count, drawn = count + int(counts[top]), look
        p_lower = clopper_pearson_lower(count, drawn, level)
        if p_lower > p_radius:
            robust = True
            break
        if clopper_pearson_upper(count, drawn, level) < p_radius:
            robust = False
            break
    abstain = p_lower <= 0.5
    return _answer(params, np.shape(x), label=None if abstain else top, count=count, p_lower=p_lower,
                   radius=_radius(params.sigma, p_lower), max_radius=max_radius_for_n(params.sigma, params.n, level),
                   samples_used=params.n0 + drawn, radius_asked=float(params.radius), robust=robust,
                   samples_at_stop=drawn, looks=looks)


def smoothing_answer(classify: Classify, x: np.ndarray, num_classes: int, params: SmoothingParams
                     ) -> dict[str, Any]:
    """The served "smoothing" block: certify-at-radius when ``params.radius`` is given, else CERTIFY."""
    run = certify if params.radius is None else certify_at_radius
    return run(classify, x, num_classes, params)


def certified_accuracy(radii: Sequence[float], results: Sequence[dict[str, Any]], labels: Sequence[int]
                       ) -> dict[str, Any]:
    """Cohen et al.'s table: the fraction of images whose certified label is the true one with a
    certified radius of at least ``r``, for each ``r``. Abstentions count as wrong."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} results for {len(labels)} labels")
    correct = np.array([not r["abstain"] and r["label"] == int(y) for r, y in zip(results, labels)], dtype=bool)
    radius = np.array([r["radius"] if r["radius"] is not None else 0.0 for r in results], dtype=float)
    total = max(len(results), 1)
    return {"radii": [float(r) for r in radii],
            "certified_accuracy": [float((correct & (radius >= r)).sum() / total) for r in radii],
            "images": len(results), "abstained": int(sum(bool(r["abstain"]) for r in results)),
            "space": SPACE}
