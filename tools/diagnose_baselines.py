"""Why does an attention baseline train badly? Loss curves, gradient norms and score ranges per kind
and learning rate, chosen on a validation split (never the test images).

Each run trains ``specformer-mnist`` with one attention kind (``dot`` = timm's softmax attention,
``l2`` = Kim et al. 2021, ``lipnorm`` = Dasoulas et al. 2021, ``scsa`` = LipsFormer) for ``--steps``
optimizer steps on MNIST's training images minus the ``--val-images`` held out (the toolkit's fixed
stratified split), plain cross-entropy, no MSVP, no Mixup, one seed, and records every
``--every`` steps: the mean training loss, the global gradient norm before the step, the gradient
norm of the attention parameters alone, the range of the attention's pre-softmax scores (the
largest |score| over the batch) and the attention rows' mean entropy relative to uniform (1 =
attention is a plain average). At the end: validation accuracy. Everything goes to one JSON, a
markdown table and a figure of the loss curves.

    python tools/diagnose_baselines.py --out runs/diagnose --grid "sgd:0.1,sgd:0.03,sgd:0.01,adamw:0.001,adamw:0.0003"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specformer_deploy.model.attention_variants import ATTENTION_KINDS
from specformer_deploy.model.factory import build_model, resolve_model_config
from specformer_deploy.training.data import load_dataset


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn for block in model.net.blocks]


def _scores(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores ``[B, H, N, N]`` of one attention module on its input ``x``."""
    kind = getattr(attn, "attention_kind", "dot")
    if kind == "lipnorm":
        return attn.scores(x)
    if kind == "l2":
        return torch.log(attn.attention(x).clamp_min(1e-30))  # log-softmax: scores up to a row constant
    if kind == "scsa":
        return torch.log(attn.attention(x).clamp_min(1e-30))
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q @ k.transpose(-2, -1) * attn.scale


