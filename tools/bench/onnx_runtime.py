#!/usr/bin/env python
"""Benchmark inference throughput: ONNX Runtime on the exported graph vs PyTorch eager, in one run.

What it measures
----------------
Images per second of the *same* network run two ways on the CPU:

- **ONNX Runtime**: the file ``specformer-deploy export`` would write, loaded with
  ``onnxruntime.InferenceSession(..., providers=["CPUExecutionProvider"])`` and the default
  session options (graph optimization level ``ORT_ENABLE_ALL``), ``session.run`` on a float32
  ``pixels`` array, both outputs (``logits``, ``attn_input_norms``) fetched.
- **PyTorch eager**: ``CertifiableModel(model).eval()`` (the exact module that is exported, with
  its LayerNorm hooks that compute ``attn_input_norms``) called under ``torch.inference_mode()``.

Why: serving runs the ONNX file without torch. This tells whether that costs or gains
throughput against keeping the model in PyTorch, at batch 1 (latency-bound serving) and batch 32
(offline scoring). The target displayed is ORT/eager >= 1.5 (ratio of median throughputs).

How the ONNX file is made: the model is built with random weights (throughput does not depend
on their values) and exported exactly as ``specformer_deploy.artifact.export.export_run`` does it:
``torch.export.export(CertifiableModel(model), ..., dynamic batch, strict=False)`` and then
``torch.onnx.export(program, ..., external_data=False, optimize=False)``, into a temporary
directory. Only the metadata step is skipped (it adds ``metadata_props`` strings that ORT
ignores); this avoids a training run, the dataset at 224 px and the parity check, which would
cost more than the benchmark itself. The outputs of both backends on the benchmark input are
compared and the largest differences reported, as a check that the same network is timed.

How it is timed: both backends use the same number of intra-op threads
(``torch.set_num_threads`` and ``SessionOptions.intra_op_num_threads``; default all CPUs this
process may use). After untimed warm-up calls, each repetition times one block of ORT calls and
one block of eager calls on the same input, the order alternating between repetitions, so slow
drifts of the machine (other processes, thermal, allocator state) hit both alike. A block holds
enough calls to last at least ``--min-block-s`` (counted per backend from the warm-up calls).
Up to ``--reps`` repetitions are run, fewer (but at least ``--min-reps``) once ``--budget-s``
seconds have been spent on that model and batch, so the default run stays within a few minutes
on two cores even when the machine is busy; the table gives the count actually run.
Reported per (model, batch): median and best images/s of each backend, the ratio of the medians
(the headline), and the median/min/max of the per-repetition paired ratios (a noise
indicator). The 1-minute load average before and after is recorded: on a shared machine it
says whether other work competed for the cores.

Examples::

    python tools/bench/onnx_runtime.py                                 # both models, batch 1 and 32
    python tools/bench/onnx_runtime.py --models specformer-tiny --reps 30
    python tools/bench/onnx_runtime.py --threads 1 --json bench_onnx.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py: the benchmarks' shared helpers

from common import finish, load_average, machine, spread, timed_calls, usable_cpus, versions

from specformer_deploy.artifact.export import CertifiableModel
from specformer_deploy.model.factory import build_model, resolve_model_config

TARGET_RATIO = 1.5
DEFAULT_MODELS = "specformer-tiny,deit_tiny_patch16_224"
OUTPUTS = ["logits", "attn_input_norms"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput (images/s) of ONNX Runtime (CPU, default optimizations) on the exported graph "
                    "against PyTorch eager on the same CertifiableModel, interleaved, per model and batch size.",
        epilog="Target displayed: ORT/eager >= 1.5 (ratio of median throughputs). Weights are random; the "
               "export follows specformer_deploy.artifact.export.export_run (torch.export + torch.onnx.export, "
               "optimize=False).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated presets or timm ViT names")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=15,
                        help="timed repetitions (each: one ORT block + one eager block)")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="per model and batch: stop repeating after this many seconds once --min-reps are done")
    parser.add_argument("--min-reps", type=int, default=5, help="repetitions done whatever --budget-s says")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per backend, model and batch")
    parser.add_argument("--min-block-s", type=float, default=0.2,
                        help="each timed block repeats the call enough times to last at least this long")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="intra-op threads for both torch and ONNX Runtime (default: all usable CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write all numbers and the environment as JSON to PATH; with no PATH (or '-') print "
                             "the JSON on stdout and the table on stderr")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.models or not args.batches or args.batches[0] < 1:
        parser.error("--models needs at least one name and --batches integers >= 1")
    if args.reps < 1 or args.min_reps < 1 or args.warmup < 0 or args.threads < 1 or args.min_block_s < 0:
        parser.error("--reps, --min-reps and --threads must be >= 1, --warmup and --min-block-s >= 0")
    args.min_reps = min(args.min_reps, args.reps)
    return args


def environment(threads: int) -> dict[str, Any]:
    return {**machine(), **versions("torch", "onnx", "onnxruntime", "timm"), "threads": threads,
            "torch_threads": torch.get_num_threads()}



def export_onnx(wrapper: CertifiableModel, example: torch.Tensor, out: Path) -> None:
    """The ONNX translation step of ``export_run`` (the same function; metadata not written)."""
    from specformer_deploy.artifact.export import write_graph_files

    write_graph_files(wrapper, example, out, outputs=list(OUTPUTS))


def make_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()  # graph_optimization_level stays at its default, ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def block(fn: Callable[[], Any], calls: int) -> float:
    """Wall seconds of ``calls`` calls."""
    return timed_calls(fn, calls)[0]


def compare(session, wrapper: CertifiableModel, pixels: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing of ORT vs eager on one input batch."""
    feed = {"pixels": pixels.numpy()}
    batch = int(pixels.shape[0])

    def run_ort() -> Any:
        return session.run(OUTPUTS, feed)

    def run_eager() -> Any:
        return wrapper(pixels)

    with torch.inference_mode():
        ort_logits, ort_norms = run_ort()
        eager_logits, eager_norms = (t.numpy() for t in run_eager())
        check = {"max_abs_logit_diff": float(np.abs(ort_logits - eager_logits).max()),
                 "max_rel_norm_diff": float((np.abs(ort_norms - eager_norms) / np.abs(eager_norms)).max()),
                 "predictions_equal": bool((ort_logits.argmax(1) == eager_logits.argmax(1)).all())}
        single = {"ort": [], "eager": []}
        for _ in range(max(args.warmup, 1)):
            single["ort"].append(block(run_ort, 1))
            single["eager"].append(block(run_eager, 1))
        calls = {name: max(1, math.ceil(args.min_block_s / max(min(ts), 1e-9))) for name, ts in single.items()}
        times: dict[str, list[float]] = {"ort": [], "eager": []}
        deadline = time.perf_counter() + args.budget_s
        for rep in range(args.reps):
            if rep >= args.min_reps and time.perf_counter() > deadline:
                break
            order = ("ort", "eager") if rep % 2 == 0 else ("eager", "ort")
            for name in order:
                times[name].append(block(run_ort if name == "ort" else run_eager, calls[name]))
    rate = {name: [calls[name] * batch / t for t in ts] for name, ts in times.items()}
    paired = [o / e for o, e in zip(rate["ort"], rate["eager"])]
    out: dict[str, Any] = {"batch": batch, "calls_per_block": calls, "reps": len(paired), "check": check}
    for name in ("ort", "eager"):
        out[name] = {"images_per_s_median": statistics.median(rate[name]), "images_per_s_best": max(rate[name]),
                     "ms_per_call_median": 1000 * statistics.median(times[name]) / calls[name],
                     "calls_per_block": calls[name], "block_s": times[name]}
    out["ratio_of_medians"] = out["ort"]["images_per_s_median"] / out["eager"]["images_per_s_median"]
    out["ratio_of_best"] = out["ort"]["images_per_s_best"] / out["eager"]["images_per_s_best"]
    out["paired_ratio"] = spread(paired)
    out["meets_target"] = out["ratio_of_medians"] >= TARGET_RATIO
    return out


