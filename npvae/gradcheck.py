"""Numerical gradient checking for any npvae op, layer or model (central differences, float64).

The error measure, per gradient array, is CS231n's relative error over the whole array:

.. math:: \\text{err} = \\frac{\\max_k |a_k - n_k|}{\\max(10^{-8}, \\max_k |a_k| + |n_k|)}

where ``a`` is the analytic gradient and ``n`` the central difference
``(f(θ + h) - f(θ - h)) / 2h``. In float64 with h = 1e-6 the difference quotient itself carries
a rounding error of about 1e-16 |f| / h, so a correct gradient scores from ~1e-9 up to ~1e-6 for
a loss of a few hundred nats (and worse next to ReLU kinks); a wrong one scores near 1.

Entry points:

- :func:`check_gradients` — the general form: a scalar function of some arrays and their gradients.
- :func:`check_op` — an op's ``forward``/``backward`` pair, through a random upstream gradient.
- :func:`check_model` — every parameter of a model (``loss_and_grads`` with a fixed ``eps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class GradCheckReport:
    """Relative error of each checked gradient; ``worst`` names the largest."""

    errors: dict[str, float] = field(default_factory=dict)  # name -> relative error
    checked: dict[str, int] = field(default_factory=dict)  # name -> entries compared

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    def __str__(self) -> str:
        width = max(len(n) for n in self.errors)
        lines = [f"{'gradient':<{width}}  {'entries':>7}  rel. error"]
        for name, err in self.errors.items():
            lines.append(f"{name:<{width}}  {self.checked[name]:>7}  {err:.2e}")
        name, err = self.worst
        lines.append(f"worst: {name} ({err:.2e})")
        return "\n".join(lines)


def relative_error(analytic, numeric) -> float:
    """``max|a - n| / max(1e-8, max(|a| + |n|))`` over whole arrays."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"expected gradients of equal shape, got {a.shape} and {n.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n)) / max(1e-8, float(np.max(np.abs(a) + np.abs(n)))))


def _entries(size: int, max_entries: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, max_entries, replace=False))


def check_gradients(
    f: Callable[[], float],
    arrays: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    h: float = 1e-6,
    max_entries: int | None = None,
    rng: np.random.Generator | None = None,
) -> GradCheckReport:
    """Compare analytic gradients with central differences of ``f``.

    Parameters
    ----------
    f : callable
        Returns a scalar computed from the current contents of ``arrays`` (it is called with
        entries nudged in place by +-h, and every entry is restored afterwards).
    arrays : dict of name -> float64 array
        The inputs, modified in place during the check (and restored).
    grads : dict of name -> array
        Analytic df/d(array), same names and shapes.
    h : float
        Step.
    max_entries : int, optional
        Check at most this many random entries per array (all when None).
    rng : np.random.Generator, optional
        Picks the entries (default: seed 0).

    Returns
    -------
    GradCheckReport
    """
    rng = np.random.default_rng(0) if rng is None else rng
    report = GradCheckReport()
    for name, array in arrays.items():
        if array.dtype != np.float64:
            raise TypeError(f"gradient checks need float64 arrays; {name} is {array.dtype}")
        if name not in grads:
            raise ValueError(f"no analytic gradient given for {name!r}")
        grad = np.asarray(grads[name])
        if grad.shape != array.shape:
            raise ValueError(f"gradient of {name!r}: expected shape {array.shape}, got {grad.shape}")
        flat = array.reshape(-1)
        if not np.shares_memory(flat, array):
            raise ValueError(f"{name!r} must be contiguous so that it can be nudged in place")
        idx = _entries(flat.size, max_entries, rng)
        numeric = np.empty(idx.size)
        for k, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + h
            plus = float(f())
            flat[i] = old - h
            minus = float(f())
            flat[i] = old
            numeric[k] = (plus - minus) / (2 * h)
        report.errors[name] = relative_error(grad.reshape(-1)[idx], numeric)
        report.checked[name] = int(idx.size)
    return report


