"""Measure the blank bands along the edges of saved pictures: how many rows (top, bottom) and columns
(left, right) at each edge are one uniform colour, the colour of the corner pixel.

A figure whose fixed-aspect image does not fill its canvas shows the leftover as a wide empty strip
(e.g. 40 px under a grid of samples); a figure that fits its contents keeps only the layout's
padding, a few pixels. ``tests/viz/test_blank_bands.py`` holds every npvae picture to
:data:`MAX_BAND` pixels per edge.

Usage::

    python scripts/blank_bands.py docs/*.png
    python scripts/blank_bands.py --max 8 docs/*.png     # exit status 1 if any band is wider
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: The widest uniform strip an edge may have: the constrained layout's padding (3/72 inch, about 6 px
#: at npvae's 150 dpi) and a pixel or two of rounding.
MAX_BAND = 8


def read_pixels(path) -> np.ndarray:
    """A PNG as an (H, W, C) array (C = 1 for gray), values as stored."""
    from npvae.data.png import read_png

    pixels = read_png(path)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def blank_bands(pixels: np.ndarray) -> dict[str, int]:
    """Uniform rows or columns at each edge of an (H, W, C) image.

    A row (column) counts when every pixel in it equals the pixel in the image's corner on that
    side; counting stops at the first row (column) that differs.

    Returns
    -------
    bands : dict with keys ``top``, ``bottom``, ``left``, ``right`` (pixels)
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]

    def run(lines: np.ndarray) -> int:  # lines: (L, N, C), from the edge inwards
        same = (lines == lines[0, 0]).all(axis=(1, 2))
        return int(np.argmin(same)) if not same.all() else len(same)

    return {"top": run(pixels), "bottom": run(pixels[::-1]),
            "left": run(pixels.transpose(1, 0, 2)), "right": run(pixels.transpose(1, 0, 2)[::-1])}


def main(argv=None) -> int:
    from npvae.cli.parser import HelpFormatter

    p = argparse.ArgumentParser(description="Count the uniform rows and columns at the edges of PNG pictures.",
                                formatter_class=HelpFormatter)
    p.add_argument("png", nargs="+", type=Path, help="the pictures to check")
    p.add_argument("--max", type=int, default=MAX_BAND, help="widest band allowed, pixels (exit 1 beyond it)")
    args = p.parse_args(argv)
    worst = 0
    for path in args.png:
        pixels = read_pixels(path)
        bands = blank_bands(pixels)
        worst = max(worst, *bands.values())
        flag = "  <- blank band" if max(bands.values()) > args.max else ""
        print(f"{path}: {pixels.shape[0]}x{pixels.shape[1]} px; uniform rows top {bands['top']}, bottom "
              f"{bands['bottom']}; columns left {bands['left']}, right {bands['right']}{flag}")
    return 1 if worst > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