def bench_model(name: str, args: argparse.Namespace, tmp: Path, status) -> dict[str, Any]:
    cfg = resolve_model_config(name, args.num_classes)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    wrapper = CertifiableModel(model).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    example = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=gen)
    path = tmp / f"{name.replace('/', '_')}.onnx"
    status.update(f"exporting {name} to ONNX...")
    started = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            export_onnx(wrapper, example, path)
    except Exception:
        sys.stderr.write(captured.getvalue())
        raise
    export_s = time.perf_counter() - started
    session = make_session(path, args.threads)
    result: dict[str, Any] = {
        "model": name, "model_config": cfg.to_dict(), "img_size": cfg.img_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "onnx_bytes": path.stat().st_size,
        "export_s": export_s, "batches": [],
    }
    for batch in args.batches:
        status.update(f"timing {name} at batch {batch} (up to {args.reps} interleaved repetitions)...")
        pixels = torch.rand(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
        result["batches"].append(compare(session, wrapper, pixels, args))
    return result


def render(result: dict[str, Any], console) -> None:
    from rich.table import Table

    env = result["environment"]
    table = Table(title=f"Throughput, ONNX Runtime (CPU EP, default opts) / PyTorch eager (target >= {TARGET_RATIO})")
    for column, justify in [("model", "left"), ("batch", "right"), ("ORT img/s\nmedian (best)", "right"),
                            ("eager img/s\nmedian (best)", "right"), ("ORT ms/call", "right"),
                            ("eager ms/call", "right"), ("ORT/eager\n(medians)", "right"),
                            ("paired ratio\nmedian [min, max]", "right"), ("target", "center"),
                            ("calls ORT/eager\nx reps", "right"), ("max |dlogit|", "right")]:
        table.add_column(column, justify=justify)
    for model in result["models"]:
        for row in model["batches"]:
            ok = row["meets_target"]
            pr = row["paired_ratio"]
            table.add_row(
                model["model"], str(row["batch"]),
                f"{row['ort']['images_per_s_median']:.1f} ({row['ort']['images_per_s_best']:.1f})",
                f"{row['eager']['images_per_s_median']:.1f} ({row['eager']['images_per_s_best']:.1f})",
                f"{row['ort']['ms_per_call_median']:.3f}", f"{row['eager']['ms_per_call_median']:.3f}",
                f"[bold]{row['ratio_of_medians']:.2f}x[/]", f"{pr['median']:.2f} [{pr['min']:.2f}, {pr['max']:.2f}]",
                "[green]met[/]" if ok else "[red]missed[/]",
                f"{row['calls_per_block']['ort']}/{row['calls_per_block']['eager']} x {row['reps']}",
                f"{row['check']['max_abs_logit_diff']:.1e}")
    console.print(table)
    for model in result["models"]:
        console.print(f"{model['model']}: {model['params_m']:.2f} M params, {model['img_size']} px, ONNX "
                      f"{model['onnx_bytes'] / 1e6:.1f} MB, export {model['export_s']:.1f} s")
    load = result["load_average_1m"]
    console.print(f"threads {env['threads']} (torch and ORT intra-op) of {env.get('cpu_affinity', env['cpu_count'])} "
                  f"usable CPUs; torch {env['torch']}, onnxruntime {env['onnxruntime']}; 1-min load average "
                  f"{load['before']} before, {load['after']} after; wall time {result['wall_time_s']:.1f} s")
    busy = [v for v in load.values() if v is not None and v > env["threads"] + 0.5]
    if busy:
        console.print(f"[yellow]the load average ({max(busy):.1f}) exceeded the {env['threads']} threads used: other "
                      "processes competed for the cores, so these figures are not those of an idle machine "
                      "(threads that wait on each other at every op suffer most from that)[/]")
    bad = [f"{m['model']}@{r['batch']}" for m in result["models"] for r in m["batches"]
           if not r["check"]["predictions_equal"] or r["check"]["max_abs_logit_diff"] > 1e-3]
    if bad:
        console.print(f"[red]ORT and eager outputs disagree for {', '.join(bad)}: the comparison is not like "
                      "for like[/]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from rich.console import Console

    json_to_stdout = args.json == "-"
    console = Console(stderr=json_to_stdout)
    console = Console(stderr=json_to_stdout, width=max(150, console.width))
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "config": {"models": args.models, "batches": args.batches, "num_classes": args.num_classes,
                   "reps": args.reps, "min_reps": args.min_reps, "budget_s": args.budget_s, "warmup": args.warmup,
                   "min_block_s": args.min_block_s,
                   "threads": args.threads, "seed": args.seed, "weights": "random init",
                   "ort": {"provider": "CPUExecutionProvider", "graph_optimization_level": "default (ORT_ENABLE_ALL)",
                           "intra_op_num_threads": args.threads},
                   "eager": "CertifiableModel(model).eval() under torch.inference_mode()"},
        "environment": environment(args.threads),
        "target": {"ratio_at_least": TARGET_RATIO},
        "load_average_1m": {"before": load_average()},
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp, console.status("starting...") as status:
        for name in args.models:
            result["models"].append(bench_model(name, args, Path(tmp), status))
    return finish(result, started, render, args.json, console)


if __name__ == "__main__":
    main()
