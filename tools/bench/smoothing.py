"""Cost of the randomized-smoothing certificate on CPU, measured in one run, against the hardware's limit.

1. The limit: the measured one-core peak of matrix products (fp32 and int8 on ONNX Runtime, bf16 on
   torch), the model's FLOPs per sample counted from its graph, and what share of the sampler's time
   ONNX Runtime spends in matrix products at all (its own profiler).
2. The sampler (``NoiseSampler``: float32 noise, the forward pass, ``bincount``) in samples/s. The
   baseline is the loop as it was: the export's float32 graph, one thread, whole 1,000-sample
   batches. Then the float32 graph and the int8 sampling graph (``export --smoothing-sampler int8``)
   each on one thread in cache-sized chunks, on one session with intra-op threads on every core
   (whole batches), and on one single-threaded stream per core (chunks); each row's fraction of the
   peak of its precision on the cores it used. Beside them the bare session on pre-made batches
   (the baseline loop's overhead, target >= 0.9x).
3. Seconds per certified image (CERTIFY, ``n0 = 100``, ``n = 10,000``) on test images, for the
   baseline loop and the fastest sampler, interleaved (targets: < 1 s; >= 4x the baseline).
4. Samples used by certify-at-radius (the sequential test) against the fixed ``n0 + n`` of CERTIFY
   on test images, per radius asked (target: >= 5x fewer on the median image).
5. With ``--training-cost`` (instead of 1-4): the training cost of each smoothing objective
   (``train --smoothing-objective``) relative to plain Gaussian-noise training: the same model,
   batch and number of optimizer steps, each objective with its paper defaults (consistency m = 2;
   SmoothAdv m = 4 and 10 PGD steps), MSVP on as ``train``'s default, repetitions interleaved.

Throughput repetitions are interleaved and medians reported, because the machines are shared.
Without ``--onnx`` the MNIST model (``specformer-mnist``) is trained with Gaussian noise
(``--sigma``) for ``--epochs`` and exported with its int8 sampler to a temporary directory first.

    python tools/bench/smoothing.py [--onnx runs/x/export/model.onnx] [--json -]
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
from common import finish, load_average, machine, percentile, set_torch_threads, spread, timed_calls, usable_cpus
from compute import cpu_features, flops_per_sample, matmul_peak, op_time_shares


def _prepare(onnx_path: str | None, workdir: Path, model: str, dataset: str, sigma: float, epochs: int) -> Path:
    """The ``--onnx`` file, or the MNIST model trained with noise ``sigma`` and exported with its int8 sampler."""
    if onnx_path:
        return Path(onnx_path)
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = workdir / "run"
    train(TrainConfig(model=model, dataset=dataset, epochs=epochs, warmup_epochs=0, noise_sd=sigma), run,
          show_progress=False)
    return Path(export_run(run, run / "export" / "model.onnx", smoothing_sampler="int8")["onnx"])


def _limit(path: Path, int8: Path | None, cores: int) -> dict[str, Any]:
    """Per-core peaks, the model's FLOPs per sample, and where each graph spends its time."""
    # Best of three interleaved rounds: a shared core's clock and neighbours vary, and AMX units
    # need a warm-up; the peak is what the core can do, so the highest round counts.
    rounds = [{p: matmul_peak(p, threads=1) for p in ("fp32", "int8", "bf16")} for _ in range(3)]
    peaks = {p: max((r[p] for r in rounds), key=lambda v: v.get("gflops") or 0.0) for p in rounds[0]}
    for p in peaks:
        peaks[p] = {**peaks[p], "rounds_gflops": [r[p].get("gflops") for r in rounds]}
    flops = flops_per_sample(path)
    feed = {"pixels": np.random.default_rng(0).random((256, *_input_shape(path)), dtype=np.float32)}
    shares = {"fp32": op_time_shares(path, feed)}
    if int8 is not None:
        shares["int8"] = op_time_shares(int8, feed)
    return {"cpu_features": cpu_features(), "cores": cores, "peak_per_core": peaks, "flops_per_sample": flops,
            "op_time_shares_one_thread_batch_256": shares}


