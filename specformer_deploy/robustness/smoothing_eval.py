"""Certified accuracy of the smoothed classifier on a test set, in the layout of Cohen et al.'s tables.

The model is an exported ``.onnx`` file: what the server certifies is that file on ONNX Runtime
(``SpecformerRuntime``, digests verified at load), so that is what is measured; a run directory is
refused with the `export` command that makes the file. Every test image gets CERTIFY (radius) and
PREDICT (the smoothed classifier's clean answer) from
:mod:`specformer_deploy.serving.smoothing`, each with a seed of its own derived from
``(seed, image index)``: the table does not depend on how many processes computed it.

Certifying a test set is embarrassingly parallel: under ``torchrun`` rank ``k`` of ``N`` takes
images ``k, k + N, ...``, and the per-image records are gathered into one table on every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.serving.decode import decode_norm, shape_text
from specformer_deploy.serving.sampler import default_streams
from specformer_deploy.serving.smoothing import (
    SPACE,
    SmoothingParams,
    certified_accuracy,
    certify,
    certify_many,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_radius_for_n,
    model_space,
    predict,
)

__all__ = ["SmoothingEvalOptions", "parse_radii", "image_seed", "load_smoothing_runtime", "certify_images",
           "summarize", "evaluate_smoothing", "interval", "plot_certified_accuracy", "certified_radii",
           "source_space"]

Progress = Callable[[int, int], None]
INTERVAL_LEVEL = 0.95  # two-sided Clopper–Pearson interval on every fraction in the table
# Most noise samples one group of images may take before their records exist: grouping fills the
# n0 selection batches, and a cap keeps a killed long certification (n = 100,000) from losing more
# than one image's work from its journal.
GROUP_SAMPLES = 200_000
_CERTIFY, _PREDICT = 0, 1


@dataclass(frozen=True)
class SmoothingEvalOptions:
    """One certified-accuracy evaluation: the smoothing parameters and which images."""

    sigma: float
    n: int = 10_000
    n0: int = 100
    alpha: float = 0.001
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1_000
    dataset: str | None = None
    data_dir: str | None = None
    # PREDICT costs another n forward passes per image; a certified-accuracy table does not need
    # it (certified accuracy at r = 0 is CERTIFY's own clean answer), so a study may skip it.
    predict: bool = True
    # Which images: "test" (what a report states) or "val" (the training images the run held out,
    # `train --val-images`, where settings are chosen).
    split: str = "test"
    # The graph that samples: "auto" (the export's reduced-precision sampling graph when it has
    # one) or "fp32" (the export itself). Part of what is measured, so part of a cache key.
    sampler: str = "auto"

    def params(self, seed: int) -> SmoothingParams:
        return SmoothingParams(sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha,
                               batch_size=self.batch_size, seed=seed).validate()


def parse_radii(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5"`` -> ``(0.0, 0.25, 0.5)``: finite, >= 0, increasing (the table's columns)."""
    try:
        radii = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--radii must be comma-separated numbers like 0,0.25,0.5, got {text!r}") from None
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii) or list(radii) != sorted(set(radii)):
        raise ValueError(f"--radii must be distinct finite radii >= 0 in increasing order, got {text!r}")
    return radii


def image_seed(seed: int, index: int, purpose: int) -> int:
    """The seed of one image's CERTIFY (purpose 0) or PREDICT (purpose 1) noise: independent
    streams per image and purpose, the same whichever rank certifies the image."""
    return int(np.random.SeedSequence([seed, index, purpose]).generate_state(1)[0])


def interval(count: int, total: int, level: float = INTERVAL_LEVEL) -> list[float]:
    """Two-sided Clopper–Pearson interval of ``count / total`` (each tail ``(1 - level) / 2``)."""
    tail = (1 - level) / 2
    return [clopper_pearson_lower(count, total, tail), clopper_pearson_upper(count, total, tail)]


