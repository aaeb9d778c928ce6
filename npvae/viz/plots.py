"""Every picture npvae draws, written straight to PNG files and safe on headless machines.

Design:

- Inputs are plain arrays, lists of dicts or callables; this module imports no npvae model. What a
  picture needs computed (the PCA of the codes, active units, the quantile grid of the manifold)
  comes from :mod:`npvae.study.statistics`; class names come with the caller (a dataset's
  ``class_names``).
- Each ``plot_*`` function writes one file, creates its parent directories, and returns the path
  written (a :class:`pathlib.Path`). The format follows the file suffix (``.png`` by default).
- matplotlib is an optional extra (``pip install 'npvae[plot]'``). It is imported lazily inside the
  functions that draw, and only its object-oriented API is used (``Figure`` + ``FigureCanvasAgg``):
  no pyplot, no global figure registry, no backend switch, so nothing leaks between calls or threads
  and no display is ever needed. Without it, the image grids (samples, reconstructions,
  interpolation, class grid, manifold) are written as bare PNG mosaics (no title or labels, each
  image pixel drawn as a square of :data:`PNG_SCALE` pixels) by :func:`npvae.data.png.write_png`;
  the plots with axes raise :class:`MatplotlibMissing`, an ``ImportError`` that says so.
- Every file is written atomically (a temporary file renamed over the target): a reader sees the
  previous picture or the new one, never half of one.
- The layout helpers (:func:`tile_images`, :func:`kl_axis`, :func:`labelled_cells`) are pure NumPy
  and work without matplotlib.
- Images are ``(N, 784)`` rows (any square ``D = side * side`` works), ``(N, H, W)`` gray or
  ``(N, H, W, 3)`` RGB, with values in ``value_range`` (``(0, 1)`` by default; ``(-1, 1)`` for
  tanh outputs). Gray ones are drawn in a gray colormap, 1 = white; RGB ones in colour; no
  axis ticks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..checkpoint import atomic_write
from ..data.png import write_png
from ..study.statistics import active_units, check_kl_per_dim, manifold_grid, pca_2d

__all__ = [
    "MatplotlibMissing",
    "image_grid",
    "kl_axis",
    "labelled_cells",
    "plot_class_grid",
    "plot_code_histogram",
    "plot_estimator_comparison",
    "plot_filters",
    "plot_grad_norms",
    "plot_gradient_decomposition",
    "plot_interpolation",
    "plot_kl_per_dim",
    "plot_latent_scatter",
    "plot_manifold",
    "plot_reconstructions",
    "plot_samples",
    "plot_training_curves",
    "tile_images",
]

_DPI = 150
_CELL_INCHES = 0.45     # on-page size of one 28x28 image in a grid
_GUTTER_FILL = 0.5      # mid-gray: visible between black MNIST backgrounds, distinct from strokes
_EMPTY_FILL = 1.0       # white: unused trailing cells blend into the page
_PAD_INCHES = 0.04      # white margin around every picture (6 px at 150 dpi)
_OUT_OF_RANGE_TOL = 0.01  # fraction of the value range an image may overshoot before we refuse it

PNG_SCALE = 2           # without matplotlib: screen pixels per image pixel, so 28x28 digits stay legible

PathLike = str | os.PathLike


class MatplotlibMissing(ImportError):
    """A picture needs matplotlib, which is not installed."""


# --------------------------------------------------------------------------------------------------
# matplotlib plumbing
# --------------------------------------------------------------------------------------------------

def _new_figure(figsize: tuple[float, float], ncols: int = 1, **subplot_kw: Any):
    """Create an Agg-backed figure (no pyplot) and its axes.

    Returns
    -------
    fig : matplotlib.figure.Figure
    axes : Axes, or a 1-D array of ``ncols`` Axes when ``ncols > 1``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MatplotlibMissing("plots with axes need matplotlib: pip install 'npvae[plot]' (image grids are "
                                "written without it)") from exc
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def _new_mosaic(figsize: tuple[float, float], mosaic):
    """An Agg-backed figure laid out by ``mosaic`` (matplotlib's subplot_mosaic); returns (fig, dict of axes)."""
    fig, axes = _new_figure(figsize)
    axes.remove()  # the one default axes, replaced by the mosaic's
    return fig, fig.subplot_mosaic(mosaic)


