#!/usr/bin/env python
"""Benchmark MSVP's training cost and the accuracy of its power iteration, in one run.

What it measures
----------------
1. **Training step time, MSVP / vanilla.** SpecFormer (Hu et al.) reports that its MSVP
   implementation makes a training step about 1.5x slower for standard training and 2.5x slower
   for adversarial training. MSVP as implemented here (``specformer_deploy.training.msvp``) costs, per
   step, one batched power-iteration update per layer (all heads of Q, K and V in one ``bmm``)
   plus a Rayleigh quotient ``u^T W v`` whose gradient joins the same backward pass; that cost
   does not grow with the batch or the number of PGD steps. The target displayed is a
   step-time ratio <= 1.03.

   Two copies of the same model with the same initial weights are trained on the same fixed
   batch on the same device: the *vanilla* step is ``SGD(zero_grad, CE(model(x), y).backward(),
   step)`` exactly as ``specformer_deploy.training.train`` does it; the *MSVP* step is the same step with
   ``msvp.penalty()`` (which updates the persistent vectors once) added to the loss before the one
   backward. For adversarial training (PGD-AT, Linf 8/255, step 2/255, ``--adv-steps`` steps,
   random start) both steps first generate the PGD examples in eval mode, as the training loop
   does. Repetitions are interleaved (each repetition runs one vanilla and one MSVP step, the
   order alternating between repetitions) so that slow drifts of the machine (thermal, other
   processes, allocator state) hit both alike; warm-up steps are excluded. Reported: median and
   minimum step times, the ratio of medians (the headline), the ratio of minima, and the median
   and quartiles of the per-repetition paired ratios (a noise indicator). The verdict against the
   target is 'met' or 'not met' only when the middle half of the paired ratios lies on one side
   of 1.03, else 'inconclusive' (the machine was too noisy to tell). The cost of
   ``msvp.penalty()`` plus its backward on its own is timed too: it is the fixed per-step
   overhead, so the ratio at another batch size can be judged from it.

   On CUDA the forward runs under bf16 autocast (as in training) and every timed step is
   bracketed by ``torch.cuda.synchronize()``.

2. **Power-iteration error against the exact SVD.** For every head's Q, K and V block of the
   same model's real weights, ``sigma_max`` is estimated as ``u^T W v`` after 1, 10 and 100
   power iterations (``power_iteration_``) started from random vectors (cold start), and
   compared with ``torch.linalg.matrix_norm(W, ord=2)`` in float64; the table gives the maximum
   and the median relative error over all heads, and the ratio sigma_2/sigma_1 that governs the
   convergence (error ~ (sigma_2/sigma_1)^(2k)). Randomly initialised weights have a small
   spectral gap, which makes this the hard case. Training does not restart from random vectors:
   the vectors persist across steps and take one iteration per step on slowly changing weights
   (warm start). That case is reported from the MSVP model copy after the timed training steps
   (its vectors as stored and after one more update, i.e. what the next penalty uses), and, with
   ``--run DIR``, on a trained run's weights with the persistent vectors saved by that run.

Examples::

    python tools/bench/msvp.py                 # paper ViT-S, CIFAR-sized input, CPU-friendly batch
    python tools/bench/msvp.py --quick         # the small 'specformer-tiny' model
    python tools/bench/msvp.py --quick --run runs/t4 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py: the benchmarks' shared helpers

from common import emit_json, load_average, machine, percentile, pixel_budget, set_torch_threads, timed_calls, versions

from specformer_deploy.attacks import pgd
from specformer_deploy.model.factory import build_model, resolve_model_config
from specformer_deploy.model.heads import attention_layers, layer_heads
from specformer_deploy.training.msvp import MSVP, MSVPConfig, power_iteration_, rayleigh_sigma

TARGET_RATIO = 1.03
PAPER_RATIO = {"standard": 1.5, "adversarial": 2.5}

# Defaults: the paper's CIFAR set-up (ViT-S, 32x32 images, 4x4 patches, 10 classes), with a batch
# and repetition counts that keep the whole run at about 2-3 minutes on 2 CPU cores.
DEFAULTS = dict(model="paper-vit-s", img_size=32, patch_size=4, batch_size=8, reps=12, adv_reps=4)
QUICK = dict(model="specformer-tiny", img_size=None, patch_size=None, batch_size=32, reps=40, adv_reps=15)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time a training step with MSVP against the same step without it (standard and PGD "
                    "adversarial training), and measure the power iteration's error against the exact SVD.",
        epilog="Defaults: --model paper-vit-s --img-size 32 --patch-size 4 --num-classes 10 --batch-size 8 "
               "--reps 12 --adv-reps 4; --quick: --model specformer-tiny (its preset size) --batch-size 32 "
               "--reps 40 --adv-reps 15. Explicit options win over both.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="use the small 'specformer-tiny' model and more repetitions")
    parser.add_argument("--model", default=None, help="preset or timm ViT name (default: paper-vit-s)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: 32; preset's with --quick)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch size (default: 4; preset's with --quick)")
    parser.add_argument("--num-classes", type=int, default=10, help="default: 10")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (32 with --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions for standard training, each one vanilla + one MSVP step "
                             "(default: 12; 40 with --quick)")
    parser.add_argument("--adv-reps", type=int, default=None,
                        help="timed repetitions for adversarial training (default: 4; 15 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up repetitions, standard (default: 2)")
    parser.add_argument("--adv-warmup", type=int, default=1,
                        help="untimed warm-up repetitions, adversarial (default: 1)")
    parser.add_argument("--adv-steps", type=int, default=10,
                        help="PGD steps per adversarial step; 0 skips PGD-AT (default: 10)")
    parser.add_argument("--adv-eps", type=pixel_budget, default=8 / 255,
                        help="Linf radius in pixels, e.g. 8/255 or 0.0314 (default: 8/255)")
    parser.add_argument("--adv-step-size", type=pixel_budget, default=2 / 255,
                        help="PGD step, e.g. 2/255 (default: 2/255)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="SGD learning rate of both copies, momentum 0.9 (default: 0.01)")
    parser.add_argument("--power-iters", default="1,10,100",
                        help="comma-separated cold-start power-iteration counts (default: 1,10,100)")
    parser.add_argument("--run", default=None,
                        help="also measure the power-iteration error on a trained run's weights and saved vectors")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when available (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write all numbers and the environment as JSON to PATH; with no PATH (or '-') "
                             "print the JSON on stdout and the tables on stderr")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    if args.model is None:
        args.model = base["model"]
        if args.img_size is None:
            args.img_size = base["img_size"]
        if args.patch_size is None:
            args.patch_size = base["patch_size"]
    for key in ("batch_size", "reps", "adv_reps"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    try:
        args.power_iters = sorted({int(s) for s in args.power_iters.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--power-iters must be comma-separated integers, got {args.power_iters!r}")
    if not args.power_iters or args.power_iters[0] < 1:
        parser.error("--power-iters needs integers >= 1")
    if args.batch_size < 1 or args.reps < 1 or args.adv_reps < 1 or args.warmup < 0 or args.adv_warmup < 0:
        parser.error("--batch-size, --reps and --adv-reps must be >= 1; warm-ups >= 0")
    if args.adv_steps < 0:
        parser.error("--adv-steps must be >= 0")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no usable CUDA device is present")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {**machine(), **versions("torch", "timm"), "device": str(device),
                           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
        env["autocast"] = "bfloat16"
    else:
        env["autocast"] = None
    return env


# --------------------------------------------------------------------------------------------
# 1. step time
# --------------------------------------------------------------------------------------------

class Trainer:
    """One model copy with its optimizer (and MSVP when given); ``step`` is one training step."""

    def __init__(self, model: nn.Module, msvp: MSVP | None, lr: float, device: torch.device) -> None:
        self.model, self.msvp, self.device = model, msvp, device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self._loss = torch.tensor(float("nan"))

    def step(self, x: torch.Tensor, y: torch.Tensor, adv: dict[str, float] | None) -> None:
        model = self.model
        if adv is not None:
            model.eval()
            with autocast(self.device):
                x = pgd(model, x, y, adv["eps"], adv["step_size"], int(adv["steps"]))
            model.train()
        with autocast(self.device):
            loss = F.cross_entropy(model(x), y)
        total = loss + self.msvp.penalty() if self.msvp is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self._loss = loss

    def loss(self) -> float:
        return float(self._loss.detach())


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one call, GPU work included."""
    return timed_calls(fn, 1, lambda: sync(device))[0]


