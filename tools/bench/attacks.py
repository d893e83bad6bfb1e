#!/usr/bin/env python
"""Benchmark PGD throughput: ``specformer_deploy.attacks.pgd`` against ``torchattacks.PGD``, in one run.

What it measures
----------------
Images per second of a full Linf PGD attack (``--steps`` forward+backward passes per image) on
the *same* model, the *same* input batch and the *same* budget (eps, step size alpha, steps):

- **ours**: ``pgd(model, x, y, eps, alpha, steps, norm="linf", random_start=...)``.
- **torchattacks**: ``torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=...)(x, y)``.

Why: evaluation and PGD adversarial training spend nearly all their time in this loop, and we
keep our own implementation (restarts, L2, CW loss, no global RNG seeding). It should not be
slower than the reference library. The target displayed is ours/torchattacks >= 1.0 (ratio of
median throughputs).

The model is built with random weights (throughput does not depend on their values) and put in
eval mode; pixels are uniform in [0, 1] and labels uniform over the classes, from ``--seed``. By
default both attacks start from the clean image (``random_start=False``), so their outputs can be
compared: the largest pixel difference and the share of equal pixels are reported as a check that
the same attack is timed (they differ only where a gradient is ~0, since torchattacks
differentiates the batch-mean loss and we the sum). ``--random-start`` times the usual variant.

How it is timed: ``torch.set_num_threads(--threads)`` (default: all CPUs this process may use).
After untimed warm-up calls, each repetition times one block of calls of each implementation on
the same input, the order alternating between repetitions, so slow drifts of the machine (other
processes, thermal, allocator state) hit both alike. A block holds enough calls to last at least
``--min-block-s``. Reported: median and best images/s of each, the ratio of the medians (the
headline), the median/min/max of the per-repetition paired ratios (a noise indicator), the
ratio of median throughputs counted in this process's CPU time instead of wall time (on a shared
machine it leaves out the time spent waiting for a core; with several threads it includes
their spinning), and the 1-minute load average before and after (on a shared machine it says whether other work
competed for the cores). On CUDA each block ends with a synchronize.

Examples::

    python tools/bench/attacks.py                            # specformer-tiny, batch 128, 10 steps
    python tools/bench/attacks.py --threads 1 --reps 20
    python tools/bench/attacks.py --model deit_tiny_patch16_224 --batch 32 --reps 5
    python tools/bench/attacks.py --json bench_attacks.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py: the benchmarks' shared helpers

from common import finish, load_average, machine, pixel_budget, spread, timed_calls, usable_cpus, versions

from specformer_deploy.attacks import format_eps, pgd
from specformer_deploy.model.factory import build_model, resolve_model_config

TARGET_RATIO = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput (images/s) of specformer_deploy.attacks.pgd against torchattacks.PGD on "
                    "the same model, inputs and budget (Linf eps, step size, steps), interleaved repetitions.",
        epilog="Target displayed: ours/torchattacks >= 1.0 (ratio of median throughputs). Weights are random.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="specformer-tiny", help="preset or timm ViT name")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="images per attack call")
    parser.add_argument("--eps", type=pixel_budget, default=8 / 255, help="Linf radius, e.g. 8/255 or 0.0314")
    parser.add_argument("--alpha", type=pixel_budget, default=2 / 255, help="step size, e.g. 2/255")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--random-start", action="store_true",
                        help="both start from a uniform random point in the ball (outputs then differ)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (each: one block of each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls of each")
    parser.add_argument("--min-block-s", type=float, default=0.5,
                        help="each timed block repeats the call enough times to last at least this long")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="torch intra-op threads (default: all usable CPUs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write all numbers and the environment as JSON to PATH; with no PATH (or '-') print "
                             "the JSON on stdout and the table on stderr")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.reps < 1 or args.threads < 1 or args.num_classes < 2:
        parser.error("--batch, --steps, --reps and --threads must be >= 1, --num-classes >= 2")
    if args.warmup < 0 or args.min_block_s < 0:
        parser.error("--warmup and --min-block-s must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {**machine(), **versions("torch", "torchattacks", "timm"),
                           "threads": torch.get_num_threads(), "device": args.device}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def block(fn: Callable[[], Any], calls: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``calls`` calls, GPU work included."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return timed_calls(fn, calls, sync)


def run(args: argparse.Namespace, status) -> dict[str, Any]:
    import torchattacks

    device = torch.device(args.device)
    cfg = resolve_model_config(args.model, args.num_classes)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    theirs_attack = torchattacks.PGD(model, eps=args.eps, alpha=args.alpha, steps=args.steps,
                                     random_start=args.random_start)
    pgd_gen = torch.Generator(device=device).manual_seed(args.seed + 2)

    def ours() -> torch.Tensor:
        return pgd(model, x, y, args.eps, args.alpha, args.steps, norm="linf", random_start=args.random_start,
                   generator=pgd_gen)

    def theirs() -> torch.Tensor:
        return theirs_attack(x, y)

    fns = {"ours": ours, "torchattacks": theirs}
    status.update("checking that both compute the same attack...")
    adv_ours, adv_theirs = ours(), theirs()
    diff = (adv_ours - adv_theirs).abs()
    with torch.no_grad():
        fooled = {name: float((model(adv).argmax(1) != y).float().mean()) for name, adv in
                  (("ours", adv_ours), ("torchattacks", adv_theirs))}
    check = {"max_abs_pixel_diff": float(diff.max()), "share_equal_pixels": float((diff <= 1e-6).float().mean()),
             "max_linf_ours": float((adv_ours - x).abs().max()),
             "max_linf_torchattacks": float((adv_theirs - x).abs().max()),
             "fooled_share": fooled, "comparable": not args.random_start}
    status.update(f"warming up ({args.warmup} calls each)...")
    single: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(args.warmup, 1)):
        for name, fn in fns.items():
            single[name].append(block(fn, 1, device)[0])
    calls = {name: max(1, math.ceil(args.min_block_s / max(min(ts), 1e-9))) for name, ts in single.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.reps):
        status.update(f"repetition {rep + 1}/{args.reps} (interleaved)...")
        order = ("ours", "torchattacks") if rep % 2 == 0 else ("torchattacks", "ours")
        for name in order:
            wall, cpu = block(fns[name], calls[name], device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    rate = {name: [calls[name] * args.batch / t for t in ts] for name, ts in times.items()}
    paired = [o / t for o, t in zip(rate["ours"], rate["torchattacks"])]
    cpu_rate = {name: [calls[name] * args.batch / max(t, 1e-9) for t in ts] for name, ts in cpu_times.items()}
    out: dict[str, Any] = {"model": args.model, "model_config": cfg.to_dict(), "img_size": cfg.img_size,
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "check": check}
    for name in fns:
        out[name] = {"images_per_s_median": statistics.median(rate[name]), "images_per_s_best": max(rate[name]),
                     "s_per_call_median": statistics.median(times[name]) / calls[name],
                     "calls_per_block": calls[name], "block_s": times[name], "block_cpu_s": cpu_times[name],
                     "images_per_cpu_s_median": statistics.median(cpu_rate[name])}
    out["ratio_of_medians"] = out["ours"]["images_per_s_median"] / out["torchattacks"]["images_per_s_median"]
    out["ratio_of_best"] = out["ours"]["images_per_s_best"] / out["torchattacks"]["images_per_s_best"]
    out["paired_ratio"] = spread(paired)
    # CPU time of this process: on a shared machine it leaves out the time spent waiting for a core.
    out["cpu_time_ratio_of_medians"] = (out["ours"]["images_per_cpu_s_median"]
                                        / out["torchattacks"]["images_per_cpu_s_median"])
    out["meets_target"] = out["ratio_of_medians"] >= TARGET_RATIO
    return out


def render(result: dict[str, Any], console) -> None:
    from rich.table import Table

    cfg, env, row = result["config"], result["environment"], result["result"]
    title = (f"Linf PGD throughput, ours / torchattacks (target >= {TARGET_RATIO}): eps {format_eps(cfg['eps'])}, "
             f"alpha {format_eps(cfg['alpha'])}, {cfg['steps']} steps, random start {cfg['random_start']}")
    table = Table(title=title)
    for column, justify in [("model", "left"), ("batch", "right"), ("ours img/s\nmedian (best)", "right"),
                            ("torchattacks img/s\nmedian (best)", "right"), ("ours s/call", "right"),
                            ("torchattacks s/call", "right"), ("ours/torchattacks\n(medians)", "right"),
                            ("paired ratio\nmedian [min, max]", "right"), ("CPU-time\nratio", "right"),
                            ("target", "center"), ("calls x reps", "right")]:
        table.add_column(column, justify=justify)
    pr = row["paired_ratio"]
    table.add_row(
        row["model"], str(cfg["batch"]),
        f"{row['ours']['images_per_s_median']:.1f} ({row['ours']['images_per_s_best']:.1f})",
        f"{row['torchattacks']['images_per_s_median']:.1f} ({row['torchattacks']['images_per_s_best']:.1f})",
        f"{row['ours']['s_per_call_median']:.3f}", f"{row['torchattacks']['s_per_call_median']:.3f}",
        f"[bold]{row['ratio_of_medians']:.3f}x[/]", f"{pr['median']:.3f} [{pr['min']:.3f}, {pr['max']:.3f}]",
        f"{row['cpu_time_ratio_of_medians']:.3f}x", "[green]met[/]" if row["meets_target"] else "[red]missed[/]",
        f"{row['ours']['calls_per_block']}/{row['torchattacks']['calls_per_block']} x {cfg['reps']}")
    console.print(table)
    check = row["check"]
    same = (f"outputs: {100 * check['share_equal_pixels']:.3f}% of pixels equal (<= 1e-6), max |diff| "
            f"{check['max_abs_pixel_diff']:.2e}" if check["comparable"] else "outputs not compared (random starts)")
    fooled = check["fooled_share"]
    console.print(f"{row['model']}: {row['params_m']:.2f} M params, {row['img_size']} px; {same}; fooled: ours "
                  f"{100 * fooled['ours']:.1f}%, torchattacks {100 * fooled['torchattacks']:.1f}%")
    load = result["load_average_1m"]
    console.print(f"device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}; threads {env['threads']} "
                  f"of {env.get('cpu_affinity', env['cpu_count'])} usable CPUs; torch {env['torch']}, torchattacks "
                  f"{env['torchattacks']}; 1-min load average {load['before']} before, {load['after']} after; wall "
                  f"time {result['wall_time_s']:.1f} s")
    busy = [v for v in load.values() if v is not None and v > env["threads"] + 0.5]
    if busy and env["device"] == "cpu":
        console.print(f"[yellow]the load average ({max(busy):.1f}) exceeded the {env['threads']} threads used: other "
                      "processes competed for the cores; the interleaving spreads that over both, but absolute "
                      "figures are not those of an idle machine[/]")
    if check["comparable"] and check["share_equal_pixels"] < 0.999:
        console.print("[red]the two attacks' outputs differ on more than 0.1% of pixels: not like for like[/]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from rich.console import Console

    json_to_stdout = args.json == "-"
    console = Console(stderr=json_to_stdout)
    console = Console(stderr=json_to_stdout, width=max(170, console.width))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "config": {"model": args.model, "num_classes": args.num_classes, "batch": args.batch, "eps": args.eps,
                   "alpha": args.alpha, "steps": args.steps, "random_start": args.random_start, "reps": args.reps,
                   "warmup": args.warmup, "min_block_s": args.min_block_s, "threads": args.threads,
                   "device": args.device, "seed": args.seed, "weights": "random init", "model_mode": "eval",
                   "ours": "specformer_deploy.attacks.pgd(norm='linf')", "torchattacks": "torchattacks.PGD"},
        "environment": environment(args),
        "target": {"ratio_at_least": TARGET_RATIO},
        "load_average_1m": {"before": load_average()},
    }
    with console.status("starting...") as status:
        result["result"] = run(args, status)
    return finish(result, started, render, args.json, console)


if __name__ == "__main__":
    main()