def _input_shape(path: Path) -> tuple[int, ...]:
    from specformer_deploy.artifact.onnx_meta import input_shape, read_metadata_file

    return tuple(input_shape(read_metadata_file(path)))


def _samplers(path: Path, int8: Path | None, cores: int) -> dict[str, Any]:
    """Every sampler configuration the bench compares, by name."""
    from specformer_deploy.serving.sampler import NoiseSampler

    graphs = {"fp32": path} if int8 is None else {"fp32": path, "int8": int8}
    out = {"fp32, 1 thread, whole batches (the loop before this bench's samplers)":
           NoiseSampler(path, precision="fp32", streams=1, chunk=None)}
    for precision, graph in graphs.items():
        out[f"{precision}, 1 thread"] = NoiseSampler(graph, precision=precision, streams=1)
        if cores > 1:
            out[f"{precision}, {cores} intra-op threads, whole batches"] = NoiseSampler(
                graph, precision=precision, intra_op_threads=cores, chunk=None)
            out[f"{precision}, {cores} streams"] = NoiseSampler(graph, precision=precision, streams=cores)
    return out


def _sampler_table(samplers: dict[str, Any], x: np.ndarray, sigma: float, batch: int, blocks: int, reps: int,
                   flops: float, peaks: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """samples/s of the smoothing loop on each sampler (interleaved repetitions, medians) and its
    fraction of the peak of its precision on the cores it used; the bare one-thread session beside."""
    from specformer_deploy.serving.smoothing import sample_counts

    samples = blocks * batch
    noisy = (x + sigma * np.random.default_rng(0).standard_normal((batch, *x.shape), dtype=np.float32))
    noisy = noisy.astype(np.float32)
    baseline = next(iter(samplers.values()))

    def loop(sampler) -> None:
        sample_counts(sampler, x, num_classes, samples, sigma, np.random.default_rng(0), batch)

    def bare() -> None:
        baseline.session.run(["logits"], {"pixels": noisy})[0].argmax(axis=1)

    for sampler in samplers.values():
        loop(sampler)  # warm-up: allocations, thread pools
    rates: dict[str, list[float]] = {name: [] for name in samplers}
    bare_rates, ratios = [], []
    for _ in range(reps):
        bare_rates.append(samples / timed_calls(bare, blocks)[0])
        for name, sampler in samplers.items():
            rates[name].append(samples / timed_calls(lambda s=sampler: loop(s))[0])
        ratios.append(rates[next(iter(samplers))][-1] / bare_rates[-1])
    rows = {}
    for name, sampler in samplers.items():
        cores_used = sampler.streams if sampler.intra_op_threads is None else sampler.intra_op_threads
        rate = statistics.median(rates[name])
        peak = peaks[sampler.precision]["gflops"] * 1e9 * cores_used
        rows[name] = {"precision": sampler.precision, "cores": cores_used, "samples_per_s": rate,
                      "samples_per_s_reps": spread(rates[name]), "fraction_of_peak": rate * flops / peak}
    base_rate = rows[next(iter(rows))]["samples_per_s"]
    for row in rows.values():
        row["vs_one_thread_fp32"] = row["samples_per_s"] / base_rate
    return {"batch": batch, "samples_per_rep": samples, "reps": reps, "rows": rows,
            "bare_one_thread_images_per_s": statistics.median(bare_rates),
            "loop_vs_bare": statistics.median(ratios), "target_loop_vs_bare": 0.9, "target_fraction_of_peak": 0.6}


def _certify_seconds(samplers: dict[str, Any], images: np.ndarray, sigma: float, n: int, batch: int,
                     num_classes: int) -> dict[str, Any]:
    """Wall seconds of one CERTIFY (n0 = 100, n) per image on each sampler, interleaved per image."""
    from specformer_deploy.serving.smoothing import SmoothingParams, certify

    seconds: dict[str, list[float]] = {name: [] for name in samplers}
    radii: dict[str, list[float]] = {name: [] for name in samplers}
    for i, x in enumerate(images):
        for name, sampler in samplers.items():
            started = time.perf_counter()
            answer = certify(sampler, x, num_classes, SmoothingParams(sigma, n0=100, n=n, batch_size=batch, seed=i))
            seconds[name].append(time.perf_counter() - started)
            radii[name].append(answer["radius"])
    names = list(samplers)
    base = names[0]
    rows = {name: {"seconds_per_image": spread(seconds[name]), "median_radius": statistics.median(radii[name]),
                   "speedup_vs_one_thread_fp32": statistics.median(b / s for b, s in zip(seconds[base],
                                                                                          seconds[name]))}
            for name in names}
    return {"n0": 100, "n": n, "images": len(images), "rows": rows, "target_s": 1.0, "target_speedup": 4.0}


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


OBJECTIVES = ("gaussian", "consistency", "smoothadv", "smoothadv-consistency")


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

    Repetitions are interleaved (gaussian, consistency, smoothadv, ..., gaussian, ...) and the ratio is
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
                      "attack_steps": state.cfg.smoothadv_steps if name.startswith("smoothadv") else 0,
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

    limit = result["limit"]
    peaks, flops = limit["peak_per_core"], limit["flops_per_sample"]["flops"]
    peak_text = ", ".join(f"{p} {v['gflops']:.0f}" if v.get("available") else f"{p} n/a" for p, v in peaks.items())
    console.print(f"one-core matmul peak (GFLOP/s; int8 GOP/s): {peak_text}; CPU: {', '.join(limit['cpu_features'])}")
    shares = limit["op_time_shares_one_thread_batch_256"]
    console.print(f"model: {flops / 1e6:.2f} MFLOP per sample (counted from the graph); time in matrix products: "
                  + ", ".join(f"{p} {100 * v['matmul_share']:.0f}%" for p, v in shares.items())
                  + " (the rest: " + ", ".join(f"{p}: " + ", ".join(f"{op} {100 * share:.0f}%" for op, share in
                                                                    v["by_op"][:4] if "MatMul" not in op)
                                               for p, v in shares.items()) + ")")
    t = result["samplers"]
    table = Table(title=f"smoothing sampler, batch {t['batch']}, {t['reps']} interleaved repetitions (medians)")
    for column in ("sampler", "cores", "samples/s", "vs baseline", "GFLOP/s per core", "of peak"):
        table.add_column(column, justify="right")
    for name, row in t["rows"].items():
        table.add_row(name, str(row["cores"]), f"{row['samples_per_s']:,.0f}", f"{row['vs_one_thread_fp32']:.2f}x",
                      f"{row['samples_per_s'] * flops / row['cores'] / 1e9:.1f}",
                      f"{100 * row['fraction_of_peak']:.0f}% (target 60%)")
    console.print(table)
    verdict = "met" if t["loop_vs_bare"] >= t["target_loop_vs_bare"] else "not met"
    console.print(f"baseline loop / bare session: {t['loop_vs_bare']:.3f} (>= 0.9 {verdict}); "
                  f"bare {t['bare_one_thread_images_per_s']:,.0f} images/s")
    c = result["certify"]
    table = Table(title=f"CERTIFY n0={c['n0']} n={c['n']:,}, seconds per image (median of {c['images']})")
    for column in ("sampler", "s / image", "min", "max", "speedup vs baseline", "median radius"):
        table.add_column(column, justify="right")
    for name, row in c["rows"].items():
        s = row["seconds_per_image"]
        table.add_row(name, f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}",
                      f"{row['speedup_vs_one_thread_fp32']:.2f}x", f"{row['median_radius']:.3f}")
    console.print(table)
    best = min(c["rows"].items(), key=lambda kv: kv[1]["seconds_per_image"]["median"])
    console.print(f"fastest: {best[0]} at {best[1]['seconds_per_image']['median']:.3f} s per image (target < "
                  f"{c['target_s']} s: {'met' if best[1]['seconds_per_image']['median'] < c['target_s'] else 'not met'}"
                  f"; {best[1]['speedup_vs_one_thread_fp32']:.2f}x the baseline loop, target "
                  f">= {c['target_speedup']:g}x: "
                  f"{'met' if best[1]['speedup_vs_one_thread_fp32'] >= c['target_speedup'] else 'not met'})")
    table = Table(title="certify-at-radius: samples used vs CERTIFY's fixed n0 + n")
    for column in ("radius (L2 px)", "images", "fixed", "median used", "p90 used", "median fewer",
                   "robust / not / undecided", "median s"):
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
    parser.add_argument("--onnx", help="an exported model (default: train the MNIST model with noise and export it "
                                       "with its int8 sampler)")
    parser.add_argument("--model", default="specformer-mnist", help="model to train when --onnx is not given")
    parser.add_argument("--dataset", default="mnist", help="its data set")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs when --onnx is not given")
    parser.add_argument("--sigma", type=float, default=None,
                        help="noise std in [0, 1] pixels (default: the model's smoothing.sigma, else 0.5)")
    parser.add_argument("--batch", type=int, default=1000, help="smoothing batch (and the bare session's)")
    parser.add_argument("--blocks", type=int, default=3, help="batches per throughput repetition")
    parser.add_argument("--reps", type=int, default=5, help="interleaved throughput repetitions")
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples")
    parser.add_argument("--images", type=int, default=5, help="test images certified at n on each sampler")
    parser.add_argument("--radius-images", type=int, default=20, help="test images for certify-at-radius")
    parser.add_argument("--radii", default="0.25,0.5", help="radii asked of certify-at-radius (L2, pixels in [0, 1])")
    parser.add_argument("--threads", type=int, default=None, help="cores the multi-core samplers use (default: all)")
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
    cores = args.threads or usable_cpus()
    result: dict[str, Any] = {"load_average_1m": {"before": load_average()}, "environment": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepare(args.onnx, Path(tmp), args.model, args.dataset, args.sigma or 0.5, args.epochs)
        runtime = SpecformerRuntime(path, threads=cores)
        int8 = runtime.sampler.path if runtime.sampler.precision == "int8" else None
        sigma = args.sigma or runtime.smoothing_sigma or 0.5
        test = load_dataset(runtime.meta["training"]["dataset"] or "digits", runtime.image_size,
                            channels=runtime.input_shape[0]).test
        count = max(args.images, args.radius_images)
        images = np.stack([test[i][0].numpy() for i in range(count)]).astype(np.float32)
        labels = np.array([int(test[i][1]) for i in range(count)])
        result.update(model=str(path), sigma=sigma, model_smoothing_sigma=runtime.smoothing_sigma,
                      model_clean_accuracy=runtime.meta["training"].get("clean_accuracy"),
                      int8_sampler=runtime.meta.get("smoothing_sampler"))
        if int8 is None:
            console.print("[yellow]this export has no int8 sampler (export --smoothing-sampler int8): fp32 rows only")
        result["limit"] = _limit(path, int8, cores)
        samplers = _samplers(path, int8, cores)
        num_classes = len(runtime.class_names)
        result["samplers"] = _sampler_table(samplers, images[0], sigma, args.batch, args.blocks, args.reps,
                                            result["limit"]["flops_per_sample"]["flops"],
                                            result["limit"]["peak_per_core"], num_classes)
        fastest = max(result["samplers"]["rows"], key=lambda k: result["samplers"]["rows"][k]["samples_per_s"])
        first = next(iter(samplers))
        chosen = {first: samplers[first], fastest: samplers[fastest]}
        result["certify"] = _certify_seconds(chosen, images[: args.images], sigma, args.n, args.batch, num_classes)
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
