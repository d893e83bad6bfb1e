"""tools/certified_accuracy.py: radii in the models' input grid and, beside them, about the data set's own images."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import certified_accuracy as tool  # noqa: E402


def _table(sigma: float, msvp: bool, **extra) -> dict:
    records = [{"index": i, "true_label": 1, "label": 1, "abstain": False, "radius": 0.1 * i, "count": 990,
                "predict_label": 1, "predict_abstain": False, "base_label": 1, "seconds": 1.0} for i in range(10)]
    return {"sigma": sigma, "msvp": msvp, "n": 1000, "n0": 100, "alpha": 0.001, "images": 10, "dataset": "digits",
            "radii": [0.0, 0.25, 0.5], "certified_accuracy": [1.0, 0.7, 0.5],
            "certified_interval": [[0.7, 1.0], [0.4, 0.9], [0.2, 0.8]], "smoothed_clean_accuracy": 1.0,
            "smoothed_clean_interval": [0.7, 1.0], "abstained": 0, "max_radius_for_n": 0.616,
            "seconds_per_image": 1.0, "per_image": records, **extra}


def test_an_old_three_channel_digits_table_gives_radii_about_the_8x8_images_too() -> None:
    """Tables without shapes (every digits export of that time: 3x16x16 from 1x8x8 images): each
    radius is also given / (2 sqrt 3), the norm of upscaling 8x8 to 16x16 and replicating to 3 channels."""
    text = tool.markdown([_table(0.25, False), _table(0.25, True)])
    norm = 2 * math.sqrt(3)
    header = next(line for line in text.splitlines() if line.startswith("| sigma |"))
    assert f"| r = 0.25 (1x8x8: {0.25 / norm:.3f}) |" in header and f"| r = 0.5 (1x8x8: {0.5 / norm:.3f}) |" in header
    assert f"| 0.616 ({0.616 / norm:.3f}) |" in text
    assert "3x16x16 input grid" in text and "r / 3.464" in text and "predate recorded shapes" in text


def test_recorded_shapes_are_used_and_a_native_grid_is_left_alone() -> None:
    same = {"input_shape": [1, 8, 8], "source": {"shape": [1, 8, 8]}}
    text = tool.markdown([_table(0.25, False, **same), _table(0.25, True, **same)])
    assert "| r = 0.25 |" in text and "1x8x8:" not in text and "predate" not in text
    assert "about the models' 1x8x8 input" in text
    grey16 = {"input_shape": [1, 16, 16], "source": {"shape": [1, 8, 8]}}
    text = tool.markdown([_table(0.25, False, **grey16)])
    assert f"| r = 0.25 (1x8x8: {0.25 / 2:.3f}) |" in text and "predate" not in text  # the resize alone: norm 2


def test_the_results_section_is_what_the_digits_json_gives() -> None:
    """docs/RESULTS.md's certified-accuracy section is the tool's output from the saved JSON."""
    import json

    tables = json.loads((ROOT / "docs" / "certified-accuracy-digits.json").read_text())["tables"]
    tables = sorted(tables, key=lambda t: (t["sigma"], tool._kind(t) != "vanilla"))
    section = (ROOT / "docs" / "RESULTS.md").read_text().split(tool.BEGIN + "\n", 1)[1].split(tool.END, 1)[0]
    assert section == tool.markdown(tables)
    assert "(1x8x8: 0.072)" in section
