"""Write a PNG of one built-in test digit, to try `certify` or the server without data of your own.

    python tools/sample_image.py runs/demo/digit.png [--index 0]
    python tools/sample_image.py mnist.png --dataset mnist --size 28
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import default_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--index", type=int, default=0, help="which test image of the split")
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"), help="a built-in dataset")
    parser.add_argument("--size", type=int, default=16, help="side of the PNG in pixels (digits are 8x8 upscaled)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(default_image(args.index, args.dataset, args.size))
    print(args.out)


if __name__ == "__main__":
    main()
