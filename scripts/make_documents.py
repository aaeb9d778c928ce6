"""Render pages of text and their dirty twins: (noisy, clean) PNG pairs for document denoising.

The denoising write-up cleans 258x540 grayscale scans of documents (coffee stains, folds, faded
ink). Those scans cannot be fetched here, so this script makes pages of the same kind: random
words set in matplotlib's own fonts (DejaVu Sans / Serif / Sans Mono, STIX, Computer Modern;
several sizes, line spacings, margins and ink tones), rendered with the Agg backend into a clean
page, and the same page dirtied by what a scan of an old sheet shows:

- uneven lighting: a linear gradient in a random direction and a soft vignette over a grey page;
- paper texture: a smooth random field;
- coffee stains: irregular blobs, darker at their rim where the coffee dried;
- creases and folds: a thin dark line with light on one side and shadow on the other;
- the ink: slightly blurred and a little faded;
- speckle: Gaussian grain and salt-and-pepper dots.

Output: ``OUT/noisy/page_0000.png`` ... and ``OUT/clean/page_0000.png`` ..., same names, 8-bit
grayscale PNGs of ``--height`` x ``--width`` pixels (white paper = 255). Page ``i`` depends only on
``--seed`` and ``i`` (and the fonts matplotlib ships), so a run is reproducible and ``--n`` only
adds pages; held-out pages come from another ``--seed``. The pairs load with npvae's own data
path, the noisy page as the input and the clean page as its target::

    python scripts/make_documents.py --out docs_train --n 144 --seed 0
    python scripts/make_documents.py --out docs_test --n 48 --seed 1        # held-out pages
    npvae train --data docs_train/noisy --target docs_train/clean ...

Needs matplotlib (``pip install 'npvae[plot]'``; it brings Pillow, which writes the PNGs).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

FONTS = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral", "cmr10")
BOLD_FONTS = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral")  # cmr10 has no bold face
DPI = 72  # one point = one pixel
REFERENCE_WIDTH = 540  # the write-up's scans; font sizes and stains scale with the page's width

WORDS = """
the of and to in is was for that with as on by at from this be are or it an which have not were his
had but their they one all been has there more also would who its than other into some when only
these two time may first after new year over most made many such where through between under then
state used work part could should must before while well during world people being both each same
three those because city number however found system since house water against later place between
high small large early long little great public report paper letter office page record account
notice committee council company market price order board general meeting member section result
figure table value method study field court school church station river street north south east
west month week morning evening press annual review history survey plan budget county district
service business daily weekly receipt invoice statement balance payment amount total credit estate
""".split()

PUNCT = (",", ",", ",", ";", ":")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for noisy/ and clean/ (created)")
    p.add_argument("--n", type=int, default=144, help="pages to render")
    p.add_argument("--height", type=int, default=258, help="page height in pixels")
    p.add_argument("--width", type=int, default=540, help="page width in pixels")
    p.add_argument("--seed", type=int, default=0, help="seeds every page (page i: seed and i)")
    p.add_argument("--force", action="store_true",
                   help="write into noisy/ and clean/ even when they already hold PNGs (removing those first)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.height < 16 or args.width < 32:
        p.error(f"pages must be at least 16 x 32 pixels (height x width), got {args.height} x {args.width}")
    if args.height * args.width > 4096 * 4096:
        p.error(f"pages of {args.height} x {args.width} pixels are too large (at most 4096 x 4096 in area)")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    return args


# ----------------------------------------------------------------------------- the clean page


def _sentence_words(rng: np.random.Generator) -> list[str]:
    """One sentence: 4 to 16 words, capitalised, with the odd comma or number, ending in a full stop."""
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(4, 17)))]
    for i in range(len(words) - 1):
        if rng.random() < 0.04:
            words[i] = str(int(rng.integers(1, 2000)))
        elif rng.random() < 0.08:
            words[i] += str(rng.choice(PUNCT))
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def page_layout(rng: np.random.Generator, height: int, width: int) -> dict:
    """The typesetting choices of one page (all sizes in pixels)."""
    scale = width / REFERENCE_WIDTH
    size = max(6.0, rng.uniform(11.0, 19.0) * scale)  # font size; with DPI = 72, points = pixels
    font = str(rng.choice(FONTS))
    return {
        "font": font,
        "size": size,
        "bold": bool(rng.random() < 0.15) and font in BOLD_FONTS,
        "line_height": size * rng.uniform(1.15, 1.8),
        "left": rng.uniform(0.02, 0.08) * width,
        "right": rng.uniform(0.02, 0.08) * width,
        "top": rng.uniform(0.02, 0.1) * height,
        "ink": rng.uniform(0.0, 0.15),  # the clean page's text tone (0 black, 1 white)
    }


def _paragraph(rng: np.random.Generator) -> list[str]:
    """The words of one paragraph: 1 to 5 sentences."""
    return [w for _ in range(int(rng.integers(1, 6))) for w in _sentence_words(rng)]


def _typeset(rng: np.random.Generator, layout: dict, height: int, width: int, measure) -> list[tuple[float, float, str]]:
    """Lines of text as (x, baseline y from the top, text): paragraphs wrapped to the text width, each
    starting with an indent, some after a blank line. ``measure(text)`` is the width of ``text`` in pixels.
    """
    usable = width - layout["left"] - layout["right"]
    lines = []
    y = layout["top"] + layout["size"]
    words: list[str] = []
    while y < height + layout["size"]:  # the last line may be cut by the page's bottom edge, as on a scan
        indent = 0.0
        if not words:
            words = _paragraph(rng)
            indent = 2.0 * layout["size"]
        line = [words.pop(0)]  # a word wider than the line is set anyway, and the edge cuts it
        while words and measure(" ".join(line + words[:1])) <= usable - indent:
            line.append(words.pop(0))
        lines.append((layout["left"] + indent, y, " ".join(line)))
        y += layout["line_height"]
        if not words and rng.random() < 0.5:  # the paragraph ends with a blank line
            y += layout["line_height"]
    return lines


def render_clean(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A clean page: (H, W) float64 in [0, 1], white paper (1) and dark text.

    Returns
    -------
    page : (H, W) float64
    coverage : (H, W) float64
        How much of each pixel the glyphs cover (0 paper, 1 ink), the anti-aliased text mask.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    layout = page_layout(rng, height, width)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    prop = FontProperties(family=layout["font"], size=layout["size"], weight="bold" if layout["bold"] else "normal")

    def measure(text: str) -> float:
        return renderer.get_text_width_height_descent(text, prop, ismath=False)[0]

    for x, y, text in _typeset(rng, layout, height, width, measure):
        fig.text(x / width, 1.0 - y / height, text, fontproperties=prop, color="black", va="baseline",
                 parse_math=False)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    if rgba.shape[:2] != (height, width):  # matplotlib sizes the canvas from the figure; check, never assume
        raise RuntimeError(f"matplotlib rendered {rgba.shape[0]} x {rgba.shape[1]} pixels, expected {height} x {width}")
    coverage = 1.0 - rgba[..., 0].astype(np.float64) / 255.0
    fig.clear()
    return 1.0 - coverage * (1.0 - layout["ink"]), coverage


# ----------------------------------------------------------------------------- dirt


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (H, 1) and (1, W)."""
    return np.arange(height, dtype=np.float64)[:, None] + 0.5, np.arange(width, dtype=np.float64)[None, :] + 0.5


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W) with edge padding; identity for sigma <= 0."""
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(k, k + n), axis=axis) for k, t in enumerate(taps))
    return out


def smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random field (H, W), zero mean and unit standard deviation: Gaussian noise on a coarse
    grid of about ``cells`` cells across the width, bilinearly interpolated."""
    gh, gw = max(2, round(cells * height / width) + 1), cells + 1
    coarse = rng.standard_normal((gh, gw))
    yy, xx = np.linspace(0, gh - 1, height), np.linspace(0, gw - 1, width)
    i0, j0 = np.minimum(yy.astype(int), gh - 2), np.minimum(xx.astype(int), gw - 2)
    fy, fx = (yy - i0)[:, None], (xx - j0)[None, :]
    i0, j0 = i0[:, None], j0[None, :]
    field = ((1 - fy) * (1 - fx) * coarse[i0, j0] + (1 - fy) * fx * coarse[i0, j0 + 1]
             + fy * (1 - fx) * coarse[i0 + 1, j0] + fy * fx * coarse[i0 + 1, j0 + 1])  # (H, W)
    return (field - field.mean()) / max(field.std(), 1e-12)


def lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multiplicative illumination (H, W) around 1: a linear gradient plus a vignette."""
    y, x = _grid(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    u = ((x / width - 0.5) * np.cos(angle) + (y / height - 0.5) * np.sin(angle))  # in about [-0.7, 0.7]
    gradient = 1.0 + rng.uniform(0.1, 0.35) * u
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r2 = ((y - cy) / height) ** 2 + ((x - cx) / width) ** 2
    return gradient * (1.0 - rng.uniform(0.0, 0.35) * r2)


def coffee_stain(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """How much one stain darkens each pixel (H, W), in [0, 1): an irregular blob with a dark rim."""
    y, x = _grid(height, width)
    scale = min(height, width)
    cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
    radius = rng.uniform(0.12, 0.45) * scale
    aspect, tilt = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    dy, dx = y - cy, x - cx
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.12 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    rho = np.hypot(u, v) / (radius * wobble)  # 1 on the stain's edge
    inside = 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / 0.03, -50, 50)))
    rim = np.exp(-0.5 * ((rho - 1.0) / rng.uniform(0.015, 0.05)) ** 2)
    fill = rng.uniform(0.03, 0.2) * (0.8 + 0.4 * rng.random())
    return np.clip(fill * inside * (0.7 + 0.3 * rho.clip(0, 1) ** 2) + rng.uniform(0.05, 0.25) * rim, 0.0, 0.95)


def crease(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multiplicative shading (H, W) around 1 of one fold across the page: a thin dark line, light on
    one side and shadow on the other, fading with the distance from the fold."""
    y, x = _grid(height, width)
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    angle = rng.uniform(0, np.pi)
    d = (x - cx) * np.sin(angle) - (y - cy) * np.cos(angle)  # signed distance to the fold, pixels
    width_px = rng.uniform(0.6, 1.8)
    reach = rng.uniform(3.0, 15.0)
    line = rng.uniform(0.1, 0.35) * np.exp(-0.5 * (d / width_px) ** 2)
    shade = rng.uniform(0.03, 0.1) * np.sign(d) * np.exp(-np.abs(d) / reach)
    return 1.0 - line + shade


