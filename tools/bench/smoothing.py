"""Cost of the randomized-smoothing certificate on CPU, measured in one run.

1. The smoothing loop (``SpecformerRuntime.smoothing``: float32 noise, in-place add, ONNX
   forward, ``bincount``) in samples/s against the bare ONNX Runtime session's images/s on
   pre-made batches of the same size: the forward pass should be the limit (target >= 0.9x, the
   median of the ratios paired within each repetition).
   Beside them, torch on the same network (``model.pt2``'s module, checked against the ONNX file,
   called eagerly under ``inference_mode``) at the same batch.
2. Seconds per certified image (CERTIFY, ``n0 = 100``, ``n = 10,000``) on test images (target < 1 s).
3. Samples used by certify-at-radius (the sequential test) against the fixed ``n0 + n`` of CERTIFY
   on test images, per radius asked (target: >= 5x fewer on the median image).
4. With ``--training-cost`` (instead of 1-3): the training cost of each smoothing objective
   (``train --smoothing-objective``) relative to plain Gaussian-noise training: the same model,
   batch and number of optimizer steps, each objective with its paper defaults (consistency m = 2;
   SmoothAdv m = 4 and 10 PGD steps), MSVP on as ``train``'s default, repetitions interleaved.

Throughput repetitions are interleaved (bare, loop, torch, ...) and medians reported, because the
machines are shared. Without ``--onnx`` the built-in model is trained with Gaussian noise
(``--sigma``) on digits and exported to a temporary directory first.

    python tools/bench/smoothing.py [--onnx runs/demo/export/model.onnx] [--threads 2] [--json -]
    python tools/bench/smoothing.py --training-cost [--train-steps 5] [--train-reps 3] [--train-batch 32] [--json -]
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import finish, load_average, machine, percentile, set_torch_threads, spread, timed_calls


def _prepare(onnx_path: str | None, workdir: Path, model: str, sigma: float, epochs: int) -> Path:
    """The ``--onnx`` file, or the built-in model trained with noise ``sigma`` and exported."""
    if onnx_path:
        return Path(onnx_path)
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = workdir / "run"
    train(TrainConfig(model=model, epochs=epochs, warmup_epochs=0, noise_sd=sigma), run, show_progress=False)
    return Path(export_run(run, run / "export" / "model.onnx")["onnx"])


def _throughput(runtime, x: np.ndarray, sigma: float, batch: int, blocks: int, reps: int) -> dict[str, Any]:
    """Per repetition: images/s of the bare session, samples/s of the loop, images/s of torch."""
    import torch

    from specformer_deploy.serving.smoothing import SmoothingParams

    session = runtime.session
    rng = np.random.default_rng(0)
    noisy = (x + sigma * rng.standard_normal((batch, *x.shape), dtype=np.float32)).astype(np.float32)
    model = runtime._logits_model()  # model.pt2, verified against the ONNX weights and logits
    params = SmoothingParams(sigma, n0=1, n=blocks * batch, batch_size=batch)
    tensor = torch.from_numpy(noisy)

    def bare() -> None:
        session.run(["logits"], {"pixels": noisy})[0].argmax(axis=1)

    def loop() -> None:
        runtime.smoothing(x, params)

    def eager() -> None:
        with torch.inference_mode():
            model(tensor).argmax(dim=1)

    for fn in (bare, loop, eager):  # warm-up: allocations, thread pools
        fn()
    rows = {"bare_onnx_images_per_s": [], "loop_samples_per_s": [], "torch_images_per_s": []}
    for _ in range(reps):
        rows["bare_onnx_images_per_s"].append(blocks * batch / timed_calls(bare, blocks)[0])
        rows["loop_samples_per_s"].append((1 + blocks * batch) / timed_calls(loop)[0])
        rows["torch_images_per_s"].append(blocks * batch / timed_calls(eager, blocks)[0])
    medians = {key: statistics.median(values) for key, values in rows.items()}
    ratios = [lo / ba for lo, ba in zip(rows["loop_samples_per_s"], rows["bare_onnx_images_per_s"])]
    # The headline is the median of ratios paired within a repetition: the load of a shared
    # machine drifts between repetitions and would otherwise land on one side of the ratio.
    return {"batch": batch, "samples_per_rep": blocks * batch, "reps": reps, **medians,
            "loop_vs_bare": statistics.median(ratios), "loop_vs_bare_paired": spread(ratios),
            "loop_vs_bare_of_medians": medians["loop_samples_per_s"] / medians["bare_onnx_images_per_s"],
            "onnx_vs_torch": medians["bare_onnx_images_per_s"] / medians["torch_images_per_s"],
            "target_loop_vs_bare": 0.9}


def _certify_seconds(runtime, images: np.ndarray, sigma: float, n: int, batch: int) -> dict[str, Any]:
    """Wall seconds of one CERTIFY (n0 = 100, n) per image, and what it answered."""
    from specformer_deploy.serving.smoothing import SmoothingParams

    seconds, radii, abstained = [], [], 0
    for i, x in enumerate(images):
        started = time.perf_counter()
        answer = runtime.smoothing(x, SmoothingParams(sigma, n0=100, n=n, batch_size=batch, seed=i))
        seconds.append(time.perf_counter() - started)
        radii.append(answer["radius"])
        abstained += answer["abstain"]
    return {"n0": 100, "n": n, "images": len(images), "seconds_per_image": spread(seconds),
            "median_radius": statistics.median(radii), "abstained": abstained, "target_s": 1.0}


def _sequential(runtime, images: np.ndarray, labels: np.ndarray, sigma: float, n: int, radius: float,
                batch: int) -> dict[str, Any]:
    """Samples certify-at-radius used on each image, against CERTIFY's fixed n0 + n."""
    from specformer_deploy.serving.smoothing import SmoothingParams

    used, verdicts, seconds, robust_correct = [], {"robust": 0, "not robust": 0, "undecided": 0}, [], 0
    for i, (x, label) in enumerate(zip(images, labels)):
        started = time.perf_counter()
        answer = runtime.smoothing(x, SmoothingParams(sigma, n0=100, n=n, radius=radius, batch_size=batch, seed=i))
        seconds.append(time.perf_counter() - started)
        used.append(answer["samples_used"])
        verdicts[{True: "robust", False: "not robust", None: "undecided"}[answer["robust"]]] += 1
        robust_correct += answer["robust"] is True and answer["label"] == int(label)
    fixed = 100 + n
    return {"radius": radius, "images": len(images), "fixed_samples": fixed,
            "median_samples_used": statistics.median(used), "p90_samples_used": percentile(used, 0.9),
            "median_fewer_x": fixed / statistics.median(used), "mean_fewer_x": fixed / statistics.mean(used),
            "verdicts": verdicts, "median_seconds": statistics.median(seconds), "target_fewer_x": 5.0,
            "robust_with_true_label": int(robust_correct)}