def _save(fig, path: PathLike) -> Path:
    """Write ``fig`` to ``path`` (parents created; atomically) and release it. Returns the path as a Path."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower() or "png"
    # "tight": the canvas shrinks to what is drawn, so a fixed-aspect image grid whose figure size was
    # only estimated leaves no blank band beside it (scripts/blank_bands.py measures the edges).
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=_DPI, facecolor="white", bbox_inches="tight",
                                             pad_inches=_PAD_INCHES), durable=False)
    # Figures made without pyplot are not registered anywhere; clearing drops the artists now
    # rather than whenever the garbage collector gets to them.
    fig.clear()
    return path


def _check_title(title: Any) -> str | None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string or None, got {type(title).__name__}")
    return title


# --------------------------------------------------------------------------------------------------
# Images and mosaics (pure NumPy)
# --------------------------------------------------------------------------------------------------

def _as_images(images: Any, name: str = "images", value_range: tuple[float, float] = (0, 1),
               lead_dims: int = 1) -> np.ndarray:
    """Validate images (gray or RGB, any size) and map them to [0, 1].

    Parameters
    ----------
    images : array_like, shape ``(*lead, D)``, ``(*lead, H, W)`` or ``(*lead, H, W, 3)``
        ``D = side**2`` pixels of a square gray image, a gray image, or an RGB one (a last
        axis of 1 is read as gray). ``lead`` has ``lead_dims`` dimensions (e.g. ``(N,)`` or
        ``(P, K)``).
    value_range : (lo, hi)
        Values ``lo`` and ``hi`` become black and white. Overshoots of up to 1% of ``hi - lo``
        (e.g. a Gaussian decoder mean of 1.004) are clipped; larger ones raise, because they
        usually mean logits were passed instead of probabilities.

    Returns
    -------
    out : ndarray, shape ``(*lead, H, W)`` or ``(*lead, H, W, 3)``, float64 in [0, 1]
    """
    lo, hi = _check_value_range(value_range)
    arr = np.asarray(images)
    lead = "(N, " if lead_dims == 1 else "(" + ", ".join("PKC"[:lead_dims]) + ", "
    expected = f"{lead}784), {lead}H, W) or {lead}H, W, 3) (any square D = side*side also works)"
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a numeric array of shape {expected}, "
                        f"got dtype {arr.dtype}")
    if arr.ndim == lead_dims + 1:
        d = arr.shape[-1]
        side = math.isqrt(d)
        if d == 0 or side * side != d:
            raise ValueError(f"expected {name} of shape {expected}, got {arr.shape}: "
                             f"{d} pixels is not a square image")
        arr = arr.reshape(*arr.shape[:-1], side, side)
    elif arr.ndim == lead_dims + 3:
        if arr.shape[-1] not in (1, 3):
            raise ValueError(f"expected {name} of shape {expected}, got {arr.shape}: the last axis of a colour "
                             f"image holds its 3 channels (RGB; drop an alpha channel first)")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != lead_dims + 2:
        hint = f"; for a single image pass {name}[None]" if arr.ndim == lead_dims else ""
        raise ValueError(f"expected {name} of shape {expected}, got {arr.shape}{hint}")
    if arr.size == 0 or 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {arr.shape}); nothing to draw")
    integer_pixels = arr.dtype.kind in "ui"
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf (did training diverge?)")
    span = hi - lo
    amin, amax = float(arr.min()), float(arr.max())
    if amin < lo - _OUT_OF_RANGE_TOL * span or amax > hi + _OUT_OF_RANGE_TOL * span:
        raise ValueError(
            f"{name} has values in [{amin:.4g}, {amax:.4g}], outside value_range=({lo:g}, {hi:g}). "
            + ("Integer pixels: pass value_range=(0, 255) or divide by 255." if integer_pixels else
               "Pass probabilities (apply a sigmoid to logits) or set value_range to match the data."))
    return np.clip((arr - lo) / span, 0.0, 1.0)


def _check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range must be finite with lo < hi, got ({lo}, {hi})")
    return lo, hi


def _tile(grid: np.ndarray, gutter: int, fill: float, empty: float) -> np.ndarray:
    """Tile a ``(R, C, h, w)`` grid of images into one ``(R*h + (R-1)*g, C*w + (C-1)*g)`` mosaic;
    a ``(R, C, h, w, 3)`` grid of RGB images gives a ``(..., ..., 3)`` mosaic.

    The ``g``-pixel gutters between cells take the value ``fill`` (no border around the outside);
    all-NaN cells (padding) take ``empty``, and so do gutters between two empty cells.
    """
    r, c, h, w = grid.shape[:4]
    out = np.full((r * h + (r - 1) * gutter, c * w + (c - 1) * gutter, *grid.shape[4:]), fill, dtype=np.float64)
    for i in range(r):
        for j in range(c):
            y, x = i * (h + gutter), j * (w + gutter)
            out[y:y + h, x:x + w] = grid[i, j]
            if np.isnan(grid[i, j]).all():  # blank the gutters right of and below an empty cell
                out[y:y + h + gutter, max(x - gutter, 0):x + w + gutter] = empty
                out[max(y - gutter, 0):y + h + gutter, x:x + w + gutter] = empty
    out[np.isnan(out)] = empty
    return out


def _pad_to_grid(images: np.ndarray, ncols: int) -> np.ndarray:
    """``(N, h, w[, 3])`` -> ``(ceil(N / ncols), ncols, h, w[, 3])``, trailing cells NaN."""
    n, cell = images.shape[0], images.shape[1:]
    nrows = -(-n // ncols)
    padded = np.full((nrows * ncols, *cell), np.nan)
    padded[:n] = images
    return padded.reshape(nrows, ncols, *cell)


def _check_ncols(ncols: Any, n: int) -> int:
    if ncols is None:
        return max(1, math.ceil(math.sqrt(n)))
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    return int(min(ncols, n))


def tile_images(images: Any, ncols: int | None = None, gutter: int = 1,
                fill: float = _GUTTER_FILL, empty: float | None = None) -> np.ndarray:
    """Tile images row by row into one 2-D mosaic (pure NumPy).

    Parameters
    ----------
    images : array_like, shape ``(N, D)`` with ``D = side**2``, or ``(N, H, W)``
        Values are copied as they are (no rescaling).
    ncols : int, optional
        Images per row; default ``ceil(sqrt(N))``. The last row is padded with empty cells.
    gutter : int
        Width in pixels of the lines between cells (no outer border).
    fill : float
        Value of the gutters.
    empty : float, optional
        Value of the empty trailing cells (and of the gutters beside them); default ``fill``.

    Returns
    -------
    mosaic : ndarray, shape ``(R*H + (R-1)*gutter, C*W + (C-1)*gutter)``
        With ``C = ncols`` and ``R = ceil(N / C)``; image ``k`` has its top-left pixel at
        ``((k // C) * (H + gutter), (k % C) * (W + gutter))``.
    """
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 2:
        side = math.isqrt(arr.shape[1])
        if side * side != arr.shape[1] or side == 0:
            raise ValueError(f"expected images of shape (N, 784) or (N, 28, 28), got {arr.shape}: "
                             f"{arr.shape[1]} pixels is not a square image")
        arr = arr.reshape(-1, side, side)
    elif arr.ndim != 3:
        raise ValueError(f"expected images of shape (N, 784) or (N, 28, 28), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("images is empty; nothing to tile")
    if isinstance(gutter, bool) or not isinstance(gutter, (int, np.integer)) or gutter < 0:
        raise ValueError(f"gutter must be a non-negative integer, got {gutter!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("images contains NaN or inf")
    fill = float(fill)
    empty = fill if empty is None else float(empty)
    return _tile(_pad_to_grid(arr, _check_ncols(ncols, arr.shape[0])), int(gutter), fill, empty)


def _draw_grid(grid: np.ndarray, title: Any, *, gutter: int = 1,
               row_labels: Sequence[str] | Mapping[int, str] | None = None,
               col_labels: Mapping[int, str] | None = None, xlabel: str | None = None,
               ylabel: str | None = None, cell_inches: float = _CELL_INCHES):
    """Tile a ``(R, C, h, w)`` grid of [0, 1] images (NaN cells empty) and show it in gray (or a
    ``(R, C, h, w, 3)`` grid in colour), nearest-neighbour, without tick marks; label rows and
    columns at the cell centres."""
    title = _check_title(title)
    h, w = grid.shape[2:4]
    mosaic = _tile(grid, gutter, _GUTTER_FILL, _EMPTY_FILL)
    height_px, width_px = mosaic.shape[:2]
    scale = cell_inches / w  # inches per image pixel
    width_in = min(max(width_px * scale, 1.5), 14.0)
    scale = width_in / width_px
    height_in = min(height_px * scale, 18.0)
    # Room for what sits beside the image, so the fixed-aspect image fills the figure.
    extra_w = 0.75 if ylabel else (1.2 if row_labels else 0.0)
    extra_h = (0.45 if title else 0.0) + (0.35 if (col_labels or xlabel) else 0.0)
    fig, ax = _new_figure((width_in + extra_w, height_in + extra_h))
    if mosaic.ndim == 3:  # RGB floats in [0, 1] are shown as they are
        ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    else:
        ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if row_labels:
        rows = row_labels if isinstance(row_labels, Mapping) else dict(enumerate(row_labels))
        ax.set_yticks([i * (h + gutter) + (h - 1) / 2 for i in rows], list(rows.values()))
    if col_labels:
        ax.set_xticks([j * (w + gutter) + (w - 1) / 2 for j in col_labels],
                      list(col_labels.values()))
    ax.tick_params(length=0, labelsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    if title:
        # Long titles on narrow grids wrap rather than getting clipped.
        ax.set_title(title, fontsize=11, wrap=True)
    return fig, ax


def _save_grid(grid: np.ndarray, path: PathLike, title: Any, *, gutter: int = 1,
               decorate: Callable | None = None, **labels) -> Path:
    """Draw a ``(R, C, h, w[, 3])`` grid of [0, 1] images with matplotlib (:func:`_draw_grid`; then
    ``decorate(ax)``, e.g. ticks), or, without matplotlib, write the bare mosaic as a PNG (no title or
    labels), each pixel a ``PNG_SCALE`` square."""
    try:
        fig, ax = _draw_grid(grid, title, gutter=gutter, **labels)
        if decorate is not None:
            decorate(ax)
    except MatplotlibMissing:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise MatplotlibMissing(f"writing {path.name} needs matplotlib: pip install 'npvae[plot]', or "
                                    "ask for a .png, which npvae writes without it") from None
        mosaic = _tile(grid, gutter, _GUTTER_FILL, _EMPTY_FILL)
        mosaic = np.repeat(np.repeat(mosaic, PNG_SCALE, axis=0), PNG_SCALE, axis=1)
        return write_png(path, np.rint(255 * mosaic).astype(np.uint8))
    return _save(fig, path)


def _check_labels_list(labels: Any, n: int, name: str, what: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but there are {n} {what}")
    return labels


def image_grid(images: Any, path: PathLike, ncols: int | None = None, title: str | None = None,
               value_range: tuple[float, float] = (0, 1),
               row_labels: Sequence[str] | None = None) -> Path:
    """Tile images into one grid picture (1-px gray gutters) and save it.

    Parameters
    ----------
    images : array_like, shape ``(N, 784)``, ``(N, H, W)`` or ``(N, H, W, 3)`` (RGB)
        Values in ``value_range``; ``lo`` is drawn black and ``hi`` white (full colour for RGB).
    path : str or PathLike
        Output file (PNG unless the suffix says otherwise); parent directories are created.
    ncols : int, optional
        Images per row; default ``ceil(sqrt(N))``.
    title : str, optional
    value_range : (lo, hi)
        ``(0, 1)`` for probabilities, ``(-1, 1)`` for tanh outputs.
    row_labels : sequence of str, optional
        One label per row, drawn to the left of the row.

    Returns
    -------
    path : Path
    """
    imgs = _as_images(images, "images", value_range)
    ncols = _check_ncols(ncols, imgs.shape[0])
    grid = _pad_to_grid(imgs, ncols)
    row_labels = _check_labels_list(row_labels, grid.shape[0], "row_labels", "rows")
    return _save_grid(grid, path, title, row_labels=row_labels)


def plot_samples(images: Any, path: PathLike, title: str = "Samples from the prior",
                 ncols: int | None = None, value_range: tuple[float, float] = (0, 1)) -> Path:
    """Save a grid of generated images, e.g. ``decode(z)`` with ``z ~ N(0, I)``.

    Parameters
    ----------
    images : array_like, shape ``(N, 784)`` or ``(N, 28, 28)``
    path : str or PathLike
    title : str
    ncols : int, optional
        Default ``ceil(sqrt(N))``.
    value_range : (lo, hi)

    Returns
    -------
    path : Path
    """
    return image_grid(images, path, ncols=ncols, title=title, value_range=value_range)


def plot_reconstructions(originals: Any, reconstructions: Any, path: PathLike,
                         title: str | None = None,
                         ncols: int | None = None,
                         value_range: tuple[float, float] = (0, 1),
                         targets: Any = None,
                         row_labels: Sequence[str] | None = None) -> Path:
    """Save inputs with each reconstruction directly below its input (and, given ``targets``, the
    target below that).

    Rows cycle "input" / "reconstruction" (/ "target"); with more than ``ncols`` images the block of
    rows repeats. A denoiser's picture passes its corrupted inputs as ``originals``, the clean images
    as ``targets`` and the labels ``("corrupted input", "output", "clean original")``.

    Parameters
    ----------
    originals : array_like, shape ``(N, 784)`` or ``(N, 28, 28)``
        What the model was given.
    reconstructions : array_like, same shape as ``originals``
        E.g. the decoder's Bernoulli means ``sigmoid(logits)`` for the encoded inputs.
    path : str or PathLike
    title : str, optional
        Default ``"Inputs and their reconstructions"``, or ``"Inputs, outputs and targets"``.
    ncols : int, optional
        Images per row; default ``min(N, 10)``.
    value_range : (lo, hi)
    targets : array_like, same shape as ``originals``, optional
        What each output should be, when that is not the input itself (denoising).
    row_labels : sequence of 2 (3 with ``targets``) str, optional
        The labels of the rows of one block; default ``("input", "reconstruction")``, or
        ``("input", "output", "target")``.

    Returns
    -------
    path : Path
    """
    rows = {"originals": originals, "reconstructions": reconstructions}
    if targets is not None:
        rows["targets"] = targets
    images = [_as_images(a, name, value_range) for name, a in rows.items()]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"{', '.join(rows)} must have the same shape, got "
                         + " and ".join(str(np.shape(a)) for a in rows.values()))
    default = ("input", "reconstruction") if targets is None else ("input", "output", "target")
    labels = _check_labels_list(row_labels, len(images), "row_labels", "rows per block") or list(default)
    if title is None:
        title = "Inputs and their reconstructions" if targets is None else "Inputs, outputs and targets"
    ncols = _check_ncols(10 if ncols is None else ncols, images[0].shape[0])
    grids = [_pad_to_grid(im, ncols) for im in images]
    grid = np.stack(grids, axis=1).reshape(-1, *grids[0].shape[1:])  # (kR, C, h, w), interleaved
    return _save_grid(grid, path, title, row_labels=labels * grids[0].shape[0])


def plot_interpolation(paths: Any, path: PathLike,
                       title: str = "Walking through latent space from A to B",
                       value_range: tuple[float, float] = (0, 1)) -> Path:
    """Save decoded latent interpolations, one path per row.

    Parameters
    ----------
    paths : array_like, shape ``(P, K, 784)`` or ``(P, K, 28, 28)``
        Row ``p`` holds the ``K`` decoded points on a path from digit A to digit B, endpoints
        included (``K >= 2``).
    path : str or PathLike
    title : str
    value_range : (lo, hi)

    Returns
    -------
    path : Path
    """
    imgs = _as_images(paths, "paths", value_range, lead_dims=2)  # (P, K, h, w)
    k = imgs.shape[1]
    if k < 2:
        raise ValueError(f"each interpolation path needs K >= 2 steps (both endpoints), got K={k}")
    return _save_grid(imgs, path, title, col_labels={0: "A", k - 1: "B"},
                      xlabel=f"{k} evenly spaced steps, endpoints included")


def plot_class_grid(images_per_class: Any, path: PathLike,
                    class_names: Sequence[str] | None = None,
                    title: str = "Generating the class you ask for (one row per class)",
                    value_range: tuple[float, float] = (0, 1)) -> Path:
    """Save class-conditional samples (e.g. from a CVAE), one labelled row per class.

    Parameters
    ----------
    images_per_class : array_like, shape ``(C, n, 784)`` or ``(C, n, 28, 28)``
        Row ``c`` holds ``n`` images generated for class ``c``.
    path : str or PathLike
    class_names : sequence of str, optional
        ``C`` names; default the class indices ``"0"``, ``"1"``, ...
    title : str
    value_range : (lo, hi)

    Returns
    -------
    path : Path
    """
    imgs = _as_images(images_per_class, "images_per_class", value_range, lead_dims=2)
    c = imgs.shape[0]
    names = (_check_labels_list(class_names, c, "class_names", "classes")
             or [str(i) for i in range(c)])
    return _save_grid(imgs, path, title, row_labels=names)


# --------------------------------------------------------------------------------------------------
# The 2-D manifold
# --------------------------------------------------------------------------------------------------

def _fmt_code(v: float) -> str:
    """A latent coordinate for a tick label; values that round to zero print as "0.00"."""
    return f"{v:.2f}" if abs(v) >= 0.005 else "0.00"


_TICK_FONT = 8  # points


def labelled_cells(n: int, cell_inches: float, label_inches: float) -> list[int]:
    """Which of ``n`` cells of ``cell_inches`` each get a tick label ``label_inches`` wide (pure Python).

    Every cell when the labels fit side by side; else evenly spaced cells, both ends included, at
    least one label's width (plus a small gap) apart.
    """
    step = max(1, math.ceil((label_inches + 0.06) / cell_inches))
    count = (n - 1) // step + 1
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, count)}) if count > 1 else [0]


def plot_manifold(decode: Callable[[np.ndarray], Any], path: PathLike, n: int = 20,
                  latent_dim: int = 2, quantile_range: tuple[float, float] = (0.05, 0.95),
                  title: str = "The learned manifold: decoding a grid over the 2-D latent space",
                  value_range: tuple[float, float] = (0, 1)) -> Path:
    """Decode an ``n x n`` grid of Gaussian quantiles and save the images in place.

    Parameters
    ----------
    decode : callable, ``(M, 2) -> (M, 784)``
        Maps latent codes to images (e.g. Bernoulli means); called once with ``M = n * n``
        float64 codes from :func:`npvae.study.statistics.manifold_grid`.
    path : str or PathLike
    n : int
        Images per side.
    latent_dim : int
        The model's latent size ``Z``; must be 2 (checked here so a wrong model fails clearly
        instead of inside ``decode``).
    quantile_range : (lo, hi)
    title : str
    value_range : (lo, hi)

    Returns
    -------
    path : Path
    """
    if latent_dim != 2:
        raise ValueError(f"the manifold plot needs a 2-D latent space, but "
                         f"latent_dim={latent_dim}; train a model with latent_dim=2, "
                         "or use plot_latent_scatter instead")
    if not callable(decode):
        raise TypeError(f"decode must be a callable (M, 2) -> (M, 784), "
                        f"got {type(decode).__name__}")
    z = manifold_grid(n, quantile_range)
    out = np.asarray(decode(z))
    if out.ndim < 1 or out.shape[0] != z.shape[0]:
        raise ValueError(f"decode returned shape {out.shape} for {z.shape[0]} codes; "
                         f"expected ({z.shape[0]}, 784)")
    imgs = _as_images(out, "decode(z)", value_range)
    grid = imgs.reshape(n, n, *imgs.shape[1:])
    lo, hi = quantile_range
    quantiles = f"at the standard-normal quantiles {100 * lo:g}% to {100 * hi:g}%"
    # No gutters: neighbouring cells are neighbouring codes, and the picture reads as one surface.
    h, w = imgs.shape[1:3]

    def ticks(ax):
        # Ticks label the grid itself: a mark at every cell's centre, the code of the cell under it on as
        # many as fit (every cell at the default size).
        cell = min(max(n * _CELL_INCHES, 1.5), 14.0) / n  # a cell's width on the page, as _draw_grid sizes it
        label = _TICK_FONT / 72 * 0.62 * max(len(_fmt_code(v)) for v in z[:, 0])
        cols = set(labelled_cells(n, cell, label))
        rows = set(labelled_cells(n, cell * h / w, _TICK_FONT / 72))
        ax.set_xticks([j * w + (w - 1) / 2 for j in range(n)],
                      [_fmt_code(z[j, 0]) if j in cols else "" for j in range(n)])
        ax.set_yticks([i * h + (h - 1) / 2 for i in range(n)],
                      [_fmt_code(z[i * n, 1]) if i in rows else "" for i in range(n)])
        ax.tick_params(length=3, labelsize=_TICK_FONT)

    return _save_grid(grid, path, title, gutter=0, decorate=ticks, xlabel=f"z[0], left to right, {quantiles}",
                      ylabel="z[1], bottom to top")


# --------------------------------------------------------------------------------------------------
# Latent space
# --------------------------------------------------------------------------------------------------

def _check_class_labels(labels: Any, n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"expected labels of shape ({n},) to match z, got {lab.shape}")
    if lab.dtype.kind not in "iub":
        if lab.dtype.kind != "f" or not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError(f"labels must be integer class indices, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {lab.min()}")
    return lab


def _class_colors(n_classes: int):
    """Qualitative colours: tab10 up to 10 classes, tab20 up to 20."""
    from matplotlib import colormaps  # matplotlib is present: a figure already exists

    if n_classes > 20:
        raise ValueError(f"cannot colour {n_classes} classes distinctly (at most 20)")
    cmap = colormaps["tab10" if n_classes <= 10 else "tab20"]
    return [cmap(i) for i in range(n_classes)]


def plot_latent_scatter(z: Any, labels: Any, path: PathLike,
                        title: str = "Latent codes of the test set, coloured by class",
                        class_names: Sequence[str] | None = None) -> Path:
    """Scatter the codes (e.g. encoder means) coloured by class.

    ``Z == 2`` is drawn as is, ``Z > 2`` projected by :func:`npvae.study.statistics.pca_2d` (axes say
    how much variance each component keeps), ``Z == 1`` as one jittered strip per class.

    Parameters
    ----------
    z : array_like, shape ``(N, Z)``
    labels : array_like of int, shape ``(N,)``, or None
        Class of each code, ``0 <= label < C``; None draws every point in one colour.
    path : str or PathLike
    title : str
    class_names : sequence of str, optional
        Names indexed by label (e.g. a dataset spec's ``class_names``); default the label itself.

    Returns
    -------
    path : Path
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"expected z of shape (N, Z), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or inf (did training diverge?)")
    n, zdim = z.shape
    lab = None if labels is None else _check_class_labels(labels, n)
    n_classes = 1 if lab is None else int(lab.max()) + 1
    if class_names is not None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of strings, not one string")
        class_names = [str(s) for s in class_names]
        if len(class_names) < n_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but labels go up to "
                             f"{n_classes - 1}")
        n_classes = len(class_names)
    names = class_names or [str(i) for i in range(n_classes)]
    title = _check_title(title)

    size = float(np.clip(3000.0 / n, 3.0, 30.0))  # marker area: smaller as points get denser
    fig, ax = _new_figure((7.0, 5.5))
    colors = _class_colors(n_classes) if lab is not None else None
    present = np.unique(lab) if lab is not None else [None]
    if zdim == 1:
        rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
        rows = np.zeros(n) if lab is None else lab.astype(np.float64)
        y = rows + rng.uniform(-0.3, 0.3, size=n)
        for c in present:
            m = slice(None) if c is None else lab == c
            ax.scatter(z[m, 0], y[m], s=size, alpha=0.6, linewidths=0,
                       color=None if c is None else colors[c])
        if lab is not None:
            ax.set_yticks(list(present), [names[c] for c in present])
            ax.set_ylabel("class")
        else:
            ax.set_yticks([])
        ax.set_xlabel("z (1-D latent)")
        ax.invert_yaxis()  # class 0 on top, like a table
    else:
        if zdim == 2:
            xy = z
            ax.set_xlabel("z[0]")
            ax.set_ylabel("z[1]")
        else:
            xy, ratio = pca_2d(z)
            ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% var)")
            ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% var)")
            title = f"{title}\n(PCA projection of the {zdim}-D latent)" if title else title
        # Shuffle the drawing order so no class systematically hides under another.
        order = np.random.default_rng(0).permutation(n)
        if lab is None:
            ax.scatter(xy[order, 0], xy[order, 1], s=size, alpha=0.6, linewidths=0)
        else:
            point_colors = np.array(colors)[lab[order]]
            ax.scatter(xy[order, 0], xy[order, 1], s=size, alpha=0.6, linewidths=0,
                       c=point_colors)
            for c in present:  # legend proxies, one per class present
                ax.scatter([], [], s=30, color=colors[c], label=names[c])
            ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), borderpad=0.0,
                      frameon=False, fontsize=9, title_fontsize=9)
        if zdim == 2:
            ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.25, linewidth=0.5)
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Training diagnostics
# --------------------------------------------------------------------------------------------------

