"""Published MNIST certified accuracy, computed from the authors' released certification logs.

Jeong & Shin 2020 (github.com/jh-jeong/smoothing-consistency) released the CERTIFY logs of every
MNIST model they report (LeNet, all 60,000 training images, 90 epochs; N = 100,000, N0 = 100,
alpha = 0.001, all 10,000 test images; one-channel 1x28x28 images, pixels in [0, 1]: the space of
our MNIST radii). This tool reads them from a clone of that repository and writes, per method and
sigma, the mean over the released seeds of certified accuracy at every radius of our report and
the average certified radius (ACR: the mean over images of the radius, 0 when wrong or abstained).
An image counts at r when its ``correct`` is 1 and its ``radius`` >= r. The logs round radii to two
decimals, so a figure at r can differ from the unrounded one by the images within 0.005 of r.

    git clone https://github.com/jh-jeong/smoothing-consistency /tmp/sc
    python tools/published_mnist.py /tmp/sc --out docs/published-mnist.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

REPO = "jh-jeong/smoothing-consistency"
RADII = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.58, 1.75, 2.0)
CURVE_STEP, CURVE_END = 0.02, 2.5  # the whole curve, for figures on the same axes as ours
# method -> (our objective's words, the directory of its logs under data/certify/mnist); every
# sigma of a directory is read. Single exploratory runs (seed suffix _0, with an _acc file) are
# left out: the reported figures are the five-seed sets.
METHODS: dict[str, tuple[str, str]] = {
    "gaussian": ("Gaussian (Cohen et al.)", "cohen"),
    "consistency": ("consistency, m = 2, eta 0.5 (lambda 10 at sigma 0.25, 5 otherwise)",
                    "consistency/cohen/num_2/lbd_{lam}/eta_0.5"),
    "smoothadv": ("SmoothAdv, m = 4, 10 PGD steps, eps 255/256 (Salman et al.)", "salman/pgd_255.0_10_10/num_4"),
    "smoothadv + consistency": ("SmoothAdv (m = 4, 10 steps) + consistency lambda 1",
                                "consistency/salman_255.0_10_10/num_4/lbd_1.0/eta_0.5"),
}
CONSISTENCY_LAMBDA = {0.25: "10.0", 0.5: "5.0", 1.0: "5.0"}  # the five-seed sets the repository holds
SETTING = ("LeNet, 60,000 training images, 90 epochs, N = 100,000, N0 = 100, alpha = 0.001, all 10,000 test images, "
           "1x28x28, pixels in [0, 1]")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def log_files(repo: Path, commit: str) -> list[str]:
    return [p for p in _git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
            if p.startswith("data/certify/mnist/")]


def read_log(repo: Path, commit: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(radius, correct)`` per test image of one CERTIFY log (tab-separated, a header line)."""
    lines = _git(repo, "show", f"{commit}:{path}").splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    radius = np.array([float(r[header.index("radius")]) for r in rows])
    correct = np.array([int(r[header.index("correct")]) for r in rows])
    return radius, correct


def summarize_logs(logs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Mean over seeds of certified accuracy (%) at RADII and of the ACR."""
    certified = [[100.0 * float(np.mean(correct.astype(bool) & (radius >= r))) for r in RADII]
                 for radius, correct in logs]
    acr = [float(np.mean(np.where(correct == 1, radius, 0.0))) for radius, correct in logs]
    grid = np.round(np.arange(0.0, CURVE_END + CURVE_STEP / 2, CURVE_STEP), 4)
    curve = np.mean([[100.0 * float(np.mean(correct.astype(bool) & (radius >= r))) for r in grid]
                     for radius, correct in logs], axis=0)
    return {"certified_accuracy": [round(float(v), 2) for v in np.mean(certified, axis=0)],
            "curve": {"radii": grid.tolist(), "certified_accuracy": [round(float(v), 2) for v in curve]},
            "certified_accuracy_sd": [round(float(v), 2) for v in np.std(certified, axis=0, ddof=1)],
            "acr": round(float(np.mean(acr)), 4), "seeds": len(logs), "images": int(len(logs[0][0]))}


def published(repo: Path, commit: str = "HEAD") -> dict[str, Any]:
    commit = _git(repo, "rev-parse", commit).strip()
    files = log_files(repo, commit)
    rows = []
    for method, (words, directory) in METHODS.items():
        for sigma in (0.25, 0.5, 1.0):
            folder = "data/certify/mnist/" + directory.format(lam=CONSISTENCY_LAMBDA[sigma])
            pattern = re.compile(re.escape(folder) + rf"/noise_{sigma:.2f}_(\d+)$")
            chosen = [p for p in files if (m := pattern.fullmatch(p)) and m.group(1) != "0"]
            if not chosen:
                continue
            logs = [read_log(repo, commit, p) for p in sorted(chosen)]
            rows.append({"method": method, "words": words, "sigma": sigma, "logs": sorted(chosen),
                         **summarize_logs(logs)})
    return {"source": f"Jeong & Shin 2020, released certification logs ({REPO} at {commit})",
            "repository": REPO, "commit": commit, "setting": SETTING, "n": 100_000, "alpha": 0.001,
            "space": "1x28x28, pixels in [0, 1], L2", "radii": list(RADII), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help=f"a clone of {REPO} (a work tree or a bare repository)")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=Path("docs/published-mnist.json"))
    args = parser.parse_args()
    data = published(args.repo, args.commit)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for row in data["rows"]:
        print(f"{row['method']:>24} sigma {row['sigma']:<4} seeds {row['seeds']} ACR {row['acr']:.3f} "
              + " ".join(f"{v:5.1f}" for v in row["certified_accuracy"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
