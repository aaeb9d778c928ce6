"""Preprocessing and seeded batching: pixels to model inputs, binarisation, epoch orders.

- :func:`to_model_range` turns data of any shape into floats in a model's value range: ``uint8``
  pixels are scaled (``0 -> lo``, ``255 -> hi``), anything else must already lie in the range.
- :func:`to_float` is the older ``(N, D)`` pixel scaler; :func:`binarize_static` and
  :func:`binarize_dynamic` draw binary data from intensities in [0, 1].
- :func:`epoch_permutation` and :func:`batch_indices` give reproducible batches.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..ops import pixels_to_range

__all__ = [
    "to_model_range", "to_float", "binarize_static", "binarize_dynamic", "epoch_permutation",
    "batch_indices",
]


def _check_probabilities(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected {name} of dtype float32 or float64 (see to_float), got {x.dtype}")
    if x.size:
        # min/max propagate NaN, so two reductions check finiteness and range without a mask.
        lo, hi = x.min(), x.max()
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(f"expected {name} with values in [0, 1], found NaN")
        if lo < 0 or hi > 1:
            raise ValueError(f"expected {name} with values in [0, 1] (Bernoulli means), got range [{lo}, {hi}]")
    return x


def _check_float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"expected dtype float32 or float64, got {dtype}")
    return dtype


def _check_value_range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"expected value_range (lo, hi) with finite lo < hi, got {value_range}")
    return lo, hi


def to_model_range(x, value_range: tuple[float, float] = (0.0, 1.0), dtype=np.float32, *,
                   name: str = "x") -> np.ndarray:
    """Turn data of any shape into a model's inputs: floats of ``dtype`` in ``value_range``.

    ``uint8`` is read as pixels 0..255 and scaled linearly, exactly as the trainer always did:

    .. math:: x = lo + (hi - lo) \\cdot \\text{pixel} / 255

    (first to [0, 1] in ``dtype``, then ``x * (hi - lo) + lo`` when the range is not (0, 1), so
    results are bit-identical to earlier versions). Every other numeric dtype (floats, bools,
    other integers) is taken as values already on the model's scale: they must lie in
    ``value_range`` and are only cast to ``dtype``.

    Parameters
    ----------
    x : (N, ...) array
        ``uint8`` pixels, or float / bool / integer values in ``value_range``; any shape.
    value_range : (lo, hi)
        The model's input range, e.g. (0, 1) for Bernoulli decoders or (-1, 1) for tanh outputs;
        finite, lo < hi.
    dtype : float32 or float64
    name : str
        Names the array in error messages (e.g. ``"train_target"``).

    Returns
    -------
    out : array of x's shape and ``dtype``
        Always a new array.

    Raises
    ------
    TypeError
        x is not numeric (strings, objects, complex), or ``dtype`` is not float32/float64.
    ValueError
        Non-uint8 values outside ``value_range`` (or NaN): the message gives the observed range.
    """
    a = np.asarray(x)
    dtype = _check_float_dtype(dtype)
    lo, hi = _check_value_range(value_range)
    if a.dtype == np.uint8:
        return pixels_to_range(a, lo, hi, dtype)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"expected {name} of a numeric dtype (uint8 pixels, or floats / integers / bools "
                        f"already in the model's range), got {a.dtype}")
    out = a.astype(dtype)
    if out.size:
        # min/max propagate NaN: two reductions check finiteness and range without a mask.
        amin, amax = out.min(), out.max()
        if np.isnan(amin) or np.isnan(amax):
            raise ValueError(f"expected {name} values in [{lo:g}, {hi:g}] for this model, found NaN")
        if amin < lo or amax > hi:
            var = name if name.isidentifier() else "x"
            hint = (f" (integer pixels 0..255? pass them as uint8: {var}.astype(np.uint8))"
                    if a.dtype.kind in "iu" and amax <= 255 and amin >= 0 and amax > hi else "")
            raise ValueError(f"expected {name} values in [{lo:g}, {hi:g}] for this model, got range "
                             f"[{amin:g}, {amax:g}]; scale your data or pick a model with that range{hint}")
    return out


def to_float(images, value_range: tuple[float, float] = (0.0, 1.0), dtype=np.float32) -> np.ndarray:
    """Scale pixels to floats in ``value_range``.

    .. math:: x = lo + (hi - lo) \\cdot \\text{pixel} / 255

    Parameters
    ----------
    images : (N, D) array
        uint8 pixels 0..255, or floats already in [0, 1] (bool counts as 0/1).
    value_range : (lo, hi)
        Target range, e.g. (0, 1) for Bernoulli decoders or (-1, 1); lo < hi, both finite.
    dtype : float32 or float64

    Returns
    -------
    x : (N, D) array of ``dtype``
        A new array; 0 maps to exactly ``lo`` and 255 (or 1.0) to exactly ``hi``.
    """
    x = np.asarray(images)
    if x.ndim != 2:
        raise ValueError(f"expected images of shape (N, D), e.g. (N, 784), got shape {x.shape}")
    dtype = _check_float_dtype(dtype)
    lo, hi = _check_value_range(value_range)
    if x.dtype == np.uint8:
        out = pixels_to_range(x, 0.0, 1.0, dtype)
    elif x.dtype == np.bool_:
        out = x.astype(dtype)
    elif x.dtype.kind == "f":
        _check_probabilities(x.astype(dtype, copy=False), "images")
        out = x.astype(dtype)
    else:
        raise TypeError(f"expected images of dtype uint8 (0..255) or float (in [0, 1]), got {x.dtype}")
    if (lo, hi) != (0.0, 1.0):
        out *= hi - lo
        out += lo
    return out


def binarize_static(x, rng: np.random.Generator | None = None) -> np.ndarray:
    """Binarise once, for a fixed binary dataset: a Bernoulli draw, or a threshold at 0.5.

    .. math:: b = \\mathbb{1}[u < x],\\ u \\sim U(0, 1) \\quad\\text{or}\\quad b = \\mathbb{1}[x > 0.5]

    Parameters
    ----------
    x : (N, D) float32 or float64 array
        Intensities in [0, 1] (see :func:`to_float`).
    rng : np.random.Generator, optional
        Source of the single draw; None thresholds at 0.5 instead.

    Returns
    -------
    b : (N, D) array of x's dtype, values in {0, 1}
    """
    x = _check_probabilities(x)
    if rng is None:
        return (x > 0.5).astype(x.dtype)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected rng to be an np.random.Generator or None, got {type(rng).__name__}")
    return (rng.random(x.shape, dtype=x.dtype) < x).astype(x.dtype)


def binarize_dynamic(x, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
    """A fresh Bernoulli draw on every call (dynamic binarisation, one per minibatch).

    .. math:: b = \\mathbb{1}[u < x],\\ u \\sim U(0, 1)

    Parameters
    ----------
    x : (B, D) float32 or float64 array
        Intensities in [0, 1].
    rng : np.random.Generator
    out : (B, D) array, optional
        C-contiguous float32/float64 buffer to write into. When it does not overlap ``x`` the
        uniforms are drawn straight into it and nothing is allocated; ``out=x`` (binarise in
        place) works too, at the cost of one temporary for the uniforms.

    Returns
    -------
    b : (B, D) array, values in {0, 1}
        ``out`` if given, else a new array of x's dtype.
    """
    x = _check_probabilities(x)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected rng to be an np.random.Generator, got {type(rng).__name__}")
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype)
    else:
        if not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype not in (np.float32, np.float64):
            raise ValueError(f"expected out of shape {x.shape} and dtype float32 or float64, got "
                             f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("expected out to be a writeable C-contiguous array")
        if np.may_share_memory(out, x):
            # Drawing into out would overwrite x before the comparison reads it. The same
            # generator calls give the same uniforms, so the result matches the separate-buffer path.
            np.less(rng.random(out.shape, dtype=out.dtype), x, out=out)
            return out
    rng.random(dtype=out.dtype, out=out)
    np.less(out, x, out=out)
    return out


# ----------------------------------------------------------------------------- batching


def _check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"expected {name} a non-negative integer, got {value!r}")
    return int(value)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one epoch, a pure function of ``(seed, epoch)``.

    Drawn from ``np.random.default_rng([seed, epoch])``, so a run resumed at epoch k visits the
    examples in exactly the order an uninterrupted run would, without replaying earlier epochs.

    Returns
    -------
    perm : (n,) int64 array
        A permutation of ``0..n-1``.
    """
    seed = _check_nonneg_int(seed, "seed")
    epoch = _check_nonneg_int(epoch, "epoch")
    n = _check_nonneg_int(n, "n")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def batch_indices(n: int, batch_size: int, perm: np.ndarray | None = None,
                  drop_last: bool = False) -> Iterator[np.ndarray]:
    """Split ``perm`` (default ``0..n-1``) into consecutive batches of indices.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        At least 1.
    perm : (n,) integer array, optional
        The order, e.g. :func:`epoch_permutation`.
    drop_last : bool
        Skip a final batch smaller than ``batch_size``.

    Yields
    ------
    idx : (b,) int64 array
        Views into ``perm``, ``b == batch_size`` except possibly the last.
    """
    n = _check_nonneg_int(n, "n")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"expected batch_size a positive integer, got {batch_size!r}")
    if perm is None:
        perm = np.arange(n, dtype=np.int64)
    else:
        perm = np.asarray(perm)
        if perm.shape != (n,) or perm.dtype.kind not in "iu":
            raise ValueError(f"expected perm an integer array of shape ({n},), got {perm.dtype} {perm.shape}")
    stop = n - n % batch_size if drop_last else n
    return (perm[start:start + batch_size] for start in range(0, stop, int(batch_size)))