def check_op(forward: Callable, backward: Callable, inputs: dict[str, np.ndarray], h: float = 1e-6,
             rng: np.random.Generator | None = None, **options) -> GradCheckReport:
    """Check an op's backward against central differences of its forward.

    The scalar checked is ``sum(dout * forward(**inputs)[0])`` for a random ``dout``; ``backward``
    must return the gradients in the order of ``inputs``.

    Parameters
    ----------
    forward : callable
        ``forward(**inputs, **options) -> (out, cache)``.
    backward : callable
        ``backward(dout, cache) -> grad or tuple of grads``.
    inputs : dict of name -> float64 array
        Keyword arguments of ``forward`` that receive gradients (in ``backward``'s order).
    options
        Further keyword arguments of ``forward`` (``reduction=``, ``eps=``, ...).

    Examples
    --------
    >>> from npvae import ops
    >>> rng = np.random.default_rng(0)
    >>> x, w, b = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=2)
    >>> check_op(ops.affine_forward, ops.affine_backward, {"x": x, "w": w, "b": b}).max_error < 1e-7
    True
    """
    rng = np.random.default_rng(0) if rng is None else rng
    arrays = {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}
    out, cache = forward(**arrays, **options)
    dout = rng.standard_normal(np.shape(out))
    grads = backward(dout if np.ndim(out) else float(dout), cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    if len(grads) != len(arrays):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(arrays)} inputs")
    grads = {k: np.array(g) for k, g in zip(arrays, grads)}

    def scalar() -> float:
        return float(np.sum(dout * forward(**arrays, **options)[0]))

    return check_gradients(scalar, arrays, grads, h=h, rng=rng)


def check_model(model, x, y=None, eps=None, h: float = 1e-5, max_entries: int | None = 20,
                rng: np.random.Generator | None = None) -> GradCheckReport:
    """Check every parameter gradient of a float64 model against central differences.

    The loss is the model's batch-mean objective with the noise held fixed (``eps``, and for
    a denoising autoencoder the corrupted input), so the function is deterministic. The default
    step h = 1e-5 suits losses of hundreds of nats (a smaller step drowns in rounding).

    Parameters
    ----------
    model : a float64 npvae model
    x : (B, D) array
    y : (B,) int array, for conditional models
    eps : (B, Z) array, optional; drawn once from ``rng`` when the model needs noise
    max_entries : int or None
        Random entries checked per parameter array (None: all).

    Returns
    -------
    GradCheckReport
        One entry per ``state_dict`` key, e.g. ``report.worst == ("decoder.0.weight", 3.1e-09)``.
    """
    if model.dtype != np.float64:
        raise TypeError(f"gradient checks need a float64 model, got {model.dtype}: build it with dtype=np.float64")
    rng = np.random.default_rng(0) if rng is None else rng
    y = model.check_labels(y, np.shape(x)[0])
    if eps is None and hasattr(model.config, "latent_dim"):
        eps = rng.standard_normal((np.shape(x)[0], model.config.latent_dim))
    noise_seed = int(rng.integers(2**31))

    def loss_and_grads():
        noise = np.random.default_rng(noise_seed)  # same corruption (denoising AE) on every call
        return model.loss_and_grads(x, y, eps=eps, rng=noise)

    _, grads = loss_and_grads()
    grads = {k: g.copy() for k, g in grads.items()}
    params = model.parameters()

    # Parameters may be non-contiguous views (the VAE's mu/logvar halves): nudge them through a
    # contiguous copy that is written back before each evaluation.
    copies = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}

    def scalar() -> float:
        for k, v in params.items():
            v[...] = copies[k]
        return loss_and_grads()[0].total

    try:
        return check_gradients(scalar, copies, grads, h=h, max_entries=max_entries, rng=rng)
    finally:
        for k, v in params.items():
            v[...] = copies[k]
