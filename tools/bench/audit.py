#!/usr/bin/env python
"""Benchmark ``audit`` on a ViT-B-sized export (12 layers x 12 heads, dim 768, 86 M parameters).

What it measures
----------------
``specformer_deploy.artifact.audit.audit_file(path)`` recomputes, from the ONNX file alone, the exact
spectral norm of every head's W_Q, W_K, W_V and W_O block (float64 SVDs), the SHA-256 of all
weights, of the graph and of every metadata value, and compares them with what export stored.
It is meant to run wherever the model is deployed, with onnx and numpy only; the target
displayed is a median audit time < 2 s for ViT-B (timm ``vit_base_patch16_224``, 224 px, 10
classes, about 345 MB of float32 weights).

How the file is made: a ViT-B with random weights (the audit's cost does not depend on their
values) is written as a run directory in the layout ``train`` writes (``config.json`` +
``model.safetensors``; digits as the run's dataset, MSVP off, no metrics) and exported with
``specformer_deploy.artifact.export.export_run``, so the audited file carries the same metadata, digests
and weight references as any ``specformer-deploy export`` output (the ONNX Runtime parity check
on 64 test images included). This takes a few minutes on a small CPU; ``--keep PATH`` writes the
file to PATH, or reuses PATH when it exists.

How it is timed: in a fresh subprocess that imports only ``specformer_deploy.artifact.audit`` (so the
figures are those of a torch-free process; ``'torch' in sys.modules`` is checked after the
audits and reported): the import itself, then ``--reps`` repetitions of one ``audit_file`` call
(first, median, minimum reported) followed by one pass over the audit's stages called one by one
with the same functions the audit uses: ``onnx.load`` (protobuf parse), ``initializer_arrays`` (tensors to numpy),
``read_metadata`` (JSON), ``head_blocks`` (per-head slices), ``spectral_norms`` (the float64
SVDs), ``weights_digest``, ``graph_digest``, ``metadata_digests`` and the audit's check of the
certificate inputs (whole-``W_O`` spectral norm per layer, ``||b_q||`` per head); the per-tensor digests are
only computed by the audit when the weights digest differs, and are timed too. Finally the
command line (``python -m specformer_deploy audit FILE``) is timed end to end ``--cli-reps``
times: interpreter start, imports (typer, rich) and the printed report included.

BLAS threads: the SVDs run in numpy's LAPACK (OpenBLAS in the wheels), which by default uses all
cores and spin-waits between its many small calls. On a machine where other processes keep the
cores busy this can make the SVD stage tens of times slower (seen here: 1.4 s alone with one
thread, 24-58 s with two threads while a torch job used both cores). ``--blas-threads N`` sets
the usual environment variables for the audit processes so both settings can be compared; the
BLAS library and thread count actually in use are reported (threadpoolctl), with the 1-minute
load average before and after. The process CPU time (``time.process_time``, all threads) of the
audit and of each stage is reported beside the wall time: with one BLAS thread it is close to
what the wall time would be on an idle machine, a useful cross-check when the machine is shared.

Examples::

    python tools/bench/audit.py --keep /tmp/vit_b.onnx           # export once, keep the file
    python tools/bench/audit.py --keep /tmp/vit_b.onnx --reps 10 # reuse it
    python tools/bench/audit.py --keep /tmp/vit_b.onnx --json audit.json
"""

# Only the standard library at module level: the worker mode (--worker) of this same file is the
# torch-free process that is timed; the parent imports torch lazily, only to export.
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py: the benchmarks' shared helpers
from common import blas_thread_env, finish, load_average, machine, spread

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGET_S = 2.0
DEFAULT_MODEL = "vit_base_patch16_224"
STAGES = ["onnx.load", "initializer_arrays", "read_metadata", "head_blocks", "spectral_norms (SVD)",
          "weights_digest", "graph_digest", "metadata_digests", "certificate inputs (||W_O|| SVD, ||b_q||)"]
EXTRA_STAGES = ["tensor_digests (only on mismatch)"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time `audit` (spectral norms by SVD, weight/graph/metadata digests) on a ViT-B-sized "
                    "export, in a subprocess that never imports torch, with a per-stage breakdown.",
        epilog="Target displayed: median audit_file time < 2 s. Exporting ViT-B takes minutes on a small CPU: "
               "use --keep PATH to export once and reuse the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="preset or timm ViT name to export")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--keep", default=None, metavar="PATH",
                        help="ONNX file to reuse if it exists, else to export to and keep (default: a temporary file)")
    parser.add_argument("--reps", type=int, default=5, help="audit_file calls, and stage-by-stage passes")
    parser.add_argument("--cli-reps", type=int, default=1,
                        help="end-to-end runs of `python -m specformer_deploy audit FILE` (0: skip)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="set OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS for the audit processes "
                             "(default: leave the environment as it is, i.e. the BLAS library's own choice)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for the audit subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write all numbers and the environment as JSON to PATH; with no PATH (or '-') print "
                             "the JSON on stdout and the tables on stderr")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.cli_reps < 0 or (args.blas_threads is not None and args.blas_threads < 1):
        parser.error("--reps must be >= 1, --cli-reps >= 0 and --blas-threads >= 1")
    if args.keep is not None and not args.keep.endswith(".onnx"):
        parser.error(f"--keep must name a .onnx file, got {args.keep}")
    return args


