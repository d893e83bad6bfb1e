"""Reproduce the SpecFormer paper's comparisons on any dataset the toolkit can read.

Trains vanilla, MSVP and the three Lipschitz baselines (L2-MHA, LipschitzNorm, LipsFormer-SCSA)
with the same budget and seed, standard and (optionally) PGD adversarial training, evaluates
them with the paper's two protocols, and writes into ``--out``:

- ``results.md``: Table 1/2 layout (accuracy under each protocol's attacks), Table 3 layout
  (training time per step relative to vanilla), Table 5 layout (MSVP lambda sweep);
- ``fig2a.png``: max singular value per layer of W_Q, W_K, W_V (vanilla vs MSVP and baselines);
- ``results.json``: every number, with the commands' options.

Runs already present in ``--out`` are reused (delete them to retrain).

    python tools/reproduce.py --out runs/reproduce-digits                     # built-in digits
    python tools/reproduce.py --dataset cifar10 --data-dir DATA --model paper-vit-s \\
        --img-size 32 --patch-size 4 --epochs 100 --adv-epochs 50 --out runs/reproduce-cifar10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from specformer_deploy.artifact.plots import plot_sigma_per_layer
from specformer_deploy.robustness.evaluate import PROTOCOLS, evaluate_model, load_attack_model
from specformer_deploy.training.checkpoint import read_metrics
from specformer_deploy.training.msvp import exact_spectral_norms
from specformer_deploy.training.train import TrainConfig, load_run_model, train

# name -> TrainConfig overrides
MODELS: dict[str, dict[str, Any]] = {
    "Vanilla": {"msvp": False},
    "MSVP (ours)": {"msvp": True},
    "L2-MHA": {"msvp": False, "attention": "l2"},
    "LNFormer (LipschitzNorm)": {"msvp": False, "attention": "lipnorm"},
    "LipsFormer (SCSA)": {"msvp": False, "attention": "scsa"},
}
LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _run(out: Path, name: str, cfg: TrainConfig) -> Path:
    run = out / name
    if (run / "checkpoint.pt").is_file() and len(read_metrics(run / "metrics.jsonl")) >= cfg.epochs:
        print(f"reusing {run}", file=sys.stderr)
        return run
    if run.exists():
        return _resume(run, cfg)
    print(f"training {run}", file=sys.stderr)
    train(cfg, run, show_progress=False)
    return run


def _resume(run: Path, cfg: TrainConfig) -> Path:
    print(f"resuming {run}", file=sys.stderr)
    train(cfg, run, resume=True, show_progress=False)
    return run


def _step_time(run: Path) -> float:
    """Median over epochs of training seconds per optimizer step."""
    metrics = read_metrics(run / "metrics.jsonl")
    steps = [m["step"] - (metrics[i - 1]["step"] if i else 0) for i, m in enumerate(metrics)]
    return statistics.median(m["time_s"] / s for m, s in zip(metrics, steps))


def _evaluate(run: Path, protocol: str, limit: int | None) -> dict[str, float]:
    model, info = load_attack_model(run)
    result = evaluate_model(model, info, PROTOCOLS[protocol], limit=limit)
    return {k: v for k, v in result.items() if k != "details"}


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce-digits"))
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="specformer-tiny")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=50, help="standard-training epochs (every model alike)")
    parser.add_argument("--adv-epochs", type=int, default=15, help="adversarial-training epochs; 0 skips Table 2")
    parser.add_argument("--adv-steps", type=int, default=5, help="PGD steps of adversarial training")
    parser.add_argument("--adv-from-scratch", action="store_true",
                        help="adversarial training from random init (default: fine-tune the standard-trained model)")
    parser.add_argument("--adv-lr", type=float, default=0.01, help="learning rate of adversarial fine-tuning")
    parser.add_argument("--lambda-msvp", type=float, default=1e-3, help="lambda_q = lambda_k = lambda_v for MSVP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="test images per evaluation (default: all)")
    parser.add_argument("--adv-limit", type=int, default=200, help="test images for the adversarial protocol")
    parser.add_argument("--no-sweep", action="store_true", help="skip the lambda sweep (Table 5)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    base = dict(model=args.model, dataset=args.dataset, data_dir=args.data_dir, img_size=args.img_size,
                patch_size=args.patch_size, seed=args.seed, lambda_q=args.lambda_msvp, lambda_k=args.lambda_msvp,
                lambda_v=args.lambda_msvp)
    results: dict[str, Any] = {"options": vars(args) | {"out": str(args.out)}, "standard": {}, "adversarial": {},
                               "step_time": {}, "sigmas": {}, "sweep": {}}

    for name, overrides in MODELS.items():
        run = _run(args.out, f"std-{_slug(name)}", TrainConfig(**base, **overrides, epochs=args.epochs))
        results["standard"][name] = _evaluate(run, "standard", args.limit)
        results["step_time"][name] = _step_time(run)
        model, _ = load_run_model(run)
        results["sigmas"][name] = {f"sigma_{n}": exact_spectral_norms(model)[:, i].tolist()
                                   for i, n in enumerate("qkv")}
        print(f"{name}: {results['standard'][name]}", file=sys.stderr)
    if args.adv_epochs > 0:
        for name, overrides in MODELS.items():
            # PGD-AT from scratch needs far more epochs than a demo budget; by default it fine-tunes
            # each standard-trained model (same architecture) adversarially at a lower LR.
            start = {}
            if not args.adv_from_scratch:
                start = {"pretrained": str(args.out / f"std-{_slug(name)}" / "model.safetensors"), "lr": args.adv_lr,
                         "warmup_epochs": 0}
            cfg = TrainConfig(**{**base, **start}, **overrides, epochs=args.adv_epochs, adversarial=True,
                              adv_steps=args.adv_steps)
            run = _run(args.out, f"adv-{_slug(name)}", cfg)
            results["adversarial"][name] = _evaluate(run, "adversarial", args.adv_limit)
            results["step_time"][f"{name} (adversarial)"] = _step_time(run)
            print(f"{name} (adversarial): {results['adversarial'][name]}", file=sys.stderr)
    if not args.no_sweep:
        for lam in LAMBDAS:
            cfg = TrainConfig(**{**base, "lambda_q": lam, "lambda_k": lam, "lambda_v": lam}, msvp=True,
                              epochs=args.epochs)
            run = _run(args.out, f"sweep-{lam:g}", cfg)
            results["sweep"][f"{lam:g}"] = _evaluate(run, "standard", args.limit)

    plot_sigma_per_layer(list(results["sigmas"].items()), args.out / "fig2a.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(render(results))
    print((args.out / "results.md").read_text())
    return 0


def render(results: dict[str, Any]) -> str:
    opts = results["options"]
    parts = [f"Dataset `{opts['dataset']}`, model `{opts['model']}`, seed {opts['seed']}, MSVP lambda "
             f"{opts['lambda_msvp']:g}; accuracies in %.\n"]
    std = results["standard"]
    keys = list(next(iter(std.values())))
    parts.append(_table(f"Table 1 layout: standard training ({opts['epochs']} epochs), standard protocol",
                        ["Model", *keys], [[n, *(f"{100 * r[k]:.2f}" for k in keys)] for n, r in std.items()]))
    if results["adversarial"]:
        adv = results["adversarial"]
        keys = list(next(iter(adv.values())))
        how = ("from scratch" if opts.get("adv_from_scratch")
               else f"fine-tuning the standard models, lr {opts['adv_lr']:g}")
        parts.append(_table(f"Table 2 layout: PGD-{opts['adv_steps']} adversarial training ({opts['adv_epochs']} "
                            f"epochs, {how}), adversarial protocol on {opts['adv_limit']} test images",
                            ["Model", *keys], [[n, *(f"{100 * r[k]:.2f}" for k in keys)] for n, r in adv.items()]))
    base = results["step_time"]["Vanilla"]
    rows = [[n, f"{1000 * t:.1f}", f"{t / base:.2f}x"] for n, t in results["step_time"].items()
            if "(adversarial)" not in n]
    if "Vanilla (adversarial)" in results["step_time"]:
        adv_base = results["step_time"]["Vanilla (adversarial)"]
        rows += [[n, f"{1000 * t:.1f}", f"{t / adv_base:.2f}x"] for n, t in results["step_time"].items()
                 if "(adversarial)" in n]
    parts.append(_table("Table 3 layout: training time per step (median over epochs), relative to vanilla",
                        ["Model", "ms / step", "relative"], rows))
    if results["sweep"]:
        sweep = results["sweep"]
        keys = list(next(iter(sweep.values())))
        parts.append(_table("Table 5 layout: MSVP lambda sweep (lambda_q = lambda_k = lambda_v), standard protocol",
                            ["lambda", *keys],
                            [[lam, *(f"{100 * r[k]:.2f}" for k in keys)] for lam, r in sweep.items()]))
    parts.append("Figure 2a layout: `fig2a.png` (max singular value per layer of W_Q, W_K, W_V).\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