def dirty(rng: np.random.Generator, coverage: np.ndarray) -> np.ndarray:
    """The scan of an old copy of the page whose glyph coverage is ``coverage`` (H, W): (H, W) in [0, 1]."""
    height, width = coverage.shape
    paper = rng.uniform(0.72, 0.95) * lighting(rng, height, width)
    paper *= 1.0 + rng.uniform(0.01, 0.05) * smooth_field(rng, height, width, cells=int(rng.integers(6, 24)))
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        paper *= 1.0 - coffee_stain(rng, height, width)
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        paper *= crease(rng, height, width)
    ink = gaussian_blur(coverage, rng.uniform(0.3, 0.9)) * rng.uniform(0.75, 1.0)  # blurred, faded glyphs
    page = paper * (1.0 - ink * (1.0 - rng.uniform(0.02, 0.2)))  # the ink darkens the paper under it
    page += rng.uniform(0.005, 0.035) * rng.standard_normal(page.shape)
    salt_pepper = rng.random(page.shape) < rng.uniform(0.0005, 0.006)
    page[salt_pepper] = rng.random(int(salt_pepper.sum())) < 0.5
    return np.clip(page, 0.0, 1.0)


# ----------------------------------------------------------------------------- pages and files


def make_pair(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Page ``index`` of ``seed``: (noisy, clean), each (H, W) uint8 (255 = white)."""
    rng = np.random.default_rng([seed, index])
    clean, coverage = render_clean(rng, height, width)
    noisy = dirty(rng, coverage)
    return _to_uint8(noisy), _to_uint8(clean)


def _to_uint8(page: np.ndarray) -> np.ndarray:
    return np.round(np.clip(page, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit grayscale PNG (colour type 0) of (H, W) uint8."""
    from PIL import Image

    Image.fromarray(pixels, mode="L").save(path, format="PNG")


def page_name(index: int) -> str:
    return f"page_{index:04d}.png"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as exc:
        print(f"make_documents.py: needs matplotlib (and the Pillow it brings): pip install 'npvae[plot]' ({exc})",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"make_documents.py: --out {out} is a file; pass a folder (it is created when missing)", file=sys.stderr)
        return 2
    folders = {"noisy": out / "noisy", "clean": out / "clean"}
    for folder in folders.values():
        if folder.exists() and not folder.is_dir():
            print(f"make_documents.py: {folder} exists and is not a folder", file=sys.stderr)
            return 2
        old = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if old and not args.force:
            print(f"make_documents.py: {folder} already holds {len(old)} PNG files, which would mix with these "
                  f"pages; choose another --out, or pass --force to remove them first", file=sys.stderr)
            return 2
        for f in old:
            f.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    squared = 0.0
    for i in range(args.n):
        noisy, clean = make_pair(args.seed, i, args.height, args.width)
        write_png(folders["noisy"] / page_name(i), noisy)
        write_png(folders["clean"] / page_name(i), clean)
        squared += float(np.mean(((noisy.astype(np.float64) - clean) / 255.0) ** 2))
    rmse = math.sqrt(squared / args.n)
    print(f"wrote {args.n} pairs of {args.height}x{args.width} grayscale pages to {folders['noisy']}/ and "
          f"{folders['clean']}/ ({page_name(0)} ...) in {time.perf_counter() - start:.1f}s, seed {args.seed}")
    print(f"RMSE of the noisy pages against the clean ones (pixels in [0, 1], root of the mean over pages of "
          f"each page's mean squared error): {rmse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
