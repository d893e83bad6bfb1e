"""Does the int8 smoothing sampler certify what the float32 one does? Both, on the same images, in one run.

For one export written with ``export --smoothing-sampler int8``, certify the first ``--limit``
test images with CERTIFY (``n0``, ``n``, ``alpha``; the same per-image seeds) twice: once sampling
with the export's float32 graph, once with its int8 sampling graph. Reported per sampler:
samples/s of the whole certification, the base classifier's accuracy on one noisy copy of each
image, and certified accuracy per radius with its 95% Clopper-Pearson interval over the test
images; and the verdict the issue asks for: int8 is adopted only if each of its certified
accuracies lies inside the float32 one's interval. Radii are in the model grid, which for the
one-channel MNIST models is MNIST's own 1 x 28 x 28 space (pixels in [0, 1]).

    python tools/sampler_comparison.py runs/sampler/gauss-0.5/export-int8/model.onnx --limit 500 \\
        --json runs/sampler/comparison.json
    python tools/sampler_comparison.py --from-json runs/sampler/comparison.json   # the Markdown table again
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SAMPLERS = ("fp32", "auto")  # auto = the export's int8 sampling graph


def _noisy_accuracy(runtime, images: np.ndarray, labels: np.ndarray, sigma: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    noisy = images + np.float32(sigma) * rng.standard_normal(images.shape, dtype=np.float32)
    return float((runtime.sampler.classify(noisy.astype(np.float32)) == labels).mean())


def compare(path: Path, limit: int, n: int, n0: int, alpha: float, radii: tuple[float, ...], seed: int,
            threads: int | None) -> dict[str, Any]:
    from specformer_deploy.robustness.smoothing_eval import (
        SmoothingEvalOptions,
        _test_images,
        certify_images,
        load_smoothing_runtime,
        summarize,
    )

    rows = {}
    for choice in SAMPLERS:
        runtime = load_smoothing_runtime(path, threads=threads, sampler=choice)
        sigma = runtime.smoothing_sigma
        options = SmoothingEvalOptions(sigma=sigma, n=n, n0=n0, alpha=alpha, radii=radii, limit=limit, seed=seed,
                                       predict=False, sampler=choice)
        images, labels, dataset, source_shape = _test_images(runtime, options)
        started = time.perf_counter()
        records = certify_images(runtime, images, labels, list(range(len(images))), options)
        wall = time.perf_counter() - started
        table = summarize(records, options, runtime.input_shape, source_shape, dataset=dataset)
        table.pop("per_image")
        rows[runtime.sampler.precision] = {
            "sampler": runtime.sampler.describe(), "streams": runtime.sampler.streams, "wall_s": wall,
            "samples_per_s": len(images) * (n0 + n) / wall,
            "base_accuracy_under_noise": _noisy_accuracy(runtime, images, labels, sigma, seed + 7),
            "table": table, "radii_per_image": [r["radius"] if not r["abstain"] and r["label"] == r["true_label"]
                                                else -1.0 for r in records]}
    fp32, int8 = rows["fp32"]["table"], rows["int8"]["table"]
    inside = [lo <= a <= hi for a, (lo, hi) in zip(int8["certified_accuracy"], fp32["certified_interval"])]
    return {"model": str(path), "images": int(fp32["images"]), "n": n, "n0": n0, "alpha": alpha, "seed": seed,
            "sigma": fp32["sigma"], "space": fp32["space"], "radii": list(radii), "rows": rows,
            "int8_inside_fp32_interval": inside, "adopt_int8": all(inside)}


def render(result: dict[str, Any]) -> str:
    radii = result["radii"]
    lines = ["| sampler | samples/s | base acc. under noise | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
             "|---|---|---|" + "---|" * len(radii)]
    for name, row in result["rows"].items():
        t = row["table"]
        cells = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                 for a, (lo, hi) in zip(t["certified_accuracy"], t["certified_interval"])]
        lines.append(f"| {name} ({row['sampler']['graph']}) | {row['samples_per_s']:,.0f} | "
                     f"{100 * row['base_accuracy_under_noise']:.1f}% | " + " | ".join(cells) + " |")
    speed = result["rows"]["int8"]["samples_per_s"] / result["rows"]["fp32"]["samples_per_s"]
    verdict = ("inside the float32 interval at every radius: int8 may be the default"
               if result["adopt_int8"] else "outside the float32 interval at some radius: float32 stays the default")
    lines += ["", f"{result['images']} test images, sigma {result['sigma']:g}, n0 {result['n0']}, n {result['n']:,}, "
                  f"alpha {result['alpha']}, the same per-image seeds for both samplers; certified accuracy in % with "
                  f"the two-sided 95% Clopper-Pearson interval over the test images; radii in the {result['space']}. "
                  f"int8 / fp32 sampling speed in this run: {speed:.2f}x. Verdict: int8 is {verdict}."]
    return "\n".join(lines)


FIGURE = "certified_accuracy_samplers.png"


def write_reports(result: dict[str, Any], folder: Path) -> None:
    """``results.md`` and the figure (certified accuracy against radius, one curve per sampler)."""
    from specformer_deploy.robustness.smoothing_eval import plot_certified_accuracy

    folder.mkdir(parents=True, exist_ok=True)
    curves = [(f"{name} sampler", np.asarray(row["radii_per_image"], dtype=float))
              for name, row in result["rows"].items()]
    plot_certified_accuracy(curves, folder / FIGURE, result["radii"],
                            styles=[{"color": "C0"}, {"color": "C3", "linestyle": "--"}])
    (folder / "results.md").write_text(render(result) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="an export written with --smoothing-sampler int8")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--radii", default="0,0.25,0.5,0.75,1.0,1.25,1.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="sampling streams (default: every core)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--from-json", default=None, help="print the Markdown table of an earlier result")
    args = parser.parse_args()
    if args.from_json:
        print(render(json.loads(Path(args.from_json).read_text())))
        return 0
    if not args.model:
        parser.error("give the exported model (or --from-json)")
    radii = tuple(float(r) for r in args.radii.split(","))
    result = compare(Path(args.model), args.limit, args.n, args.n0, args.alpha, radii, args.seed, args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
        write_reports(result, Path(args.json).parent)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