def _read_records(records: Any, event: str) -> list[dict]:
    """A list of dicts, or a JSON-lines file, filtered to lines whose ``event`` (if any) matches."""
    if isinstance(records, (str, os.PathLike)):
        path = Path(records)
        if not path.is_file():
            raise FileNotFoundError(f"no log file at {path}")
        from ..rundir import read_log

        rows = read_log(path)  # regular file, bounded, one line naming the file for any bad line
    else:
        if isinstance(records, Mapping):
            raise TypeError("records must be a list of dicts (one per entry) or a JSONL path, "
                            "not a single dict")
        rows = list(records)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"records[{i}] must be a dict, got {type(row).__name__}")
        from ..rundir import upgrade_record

        rows = [upgrade_record(dict(row)) for row in rows]  # records from before the renames, as in a log
    return [r for r in rows if r.get("event", event) == event]


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None for missing/non-numeric/non-finite values."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _series(rows: list[dict], key: str, xkey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get(xkey))
        xs.append(i + 1 if x is None else x)
        ys.append(y)
    return xs, ys


_CURVE_PANELS = (
    ("Total loss", "loss"),
    ("Reconstruction term", "recon"),
    ("Second term (KL for a VAE)", "reg"),
)


def plot_training_curves(records: Any, path: PathLike, title: str | None = "Training curves",
                         logy: bool = False, ylabel: str = "loss per example",
                         panels: Sequence[tuple[str, str]] | None = None) -> Path:
    """Save loss curves per epoch, one panel per logged term (default: total, reconstruction, KL).

    Parameters
    ----------
    records : list of dict, or str / PathLike of a JSON-lines log
        One dict per epoch with any of ``epoch``, ``train_loss``, ``train_recon``, ``train_reg``,
        ``val_loss``, ``val_recon``, ``val_reg`` (logs from before the rename say ``_kl``); missing, None or non-finite values are skipped
        (``epoch`` defaults to the 1-based position). Entries with an ``event`` key are used
        only when ``event == "epoch"``, so a log that mixes step, config and epoch lines works.
    path : str or PathLike
    title : str, optional
    logy : bool
        Log-scale the y axes (useful when the first epochs dwarf the rest).
    ylabel : str
        Units of the logged values, shown on the first panel.
    panels : sequence of (title, key), optional
        One panel per entry, drawing ``train_{key}`` and ``val_{key}``; default
        ``(("Total loss", "loss"), ("Reconstruction term", "recon"), ("Second term (KL for a VAE)", "kl"))``.
        A model whose loss has one term draws one panel.

    Returns
    -------
    path : Path

    Raises
    ------
    ValueError
        If no record holds any of the six curves.
    """
    rows = _read_records(records, "epoch")
    panels = list(_CURVE_PANELS if panels is None else panels)
    if not panels or any(len(p) != 2 for p in panels):
        raise ValueError(f"panels must be a non-empty sequence of (title, key) pairs, got {panels!r}")
    fig, axes = _new_figure((4.0 * len(panels) + (1.0 if len(panels) == 1 else 0.0), 3.8), ncols=len(panels))
    axes = np.atleast_1d(axes)
    drew = False
    for ax, (panel_title, suffix) in zip(axes, panels):
        for split, style in (("train", "-"), ("val", "--")):
            xs, ys = _series(rows, f"{split}_{suffix}", "epoch")
            if xs:
                drew = True
                ax.plot(xs, ys, style, color="C0" if split == "train" else "C1",
                        marker="o" if len(xs) <= 30 else None, markersize=3,
                        label="train" if split == "train" else "validation")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 on a two-epoch run
        ax.grid(alpha=0.3, linewidth=0.5)
        if ax.lines:
            if logy:
                ax.set_yscale("log")
            ax.legend(fontsize=8, frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
    if not drew:
        keys = ", ".join(f"{s}_{k}" for s in ("train", "val") for _, k in panels)
        raise ValueError(f"no epoch record holds any of {keys} ({len(rows)} epoch records read)")
    axes[0].set_ylabel(ylabel)
    if _check_title(title):
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def kl_axis(kl: np.ndarray, threshold: float) -> tuple[str, float, float]:
    """The y axis that fits mean KLs per unit (Z,) (non-negative) and the activity threshold.

    Every unit active and all within a factor 100 of each other: a linear axis from 0 to 1.15 x the
    largest, so their differences read at a glance. Otherwise (a collapsed unit, or values spanning
    decades) a log axis so collapsed units (KL ~ 1e-4) stay visible next to active ones (KL ~ 1): from
    half the smaller of the smallest positive KL and the threshold up to twice the largest.

    Returns
    -------
    scale : "linear" or "log"
    bottom, top : float
    """
    positive = kl[kl > 0]
    if kl.min() > threshold and kl.max() <= 100 * kl.min():
        return "linear", 0.0, 1.15 * kl.max()
    floor = 0.5 * min(threshold, positive.min() if positive.size else threshold)
    return "log", floor, 2.0 * max(kl.max(), threshold)


def plot_kl_per_dim(kl_per_dim: Any, path: PathLike, threshold: float = 0.01,
                    title: str | None = None) -> Path:
    """Bar chart of mean KL per latent unit, sorted descending, with the activity threshold.

    The y axis fits the data (:func:`kl_axis`): linear when every unit is active and of one order of
    magnitude, else logarithmic, where exact zeros (no height on a log axis) are marked "0" on the floor.

    Parameters
    ----------
    kl_per_dim : array_like, shape ``(Z,)``
        Mean KL per unit in nats (see :func:`npvae.study.statistics.active_units`).
    path : str or PathLike
    threshold : float
        Units above it count as active (nats); drawn as a dashed line.
    title : str, optional
        Default ``"KL per latent unit: k of Z units active"``; a given title gets that count
        appended on a second line.

    Returns
    -------
    path : Path
    """
    kl = np.clip(check_kl_per_dim(kl_per_dim), 0.0, None)
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive number of nats, got {threshold!r}")
    zdim = kl.size
    k = active_units(kl, threshold)
    order = np.argsort(-kl, kind="stable")
    scale, floor, top = kl_axis(kl, threshold)
    heights = np.maximum(kl[order], floor)
    active = kl[order] > threshold

    fig, ax = _new_figure((min(max(4.5, 0.28 * zdim + 2.0), 14.0), 4.0))
    x = np.arange(zdim)
    ax.bar(x, heights - floor, bottom=floor, width=0.8,
           color=np.where(active, "C0", "0.65").tolist())
    ax.axhline(threshold, color="C3", linestyle="--", linewidth=1.2,
               label=f"threshold {threshold:g} nats")
    if scale == "log":
        for j in np.flatnonzero(kl[order] == 0):
            ax.text(x[j], floor, "0", ha="center", va="bottom", fontsize=7, color="0.4")
    ax.set_yscale(scale)
    ax.set_ylim(bottom=floor, top=top)
    labelsize = 8 if zdim <= 32 else 6
    if zdim <= 64:
        ax.set_xticks(x, [str(i) for i in order], fontsize=labelsize,
                      rotation=0 if zdim <= 20 else 90)
    ax.set_xlim(-0.6, zdim - 0.4)
    ax.set_xlabel("latent unit (sorted by KL)")
    ax.set_ylabel("mean KL (nats, log scale)" if scale == "log" else "mean KL (nats)")
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    from matplotlib.patches import Patch

    kinds = [Patch(color="C0", label="active")] * bool(active.any()) + \
        [Patch(color="0.65", label="inactive")] * bool((~active).any())  # only the kinds of bar drawn
    ax.legend(handles=[*kinds, ax.lines[0]], fontsize=8, frameon=False, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderpad=0.0)  # beside the bars, never over them
    summary = f"{k} of {zdim} units active"
    title = _check_title(title)
    ax.set_title(f"{title}\n{summary}" if title else f"KL per latent unit: {summary}",
                 fontsize=11)
    return _save(fig, path)


def plot_filters(weights: Any, path: PathLike, ncols: int | None = None,
                 title: str | None = "First-layer filters") -> Path:
    """Each row of a first layer's weights (H, 784) as a 28x28 tile, scaled per tile so that 0 is mid-gray
    and the tile's largest |w| is black (negative) or white (positive).

    Parameters
    ----------
    weights : array_like, shape ``(H, D)`` with ``D = side**2``
    path : str or PathLike
    ncols : int, optional
        Tiles per row; default ``ceil(sqrt(H))``.
    title : str, optional

    Returns
    -------
    path : Path
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"expected weights of shape (H, 784), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contains NaN or inf")
    peak = np.abs(w).max(axis=1, keepdims=True)
    tiles = 0.5 + 0.5 * w / np.where(peak > 0, peak, 1.0)  # (H, D) in [0, 1]
    return image_grid(tiles, path, ncols=ncols, title=_check_title(title))


def plot_code_histogram(codes: Any, path: PathLike, threshold: float | None = None, bins: int = 60,
                        title: str | None = None) -> Path:
    """Histogram of every code activation (all N x Z values), log-scaled counts, with the near-zero band.

    Parameters
    ----------
    codes : array_like, shape ``(N, Z)``
    path : str or PathLike
    threshold : float, optional
        Activations with |h| <= threshold count as near zero: the band is shaded and its share printed.
    bins : int
    title : str, optional

    Returns
    -------
    path : Path
    """
    h = np.asarray(codes, dtype=np.float64)
    if h.ndim != 2 or h.size == 0:
        raise ValueError(f"expected codes of shape (N, Z), got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("codes contains NaN or inf")
    values = h.ravel()
    fig, ax = _new_figure((6.0, 3.8))
    ax.hist(values, bins=int(bins), color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("code activation")
    ax.set_ylabel("count (log scale)")
    summary = f"{h.shape[0]:,} images x {h.shape[1]} units; mean {values.mean():.3g}"
    if threshold is not None:
        ax.axvspan(-threshold, threshold, color="C3", alpha=0.15, linewidth=0)
        summary += f"; {100 * float((np.abs(values) <= threshold).mean()):.1f}% with |h| <= {threshold:g}"
    title = _check_title(title)
    ax.set_title(f"{title}\n{summary}" if title else f"Code activations\n{summary}", fontsize=10)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    return _save(fig, path)


_STEP_KEYS = frozenset({"step", "epoch", "event", "iteration", "time"})


def plot_grad_norms(records: Any, path: PathLike,
                    title: str = "Gradient norm per layer during training") -> Path:
    """Save one line per layer of gradient norm against step, on a log y axis.

    Parameters
    ----------
    records : list of dict, or str / PathLike of a JSON-lines log
        ``{"step": int, "<layer name>": norm, ...}``. Every numeric key other than
        ``step``/``epoch``/``iteration``/``time`` is a layer; layers may come and go between
        records. Non-positive norms cannot sit on a log axis and are skipped. Entries with an
        ``event`` key are used only when ``event == "grad_norms"``, the trainer's records
        (``npvae train --log-grad-norms``).
    path : str or PathLike
    title : str

    Returns
    -------
    path : Path
    """
    rows = _read_records(records, "grad_norms")
    layers: dict[str, None] = {}  # insertion-ordered set: layers in order of first appearance
    for row in rows:
        for key, v in row.items():
            if key not in _STEP_KEYS and _number(v) is not None:
                layers.setdefault(str(key))
    if not layers:
        raise ValueError(f"no layer norms found in {len(rows)} records; expected dicts like "
                         '{"step": 10, "encoder.0": 0.3, ...}')
    fig, ax = _new_figure((8.5, 4.5))
    many = len(layers) > 10
    for i, name in enumerate(layers):
        xs, ys = _series(rows, name, "step")
        keep = [j for j, y in enumerate(ys) if y > 0]
        ax.plot([xs[j] for j in keep], [ys[j] for j in keep], linewidth=1.2,
                color=f"C{i % 10}", linestyle="-" if not many or i < 10 else "--", label=name,
                marker="o" if len(keep) <= 30 else None, markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (log scale)")
    ax.grid(alpha=0.3, linewidth=0.5, which="both")
    ax.legend(title="layer", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, borderpad=0.0,
              fontsize=8, title_fontsize=9)
    if _check_title(title):
        ax.set_title(title, fontsize=11)
    return _save(fig, path)


_ESTIMATOR_COLORS = ("C0", "C3", "C2", "C1", "C4", "C5", "C6")


def plot_estimator_comparison(table: Mapping[str, Any], path: PathLike,
                              n_draws: int | None = None,
                              title: str = "Gradient estimators of the same gradient, on the same draws") -> Path:
    """Compare gradient estimators: each one's means in a panel of its own (top), all per-draw variances (below).

    Parameters
    ----------
    table : mapping
        ``estimators``: the names to draw, in order (default: every name with a ``_mean`` or ``_var``
        column, in column order); for each
        name, ``{name}_mean`` and ``{name}_var``: sequences of length P (one per parameter), the
        mean and variance over draws of the single-draw estimate. Optional: ``labels`` (name ->
        legend label), ``param`` (P names, default ``theta[i]``), ``exact`` (P true gradients,
        drawn as black crosses) and ``n_draws``.
    path : str or PathLike
    n_draws : int, optional
        Draws behind each mean; when known (here or in ``table``), the means get error bars of
        +- 2 standard errors, ``2 * sqrt(var / n_draws)``.
    title : str

    Returns
    -------
    path : Path
    """
    if not isinstance(table, Mapping):
        raise TypeError(f"table must be a dict of columns, got {type(table).__name__}")
    names = [str(n) for n in table.get("estimators") or
             dict.fromkeys(k.rsplit("_", 1)[0] for k in table if k.endswith(("_mean", "_var")))]
    if not 1 <= len(names) <= len(_ESTIMATOR_COLORS):
        raise ValueError(f"expected 1 to {len(_ESTIMATOR_COLORS)} estimators, got {names}")
    keys = [f"{n}_{s}" for n in names for s in ("mean", "var")]
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(f"table is missing {missing}; it needs {keys}")
    cols = {}
    for k in (*keys, "exact"):
        if k not in table:
            continue
        col = np.asarray(table[k], dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(col)):
            raise ValueError(f"table[{k!r}] contains NaN or inf")
        cols[k] = col
    p = cols[keys[0]].size
    bad = {k: v.size for k, v in cols.items() if v.size != p}
    if p == 0 or bad:
        raise ValueError(f"all columns need the same non-zero length; {keys[0]} has {p}, but {bad}")
    for n in names:
        if cols[f"{n}_var"].min() < 0:
            raise ValueError(f"table[{n + '_var'!r}] has a negative variance ({cols[n + '_var'].min():.3g})")
    params = _check_labels_list(table.get("param"), p, "table['param']", "parameters") \
        or [f"theta[{i}]" for i in range(p)]
    labels = {**{n: n for n in names}, **dict(table.get("labels") or {})}
    if n_draws is None:
        n_draws = table.get("n_draws")
    if n_draws is not None and (isinstance(n_draws, bool) or int(n_draws) != n_draws
                                or n_draws < 1):
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")

    # One mean panel per estimator, each on its own scale (a noisy estimator's error bars would
    # flatten the others' means on a shared axis), the first estimator's means as a reference in
    # the others; the variances of all of them below, on one log scale.
    m = len(names)
    top = [f"mean{i}" for i in range(m)]
    fig, axes = _new_mosaic((min(14.0, max(10.0, 3.6 * m)), 7.5), [top, ["var"] * m])
    x = np.arange(p)
    first = names[0]
    for i, (n, color) in enumerate(zip(names, _ESTIMATOR_COLORS)):
        ax = axes[f"mean{i}"]
        mean, var = cols[f"{n}_mean"], cols[f"{n}_var"]
        err = None if n_draws is None else 2.0 * np.sqrt(var / n_draws)
        ax.errorbar(x, mean, yerr=err, fmt="o", color=color, capsize=3, markersize=5, label=labels[n])
        if i > 0:
            ax.scatter(x, cols[f"{first}_mean"], marker="_", color="k", s=120, zorder=3,
                       label=f"{labels[first]} mean")
        if "exact" in cols:
            ax.scatter(x, cols["exact"], marker="x", color="k", s=40, zorder=4, label="exact")
        ax.axhline(0.0, color="0.6", linewidth=0.6)
        ax.set_title(labels[n], fontsize=11, color=color)
        ax.margins(y=0.3)  # head-room: the legend sits above the points, never on them
        ax.legend(fontsize=9, frameon=False, loc="upper center", ncols=2)
    axes["mean0"].set_ylabel("mean estimate" + ("" if n_draws is None else f"\n(± 2 s.e., {int(n_draws)} draws)"),
                             fontsize=10)

    ax_v = axes["var"]
    w = 0.8 / m  # each estimator's slot within a parameter's group
    offsets = (np.arange(m) - (m - 1) / 2) * w
    variances = np.concatenate([cols[f"{n}_var"] for n in names])
    floor = max(variances[variances > 0].min() / 10, 1e-300) if np.any(variances > 0) else 1e-12
    for n, color, dx in zip(names, _ESTIMATOR_COLORS, offsets):
        v = np.maximum(cols[f"{n}_var"], floor)
        ax_v.bar(x + dx, v - floor, bottom=floor, width=w, color=color, label=labels[n])
    ax_v.set_yscale("log")
    top = max(float(variances.max()), floor)
    ax_v.set_ylim(bottom=floor, top=top * (top / floor) ** 0.3)  # a third of the decades free for the legend
    base = cols[f"{first}_var"]
    ratios = []
    for n in names[1:]:
        pos = (base > 0) & (cols[f"{n}_var"] > 0)
        if pos.any():
            ratios.append(f"{n}/{first} {np.median(cols[f'{n}_var'][pos] / base[pos]):.3g}x")
    ax_v.set_title("Variance of one draw's estimate (log scale)"
                   + (f"; median ratios: {', '.join(ratios)}" if ratios else ""), fontsize=11)
    ax_v.set_ylabel("variance", fontsize=10)
    ax_v.legend(fontsize=9, frameon=False, ncols=min(m, 3), loc="upper center")
    rotation = 0 if p <= 6 else 45
    for ax in axes.values():
        ax.set_xticks(x, params, rotation=rotation, ha="center" if rotation == 0 else "right", fontsize=9)
        ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax_v.set_xlabel("parameter of q", fontsize=10)
    if _check_title(title):
        fig.suptitle(title, fontsize=13)
    return _save(fig, path)


# Every estimator shares the decoder's gradient, whose IWAE SNR grows as √k (Rainforth et al. 2018).
_DECODER_SNR_RATE = 0.5


def _rate_label(slope: float) -> str:
    return {0.5: "∝ √k", -0.5: "∝ 1/√k"}.get(slope, f"∝ k^{slope:g}")


def plot_snr(rows: Sequence[Mapping[str, Any]], path: PathLike,
             title: str | None = "Signal-to-noise ratio of the gradient against k",
             rates: Mapping[str, float] | None = None) -> Path:
    """SNR of each estimator's encoder and decoder gradients against k, on log axes.

    Grey dashed guides show the papers' large-k rates through the last point of the estimator they
    concern (encoder: each of ``rates``; decoder ∝ √k, through the first estimator); where the rows
    carry ``floor``, a dotted line per estimator marks the SNR its draws would show if the gradient
    were zero.

    Parameters
    ----------
    rows : sequence of mappings
        As :func:`npvae.study.gradflow.estimator_snr` returns: ``estimator``, ``k``, ``group``
        ("encoder" or "decoder") and ``snr``; optional ``floor``; ``labels`` are not read (names are drawn).
    path : str or PathLike
    rates : mapping of estimator name -> float, optional
        The published large-k rate of an estimator's encoder SNR, SNR ∝ k^rate (default: each
        estimator entry's ``snr_rate`` in :data:`npvae.objectives.estimators.ESTIMATORS`).
    title : str or None

    Returns
    -------
    path : Path
    """
    rows = [dict(r) for r in rows]
    need = ("estimator", "k", "group", "snr")
    if not rows or any(any(key not in r for key in need) for r in rows):
        raise ValueError(f"expected rows with {', '.join(need)} (npvae.study.gradflow.estimator_snr)")
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    if len(names) > len(_ESTIMATOR_COLORS):
        raise ValueError(f"expected at most {len(_ESTIMATOR_COLORS)} estimators, got {names}")
    if rates is None:  # imported here: the registry brings the objectives, which only this default needs
        from ..objectives.estimators import ESTIMATORS

        rates = {n: e.snr_rate for n, e in ESTIMATORS.items() if e.snr_rate is not None}
    fig, axes = _new_figure((11.0, 4.6), ncols=2)

    def curve(name, group, key="snr"):
        pts = sorted((r["k"], r[key]) for r in rows if r["estimator"] == name and r["group"] == group
                     and np.isfinite(r.get(key, np.nan)) and r[key] > 0)
        return tuple(zip(*pts)) if pts else ((), ())

    for ax, group in zip(axes, ("encoder", "decoder")):
        curves = {n: curve(n, group) for n in names}
        shared = len({c for c in curves.values()}) == 1 and len(names) > 1
        drawn = [(names[0], "k")] if shared else list(zip(names, _ESTIMATOR_COLORS))
        for (n, color), marker in zip(drawn, "osD^v<>"):
            ks, snr = curves[n]
            if ks:
                ax.plot(ks, snr, marker=marker, color=color, linewidth=1.5, markersize=6,
                        label="every estimator (one gradient)" if shared else n)
            fk, floor = curve(n, group, "floor")
            if fk:
                ax.plot(fk, floor, linestyle=":", color=color, linewidth=1,
                        label="noise floor of the draws" if n == drawn[0][0] else None)
        guides = dict(rates) if group == "encoder" else {None: _DECODER_SNR_RATE}
        colors = dict(drawn)  # each estimator's guide in its curve's colour, so that two guides differ
        for name, slope in guides.items():
            ks, snr = curves.get(name if name is not None else names[0], ((), ()))
            if len(ks) > 1:
                ref = np.array([ks[0], ks[-1]], dtype=np.float64)
                ax.plot(ref, snr[-1] * (ref / ref[-1]) ** slope, linestyle="--", color=colors.get(name, "0.5"),
                        linewidth=1, alpha=0.8, label=_rate_label(slope) + ("" if name is None else f" ({name})"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (samples per image)", fontsize=11)
        ax.set_title(f"{group} parameters", fontsize=12)
        ax.grid(which="both", alpha=0.3, linewidth=0.5)
        ax.tick_params(labelsize=10)
        ax.legend(fontsize=9, frameon=False)
    axes[0].set_ylabel("SNR = |mean| / std, mean over parameters", fontsize=11)
    if _check_title(title):
        fig.suptitle(title, fontsize=13)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Gradient flow (npvae.study.gradflow)
# --------------------------------------------------------------------------------------------------

def plot_gradient_decomposition(rows: Sequence[Mapping[str, Any]], path: PathLike,
                                title: str = "Where each parameter's gradient comes from: "
                                             "reconstruction vs KL") -> Path:
    """Bar chart of the reconstruction and KL parts of each parameter's gradient, with their cosine.

    Top: the norm of each part per parameter (log scale; a part that is exactly zero, like the KL
    part of every decoder parameter, is marked "0" on the floor). Bottom: cos(recon part, KL part),
    +1 when the two terms push the parameter the same way, -1 when they fight.

    Parameters
    ----------
    rows : sequence of dicts
        One per parameter, in forward order, with ``param``, ``recon_norm``, ``kl_norm`` and
        optionally ``cosine`` (NaN or missing where undefined), as from
        :func:`npvae.study.gradflow.decomposition_rows`.
    path : str or PathLike
    title : str

    Returns
    -------
    path : Path
    """
    rows = list(rows)
    if not rows:
        raise ValueError("expected at least one row (one per parameter)")
    for i, row in enumerate(rows):
        missing = [k for k in ("param", "recon_norm", "kl_norm") if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] is missing {missing}")
    names = [str(r["param"]) for r in rows]
    recon = np.array([float(r["recon_norm"]) for r in rows])
    kl = np.array([float(r["kl_norm"]) for r in rows])
    norms = np.concatenate([recon, kl])
    if not np.all(np.isfinite(norms)) or norms.min() < 0:
        raise ValueError("gradient norms must be finite and non-negative")
    cos = np.array([np.nan if _number(r.get("cosine")) is None else float(r["cosine"]) for r in rows])
    positive = norms[norms > 0]
    floor = positive.min() / 10 if positive.size else 1e-12

    p = len(rows)
    fig = _new_figure((max(7.0, 0.75 * p + 2.5), 6.0))[0]
    fig.clear()
    ax, ax_cos = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    x = np.arange(p)
    w = 0.38
    for values, dx, color, label in ((recon, -w / 2, "C0", "reconstruction part"),
                                     (kl, w / 2, "C3", "KL part (beta-weighted)")):
        shown = np.maximum(values, floor)
        ax.bar(x + dx, shown - floor, bottom=floor, width=w, color=color, label=label)
        for j in np.flatnonzero(values == 0):
            ax.text(x[j] + dx, floor, "0", ha="center", va="bottom", fontsize=8, color=color)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("gradient norm (log scale)")
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=8, frameon=False)
    if _check_title(title):
        ax.set_title(title, fontsize=11)
    ax_cos.axhline(0.0, color="0.6", linewidth=0.6)
    defined = np.isfinite(cos)
    ax_cos.scatter(x[defined], cos[defined], color="k", s=18, zorder=3)
    for j in np.flatnonzero(~defined):
        ax_cos.text(x[j], 0.0, "n/a", ha="center", va="center", fontsize=7, color="0.5")
    ax_cos.set_ylim(-1.1, 1.1)
    ax_cos.set_ylabel("cos(recon, KL)")
    ax_cos.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax_cos.set_xticks(x, names, rotation=30 if p > 4 else 0, ha="right" if p > 4 else "center", fontsize=8)
    ax_cos.set_xlabel("parameter")
    return _save(fig, path)