# --------------------------------------------------------------------------------------------
# The timed, torch-free process
# --------------------------------------------------------------------------------------------

def worker(path: str, reps: int) -> dict[str, Any]:
    started = time.perf_counter()
    from specformer_deploy.artifact import audit  # the only project import; it pulls in onnx, numpy, onnx_meta

    import_s = time.perf_counter() - started
    torch_after_import = "torch" in sys.modules
    import onnx

    from specformer_deploy.artifact.onnx_meta import (
        graph_digest,
        head_blocks,
        initializer_arrays,
        metadata_digests,
        read_metadata,
        spectral_norms,
        tensor_digests,
        weights_digest,
    )

    full, full_cpu, report = [], [], None
    stages: dict[str, list[float]] = {name: [] for name in STAGES + EXTRA_STAGES}
    stages_cpu: dict[str, list[float]] = {name: [] for name in STAGES + EXTRA_STAGES}

    def timed(name: str, fn, *fn_args):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn(*fn_args)
        stages[name].append(time.perf_counter() - t0)
        stages_cpu[name].append(time.process_time() - c0)
        return value

    file_meta: dict[str, Any] = {}
    for _ in range(reps):  # one whole audit, then one staged pass: drifts of the machine hit both alike
        t0, c0 = time.perf_counter(), time.process_time()
        report = audit.audit_file(path)
        full.append(time.perf_counter() - t0)
        full_cpu.append(time.process_time() - c0)
        torch_after_audit = "torch" in sys.modules

        proto = timed("onnx.load", lambda: onnx.load(path, load_external_data=False))  # as audit._load does
        arrays = timed("initializer_arrays", initializer_arrays, proto)
        meta = timed("read_metadata", read_metadata, proto)
        heads, head_dim = int(meta["heads"]), int(meta["head_dim"])
        file_meta = {"package_version": meta.get("package_version"), "format_version": meta.get("format_version"),
                     "sigma_o_full": "sigma_o_full" in meta.get("spectral", {}),
                     "bias_q_norm": "bias_q_norm" in meta}
        blocks = timed("head_blocks", lambda found, layers, h, d: [head_blocks(found, layer, h, d) for layer in layers],
                       arrays, meta["attention_weights"], heads, head_dim)
        timed("spectral_norms (SVD)", spectral_norms, [b[n] for b in blocks for n in audit.PROJECTIONS])
        timed("weights_digest", weights_digest, arrays)
        timed("graph_digest", graph_digest, proto)
        timed("metadata_digests", metadata_digests, meta)
        scratch = audit.AuditReport(path, audit.EXIT_CONSISTENT, "consistent")
        timed("certificate inputs (||W_O|| SVD, ||b_q||)", audit._check_certificate_inputs, scratch, arrays,
              meta["attention_weights"], meta)
        timed("tensor_digests (only on mismatch)", tensor_digests, arrays)
        del proto, arrays, blocks
    return {
        "import_s": import_s, "audit_s": full, "stages_s": stages, "audit_cpu_s": full_cpu,
        "stages_cpu_s": stages_cpu, "file_metadata": file_meta,
        "torch_imported_after_import": torch_after_import, "torch_imported_after_audit": torch_after_audit,
        "torch_imported_at_end": "torch" in sys.modules,
        "exit_code": report.exit_code, "verdict": report.verdict, "problems": report.problems[:5],
        "layers": len(report.layers), "heads": (report.model or {}).get("heads"),
        "head_dim": (report.model or {}).get("head_dim"),
        "numpy": __import__("numpy").__version__, "onnx": onnx.__version__, "blas": blas_info(),
    }


def blas_info() -> list[dict[str, Any]] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: pool.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer")}
            for pool in threadpool_info()]


# --------------------------------------------------------------------------------------------
# The parent: export (torch), then run the worker and the CLI
# --------------------------------------------------------------------------------------------