OBJECTIVES = ("gaussian", "consistency", "smoothadv")


def _objective_state(ctx, objective: str, model: str, batch: int, sigma: float, workdir: Path):
    """A training run's state (the loop's own ``setup_run``) for one objective, one step taken
    untimed to warm up allocations."""
    from rich.console import Console

    from specformer_deploy.training.train import TrainConfig, setup_run, train_one_epoch

    cfg = TrainConfig(model=model, batch_size=batch, epochs=1, warmup_epochs=0, noise_sd=sigma,
                      smoothing_objective=objective, device="cpu", seed=0)
    state = setup_run(ctx, cfg, workdir / objective, False, Console(quiet=True))
    state.steps_per_epoch = 1
    train_one_epoch(state, 0)
    return state


def _timed_steps(state, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``steps`` optimizer steps (the epoch is cut to that many batches)."""
    from specformer_deploy.training.train import train_one_epoch

    state.steps_per_epoch = steps
    cpu_started = time.process_time()
    wall = train_one_epoch(state, 0)["seconds"]
    return wall / steps, (time.process_time() - cpu_started) / steps


def _training_cost(model: str, batch: int, steps: int, reps: int, sigma: float) -> dict[str, Any]:
    """Each objective's seconds per step and its ratio to plain Gaussian-noise training.

    Repetitions are interleaved (gaussian, consistency, smoothadv, gaussian, ...) and the ratio is
    the median of the ratios paired within a repetition, because the shared machine's load drifts;
    CPU seconds (this process's) are reported beside wall seconds for the same reason."""
    from specformer_deploy.training.distributed import init_distributed, shutdown

    ctx = init_distributed("cpu")
    wall: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    cpu: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            states = {name: _objective_state(ctx, name, model, batch, sigma, Path(tmp)) for name in OBJECTIVES}
            for _ in range(reps):
                for name, state in states.items():
                    w, c = _timed_steps(state, steps)
                    wall[name].append(w)
                    cpu[name].append(c)
    finally:
        shutdown(ctx)
    rows = {}
    for name, state in states.items():
        rows[name] = {"copies": state.cfg.copies,
                      "attack_steps": state.cfg.smoothadv_steps if name == "smoothadv" else 0,
                      "seconds_per_step": statistics.median(wall[name]),
                      "cpu_seconds_per_step": statistics.median(cpu[name]),
                      "vs_gaussian": statistics.median(a / b for a, b in zip(wall[name], wall["gaussian"])),
                      "cpu_vs_gaussian": statistics.median(a / b for a, b in zip(cpu[name], cpu["gaussian"]))}
    return {"model": model, "batch": batch, "steps_per_rep": steps, "reps": reps, "sigma": sigma,
            "objectives": rows}


def _render_training_cost(result: dict[str, Any], console) -> None:
    from rich.table import Table

    cost = result["training_cost"]
    table = Table(title=f"training cost per objective: {cost['model']}, batch {cost['batch']}, sigma {cost['sigma']}, "
                        f"{cost['reps']} interleaved repetitions of {cost['steps_per_rep']} steps (medians)")
    for column in ("objective", "noisy copies m", "attack steps", "s / step", "vs gaussian", "CPU s / step",
                   "CPU vs gaussian"):
        table.add_column(column, justify="right")
    for name, row in cost["objectives"].items():
        table.add_row(name, str(row["copies"]), str(row["attack_steps"]), f"{row['seconds_per_step']:.3f}",
                      f"{row['vs_gaussian']:.2f}x", f"{row['cpu_seconds_per_step']:.3f}",
                      f"{row['cpu_vs_gaussian']:.2f}x")
    console.print(table)
    console.print(f"load average {result['load_average_1m']}, wall {result['wall_time_s']:.0f} s")


def _render(result: dict[str, Any], console) -> None:
    from rich.table import Table

    t = result["throughput"]
    table = Table(title=f"smoothing loop vs bare ONNX Runtime, batch {t['batch']} ({result['model']})")
    for column in ("bare ONNX (img/s)", "smoothing loop (samples/s)", "loop / bare (paired median)", "torch (img/s)",
                   "ONNX / torch"):
        table.add_column(column, justify="right")
    verdict = "met" if t["loop_vs_bare"] >= t["target_loop_vs_bare"] else "not met"
    table.add_row(f"{t['bare_onnx_images_per_s']:.0f}", f"{t['loop_samples_per_s']:.0f}",
                  f"{t['loop_vs_bare']:.3f} (>= 0.9 {verdict})", f"{t['torch_images_per_s']:.0f}",
                  f"{t['onnx_vs_torch']:.2f}")
    console.print(table)
    c = result["certify"]
    s = c["seconds_per_image"]
    console.print(f"CERTIFY n0={c['n0']} n={c['n']}: {s['median']:.3f} s per image (median of {c['images']}, "
                  f"min {s['min']:.3f}, max {s['max']:.3f}; target < {c['target_s']} s "
                  f"{'met' if s['median'] < c['target_s'] else 'not met'}); median radius {c['median_radius']:.3f}, "
                  f"{c['abstained']} abstained")
    table = Table(title="certify-at-radius: samples used vs CERTIFY's fixed n0 + n")
    for column in ("radius (L2 px)", "images", "fixed", "median used", "p90 used", "median fewer",
                   "robust / not / undecided",
                   "median s"):
        table.add_column(column, justify="right")
    for row in result["sequential"]:
        ok = "met" if row["median_fewer_x"] >= row["target_fewer_x"] else "not met"
        table.add_row(f"{row['radius']:g}", str(row["images"]), str(row["fixed_samples"]),
                      f"{row['median_samples_used']:.0f}", f"{row['p90_samples_used']:.0f}",
                      f"{row['median_fewer_x']:.1f}x (>= 5x {ok})",
                      " / ".join(str(v) for v in row["verdicts"].values()), f"{row['median_seconds']:.3f}")
    console.print(table)
    console.print(f"sigma {result['sigma']} (model trained with {result['model_smoothing_sigma']}, clean accuracy "
                  f"{result['model_clean_accuracy']}); load average {result['load_average_1m']}, "
                  f"wall {result['wall_time_s']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", help="an exported model (default: train the built-in one with noise and export)")
    parser.add_argument("--model", default="specformer-tiny", help="model to train when --onnx is not given")
    parser.add_argument("--epochs", type=int, default=50,
                        help="training epochs when --onnx is not given (a few epochs with noise leave a constant "
                             "classifier, whose certificates are trivially fast and say nothing)")
    parser.add_argument("--sigma", type=float, default=None,
                        help="noise std in [0, 1] pixels (default: the model's smoothing.sigma, else 0.25)")
    parser.add_argument("--batch", type=int, default=1000, help="smoothing batch (and the bare session's)")
    parser.add_argument("--blocks", type=int, default=4, help="batches per throughput repetition")
    parser.add_argument("--reps", type=int, default=7, help="interleaved throughput repetitions")
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples")
    parser.add_argument("--images", type=int, default=10, help="test images certified at n")
    parser.add_argument("--radius-images", type=int, default=20, help="test images for certify-at-radius")
    parser.add_argument("--radii", default="0.1,0.25", help="radii asked of certify-at-radius (L2, pixels in [0, 1])")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON ('-': stdout)")
    parser.add_argument("--training-cost", action="store_true",
                        help="measure each smoothing objective's training cost against Gaussian noise instead")
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimizer steps per objective and repetition")
    parser.add_argument("--train-reps", type=int, default=3, help="interleaved repetitions of --train-steps")
    parser.add_argument("--train-batch", type=int, default=32, help="training batch (images before the m copies)")
    args = parser.parse_args()
    if args.training_cost:
        return _main_training_cost(args)

    from rich.console import Console

    from specformer_deploy.serving.runtime import SpecformerRuntime
    from specformer_deploy.training.data import load_dataset

    started, console = time.perf_counter(), Console(stderr=args.json == "-", width=150)
    set_torch_threads(args.threads)
    result: dict[str, Any] = {"load_average_1m": {"before": load_average()}, "environment": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepare(args.onnx, Path(tmp), args.model, args.sigma or 0.25, args.epochs)
        runtime = SpecformerRuntime(path, threads=args.threads)
        sigma = args.sigma or runtime.smoothing_sigma or 0.25
        test = load_dataset(runtime.meta["training"]["dataset"] or "digits", runtime.image_size,
                            channels=runtime.input_shape[0]).test
        count = max(args.images, args.radius_images)
        images = np.stack([test[i][0].numpy() for i in range(count)]).astype(np.float32)
        labels = np.array([int(test[i][1]) for i in range(count)])
        result.update(model=str(path), sigma=sigma, model_smoothing_sigma=runtime.smoothing_sigma,
                      model_clean_accuracy=runtime.meta["training"].get("clean_accuracy"),
                      device=runtime.device, threads=args.threads)
        result["throughput"] = _throughput(runtime, images[0], sigma, args.batch, args.blocks, args.reps)
        result["certify"] = _certify_seconds(runtime, images[: args.images], sigma, args.n, args.batch)
        result["sequential"] = [_sequential(runtime, images[: args.radius_images], labels[: args.radius_images],
                                            sigma, args.n, float(r), args.batch) for r in args.radii.split(",")]
    finish(result, started, _render, args.json, console)
    return 0


def _main_training_cost(args: argparse.Namespace) -> int:
    from rich.console import Console

    started, console = time.perf_counter(), Console(stderr=args.json == "-", width=150)
    threads = set_torch_threads(args.threads)
    result: dict[str, Any] = {"load_average_1m": {"before": load_average()}, "environment": machine(),
                              "torch_threads": threads}
    result["training_cost"] = _training_cost(args.model, args.train_batch, args.train_steps, args.train_reps,
                                             args.sigma or 0.25)
    finish(result, started, _render_training_cost, args.json, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
