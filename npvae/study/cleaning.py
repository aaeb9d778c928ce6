"""How much a model trained on pairs (input -> target, e.g. noisy scan -> clean scan) cleans: the
numbers ``npvae evaluate`` reports for paired runs.

- :func:`pixel_rmse`: the root mean squared error per pixel of images against their targets, in
  units of the data's range (black to white is 1, whatever range the model works in);
- :func:`cleaning_rmse`: that error of the inputs ("before" cleaning) and of the model's outputs
  ("after").
"""

from __future__ import annotations

import numpy as np


def pixel_rmse(images, target, value_range=(0.0, 1.0)) -> float:
    """Root mean squared error per pixel, in units of the range.

    .. math:: \\mathrm{RMSE} = \\frac{1}{hi - lo} \\sqrt{\\frac{1}{N D} \\sum_{n, j} (a_{n j} - t_{n j})^2}

    Parameters
    ----------
    images, target : (N, ...) arrays of the same shape, in ``value_range``
    value_range : (lo, hi), hi > lo
        The data's range; the result is divided by its width, so it is in [0, 1] units (0.1: a tenth
        of the way from black to white).

    Returns
    -------
    float
    """
    a, t = np.asarray(images, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if a.shape != t.shape:
        raise ValueError(f"expected images and targets of the same shape, got {a.shape} and {t.shape}")
    if a.size == 0:
        raise ValueError("expected at least one pixel, got empty arrays")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"expected a value range (lo, hi) with hi > lo, got {tuple(value_range)}")
    return float(np.sqrt(np.mean((a - t) ** 2)) / (hi - lo))


def cleaning_rmse(model, x, target, y=None, batch_size: int = 1000) -> dict:
    """The per-pixel RMSE against the targets of the inputs and of the model's outputs.

    Parameters
    ----------
    model : a trained npvae model; its output is ``model.reconstruct(x, y)`` (the code decoded: a
        VAE's posterior mean decoded to its likelihood's mean; no corruption for a denoiser, whose
        input here is already the noisy one), not clipped
    x, target : (N, *input_shape) arrays in the model's range
    y : (N,) labels, for conditional models

    Returns
    -------
    dict
        ``before`` (x against target) and ``after`` (the outputs against target), both in [0, 1] units
        (:func:`pixel_rmse` over the model's ``value_range``).
    """
    x = model.check_input(x)
    target = model.check_target(target, x)
    if target is None:
        raise ValueError("cleaning_rmse compares with paired targets; got target=None")
    output = model.reconstruct(x, y, batch_size)
    return {"before": pixel_rmse(x, target, model.value_range), "after": pixel_rmse(output, target, model.value_range)}