def write_random_run(model_name: str, num_classes: int, run_dir: Path, seed: int) -> dict[str, Any]:
    """A run directory as ``train`` lays it out (config.json + model.safetensors), random weights."""
    from dataclasses import asdict

    import torch
    from safetensors.torch import save_file

    from specformer_deploy import __version__
    from specformer_deploy.model.factory import build_model, resolve_model_config
    from specformer_deploy.training.checkpoint import RunFiles, atomic_write, atomic_write_text
    from specformer_deploy.training.data import load_dataset
    from specformer_deploy.training.train import FORMAT_VERSION, TrainConfig

    model_cfg = resolve_model_config(model_name, num_classes)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    bundle = load_dataset("digits", 8)  # only for the class names and sizes; export loads it at the model's size
    if bundle.num_classes != num_classes:
        raise SystemExit(f"--num-classes must be {bundle.num_classes} (the digits dataset the export checks parity on)")
    train_cfg = TrainConfig(model=model_name, dataset="digits", epochs=1, msvp=False, seed=seed)
    config = {"format_version": FORMAT_VERSION, "package_version": __version__, "train": asdict(train_cfg),
              "model": model_cfg.to_dict(),
              "data": {"dataset": bundle.name, "class_names": bundle.class_names, "train_size": len(bundle.train),
                       "test_size": len(bundle.test)}}
    files = RunFiles(run_dir)
    atomic_write_text(files.config, json.dumps(config, indent=2) + "\n")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(files.weights, lambda tmp: save_file(weights, str(tmp)))
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "img_size": model_cfg.img_size}


def export_file(args: argparse.Namespace, target: Path, status) -> dict[str, Any]:
    import contextlib
    import io

    from specformer_deploy.artifact.export import export_run

    started = time.perf_counter()
    steps: dict[str, float] = {}
    last = [None, started]

    def step(message: str) -> None:
        now = time.perf_counter()
        if last[0] is not None:
            steps[last[0]] = now - last[1]
        last[0], last[1] = message, now
        status.update(f"export: {message}...")

    with tempfile.TemporaryDirectory(prefix="bench-audit-run-") as run_dir:
        status.update(f"building a random-weight {args.model} run directory...")
        info = write_random_run(args.model, args.num_classes, Path(run_dir), args.seed)
        steps["random-weight run directory"] = time.perf_counter() - started
        last[1] = time.perf_counter()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                exported = export_run(run_dir, target, step=step)
        except Exception:
            sys.stderr.write(captured.getvalue())
            raise
    step("done")
    steps.pop("done", None)
    return {**info, "export_s": time.perf_counter() - started, "export_steps_s": steps,
            "parity": exported["parity"], "opset": exported["opset"]}


def run_worker(path: Path, reps: int, blas_threads: int | None, timeout: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), "--reps", str(reps)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=str(ROOT), env=blas_thread_env(blas_threads),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the audit worker ran past --timeout {timeout:g} s ({reps} audits + {reps} staged passes); "
                         "on a CPU shared with other busy processes a multi-threaded BLAS can slow the SVDs by "
                         "orders of magnitude: try --blas-threads 1") from None
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the audit worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(path: Path, reps: int, blas_threads: int | None) -> dict[str, Any] | None:
    if reps == 0:
        return None
    times, codes = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "specformer_deploy", "audit", str(path)], capture_output=True,
                              text=True, cwd=str(ROOT), env=blas_thread_env(blas_threads))
        times.append(time.perf_counter() - t0)
        codes.append(proc.returncode)
    return {"wall_s": times, "exit_codes": codes}


