#!/usr/bin/env python
"""Benchmark data-parallel training: throughput of N torchrun processes against 1, in one run.

Each configuration is a real ``torchrun --standalone --nproc-per-node P -m specformer_deploy
train`` run with the same global batch, model and data (the built-in digits unless told
otherwise), so the numbers include everything a user pays: DistributedSampler, DDP's gradient
all-reduce (gloo on CPU, nccl on GPUs) and the MSVP penalty. The per-epoch evaluation is
left out (each epoch's ``time_s`` in metrics.jsonl covers the training steps only). The first
epoch (start-up, torch.compile's compilation) is dropped; the figure is the median images/s of
the remaining epochs. Configurations are repeated in alternation (``--rounds``) so that a
machine's slow drifts hit all of them alike; the headline is the ratio of the medians to the
1-process figure.

On a CPU the processes share the machine's cores (torchrun sets one thread per process), so
the ratio says what DDP costs or gains on that machine, not what N machines would give. On a
GPU host pass ``--device cuda`` and ``--nproc`` up to the number of GPUs.

    python tools/bench/ddp.py --nproc 1 2                 # CPU, gloo
    python tools/bench/ddp.py --nproc 1 2 --compile       # also torch.compile'd variants
    python tools/bench/ddp.py --device cuda --nproc 1 8 --model paper-vit-s --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, load_average, machine, usable_cpus


def run_once(nproc: int, compile_model: bool, args: argparse.Namespace, root: Path, tag: str) -> dict:
    """One torchrun run; returns its steady-state throughput and the wall time it took."""
    out = root / tag
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "specformer_deploy", "train", "--model", args.model, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(out)]
    if args.img_size:
        command += ["--img-size", str(args.img_size)]
    if args.patch_size:
        command += ["--patch-size", str(args.patch_size)]
    if args.adversarial:
        command += ["--adversarial", "--adv-steps", str(args.adv_steps)]
    if compile_model:
        command.append("--compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[1:] or metrics
    steps = metrics[0]["step"]
    rates = [steps * args.batch_size / m["time_s"] for m in steady]
    return {"images_per_s": statistics.median(rates), "first_epoch_s": metrics[0]["time_s"], "wall_s": wall,
            "final_loss": metrics[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="Process counts to compare (1 first).")
    parser.add_argument("--compile", action="store_true", help="Also run each process count with --compile.")
    parser.add_argument("--model", default="specformer-tiny")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64, help="Global batch (divisible by every --nproc x 2).")
    parser.add_argument("--epochs", type=int, default=4, help="Epochs per run; the first is dropped.")
    parser.add_argument("--adversarial", action="store_true", help="PGD adversarial training.")
    parser.add_argument("--adv-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process).")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="CPU threads shared by the processes of one run (OMP_NUM_THREADS = threads / nproc).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating repetitions of every configuration.")
    parser.add_argument("--json", dest="json_target", default=None, help="Write the result as JSON ('-': stdout).")
    args = parser.parse_args()
    console = Console(stderr=True)

    configs = [(n, c) for n in args.nproc for c in ([False, True] if args.compile else [False])]
    samples: dict[tuple[int, bool], list[dict]] = {config: [] for config in configs}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = configs if round_index % 2 == 0 else configs[::-1]
            for nproc, compile_model in order:
                tag = f"n{nproc}{'c' if compile_model else ''}r{round_index}"
                sample = run_once(nproc, compile_model, args, Path(tmp), tag)
                samples[(nproc, compile_model)].append(sample)
                console.print(f"round {round_index + 1}/{args.rounds}: {nproc} process(es)"
                              f"{' compiled' if compile_model else ''}: {sample['images_per_s']:.0f} images/s")

    baseline = statistics.median(s["images_per_s"] for s in samples[(args.nproc[0], False)])
    table = Table(title=f"DDP throughput, {args.model}, global batch {args.batch_size}, {args.device}")
    for column in ("processes", "compile", "images/s (median)", f"vs {args.nproc[0]} process", "first epoch s",
                   "final loss"):
        table.add_column(column)
    rows = []
    for (nproc, compile_model), runs in samples.items():
        rate = statistics.median(s["images_per_s"] for s in runs)
        row = {"nproc": nproc, "compile": compile_model, "images_per_s": rate, "ratio": rate / baseline,
               "first_epoch_s": statistics.median(s["first_epoch_s"] for s in runs),
               "final_loss": runs[-1]["final_loss"], "samples": runs}
        rows.append(row)
        table.add_row(str(nproc), "yes" if compile_model else "no", f"{rate:.0f}", f"{rate / baseline:.2f}x",
                      f"{row['first_epoch_s']:.1f}", f"{row['final_loss']:.4f}")
    console.print(table)
    console.print(f"load average: {load_before} before, {load_average()} after (a shared machine makes these noisy)")
    emit_json({"benchmark": "ddp", "device": args.device, "model": args.model, "batch_size": args.batch_size,
               "epochs": args.epochs, "threads": args.threads, "rounds": args.rounds, "rows": rows,
               "load_average": [load_before, load_average()], "environment": machine()}, args.json_target, console)


if __name__ == "__main__":
    main()