def compare(vanilla: Trainer, msvp: Trainer, x: torch.Tensor, y: torch.Tensor, adv: dict[str, float] | None,
            warmup: int, reps: int, device: torch.device) -> dict[str, Any]:
    """Interleaved repetitions of one vanilla and one MSVP step (order alternating)."""
    times: dict[str, list[float]] = {"vanilla": [], "msvp": []}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            order = [("vanilla", vanilla), ("msvp", msvp)]
            if rep % 2:
                order.reverse()
            for name, trainer in order:
                seconds = timed(lambda t=trainer: t.step(x, y, adv), device)
                if rep >= warmup:
                    times[name].append(seconds)
    finally:
        if gc_was_enabled:
            gc.enable()
    tv, tm = times["vanilla"], times["msvp"]
    paired = [m / v for v, m in zip(tv, tm)]
    med_v, med_m = statistics.median(tv), statistics.median(tm)
    ratio = med_m / med_v
    result = {
        "warmup_reps": warmup, "timed_reps": reps,
        "vanilla_s": tv, "msvp_s": tm,
        "vanilla_median_s": med_v, "msvp_median_s": med_m,
        "vanilla_min_s": min(tv), "msvp_min_s": min(tm),
        "ratio_of_medians": ratio, "ratio_of_minima": min(tm) / min(tv),
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_p25": percentile(paired, 0.25), "paired_ratio_p75": percentile(paired, 0.75),
        "meets_target": ratio <= TARGET_RATIO,
        # Only a verdict when the middle half of the paired ratios lies on one side of the target.
        "verdict": ("met" if percentile(paired, 0.75) <= TARGET_RATIO else
                    "not met" if percentile(paired, 0.25) > TARGET_RATIO else "inconclusive"),
        "vanilla_spread": percentile(tv, 0.9) / percentile(tv, 0.1),
        "msvp_spread": percentile(tm, 0.9) / percentile(tm, 0.1),
        "final_loss_vanilla": vanilla.loss(), "final_loss_msvp": msvp.loss(),
    }
    return result