def render(result: dict[str, Any], console) -> None:
    from rich.table import Table

    w = result["worker"]
    audit_s = result["audit_s"]
    ok = audit_s["median"] < TARGET_S
    table = Table(title=f"audit_file on {result['config']['model']} ({w['layers']} layers x {w['heads']} heads, "
                        f"{result['file_mb']:.0f} MB) in a torch-free process (target median < {TARGET_S:g} s)")
    for column, justify in [("what", "left"), ("median s", "right"), ("min s", "right"), ("max s", "right"),
                            ("share of audit", "right"), ("CPU s\nmedian", "right")]:
        table.add_column(column, justify=justify)
    table.add_row("[bold]audit_file (whole)[/]", f"[bold]{audit_s['median']:.3f}[/]", f"{audit_s['min']:.3f}",
                  f"{audit_s['max']:.3f}", "100%", f"{result['audit_cpu_s']['median']:.3f}", end_section=True)
    for name in STAGES:
        if name not in result["stages"]:
            table.add_row(f"  {name}", "not timed", "", "", "", "")
            continue
        s = result["stages"][name]
        table.add_row(f"  {name}", f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}",
                      f"{100 * s['median'] / audit_s['median']:.0f}%", f"{result['stages_cpu'][name]['median']:.3f}")
    staged = sum(result["stages"][n]["median"] for n in STAGES if n in result["stages"])
    table.add_row("  sum of stages", f"{staged:.3f}", "", "", f"{100 * staged / audit_s['median']:.0f}%",
                  end_section=True)
    s = result["stages"][EXTRA_STAGES[0]]
    table.add_row(f"{EXTRA_STAGES[0]}", f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}", "",
                  f"{result['stages_cpu'][EXTRA_STAGES[0]]['median']:.3f}")
    table.add_row("first audit_file call", f"{w['audit_s'][0]:.3f}", "", "", "")
    table.add_row("import specformer_deploy.artifact.audit", f"{w['import_s']:.3f}", "", "", "")
    cli = result["cli"]
    if cli:
        c = spread(cli["wall_s"])
        table.add_row(f"CLI end to end ({len(cli['wall_s'])} run(s), exit {sorted(set(cli['exit_codes']))})",
                      f"{c['median']:.3f}", f"{c['min']:.3f}", f"{c['max']:.3f}", "")
    console.print(table)
    torch_seen = w["torch_imported_after_audit"] or w["torch_imported_at_end"]
    console.print(f"verdict {w['verdict']} (exit {w['exit_code']}); 'torch' in sys.modules after auditing: "
                  + ("[red]True[/]" if torch_seen else "[green]False[/]")
                  + f"; target {'[green]met[/]' if ok else '[red]missed[/]'} ({audit_s['median']:.3f} s median over "
                    f"{len(w['audit_s'])} calls)")
    exp = result["export"]
    if exp:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in exp["export_steps_s"].items())
        console.print(f"export (once): {exp['export_s']:.1f} s ({parts}); parity max |dlogit| "
                      f"{exp['parity']['max_abs_logit_diff']:.1e}")
    else:
        fm = w["file_metadata"]
        console.print(f"reused {result['file']} (no export; written by specformer-deploy {fm['package_version']}, "
                      f"format {fm['format_version']})")
    fm = w["file_metadata"]
    if not (fm["sigma_o_full"] and fm["bias_q_norm"]):
        console.print("[yellow]the file lacks sigma_o_full/bias_q_norm (exported by an older export): the audit "
                      "skips the certificate-input checks on it, so it is cheaper than on a current export; "
                      "re-export (delete the --keep file)[/]")
    env = result["environment"]
    blas = ", ".join(f"{p['internal_api']} {p['version']} {p['num_threads']} thread(s)" for p in (w["blas"] or [])
                     ) or "unknown"
    setting = ("library default" if result["config"]["blas_threads"] is None
               else f"--blas-threads {result['config']['blas_threads']}")
    console.print(f"{env['cpu_affinity']} usable CPUs, BLAS {blas} ({setting}), numpy {w['numpy']}, onnx {w['onnx']}; "
                  f"1-min load average "
                  f"{result['load_average_1m']['before']} before, {result['load_average_1m']['after']} after; "
                  f"wall time {result['wall_time_s']:.1f} s")
    cpus = env["cpu_affinity"] or env["cpu_count"] or 1
    busy = [v for v in result["load_average_1m"].values() if v is not None and v > cpus + 0.5]
    if busy:
        console.print(f"[yellow]the load average ({max(busy):.1f}) exceeded the {cpus} usable CPUs: other processes "
                      "competed for the cores, so these times are not those of an idle machine[/]")
    if w["exit_code"] != 0:
        console.print(f"[red]the audit did not find the file consistent: {w['problems']}[/]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.reps)))
        return {}
    from rich.console import Console

    json_to_stdout = args.json == "-"
    console = Console(stderr=json_to_stdout)
    console = Console(stderr=json_to_stdout, width=max(110, console.width))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "config": {"model": args.model, "num_classes": args.num_classes, "reps": args.reps, "cli_reps": args.cli_reps,
                   "seed": args.seed, "weights": "random init", "keep": args.keep,
                   "blas_threads": args.blas_threads},
        "environment": machine(),
        "target": {"median_audit_s_below": TARGET_S},
        "load_average_1m": {"before": load_average()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp, console.status("starting...") as status:
        path = Path(args.keep) if args.keep else Path(tmp) / "model.onnx"
        result["export"] = None
        if not path.is_file():
            result["export"] = export_file(args, path, status)
        result["file"] = str(path)
        result["file_mb"] = path.stat().st_size / 1e6
        status.update(f"auditing in a torch-free subprocess ({args.reps} calls + {args.reps} staged passes)...")
        w = result["worker"] = run_worker(path, args.reps, args.blas_threads, args.timeout)
        status.update("timing the CLI end to end...")
        result["cli"] = run_cli(path, args.cli_reps, args.blas_threads)
    result["audit_s"] = spread(w["audit_s"])
    result["stages"] = {name: spread(values) for name, values in w["stages_s"].items() if values}
    result["audit_cpu_s"] = spread(w["audit_cpu_s"])
    result["stages_cpu"] = {name: spread(values) for name, values in w["stages_cpu_s"].items() if values}
    result["meets_target"] = result["audit_s"]["median"] < TARGET_S
    return finish(result, started, render, args.json, console)


if __name__ == "__main__":
    main()