def load_smoothing_runtime(path: str | Path, device_id: int | None = None, threads: int | None = None,
                           sampler: str = "auto"):
    """The exported model on ONNX Runtime (digests verified), or a ValueError that says what to pass."""
    from specformer_deploy.serving.runtime import SpecformerRuntime

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a run directory; smoothing certifies the exported file that is served. Export "
                         f"it first (specformer-deploy export {path} --out {path / 'export' / 'model.onnx'}) and "
                         "pass the .onnx file")
    if path.suffix != ".onnx":
        raise ValueError(f"{path} is not an .onnx file written by `specformer-deploy export`")
    return SpecformerRuntime(path, device_id=device_id, threads=threads, sampler=sampler)


def certify_images(runtime, images: np.ndarray, labels: np.ndarray, indices: Sequence[int],
                   options: SmoothingEvalOptions, on_image: Callable[[], None] | None = None,
                   on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One record per image: the base model's label on the clean image, CERTIFY's label and radius,
    PREDICT's label (None when ``options.predict`` is off), and the seconds both took.

    Images are certified in groups whose samples share batches (:func:`certify_many`), so an image
    whose ``n0`` is smaller than the batch does not leave it mostly empty; each image keeps its own
    seed, so its answer is the one `certify` gives it alone. A group takes at most ``GROUP_SAMPLES``
    samples (one image at n = 100,000), so ``on_record`` hears of each image soon after it is done.
    A sampler that draws its noise on a GPU certifies one image at a time."""
    sampler, num_classes = runtime.sampler, len(runtime.class_names)
    per_image = options.n0 + options.n * (2 if options.predict else 1)
    group = 1 if getattr(sampler, "device_counts", None) else max(1, min(
        math.ceil(options.batch_size / min(options.n0, options.n)), GROUP_SAMPLES // per_image))
    records = []
    for start in range(0, len(indices), group):
        positions = range(start, min(start + group, len(indices)))
        xs = [np.ascontiguousarray(images[p], dtype=np.float32) for p in positions]
        started = time.perf_counter()
        params = [options.params(image_seed(options.seed, indices[p], _CERTIFY)) for p in positions]
        certs = (certify_many(sampler, xs, num_classes, params) if len(xs) > 1
                 else [certify(sampler, xs[0], num_classes, params[0])])
        certified_s = (time.perf_counter() - started) / len(xs)
        base = sampler.classify(np.stack(xs))
        for position, x, cert, base_label in zip(positions, xs, certs, base):
            started = time.perf_counter()
            pred = (predict(sampler, x, num_classes, options.params(image_seed(options.seed, indices[position],
                                                                                 _PREDICT)))
                    if options.predict else {"label": None, "abstain": None})
            records.append({"index": int(indices[position]), "true_label": int(labels[position]),
                            "base_label": int(base_label),
                            "label": cert["label"], "abstain": cert["abstain"], "radius": cert["radius"],
                            "count": cert["count"], "p_lower": cert["p_lower"],
                            "predict_label": pred["label"], "predict_abstain": pred["abstain"],
                            "certify_s": round(certified_s, 4),
                            "seconds": round(certified_s + time.perf_counter() - started, 4)})
            if on_record is not None:
                on_record(records[-1])
            if on_image is not None:
                on_image()
    return records


def certified_radii(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per image: the certified radius when the certified label is the true one, else -1 (abstained
    or wrong: never counted at any radius)."""
    return np.array([r["radius"] if not r["abstain"] and r["label"] == r["true_label"] else -1.0 for r in records])


def source_space(input_shape: Sequence[int], source_shape: Sequence[int] | None,
                 radii: Sequence[float], records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The same certificates stated about the data set's own images (``source_shape``, before
    resizing and channel conversion): each radius divided by the decode's norm ``||A||_2``
    (:mod:`specformer_deploy.serving.decode`), and certified accuracy at ``radii`` in that space.
    ``None`` when the images have no single shape (an image folder)."""
    if source_shape is None:
        return None
    source, model = tuple(int(v) for v in source_shape), tuple(int(v) for v in input_shape)
    norm = decode_norm(source, model)
    scaled = [{**r, "radius": None if r["radius"] is None else r["radius"] / norm} for r in records]
    table = certified_accuracy(radii, scaled, [r["true_label"] for r in records])
    return {"shape": list(source), "space": f"the data set's own images {shape_text(*source)}, pixels in [0, 1], L2",
            "decode_norm": norm, "radii": list(radii), "certified_accuracy": table["certified_accuracy"],
            "rule": "radius in the model grid / decode_norm (the decode is linear: ||A d|| <= ||A||_2 ||d||)"}


def summarize(records: Sequence[dict[str, Any]], options: SmoothingEvalOptions,
              input_shape: Sequence[int] | None = None, source_shape: Sequence[int] | None = None,
              **about: Any) -> dict[str, Any]:
    """The table: certified accuracy per radius with its interval, the smoothed classifier's clean
    accuracy (PREDICT; abstentions wrong), the base model's clean accuracy, and the cost; radii in
    the model grid (``input_shape``; ``None``: not recorded) and, with both shapes, in the data set's
    own images."""
    records = sorted(records, key=lambda r: r["index"])
    total = len(records)
    table = certified_accuracy(options.radii, records, [r["true_label"] for r in records])
    counts = [round(a * total) for a in table["certified_accuracy"]]
    predicted = options.predict
    smoothed = sum(1 for r in records if not r["predict_abstain"] and r["predict_label"] == r["true_label"])
    base = sum(1 for r in records if r["base_label"] == r["true_label"])
    seconds = [r["seconds"] for r in records]
    return {
        "certificate": "randomized smoothing (Cohen et al. 2019)",
        "space": SPACE if input_shape is None else model_space(tuple(input_shape)),
        "input_shape": None if input_shape is None else [int(v) for v in input_shape],
        "source": None if input_shape is None else source_space(input_shape, source_shape, options.radii, records),
        "sigma": options.sigma, "n0": options.n0, "n": options.n, "alpha": options.alpha,
        "images": total, "radii": list(options.radii),
        "certified_accuracy": table["certified_accuracy"], "certified_count": counts,
        "certified_interval": [interval(c, total) for c in counts],
        "interval": f"two-sided {INTERVAL_LEVEL:.0%} Clopper-Pearson over the test images",
        "abstained": table["abstained"],
        "smoothed_clean_accuracy": smoothed / max(total, 1) if predicted else None,
        "smoothed_clean_interval": interval(smoothed, total) if predicted else None,
        "predict_abstained": sum(1 for r in records if r["predict_abstain"]) if predicted else None,
        "base_clean_accuracy": base / max(total, 1),
        "max_radius_for_n": max_radius_for_n(options.sigma, options.n, options.alpha),
        "seconds_per_image": float(np.mean(seconds)) if seconds else 0.0,
        "certify_seconds_per_image": float(np.mean([r["certify_s"] for r in records])) if records else 0.0,
        "options": asdict(options), **about, "per_image": list(records),
    }


def _shard(count: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, count, world_size))


def _test_images(runtime, options: SmoothingEvalOptions) -> tuple[np.ndarray, np.ndarray, str, Any]:
    from specformer_deploy.training.data import load_dataset

    dataset = options.dataset or (runtime.meta.get("training") or {}).get("dataset")
    if not dataset:
        raise ValueError("the model does not record its dataset: pass --dataset")
    held_out = int((runtime.meta.get("training") or {}).get("val_images") or 0)
    if options.split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {options.split!r}")
    if options.split == "val" and held_out <= 0:
        raise ValueError("--split val certifies the training images the run held out, and this model's run held "
                         "out none (train --val-images N)")
    bundle = load_dataset(dataset, runtime.image_size, options.data_dir, runtime.channels, held_out)
    if bundle.num_classes != len(runtime.class_names):
        raise ValueError(f"dataset {dataset} has {bundle.num_classes} classes but the model has "
                         f"{len(runtime.class_names)}")
    images_of = bundle.validation if options.split == "val" else bundle.test
    count = len(images_of) if options.limit is None else min(options.limit, len(images_of))
    if count < 1:
        raise ValueError(f"--limit must be >= 1, got {options.limit}")
    images = np.stack([images_of[i][0].numpy() for i in range(count)]).astype(np.float32)
    labels = np.array([int(images_of[i][1]) for i in range(count)])
    return images, labels, dataset, bundle.source_shape


def evaluate_smoothing(path: str | Path, options: SmoothingEvalOptions, ctx=None, device_id: int | None = None,
                       on_progress: Progress | None = None, threads: int | None = None,
                       done: Sequence[dict[str, Any]] = (),
                       on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Certify this rank's share of the test images and gather every rank's records into one table
    (returned on every rank). ``ctx`` is a :class:`~specformer_deploy.training.distributed.DistContext`
    (``None``: one process). ``on_progress(done, total)`` counts this rank's images.

    Hours-long certifications resume: ``done`` holds records of an earlier, interrupted call with the
    same file and options (each image's answer depends only on its index and the seed, so they are
    not certified again), and ``on_record`` receives each new record as soon as it exists."""
    from specformer_deploy.training.distributed import DistContext, gather_objects

    ctx = ctx or DistContext()
    # Every core by default, shared among the processes of this machine under torchrun.
    threads = threads or max(1, default_streams() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    runtime = load_smoothing_runtime(path, device_id=device_id, threads=threads, sampler=options.sampler)
    options.params(0)  # refuse bad parameters before any work
    images, labels, dataset, source_shape = _test_images(runtime, options)
    finished = {int(r["index"]): r for r in done if int(r["index"]) < len(images)}
    mine = [i for i in _shard(len(images), ctx.rank, ctx.world_size) if i not in finished]
    count = 0

    def advance() -> None:
        nonlocal count
        count += 1
        if on_progress is not None:
            on_progress(count, len(mine))

    started = time.perf_counter()
    records = certify_images(runtime, images[mine], labels[mine], mine, options, advance, on_record)
    wall = time.perf_counter() - started
    gathered = gather_objects(ctx, {"records": records, "wall_s": wall})
    trained = runtime.smoothing_sigma
    msvp = (runtime.meta.get("msvp") or {}).get("enabled")
    records = [*finished.values(), *(r for part in gathered for r in part["records"])]
    return summarize(records, options, runtime.input_shape, source_shape,
                     model=str(path), dataset=dataset,
                     trained_sigma=trained, msvp=msvp, world_size=ctx.world_size, device=runtime.device,
                     sampler=runtime.sampler.describe(), streams=runtime.sampler.streams,
                     split={"test": "test images", "val": "validation images (held-out training images)"}[
                         options.split],
                     wall_s=round(max(part["wall_s"] for part in gathered), 3))


def plot_certified_accuracy(curves: Sequence[tuple[str, np.ndarray]], path: str | Path,
                            marks: Sequence[float] = (), styles: Sequence[dict[str, Any]] | None = None) -> Path:
    """Certified accuracy against radius, one curve per model (Cohen et al.'s figures): the
    fraction of images whose certified radius (``certified_radii``; -1 = not counted) is >= r.
    ``styles``: matplotlib line keywords per curve (colour per sigma, dash per model, say)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([float(np.max(radii, initial=0.0)) for _, radii in curves] + list(marks) + [0.1]) * 1.05
    grid = np.linspace(0.0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, radii), style in zip(curves, styles or [{}] * len(curves)):
        radii = np.asarray(radii, dtype=float)
        ax.plot(grid, [(radii >= r).mean() if len(radii) else 0.0 for r in grid], label=label, **style)
    for r in marks:
        ax.axvline(r, color="grey", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    from specformer_deploy.artifact.plots import save_figure

    return save_figure(fig, path)
