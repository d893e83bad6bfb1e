"""Reproduce the SpecFormer paper's comparisons on any dataset the toolkit can read.

Trains vanilla, MSVP and the three Lipschitz baselines (L2-MHA, LipschitzNorm, LipsFormer-SCSA)
with the same budget, once per seed of ``--seeds``, standard and (optionally) PGD adversarial
training, evaluates them with the paper's two protocols and, with ``--strong-attacks``, every
standard-trained model with stronger attacks (for example PGD-40 at the MNIST-customary radii),
and writes into ``--out``:

- ``results.json``: every number, with the options, including each model's per-image
  correctness (1/0 per test image, per attack, per seed) so every statistic can be recomputed,
  each run's training and evaluation seconds and the machine they were measured on;
- ``results.md``, rendered from that JSON only: Table 1/2 layout (accuracy under each protocol's
  attacks, mean ± sample sd over seeds), the stronger attacks, MSVP − vanilla paired differences
  with 95% intervals, whether MSVP's effect matches the paper's claim (robust accuracy up, clean
  accuracy not down) row by row, Table 3 layout (training time per step relative to vanilla),
  Table 5 layout (MSVP lambda sweep), the spread over seeds of Figure 2a's numbers, the wall time;
- ``fig2a.png``: max singular value per layer of W_Q, W_K, W_V, mean over seeds with the
  min–max band over seeds.

The interval for MSVP − vanilla is a paired two-level percentile bootstrap (10,000 resamples,
generator seed 0): each resample draws the seeds with replacement, then the test images with
replacement within every drawn seed, and averages the per-image differences. An interval that
excludes 0 means the sign of the difference is not explained by the choice of seed and test images.

Stronger attacks take ``parse_attack`` specs separated by commas (``pgd:0.1:40`` is Linf PGD at
eps 0.1 with 40 steps of 2.5·eps/steps and one random start, ``pgd-l2:1.58:40`` the L2 one) and
run on the first ``--strong-limit`` test images.

Runs already present in ``--out`` are reused (delete them to retrain); seed 0 keeps the run names
of a single-seed reproduction (``std-vanilla``), other seeds add ``-seed<N>``. Each evaluation is
cached in its run directory as ``eval-<key>.json``, the key covering the attack specs, the number
of test images and the SHA-256 of the run's weights, so a rerun only attacks what changed (a
retrained run is evaluated again) and a cached evaluation keeps the seconds it took when measured.
``--from-json FILE`` regenerates ``results.md`` and ``fig2a.png`` beside FILE without training.

    python tools/reproduce.py --out runs/reproduce-digits                     # built-in digits, seed 0
    python tools/reproduce.py --seeds 0,1,2 --out runs/reproduce-digits       # mean ± sd and intervals
    python tools/reproduce.py --dataset mnist --model specformer-mnist --epochs 20 --adv-epochs 0 \\
        --no-sweep --seeds 0,1,2 --strong-attacks pgd:0.1:40,pgd:0.3:40,pgd-l2:1.58:40 \\
        --out runs/reproduce-mnist                                            # built-in real MNIST
    python tools/reproduce.py --from-json runs/reproduce-digits/results.json  # tables again, no training
    python tools/reproduce.py --dataset cifar10 --data-dir DATA --model paper-vit-s \\
        --img-size 32 --patch-size 4 --epochs 100 --adv-epochs 50 --out runs/reproduce-cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specformer_deploy.artifact.plots import plot_sigma_per_layer
from specformer_deploy.attacks import parse_attack, run_attack
from specformer_deploy.robustness.evaluate import PROTOCOLS, load_attack_model
from specformer_deploy.robustness.statistics import METHOD, Interval, mean_sd, paired_bootstrap
from specformer_deploy.training.checkpoint import atomic_write_text, read_metrics
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.msvp import exact_spectral_norms
from specformer_deploy.training.recipes import BASELINE_RECIPES
from specformer_deploy.training.train import TrainConfig, load_run_model, train

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import file_sha256, machine  # tools/bench/common.py: the machine description every benchmark records

# name -> TrainConfig overrides. L2-MHA and LNFormer do not learn with the common recipe (SGD lr 0.1):
# each gets its own paper's optimizer with the learning rate chosen on the validation split
# (specformer_deploy/training/recipes.py; the report prints every row's recipe).
MODELS: dict[str, dict[str, Any]] = {
    "Vanilla": {"msvp": False},
    "MSVP (ours)": {"msvp": True},
    "L2-MHA": {"msvp": False, "attention": "l2", **BASELINE_RECIPES["l2"]},
    "LNFormer (LipschitzNorm)": {"msvp": False, "attention": "lipnorm", **BASELINE_RECIPES["lipnorm"]},
    "LipsFormer (SCSA)": {"msvp": False, "attention": "scsa"},
}
LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3)
BOOTSTRAP_RESAMPLES = 10_000


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _differing_options(run: Path, cfg: TrainConfig) -> list[str]:
    from specformer_deploy.training.checkpoint import RunFiles
    from specformer_deploy.training.config import differing_options

    return differing_options(RunFiles(run).read_config()["train"], cfg)


def _run(out: Path, name: str, cfg: TrainConfig) -> Path:
    run = out / name
    if (run / "checkpoint.pt").is_file() and (differing := _differing_options(run, cfg)):
        raise SystemExit(f"{run} was trained with other options ({'; '.join(differing)}); delete it to retrain")
    if (run / "checkpoint.pt").is_file() and len(read_metrics(run / "metrics.jsonl")) >= cfg.epochs:
        print(f"reusing {run}", file=sys.stderr)
        return run
    if (run / "checkpoint.pt").is_file():
        return _resume(run, cfg)
    if run.exists():  # killed before its first epoch ended: nothing to resume
        print(f"discarding {run}: it holds no finished epoch", file=sys.stderr)
        shutil.rmtree(run)
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


def _evaluate(run: Path, attacks: list[str], limit: int | None) -> dict[str, Any]:
    """``_measure``'s result plus ``evaluate_s``, cached in ``run/eval-<key>.json``.

    The key covers the attack specs, ``limit`` and the SHA-256 of the weights the evaluation loads,
    so retraining a run (new weights) or asking other attacks misses the cache, and a hit returns
    the seconds the evaluation took when it was measured.
    """
    key_fields = {"attacks": list(attacks), "limit": limit, "weights_sha256": file_sha256(run / "model.safetensors")}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache = run / f"eval-{key}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key_fields:
            print(f"reusing evaluation {cache}", file=sys.stderr)
            return cached["evaluation"]
    started = time.perf_counter()
    evaluation = _measure(run, attacks, limit)
    evaluation["evaluate_s"] = round(time.perf_counter() - started, 3)
    atomic_write_text(cache, json.dumps({"key": key_fields, "evaluation": evaluation}) + "\n")
    return evaluation


def _measure(run: Path, attacks: list[str], limit: int | None) -> dict[str, Any]:
    """``{"accuracy": {attack: acc}, "correct": {attack: [1/0 per test image]}}`` on the first ``limit`` images.

    Follows ``robust_accuracy``'s rule and seeding (robust = correct clean and attacked; the
    generator seeded 0, batch ``i`` seeded ``i``), keeping the verdict of every image.
    """
    model, info = load_attack_model(run)
    bundle = load_dataset(info["dataset"], int(info["image_size"]), info.get("data_dir"), int(info.get("channels", 3)))
    count = len(bundle.test) if limit is None else min(limit, len(bundle.test))
    x = torch.stack([bundle.test[i][0] for i in range(count)])
    y = torch.tensor([bundle.test[i][1] for i in range(count)])
    correct: dict[str, list[int]] = {"clean": _correct_per_image(model, x, y, None, bundle.num_classes)}
    for text in attacks:
        spec = parse_attack(text, tuple(x.shape[1:]))
        correct[str(spec)] = _correct_per_image(model, x, y, spec, bundle.num_classes)
    return {"accuracy": {k: sum(v) / len(v) for k, v in correct.items()}, "correct": correct}


def _correct_per_image(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Any, num_classes: int,
                       batch_size: int = 128) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    verdicts: list[int] = []
    for index, start in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            ok = model(xb).argmax(dim=1) == yb
        if spec is not None and bool(ok.any()):
            keep = ok.nonzero().squeeze(1)
            adv = run_attack(model, spec, xb[keep], yb[keep], num_classes=num_classes, generator=generator,
                             seed=index)
            with torch.no_grad():
                ok[keep] = model(adv).argmax(dim=1) == yb[keep]
        verdicts += [int(v) for v in ok.tolist()]
    return verdicts


def _run_name(kind: str, seed: int) -> str:
    return kind if seed == 0 else f"{kind}-seed{seed}"


def _seeds(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers such as 0,1,2, got {text!r}")
    return seeds


def _attack_list(text: str) -> list[str]:
    """``--strong-attacks``: comma-separated ``parse_attack`` specs, each validated and written canonically."""
    try:
        return [str(parse_attack(part)) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce-digits"))
    parser.add_argument("--from-json", type=Path, default=None,
                        help="regenerate results.md and fig2a.png beside this results.json; no training")
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
    parser.add_argument("--adv-lr", type=float, default=0.01, help="learning rate of adversarial fine-tuning (rows "
                        "with their own recipe lr scale it by recipe lr / 0.1)")
    parser.add_argument("--lambda-msvp", type=float, default=1e-3, help="lambda_q = lambda_k = lambda_v for MSVP")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--limit", type=int, default=None, help="test images per evaluation (default: all)")
    parser.add_argument("--adv-limit", type=int, default=200, help="test images for the adversarial protocol")
    parser.add_argument("--no-sweep", action="store_true", help="skip the lambda sweep (Table 5)")
    parser.add_argument("--strong-attacks", type=_attack_list, default="",
                        help="comma-separated attack specs run on every standard-trained model, e.g. "
                             "pgd:0.1:40,pgd:0.3:40,pgd-l2:1.58:40 (default: none)")
    parser.add_argument("--strong-limit", type=int, default=500, help="test images for the stronger attacks")
    args = parser.parse_args()
    if args.strong_limit < 1:
        parser.error(f"--strong-limit must be >= 1, got {args.strong_limit}")
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        write_reports(results, args.from_json.parent)
        print((args.from_json.parent / "results.md").read_text())
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    options = vars(args) | {"out": str(args.out), "bootstrap_resamples": BOOTSTRAP_RESAMPLES}
    options.pop("from_json")
    results: dict[str, Any] = {
        "options": options, "recipes": MODELS, "standard": {}, "adversarial": {}, "step_time": {}, "sigmas": {},
        "sweep": {},
        "strong": {}, "strong_attacks": [parse_attack(text).to_dict() for text in args.strong_attacks],
        "wall_time": {"runs": {}}, "machine": machine(), "input_shape": _input_shape(args)}
    for seed in args.seeds:
        _reproduce_seed(args, seed, results)
    runs = results["wall_time"]["runs"].values()
    results["wall_time"] |= {part: round(sum(r[part] for r in runs), 3) for part in ("train_s", "evaluate_s")}
    results["wall_time"]["total_s"] = round(results["wall_time"]["train_s"] + results["wall_time"]["evaluate_s"], 3)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_reports(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


def _reproduce_seed(args: argparse.Namespace, seed: int, results: dict[str, Any]) -> None:
    """Train and evaluate every row with one seed, filing each number under ``results[...][name][str(seed)]``."""
    key = str(seed)
    base = dict(model=args.model, dataset=args.dataset, data_dir=args.data_dir, img_size=args.img_size,
                patch_size=args.patch_size, seed=seed, lambda_q=args.lambda_msvp, lambda_k=args.lambda_msvp,
                lambda_v=args.lambda_msvp)
    for name, overrides in MODELS.items():
        run = _run(args.out, _run_name(f"std-{_slug(name)}", seed), TrainConfig(**base, **overrides,
                                                                                epochs=args.epochs))
        results["standard"].setdefault(name, {})[key] = _evaluate(run, PROTOCOLS["standard"], args.limit)
        _record_time(results, run, results["standard"][name][key])
        if args.strong_attacks:
            results["strong"].setdefault(name, {})[key] = _evaluate(run, args.strong_attacks, args.strong_limit)
            _record_time(results, run, results["strong"][name][key])
            print(f"{name} seed {seed}, stronger attacks: {results['strong'][name][key]['accuracy']}",
                  file=sys.stderr)
        results["step_time"].setdefault(name, {})[key] = _step_time(run)
        model, _ = load_run_model(run)
        results["sigmas"].setdefault(name, {})[key] = {f"sigma_{n}": exact_spectral_norms(model)[:, i].tolist()
                                                       for i, n in enumerate("qkv")}
        print(f"{name} seed {seed}: {results['standard'][name][key]['accuracy']}", file=sys.stderr)
    if args.adv_epochs > 0:
        for name, overrides in MODELS.items():
            # PGD-AT from scratch needs far more epochs than a demo budget; by default it fine-tunes
            # each standard-trained model (same architecture, same seed) adversarially at a lower LR.
            start = {}
            if not args.adv_from_scratch:
                std_run = args.out / _run_name(f"std-{_slug(name)}", seed)
                # --adv-lr is for the common recipe's lr; a row with its own lr keeps the same ratio
                lr = args.adv_lr * overrides.get("lr", TrainConfig.lr) / TrainConfig.lr
                start = {"pretrained": str(std_run / "model.safetensors"), "lr": lr, "warmup_epochs": 0}
            cfg = TrainConfig(**{**base, **overrides, **start}, epochs=args.adv_epochs, adversarial=True,
                              adv_steps=args.adv_steps)
            run = _run(args.out, _run_name(f"adv-{_slug(name)}", seed), cfg)
            results["adversarial"].setdefault(name, {})[key] = _evaluate(run, PROTOCOLS["adversarial"], args.adv_limit)
            _record_time(results, run, results["adversarial"][name][key])
            results["step_time"].setdefault(f"{name} (adversarial)", {})[key] = _step_time(run)
            print(f"{name} (adversarial) seed {seed}: {results['adversarial'][name][key]['accuracy']}",
                  file=sys.stderr)
    if not args.no_sweep:
        for lam in LAMBDAS:
            cfg = TrainConfig(**{**base, "lambda_q": lam, "lambda_k": lam, "lambda_v": lam}, msvp=True,
                              epochs=args.epochs)
            run = _run(args.out, _run_name(f"sweep-{lam:g}", seed), cfg)
            results["sweep"].setdefault(f"{lam:g}", {})[key] = _evaluate(run, PROTOCOLS["standard"], args.limit)
            _record_time(results, run, results["sweep"][f"{lam:g}"][key])


def _record_time(results: dict[str, Any], run: Path, evaluation: dict[str, Any]) -> None:
    """Add one evaluation's seconds to ``run``'s entry; training seconds are the sum of its epochs' ``time_s``."""
    train_s = round(sum(m["time_s"] for m in read_metrics(run / "metrics.jsonl")), 3)
    entry = results["wall_time"]["runs"].setdefault(run.name, {"train_s": train_s, "evaluate_s": 0.0})
    entry["evaluate_s"] = round(entry["evaluate_s"] + evaluation["evaluate_s"], 3)


