"""Regenerate the certified-accuracy section of docs/RESULTS.md from `evaluate --smoothing --json` files.

Each input is one model's table (``specformer-deploy evaluate MODEL.onnx --smoothing SIGMA ... --json``).
The script writes, from those files alone (no number is typed by hand):

- the markdown table (rows: sigma x vanilla/MSVP; columns: certified accuracy per radius with its
  two-sided 95% Clopper–Pearson interval, the smoothed classifier's clean accuracy, abstentions,
  the largest radius n samples can certify, seconds per image) between the markers
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

from specformer_deploy.robustness.smoothing_eval import certified_radii, plot_certified_accuracy

BEGIN, END = "<!-- certified-accuracy:begin -->", "<!-- certified-accuracy:end -->"

# Cohen, Rosenfeld, Kolter (ICML 2019), Table / Figure for CIFAR-10, ResNet-110, sigma 0.25,
# n = 100,000, alpha = 0.001: their figures, quoted for scale only.
COHEN_CIFAR10 = {"model": "ResNet-110 (Cohen et al. 2019, CIFAR-10, their figures)", "sigma": 0.25,
                 "certified_accuracy": {0.25: 0.60, 0.5: 0.42}}


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
    lines = [f"Certified accuracy (%) at L2 radius r (pixels in [0, 1]); {setup}.", ""]
    header = ["sigma", "model", *[f"r = {r:g}" for r in radii], "smoothed clean", "abstained",
              "max certifiable r", "s / image"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tables:
        cells = [f"{t['sigma']:g}", _kind(t)]
        for accuracy, (low, high) in zip(t["certified_accuracy"], t["certified_interval"]):
            cells.append(f"{_pct(accuracy)} [{_pct(low)}, {_pct(high)}]")
        low, high = t["smoothed_clean_interval"]
        cells += [f"{_pct(t['smoothed_clean_accuracy'])} [{_pct(low)}, {_pct(high)}]", str(t["abstained"]),
                  f"{t['max_radius_for_n']:.3f}", f"{t['seconds_per_image']:.2f}"]
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
              "largest radius n samples can certify, so every column beyond it is 0 by construction, not by the "
              "model. 's / image': CERTIFY + PREDICT on 2 shared CPU cores. 'MSVP - vanilla': the difference in "
              "certified accuracy in points on the same images, with the exact McNemar test's p-value on the "
              "images where the two models disagree."]
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
        curves = [(f"sigma {t['sigma']:g}, {_kind(t)}", certified_radii(t["per_image"])) for t in tables]
        sigmas = sorted({t["sigma"] for t in tables})
        styles = [{"color": f"C{sigmas.index(t['sigma'])}", "linestyle": "-" if _kind(t) == "MSVP" else "--"}
                  for t in tables]
        plot_certified_accuracy(curves, args.plot, tables[0]["radii"], styles)
    if args.results:
        replace_section(args.results, section)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