def penalty_cost(msvp: MSVP, model: nn.Module, reps: int, device: torch.device) -> dict[str, Any]:
    """``msvp.penalty()`` (one power-iteration update) plus its backward, on its own."""
    saved = {k: v.clone() for k, v in msvp.state_dict().items()}

    def once() -> None:
        grads = torch.autograd.grad(msvp.penalty(), [p for p in model.parameters() if p.requires_grad],
                                    allow_unused=True)
        del grads

    for _ in range(3):
        once()
    times = [timed(once, device) for _ in range(reps)]
    msvp.load_state_dict(saved)  # leave the persistent vectors as the training steps left them
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


# --------------------------------------------------------------------------------------------
# 2. power-iteration error
# --------------------------------------------------------------------------------------------

def qkv_blocks(model: nn.Module) -> torch.Tensor:
    """All heads' Q/K/V blocks as one float32 batch ``[layers * 3 * heads, D_h, d]`` (detached)."""
    blocks = []
    for attn in attention_layers(model):
        w = layer_heads(attn).qkv.detach().float()
        blocks.append(w.reshape(-1, w.shape[-2], w.shape[-1]))
    shapes = {tuple(b.shape[1:]) for b in blocks}
    if len(shapes) != 1:
        raise SystemExit(f"attention layers with different head shapes {shapes} are not supported here")
    return torch.cat(blocks)