def _probe_attention(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[float, float]:
    """(largest |score| spread within a row, mean attention entropy / log N) over layers, no grad."""
    inputs: list[torch.Tensor] = []
    hooks = [block.norm1.register_forward_hook(lambda _m, _i, out: inputs.append(out.detach()))
             for block in model.net.blocks]
    with torch.no_grad():
        model(pixels)
        spread, entropy = 0.0, []
        for attn, x in zip(_attention_modules(model), inputs):
            s = _scores(attn, x)
            spread = max(spread, float((s.amax(-1) - s.amin(-1)).max()))
            p = torch.softmax(s, dim=-1)
            entropy.append(float((-(p * p.clamp_min(1e-30).log()).sum(-1)).mean() / math.log(s.shape[-1])))
    for hook in hooks:
        hook.remove()
    return spread, float(np.mean(entropy))


def _grad_norm(parameters) -> float:
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def accuracy(model: torch.nn.Module, dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            x = torch.stack([t[0] for t in items])
            y = torch.tensor([int(t[1]) for t in items])
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(dataset)


def train_kind(kind: str, optimizer: str, lr: float, steps: int, every: int, val_images: int = 500,
               batch_size: int = 32, seed: int = 0, zero_grads: bool = False, warmup: int = 200) -> dict[str, Any]:
    """One run's curves: linear warm-up over ``warmup`` steps, then ``lr`` (training's schedule
    starts the same way). ``zero_grads``: every gradient is zeroed before each step (a model that
    cannot learn: what a check for "the loss falls" must catch)."""
    torch.manual_seed(seed)
    bundle = load_dataset("mnist", 28, val_images=val_images)
    model = build_model(resolve_model_config("specformer-mnist", bundle.num_classes, attention=kind,
                                             in_chans=bundle.channels))
    params = list(model.parameters())
    attention_params = [p for attn in _attention_modules(model) for p in attn.parameters()]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.05))
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    y_all = torch.tensor([int(bundle.train[i][1]) for i in range(len(bundle.train))])
    curve: list[dict[str, float]] = []
    losses, grads, attn_grads = [], [], []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / max(warmup, 1))
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x_all[index]), y_all[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if zero_grads:
            for p in params:
                p.grad = torch.zeros_like(p)
        grads.append(_grad_norm(params))
        attn_grads.append(_grad_norm(attention_params))
        opt.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == 1:
            model.eval()
            spread, entropy = _probe_attention(model, x_all[:64])
            curve.append({"step": step, "loss": float(np.mean(losses)), "grad_norm": float(np.mean(grads)),
                          "attention_grad_norm": float(np.mean(attn_grads)), "score_spread": spread,
                          "attention_entropy": entropy, "finite": bool(math.isfinite(float(np.mean(losses))))})
            losses, grads, attn_grads = [], [], []
    return {"kind": kind, "optimizer": optimizer, "lr": lr, "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "seed": seed,
            "zero_grads": zero_grads, "curve": curve, "val_accuracy": accuracy(model, bundle.validation),
            "seconds": time.perf_counter() - started}


def render(results: dict[str, Any]) -> str:
    rows = ["| kind | optimizer | lr | loss: first → last | grad norm: first → last | attention grad norm: first → "
            "last | score spread: first → last | attention entropy / log N: last | val accuracy |",
            "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        a, b = run["curve"][0], run["curve"][-1]
        rows.append(f"| {run['kind']} | {run['optimizer']} | {run['lr']:g} | {a['loss']:.3f} → {b['loss']:.3f} | "
                    f"{a['grad_norm']:.3g} → {b['grad_norm']:.3g} | {a['attention_grad_norm']:.3g} → "
                    f"{b['attention_grad_norm']:.3g} | {a['score_spread']:.3g} → {b['score_spread']:.3g} | "
                    f"{b['attention_entropy']:.3f} | {100 * run['val_accuracy']:.1f} |")
    best = {}
    for run in results["runs"]:
        if run["kind"] not in best or run["val_accuracy"] > best[run["kind"]]["val_accuracy"]:
            best[run["kind"]] = run
    chosen = "; ".join(f"{k}: {r['optimizer']} lr {r['lr']:g} ({100 * r['val_accuracy']:.1f}%)"
                       for k, r in best.items())
    return (f"Validation accuracy on the {results['val_images']} held-out training images after {results['steps']} "
            f"steps of batch {results['batch_size']} ({results['warmup']} warm-up steps; no MSVP, no Mixup, seed "
            f"{results['seed']}). Best per kind: "
            f"{chosen}.\n\n" + "\n".join(rows) + "\n")


def write_figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specformer_deploy.artifact.plots import save_figure

    kinds = list(dict.fromkeys(r["kind"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for run in [r for r in results["runs"] if r["kind"] == kind]:
            ax.plot([c["step"] for c in run["curve"]], [c["loss"] for c in run["curve"]],
                    label=f"{run['optimizer']} {run['lr']:g}")
        ax.set_title(kind)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    save_figure(fig, path)


def write_reports(results: dict[str, Any], folder: Path) -> None:
    """``results.md`` and ``loss_curves.png`` in ``folder`` (tools/render_results.py calls this)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_figure(results, folder / "loss_curves.png")
    (folder / "results.md").write_text(render(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(ATTENTION_KINDS))
    parser.add_argument("--grid", default="sgd:0.1,sgd:0.01,adamw:0.001", help="optimizer:lr pairs")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/diagnose-baselines"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = [(part.split(":")[0], float(part.split(":")[1])) for part in args.grid.split(",") if part]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for kind in args.kinds.split(","):
        for optimizer, lr in grid:
            run = train_kind(kind, optimizer, lr, args.steps, args.every, args.val_images, args.batch_size, args.seed,
                             warmup=args.warmup)
            runs.append(run)
            print(f"{kind} {optimizer} {lr:g}: loss {run['curve'][0]['loss']:.3f} -> {run['curve'][-1]['loss']:.3f}, "
                  f"val {100 * run['val_accuracy']:.1f}% ({run['seconds']:.0f} s)", file=sys.stderr)
    results = {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "seed": args.seed,
               "val_images": args.val_images,
               "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_reports(results, args.out)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
