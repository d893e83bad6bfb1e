"""Write a PNG of one built-in test digit, to try `certify` or the server without data of your own.

    python tools/sample_image.py runs/demo/digit.png [--index 0]
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
    parser.add_argument("--index", type=int, default=0, help="which test image of the digits split")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(default_image(args.index))
    print(args.out)


if __name__ == "__main__":
    main()
