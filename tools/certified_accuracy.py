"""Regenerate the certified-accuracy section of docs/RESULTS.md from `evaluate --smoothing --json` files.

Each input is one model's table (``specformer-deploy evaluate MODEL.onnx --smoothing SIGMA ... --json``).
The script writes, from those files alone (no number is typed by hand):

- the markdown table (rows: sigma x vanilla/MSVP; columns: certified accuracy per radius with its
  two-sided 95% Clopper–Pearson interval, the smoothed classifier's clean accuracy, abstentions,
  the largest radius n samples can certify, seconds per image) between the markers
  (radii in the models' input grid, where CERTIFY works, and in parentheses the same radius about the
  data set's own images: r / ||A||_2 of the decode between them, ``decode_norm``)
  ``<!-- certified-accuracy:begin -->`` and ``<!-- certified-accuracy:end -->`` of ``--results``;
- ``--json``: every input's table and per-image records in one file (what the section is made of);
- ``--plot``: certified accuracy against radius, one curve per model.

    python tools/certified_accuracy.py runs/smoothing-digits/eval/*.json --results docs/RESULTS.md \\
        --json docs/certified-accuracy-digits.json --plot docs/certified-accuracy-digits.png
    python tools/certified_accuracy.py --from-json docs/certified-accuracy-digits.json --results docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from specformer_deploy.robustness.smoothing_eval import certified_radii
from specformer_deploy.serving.decode import decode_norm, shape_text

BEGIN, END = "<!-- certified-accuracy:begin -->", "<!-- certified-accuracy:end -->"

# Cohen, Rosenfeld, Kolter (ICML 2019), Table / Figure for CIFAR-10, ResNet-110, sigma 0.25,
# n = 100,000, alpha = 0.001: their figures, quoted for scale only.
COHEN_CIFAR10 = {"model": "ResNet-110 (Cohen et al. 2019, CIFAR-10, radius about its 3x32x32 images, their figures)",
                 "sigma": 0.25, "certified_accuracy": {0.25: 0.60, 0.5: 0.42}}

# Tables written before `evaluate --json` recorded shapes: the data sets' own image shapes, and the
# exports of that time, all three-channel at the built-in recipe's size (digits: specformer-tiny, 16).
SOURCE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28)}
LEGACY_INPUT_SHAPES = {"digits": (3, 16, 16), "mnist": (3, 28, 28)}


def shapes(table: dict[str, Any]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None, list[str]]:
    """``(input_shape, source_shape, inferred)``: the model's input grid and the data set's images,
    as recorded, else inferred for an older table from its data set (``inferred`` names which)."""
    shape, source, inferred = table.get("input_shape"), (table.get("source") or {}).get("shape"), []
    dataset = table.get("dataset") or (table.get("options") or {}).get("dataset")
    if shape is None and dataset in LEGACY_INPUT_SHAPES:
        shape = LEGACY_INPUT_SHAPES[dataset]
        inferred.append("input")
    if source is None and dataset in SOURCE_SHAPES:
        source = SOURCE_SHAPES[dataset]
        inferred.append("source")
    return (None if shape is None else tuple(shape)), (None if source is None else tuple(source)), inferred


def common_space(tables: list[dict[str, Any]]) -> tuple[tuple[int, ...], tuple[int, ...], float, list[str]] | None:
    """``(input_shape, source_shape, ||A||_2, inferred)`` when every table has the same known shapes
    and they differ (the table then gives each radius about the data set's images too), else None."""
    found = {shapes(t)[:2] for t in tables}
    if len(found) != 1:
        return None
    shape, source = found.pop()
    if shape is None or source is None or shape == source:
        return None
    inferred = sorted({what for t in tables for what in shapes(t)[2]})
    return shape, source, decode_norm(source, shape), inferred


def _space_words(tables: list[dict[str, Any]]) -> str:
    """Which space r is about, in words, and the conversion to the data set's own images."""
    space = common_space(tables)
    if space is None:
        grids = {shapes(t)[0] for t in tables}
        if len(grids) == 1 and None not in grids:
            grid = grids.pop()
            return f"L2 radius r about the models' {shape_text(*grid)} input (pixels in [0, 1])"
        return "L2 radius r about each model's input (pixels in [0, 1])"
    shape, source, norm, inferred = space
    steps = []
    if (source[0], shape[0]) == (1, 3):
        steps.append("replicated into three channels")
    if source[1:] != shape[1:]:
        steps.insert(0, f"upscaled from {source[1]}x{source[2]} to {shape[1]}x{shape[2]}")
    text = (f"L2 radius r in the models' {shape_text(*shape)} input grid (pixels in [0, 1]), where CERTIFY draws its "
            f"noise; in parentheses the same radius about the data set's own {shape_text(*source)} images, "
            f"r / ||A||_2 = r / {norm:.4g}, where A is the linear map from a {shape_text(*source)} image to the model "
            f"input ({' and '.join(steps)}) and ||A||_2 its spectral norm (`decode_norm`): an image change d moves "
            "the input by at most ||A||_2 ||d||, so every image within r / ||A||_2 stays inside the certified ball, "
            "and no larger radius follows from the certificate")
    if inferred:
        text += (f" (these tables predate recorded shapes: {' and '.join(inferred)} shape inferred, the "
                 f"{shape_text(*shape)} input of that time's exports and the data set's own {shape_text(*source)})")
    return text


def _in_source(value: float, tables: list[dict[str, Any]], named: bool = False) -> str:
    """`` (0.072)``: ``value`` about the data set's images (``named``: with their shape), or ""."""
    space = common_space(tables)
    if space is None:
        return ""
    scaled = value / space[2]
    return f" ({shape_text(*space[1]) + ': ' if named else ''}{'0' if scaled == 0 else f'{scaled:.3f}'})"


def _kind(table: dict[str, Any]) -> str:
    msvp = table.get("msvp")
    if msvp is None:  # files written before the field existed: the run's name says it
        msvp = "msvp" in Path(str(table.get("model", ""))).parent.parent.name
    return "MSVP" if msvp else "vanilla"


def load_tables(paths: list[Path]) -> list[dict[str, Any]]:
    tables = [json.loads(p.read_text()) for p in paths]
    for path, table in zip(paths, tables):
        if "certified_accuracy" not in table or "per_image" not in table:
            raise SystemExit(f"{path} is not the output of `specformer-deploy evaluate --smoothing --json`")
    return sorted(tables, key=lambda t: (t["sigma"], _kind(t) != "vanilla"))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(tables: list[dict[str, Any]]) -> str:
    """The section: setup line, table, Cohen et al.'s row for scale, and how to read it."""
    radii = tables[0]["radii"]
    if any(t["radii"] != radii for t in tables):
        raise SystemExit("the tables were evaluated at different --radii; evaluate them at the same radii")
    settings = sorted({(t["n"], t["n0"], t["alpha"], t["images"], t["dataset"]) for t in tables})
    setup = "; ".join(f"n = {n:,}, n0 = {n0}, alpha = {a}, the first {i} {d} test images"
                      for n, n0, a, i, d in settings)
    lines = [f"Certified accuracy (%) at {_space_words(tables)}; {setup}.", ""]
    header = ["sigma", "model", *[f"r = {r:g}{_in_source(r, tables, named=True)}" for r in radii], "smoothed clean",
              "abstained", "max certifiable r", "s / image"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tables:
        cells = [f"{t['sigma']:g}", _kind(t)]
        for accuracy, (low, high) in zip(t["certified_accuracy"], t["certified_interval"]):
            cells.append(f"{_pct(accuracy)} [{_pct(low)}, {_pct(high)}]")
        low, high = t["smoothed_clean_interval"]
        cells += [f"{_pct(t['smoothed_clean_accuracy'])} [{_pct(low)}, {_pct(high)}]", str(t["abstained"]),
                  f"{t['max_radius_for_n']:.3f}{_in_source(t['max_radius_for_n'], tables)}",
                  f"{t['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        if _kind(t) == "MSVP":
            lines += _paired_rows([u for u in tables if u["sigma"] == t["sigma"]], radii)
    cohen = COHEN_CIFAR10
    cohen_cells = [f"{cohen['sigma']:g}", cohen["model"],
                   *[_pct(cohen["certified_accuracy"][r]) if r in cohen["certified_accuracy"] else "" for r in radii],
                   "", "", "", ""]
    lines.append("| " + " | ".join(cohen_cells) + " |")
    lines += ["", "Brackets: two-sided 95% Clopper–Pearson intervals over the test images (the sampling error of "
              "the certificates themselves is inside alpha). An image counts at radius r iff its certified label "
              "is the true label and its certified radius is >= r; abstentions count as wrong. 'smoothed clean': "
              "PREDICT's accuracy (abstentions wrong). 'max certifiable r': sigma * Phi^-1(alpha^(1/n)), the "
              "largest radius n samples can certify (in parentheses: about the data set's images), so every column "
              "beyond it is 0 by construction, not by the model. 's / image': CERTIFY + PREDICT on 2 shared CPU "
              "cores. 'MSVP - vanilla': the difference in certified accuracy in points on the same images, with "
              "the exact McNemar test's p-value on the images where the two models disagree."]
    return "\n".join(lines) + "\n"


def _paired_rows(tables: list[dict[str, Any]], radii: list[float]) -> list[str]:
    """Per sigma, MSVP minus vanilla in points at each radius, with the exact McNemar p-value of the
    paired per-image outcomes (same images, same seed): a small p says the difference is not the
    luck of which images each model happened to certify."""
    from scipy.stats import binomtest

    rows = []
    for sigma in sorted({t["sigma"] for t in tables}):
        pair = {_kind(t): t for t in tables if t["sigma"] == sigma}
        if set(pair) != {"vanilla", "MSVP"}:
            continue
        a, b = (pair[k]["per_image"] for k in ("vanilla", "MSVP"))
        if [r["index"] for r in a] != [r["index"] for r in b]:
            continue
        ra, rb = certified_radii(a), certified_radii(b)
        cells = [f"{sigma:g}", "MSVP - vanilla (McNemar p)"]
        for r in radii:
            only_a, only_b = int(((ra >= r) & (rb < r)).sum()), int(((rb >= r) & (ra < r)).sum())
            p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            cells.append(f"{100 * (only_b - only_a) / len(a):+.1f} (p {p:.2g})")
        rows.append("| " + " | ".join(cells + ["", "", "", ""]) + " |")
    return rows


def plot(tables: list[dict[str, Any]], path: Path) -> Path:
    """Certified accuracy against radius, one curve per model: radii in the models' input grid on the
    bottom axis and, when the tables share their shapes, about the data set's images on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specformer_deploy.artifact.plots import save_figure

    curves = [(f"sigma {t['sigma']:g}, {_kind(t)}", certified_radii(t["per_image"])) for t in tables]
    sigmas = sorted({t["sigma"] for t in tables})
    marks = tables[0]["radii"]
    top = max([float(np.max(radii, initial=0.0)) for _, radii in curves] + list(marks) + [0.1]) * 1.05
    grid = np.linspace(0.0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for t, (label, radii) in zip(tables, curves):
        ax.plot(grid, [(radii >= r).mean() for r in grid], label=label, color=f"C{sigmas.index(t['sigma'])}",
                linestyle="-" if _kind(t) == "MSVP" else "--")
    for r in marks:
        ax.axvline(r, color="grey", alpha=0.25, linewidth=0.8)
    space = common_space(tables)
    grids = {shapes(t)[0] for t in tables}
    grid_name = shape_text(*next(iter(grids))) if len(grids) == 1 and None not in grids else "model input"
    ax.set_xlabel(f"L2 radius in the models' {grid_name} input grid (pixels in [0, 1])")
    if space is not None:
        norm = space[2]
        top_axis = ax.secondary_xaxis("top", functions=(lambda r: r / norm, lambda r: r * norm))
        top_axis.set_xlabel(f"the same radius about the data set's {shape_text(*space[1])} images (r / {norm:.4g})")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def replace_section(results: Path, section: str) -> None:
    text = results.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{results} has no {BEGIN} ... {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    results.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def compact(table: dict[str, Any]) -> dict[str, Any]:
    keep = ("index", "true_label", "label", "abstain", "radius", "count", "predict_label", "predict_abstain",
            "base_label", "seconds")
    return {**table, "per_image": [{k: r[k] for k in keep} for r in table["per_image"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", type=Path, help="evaluate --smoothing --json outputs")
    parser.add_argument("--from-json", type=Path, help="a file this script wrote with --json, instead of tables")
    parser.add_argument("--results", type=Path, help="RESULTS.md whose marked section is replaced")
    parser.add_argument("--json", type=Path, help="write every table (compact per-image records) here")
    parser.add_argument("--plot", type=Path, help="draw certified accuracy against radius here")
    args = parser.parse_args(argv)
    if bool(args.tables) == bool(args.from_json):
        parser.error("pass the tables or --from-json, not both or neither")
    tables = json.loads(args.from_json.read_text())["tables"] if args.from_json else load_tables(args.tables)
    tables = sorted(tables, key=lambda t: (t["sigma"], _kind(t) != "vanilla"))
    section = markdown(tables)
    if args.json:
        args.json.write_text(json.dumps({"tables": [compact(t) for t in tables]}, separators=(",", ":")) + "\n")
    if args.plot:
        plot(tables, args.plot)
    if args.results:
        replace_section(args.results, section)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