def error_stats(estimate: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    rel = ((exact.double() - estimate.double()).abs() / exact.double()).cpu()
    return {"max_rel_err": float(rel.max()), "median_rel_err": float(rel.median()), "mean_rel_err": float(rel.mean())}


def exact_norms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma_1 (matrix_norm ord=2, float64) and sigma_2/sigma_1 per matrix."""
    w64 = w.double()
    sigma1 = torch.linalg.matrix_norm(w64, ord=2)
    sv = torch.linalg.svdvals(w64)
    gap = sv[:, 1] / sv[:, 0] if sv.shape[1] > 1 else torch.zeros_like(sigma1)
    return sigma1, gap


def cold_start(w: torch.Tensor, exact: torch.Tensor, iterations: list[int], seed: int) -> list[dict[str, Any]]:
    """Error after each count of iterations, from one random start (counts are cumulative)."""
    gen = torch.Generator().manual_seed(seed)
    batch, m, n = w.shape
    u = F.normalize(torch.randn(batch, m, generator=gen).to(w), dim=-1)
    v = F.normalize(torch.randn(batch, n, generator=gen).to(w), dim=-1)
    rows, done = [], 0
    for k in iterations:
        power_iteration_(w, u, v, k - done)
        done = k
        sigma = rayleigh_sigma(w, u, v)
        rows.append({"iterations": k, **error_stats(sigma, exact)})
    return rows


def persistent(msvp: MSVP, model: nn.Module) -> dict[str, Any]:
    """Error of MSVP's persistent vectors as stored, and after one more update (the next penalty's)."""
    w = qkv_blocks(model)
    exact, _ = exact_norms(w)
    saved = {k: v.clone() for k, v in msvp.state_dict().items()}
    with torch.no_grad():
        stored = msvp.sigmas(update=False).reshape(-1)
        updated = msvp.sigmas(update=True).reshape(-1)
    msvp.load_state_dict(saved)
    return {"stored": error_stats(stored, exact), "plus_one_iteration": error_stats(updated, exact)}


def power_section(model: nn.Module, iterations: list[int], seed: int) -> dict[str, Any]:
    w = qkv_blocks(model)
    exact, gap = exact_norms(w)
    return {
        "matrices": int(w.shape[0]), "matrix_shape": list(w.shape[1:]),
        "sigma_max": {"max": float(exact.max()), "median": float(exact.median())},
        "sigma2_over_sigma1": {"max": float(gap.max()), "median": float(gap.median())},
        "cold_start": cold_start(w, exact, iterations, seed),
    }


def trained_run_section(run_dir: str, iterations: list[int], seed: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    from specformer_deploy.training.train import load_run_model

    model, config = load_run_model(run_dir, "cpu")
    out = power_section(model, iterations, seed)
    out.update({"run": str(run_dir), "model": config["model"]["name"],
                "epochs": config["train"].get("epochs"), "msvp": config["train"].get("msvp")})
    vectors_path = Path(run_dir) / "msvp_vectors.safetensors"
    if vectors_path.is_file():
        train_cfg = config["train"]
        msvp = MSVP(model, MSVPConfig(n_power_iterations=int(train_cfg.get("n_power_iterations", 1))),
                    init_iterations=1)
        msvp.load_state_dict(load_file(str(vectors_path)))
        out["persistent"] = persistent(msvp, model)
    else:
        out["persistent"] = None
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def render(result: dict[str, Any], console) -> None:
    from rich.table import Table

    cfg, env = result["config"], result["environment"]
    where = env.get("gpu") or f"CPU ({env['torch_threads']} threads, {env['cpu_count']} cores)"
    console.print(f"[bold]MSVP benchmark[/bold]  model {cfg['model']} ({cfg['params_m']:.2f}M params, img "
                  f"{cfg['img_size']}, {cfg['attention_layers']} attention layers x {cfg['heads']} heads), "
                  f"batch {cfg['batch_size']}, device {env['device']} = {where}, torch {env['torch']}"
                  + (", bf16 autocast" if env.get("autocast") else ""))

    table = Table(title=f"Training step time, MSVP / vanilla (target <= {TARGET_RATIO})", show_lines=False)
    for col, just in [("training", "left"), ("warm-up+timed", "right"), ("vanilla median", "right"),
                      ("MSVP median", "right"), ("ratio of medians", "right"), ("ratio of minima", "right"),
                      ("paired ratio median [IQR]", "right"), ("<= 1.03? (IQR)", "center"), ("paper", "right")]:
        table.add_column(col, justify=just)
    for mode, label in [("standard", "standard"), ("adversarial", "PGD-AT")]:
        t = result["timing"].get(mode)
        if t is None:
            table.add_row(label, "-", "skipped", "", "", "", "", "", f"{PAPER_RATIO[mode]}x")
            continue
        if mode == "adversarial":
            label = f"PGD-AT ({t['pgd_steps']} steps)"
        verdict = {"met": "[green]met[/green]", "not met": "[red]not met[/red]",
                   "inconclusive": "[yellow]inconclusive[/yellow]"}[t["verdict"]]
        table.add_row(label, f"{t['warmup_reps']}+{t['timed_reps']}", f"{t['vanilla_median_s'] * 1e3:.1f} ms",
                      f"{t['msvp_median_s'] * 1e3:.1f} ms", f"[bold]{t['ratio_of_medians']:.4f}[/bold]",
                      f"{t['ratio_of_minima']:.4f}",
                      f"{t['paired_ratio_median']:.4f} [{t['paired_ratio_p25']:.3f}, {t['paired_ratio_p75']:.3f}]",
                      verdict, f"{PAPER_RATIO[mode]}x")
    console.print(table)
    for mode in ("standard", "adversarial"):
        t = result["timing"].get(mode)
        if t and t["vanilla_spread"] > 1.25:
            console.print(f"[yellow]warning: {mode} vanilla step times vary a lot (p90/p10 = "
                          f"{t['vanilla_spread']:.2f}), so the ratios are noisy: trust the paired-ratio IQR, "
                          f"rerun with more repetitions"
                          + (" (on a small shared VM, --threads 1 can be steadier)" if env["device"] == "cpu" else "")
                          + "[/yellow]")
    pc = result["timing"]["penalty_only"]
    std = result["timing"]["standard"]
    console.print(f"msvp.penalty() + its backward alone (the fixed per-step overhead): median "
                  f"{pc['median_s'] * 1e3:.2f} ms, min {pc['min_s'] * 1e3:.2f} ms = "
                  f"{pc['median_s'] / std['vanilla_median_s'] * 100:.2f}% of the vanilla standard step at batch "
                  f"{cfg['batch_size']}")

    def power_table(title: str, sec: dict[str, Any]) -> Table:
        tab = Table(title=title)
        for col in ("estimate", "max rel. error", "median rel. error"):
            tab.add_column(col, justify="left" if col == "estimate" else "right")
        for row in sec["cold_start"]:
            tab.add_row(f"cold start, {row['iterations']} iteration{'s' if row['iterations'] > 1 else ''}",
                        f"{row['max_rel_err']:.2e}", f"{row['median_rel_err']:.2e}")
        pers = sec.get("persistent")
        if pers:
            note = pers.get("note", "")
            tab.add_row(f"persistent vectors, as stored{note}", f"{pers['stored']['max_rel_err']:.2e}",
                        f"{pers['stored']['median_rel_err']:.2e}")
            tab.add_row(f"persistent vectors + 1 iteration{note}", f"{pers['plus_one_iteration']['max_rel_err']:.2e}",
                        f"{pers['plus_one_iteration']['median_rel_err']:.2e}")
        return tab

    pw = result["power_iteration"]["model_weights"]
    console.print(power_table(
        f"Power iteration vs exact SVD: {pw['matrices']} Q/K/V head blocks {tuple(pw['matrix_shape'])} of the "
        f"benchmark model", pw))
    console.print(f"  sigma_2/sigma_1: median {pw['sigma2_over_sigma1']['median']:.3f}, max "
                  f"{pw['sigma2_over_sigma1']['max']:.3f} (cold-start error shrinks like ratio^(2k)); "
                  f"weights: {pw['weights']}")
    tr = result["power_iteration"].get("trained_run")
    if tr:
        console.print(power_table(f"Power iteration vs exact SVD: trained run {tr['run']} ({tr['model']}, "
                                  f"{tr['epochs']} epochs, {tr['matrices']} blocks)", tr))
        console.print(f"  sigma_2/sigma_1: median {tr['sigma2_over_sigma1']['median']:.3f}, max "
                      f"{tr['sigma2_over_sigma1']['max']:.3f}")
    console.print(f"total wall time {result['wall_time_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from rich.console import Console

    json_to_stdout = args.json == "-"
    console = Console(stderr=json_to_stdout)
    if not console.is_terminal and console.width < 132:  # keep the tables readable in logs
        console = Console(stderr=json_to_stdout, width=132)
    started = time.perf_counter()
    set_torch_threads(args.threads)
    device = resolve_device(args.device)

    torch.manual_seed(args.seed)
    model_cfg = resolve_model_config(args.model, args.num_classes, args.img_size, args.patch_size)
    base = build_model(model_cfg)
    vanilla_model = copy.deepcopy(base).to(device).train()
    msvp_model = copy.deepcopy(base).to(device).train()
    del base
    msvp = MSVP(msvp_model, MSVPConfig(), generator=torch.Generator().manual_seed(args.seed)).to(device).train()
    vanilla = Trainer(vanilla_model, None, args.lr, device)
    with_msvp = Trainer(msvp_model, msvp, args.lr, device)

    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.batch_size, 3, model_cfg.img_size, model_cfg.img_size, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)

    first = next(iter(attention_layers(vanilla_model)))
    result: dict[str, Any] = {
        "config": {
            "model": args.model, "model_config": model_cfg.to_dict(), "img_size": model_cfg.img_size,
            "params_m": sum(p.numel() for p in vanilla_model.parameters()) / 1e6,
            "attention_layers": msvp.num_layers, "heads": layer_heads(first).num_heads,
            "batch_size": args.batch_size, "lr": args.lr, "optimizer": "SGD(momentum=0.9, weight_decay=1e-4)",
            "msvp": {"lambda_q": msvp.config.lambda_q, "lambda_k": msvp.config.lambda_k,
                     "lambda_v": msvp.config.lambda_v, "n_power_iterations": msvp.config.n_power_iterations},
            "adversarial": {"eps": args.adv_eps, "step_size": args.adv_step_size, "steps": args.adv_steps},
            "quick": args.quick, "seed": args.seed, "power_iters": args.power_iters,
        },
        "environment": environment(device),
        "target": {"ratio_at_most": TARGET_RATIO, "paper_ratio": PAPER_RATIO},
        "timing": {},
        "load_average_1m": {"before": load_average()},
    }

    status = console.status("timing standard training steps...")
    with status:
        result["timing"]["standard"] = compare(vanilla, with_msvp, x, y, None, args.warmup, args.reps, device)
        if args.adv_steps > 0:
            status.update(f"timing PGD-AT steps ({args.adv_steps} PGD steps)...")
            adv = {"eps": args.adv_eps, "step_size": args.adv_step_size, "steps": args.adv_steps}
            t = compare(vanilla, with_msvp, x, y, adv, args.adv_warmup, args.adv_reps, device)
            t["pgd_steps"] = args.adv_steps
            result["timing"]["adversarial"] = t
        else:
            result["timing"]["adversarial"] = None
        status.update("timing the penalty alone...")
        result["timing"]["penalty_only"] = penalty_cost(msvp, msvp_model, max(args.reps, 10), device)

        status.update("power iteration vs SVD...")
        msvp_model.cpu()
        msvp.cpu()
        steps_taken = (args.warmup + args.reps
                       + ((args.adv_warmup + args.adv_reps) if args.adv_steps > 0 else 0))
        section = power_section(msvp_model, args.power_iters, args.seed + 2)
        section["persistent"] = persistent(msvp, msvp_model)
        section["persistent"]["training_steps_taken"] = steps_taken
        section["persistent"]["note"] = (f" (15 init + {steps_taken} step updates)")
        section["weights"] = f"benchmark model after {steps_taken} SGD steps (lr {args.lr}) from random init"
        result["power_iteration"] = {"model_weights": section, "trained_run": None}
        if args.run:
            status.update(f"power iteration on {args.run}...")
            result["power_iteration"]["trained_run"] = trained_run_section(args.run, args.power_iters, args.seed + 3)

    losses = [result["timing"][m][k] for m in ("standard", "adversarial") if result["timing"][m]
              for k in ("final_loss_vanilla", "final_loss_msvp")]
    result["finite_losses"] = all(math.isfinite(v) for v in losses)
    result["load_average_1m"]["after"] = load_average()
    result["wall_time_s"] = time.perf_counter() - started
    render(result, console)
    if not result["finite_losses"]:
        console.print("[yellow]warning: a training loss became non-finite; timings may not be representative "
                      "(lower --lr)[/yellow]")
    emit_json(result, args.json, console)
    return result


if __name__ == "__main__":
    main()