def write_reports(results: dict[str, Any], folder: Path) -> None:
    """``results.md`` and ``fig2a.png`` in ``folder``, computed from ``results`` (a results.json) alone."""
    results = _per_seed_layout(results)
    plot_sigma_per_layer([(name, list(by_seed.values())) for name, by_seed in results["sigmas"].items()],
                         folder / "fig2a.png")
    (folder / "results.md").write_text(render(results))


def _per_seed_layout(results: dict[str, Any]) -> dict[str, Any]:
    """A single-seed results.json written before seeds were recorded, filed under its seed (no per-image data)."""
    if "seeds" in results["options"]:
        return results
    seed = str(results["options"].get("seed", 0))
    wrapped = {section: {name: {seed: {"accuracy": cell}} for name, cell in results[section].items()}
               for section in ("standard", "adversarial", "sweep")}
    return results | wrapped | {
        "options": results["options"] | {"seeds": [int(seed)]},
        "step_time": {name: {seed: t} for name, t in results["step_time"].items()},
        "sigmas": {name: {seed: s} for name, s in results["sigmas"].items()}}


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, sd = mean_sd([scale * v for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _accuracy_rows(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(next(iter(next(iter(section.values())).values()))["accuracy"])
    rows = [[name, *(_cell([run["accuracy"][k] for run in by_seed.values()]) for k in keys)]
            for name, by_seed in section.items()]
    return keys, rows


def _intervals(section: dict[str, Any], resamples: int) -> dict[str, Interval] | None:
    """MSVP − vanilla bootstrap interval per attack (``clean`` included); None without per-image data."""
    msvp, vanilla = section.get("MSVP (ours)"), section.get("Vanilla")
    if not msvp or not vanilla or any("correct" not in run for run in [*msvp.values(), *vanilla.values()]):
        return None
    seeds = sorted(set(msvp) & set(vanilla), key=int)
    return {key: paired_bootstrap([msvp[s]["correct"][key] for s in seeds],
                                  [vanilla[s]["correct"][key] for s in seeds], resamples=resamples)
            for key in msvp[seeds[0]]["correct"]}


def _bounds(interval: Interval) -> str:
    return f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"


def _difference_table(title: str, intervals: dict[str, Interval] | None) -> str | None:
    """MSVP − vanilla per attack, in percentage points, with the bootstrap interval; None without intervals."""
    if not intervals:
        return None
    rows = []
    for key, interval in intervals.items():
        verdict = ("MSVP higher" if interval.low > 0 else "vanilla higher" if interval.high < 0
                   else "not distinguishable")
        rows.append([key, f"{100 * interval.difference:+.2f}", _bounds(interval), verdict])
    first = next(iter(intervals.values()))
    return _table(f"{title}: MSVP − vanilla, paired, {first.seeds} seed(s) × {first.images} test images",
                  ["Attack", "difference (pp)", "95% interval (pp)", "verdict"], rows)


MATCHES = "matches"
CONTRADICTS = "contradicts"
UNCLEAR = "not distinguishable from 0 at this sample size"


def claim_verdict(interval: Interval) -> str:
    """Does one MSVP − vanilla interval agree with the paper's claim?

    The paper claims robust accuracy goes up and clean accuracy does not go down, so for either
    kind of row an interval wholly above 0 matches, one wholly below 0 contradicts, and one that
    contains 0 cannot tell the sign at this many seeds and test images (a clean drop too small to
    resolve is not shown absent, so it is not called a match).
    """
    if interval.low > 0:
        return MATCHES
    if interval.high < 0:
        return CONTRADICTS
    return UNCLEAR


ClaimRow = tuple[str, str, Interval, str]


def _claim_rows(groups: list[tuple[str, dict[str, Interval] | None, bool]]) -> list[ClaimRow]:
    """``(training, measure, interval, verdict)`` per attack of each ``(training, intervals, with_clean)`` group.

    ``with_clean`` is False for the stronger attacks: their clean accuracy is a subset of the test
    images the standard protocol's clean row already covers.
    """
    return [(training, measure, interval, claim_verdict(interval))
            for training, intervals, with_clean in groups
            for measure, interval in (intervals or {}).items() if with_clean or measure != "clean"]


def _claim_section(rows: list[ClaimRow]) -> str | None:
    """"Does MSVP's effect match the paper's claim?": one verdict per row and one overall sentence."""
    if not rows:
        return None
    claims = {True: "not down", False: "up"}
    table = _table("Does MSVP's effect match the paper's claim?",
                   ["Training", "Accuracy", "paper claims", "MSVP − vanilla (pp)", "95% interval (pp)", "verdict"],
                   [[training, measure, claims[measure == "clean"], f"{100 * interval.difference:+.2f}",
                     _bounds(interval), verdict] for training, measure, interval, verdict in rows])
    return table + "\n" + overall_sentence([(f"{t}: {m}", v) for t, m, _, v in rows]) + "\n"


def overall_sentence(verdicts: list[tuple[str, str]]) -> str:
    """The verdicts of all rows in one sentence, naming the rows that match or contradict."""
    def named(kind: str) -> list[str]:
        return [row for row, verdict in verdicts if verdict == kind]

    matches, contradicts, unclear = named(MATCHES), named(CONTRADICTS), named(UNCLEAR)
    total = len(verdicts)
    if len(matches) == total:
        return f"Overall: all {total} rows match the paper's claim."
    if len(contradicts) == total:
        return f"Overall: all {total} rows contradict the paper's claim."
    if len(unclear) == total:
        return (f"Overall: none of the {total} rows tells MSVP from vanilla at this sample size; these data "
                "neither support nor contradict the paper's claim.")
    parts = []
    if matches:
        parts.append(f"{len(matches)} of {total} rows match the paper's claim ({'; '.join(matches)})")
    if contradicts:
        parts.append(f"{len(contradicts)} of {total} contradict it ({'; '.join(contradicts)})")
    else:
        parts.append("none contradicts it")
    if unclear:
        parts.append(f"{len(unclear)} are not distinguishable from 0 at this sample size")
    return "Overall: " + ", ".join(parts) + "."


def _input_shape(args: argparse.Namespace) -> list[int]:
    """``[C, H, W]`` of the models' input (the data's own channels): the space every epsilon is in."""
    from specformer_deploy.model.factory import resolve_model_config

    size = resolve_model_config(args.model, 2, args.img_size, args.patch_size).img_size
    return list(load_dataset(args.dataset, size, args.data_dir).test[0][0].shape)


def _space_text(results: dict[str, Any]) -> str:
    """Where the budgets live: pixels in [0, 1] of the recorded input shape (older JSON: 3 channels)."""
    shape = results.get("input_shape")
    if shape is None:
        return "pixels in [0, 1] of the 3-channel model input (grey data replicated: an L2 budget is sqrt(3) " \
               "times the same budget on the grey image)"
    return f"pixels in [0, 1] of the {'x'.join(map(str, shape))} model input"


def _strong_section(results: dict[str, Any]) -> str:
    """The stronger attacks' table and how each attack was run, from the JSON's attack records."""
    specs = results.get("strong_attacks", [])
    starts = {int(spec["restarts"]) for spec in specs}
    start_text = ("one random start" if starts == {1} else "random starts as listed")
    images = len(next(iter(next(iter(results["strong"].values())).values()))["correct"]["clean"])
    keys, rows = _accuracy_rows(results["strong"])
    table = _table(f"Stronger attacks (standard training, first {images} test images; PGD step size "
                   f"2.5·eps/steps, {start_text}; budgets in {_space_text(results)})", ["Model", *keys], rows)
    lines = [f"- `{spec['spec']}`: {spec['label']}, step size {spec['resolved_step_size']:.4g}, "
             f"{spec['restarts']} random start(s)"
             for spec in specs if spec.get("resolved_step_size") is not None]
    return table + ("\n" + "\n".join(lines) + "\n" if lines else "")


def _wall_time_line(results: dict[str, Any]) -> str | None:
    wall, host = results.get("wall_time"), results.get("machine")
    if not wall or "total_s" not in wall or not host:
        return None
    where = (f"{host['platform']}, {host['processor']}, {host['cpu_affinity']} of {host['cpu_count']} CPUs usable, "
             f"Python {host['python']}")
    return (f"Wall time: {wall['total_s'] / 3600:.2f} h ({wall['total_s']:.0f} s: training {wall['train_s']:.0f} s, "
            f"evaluation {wall['evaluate_s']:.0f} s, summed over {len(wall['runs'])} runs' measured epochs and "
            f"evaluations; a reused evaluation counts the seconds it took when measured) on {where}.\n")


def render(results: dict[str, Any]) -> str:
    """The markdown report; every number comes from ``results`` (per-seed layout)."""
    opts = results["options"]
    seeds = opts["seeds"]
    resamples = int(opts.get("bootstrap_resamples", BOOTSTRAP_RESAMPLES))
    spread = "; cells are mean ± sample sd over the seeds" if len(seeds) > 1 else ""
    parts = [f"Dataset `{opts['dataset']}`, model `{opts['model']}`, seed(s) {', '.join(map(str, seeds))}, MSVP "
             f"lambda {opts['lambda_msvp']:g}; accuracies in %{spread}.\n"]
    if results.get("recipes"):
        recipes = "; ".join(f"{name}: {json.dumps(o)}" for name, o in results["recipes"].items())
        parts.append("Recipe per row (TrainConfig overrides of the common recipe; rows without an optimizer use "
                     f"the common SGD): {recipes}.\n")
    keys, rows = _accuracy_rows(results["standard"])
    parts.append(_table(f"Table 1 layout: standard training ({opts['epochs']} epochs), standard protocol",
                        ["Model", *keys], rows))
    groups = [("standard", _intervals(results["standard"], resamples), True)]
    differences = [_difference_table("Standard training", groups[-1][1])]
    if results["adversarial"]:
        keys, rows = _accuracy_rows(results["adversarial"])
        how = ("from scratch" if opts.get("adv_from_scratch")
               else f"fine-tuning the standard models, lr {opts['adv_lr']:g}")
        parts.append(_table(f"Table 2 layout: PGD-{opts['adv_steps']} adversarial training ({opts['adv_epochs']} "
                            f"epochs, {how}), adversarial protocol on {opts['adv_limit']} test images",
                            ["Model", *keys], rows))
        groups.append(("adversarial", _intervals(results["adversarial"], resamples), True))
        differences.append(_difference_table("Adversarial training", groups[-1][1]))
    if results.get("strong"):
        parts.append(_strong_section(results))
        groups.append(("standard (stronger attacks)", _intervals(results["strong"], resamples), False))
        differences.append(_difference_table("Stronger attacks", groups[-1][1]))
    differences = [d for d in differences if d]
    if differences:
        parts.append(f"Intervals: {METHOD}; {resamples} resamples, generator seed 0, 95% percentile interval. "
                     "pp = percentage points. \"not distinguishable\": the interval contains 0, so the sign of "
                     "the difference may be noise from the choice of seeds and test images.\n")
        parts += differences
    claim = _claim_section(_claim_rows(groups))
    if claim:
        parts.append(claim)
    parts.append(_step_time_table(results["step_time"]))
    if results["sweep"]:
        keys, rows = _accuracy_rows(results["sweep"])
        parts.append(_table("Table 5 layout: MSVP lambda sweep (lambda_q = lambda_k = lambda_v), standard protocol",
                            ["lambda", *keys], rows))
    parts.append(_sigma_table(results["sigmas"]))
    band = "; shaded band: min–max over seeds" if len(seeds) > 1 else ""
    parts.append(f"Figure 2a layout: `fig2a.png` (max singular value per layer of W_Q, W_K, W_V, mean over "
                 f"seeds{band}).\n")
    wall = _wall_time_line(results)
    if wall:
        parts.append(wall)
    return "\n".join(parts)


def _step_time_table(step_time: dict[str, dict[str, float]]) -> str:
    def seconds(name: str) -> float:
        return float(np.mean(list(step_time[name].values())))

    rows = []
    for adversarial in (False, True):
        base_name = "Vanilla (adversarial)" if adversarial else "Vanilla"
        if base_name not in step_time:
            continue
        rows += [[n, _cell(list(t.values()), scale=1000.0, digits=1), f"{seconds(n) / seconds(base_name):.2f}x"]
                 for n, t in step_time.items() if ("(adversarial)" in n) == adversarial]
    return _table("Table 3 layout: training time per step (median over epochs), relative to vanilla",
                  ["Model", "ms / step", "relative"], rows)


def _sigma_table(sigmas: dict[str, dict[str, dict[str, list[list[float]]]]]) -> str:
    """Largest singular value over all layers and heads, per projection: Figure 2a's spread over seeds."""
    rows = [[name, *(_cell([float(np.max(s[f"sigma_{p}"])) for s in by_seed.values()], scale=1.0, digits=3)
                     for p in "qkv")] for name, by_seed in sigmas.items()]
    return _table("Figure 2a numbers: max singular value over layers and heads", ["Model", "W_Q", "W_K", "W_V"], rows)


if __name__ == "__main__":
    sys.exit(main())
