"""The functional core: every op as a pure forward and a hand-derived backward.

Conventions (CS231n style):

- ``forward(inputs..., out=None) -> (out, cache)`` and ``backward(dout, cache, ...) -> grads``.
- ``dfoo`` is dL/dfoo and has exactly ``foo``'s shape. Shapes: ``B`` batch, ``D`` input, ``Z`` latent.
- ``logvar`` is always log sigma^2, ``std = exp(logvar / 2)``, ``eps`` the standard-normal noise.
- The working dtype is the first array argument's (float32 or float64); other arrays are cast to it,
  so no op upcasts float32 to float64.
- Losses take a ``reduction``:

  ============== ==================================================== =================
  ``"none"``     per-example sums over features                        shape ``(B,)``
  ``"sum"``      sum over everything                                   scalar
  ``"batchmean"`` sum / B: the per-example mean (nats per example)     scalar
  ``"mean"``     sum / (B * D): the mean over elements (torch default) scalar
  ============== ==================================================== =================

  Note ``"none"`` sums over features (a log-likelihood of a vector), unlike torch's elementwise "none".
- Forward and backward passes accept buffers (``out=``, ``rows=``, ``probs=``, ``std=``, ``dx=`` ...)
  to write into, for allocation-free training; with reduction ``"none"`` the returned per-example
  losses are the ``rows`` buffer itself.

The loops themselves live in :mod:`npvae._kernels` and run under the active backend
(:func:`npvae.set_backend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import _kernels as K
from .registry import Registry

REDUCTIONS = ("none", "sum", "batchmean", "mean")


# ----------------------------------------------------------------------------- the activations
#
# One entry per activation: its math in NumPy (the kernels' twins and the contractive penalty call
# it), its code (the compiled loops in npvae._kernels branch on it, one tight loop per activation),
# and its PyTorch equivalent as data (npvae.torch builds and reads torch modules from it, so this
# module stays NumPy-only). Adding an activation: one entry here and one branch per compiled loop
# (tests/test_kernels.py compares every entry's compiled loops with its NumPy form).


@dataclass(frozen=True)
class ActivationInfo:
    """Everything about one elementwise activation ``y = f(a)``.

    Attributes
    ----------
    name : str
        Its name (``Dense(..., activation=name)``, ``--activation``).
    help : str
        The forward and the derivative, one line.
    code : int
        The integer the compiled kernels branch on.
    forward : callable ``(a, alpha, out)``
        Writes f(a) into ``out`` (which may be ``a`` itself); NumPy, any shape.
    derivative : callable ``(y, alpha) -> f'(a)``
        Read off the output y = f(a), an array of y's shape and dtype.
    second_derivative : callable ``(y, d1, alpha) -> f''(a)``
        Read off y and ``d1 = f'(a)`` (the contractive penalty's gradient needs it).
    takes_alpha : bool
        Whether ``alpha`` (a slope) changes it.
    torch : str
        The ``torch.nn`` module class that computes the same function.
    torch_alpha : str or None
        That class's argument (and attribute) holding alpha.
    torch_fixed : dict
        Attributes the torch module must have to compute npvae's function (``beta=1`` for Softplus).
    """

    name: str
    help: str
    code: int
    forward: Callable
    derivative: Callable
    second_derivative: Callable
    takes_alpha: bool = False
    torch: str = ""
    torch_alpha: str | None = None
    torch_fixed: dict = field(default_factory=dict)


ACTIVATIONS: Registry[ActivationInfo] = Registry("activation")


def activation_info(code: int) -> ActivationInfo:
    """The :data:`ACTIVATIONS` entry of kernel code ``code`` (as the caches hold it)."""
    return K.ACTIVATIONS_BY_CODE[code]


def _register_activation(entry: ActivationInfo) -> None:
    if entry.code in K.ACTIVATIONS_BY_CODE:
        raise ValueError(f"activation code {entry.code} is taken by {K.ACTIVATIONS_BY_CODE[entry.code].name!r}")
    ACTIVATIONS.register(entry)
    K.ACTIVATIONS_BY_CODE[entry.code] = entry  # what the kernels' NumPy twins dispatch on


def _zeros(y, d1, alpha):
    return np.zeros_like(y)


def _identity(a, alpha, out):
    if a is not out:  # the twins apply activations in place
        np.copyto(out, a)


def _leaky_relu(a, alpha, out):
    np.multiply(a, np.where(a < 0, alpha, 1.0).astype(out.dtype), out=out)


def _sigmoid(a, alpha, out):
    e = np.exp(-np.abs(a))  # <= 1: never overflows
    out[...] = np.where(a >= 0, 1.0, e) / (1.0 + e)


def _softplus(a, alpha, out):
    out[...] = np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a)))


def _softplus_second(y, d1, alpha):
    return d1 * np.exp(-y)  # sigmoid(a) (1 - sigmoid(a)), with 1 - sigmoid(a) = e^-softplus(a)


for _entry in (
    ActivationInfo("identity", "a; derivative 1", 0, _identity, lambda y, alpha: np.ones_like(y), _zeros,
                   torch="Identity"),
    ActivationInfo("relu", "max(a, 0); derivative [y > 0] (0 at a = 0, as PyTorch)", 1,
                   lambda a, alpha, out: np.maximum(a, 0, out=out),
                   lambda y, alpha: (y > 0).astype(y.dtype), _zeros, torch="ReLU"),
    ActivationInfo("leaky_relu", "a if a > 0 else alpha a (alpha >= 0); derivative 1 if y > 0 else alpha", 2,
                   _leaky_relu, lambda y, alpha: np.where(y > 0, y.dtype.type(1), y.dtype.type(alpha)), _zeros,
                   takes_alpha=True, torch="LeakyReLU", torch_alpha="negative_slope"),
    ActivationInfo("sigmoid", "1 / (1 + e^-a), from e^-abs(a); derivative y (1 - y)", 3, _sigmoid,
                   lambda y, alpha: y * (1 - y), lambda y, d1, alpha: d1 * (1 - 2 * y), torch="Sigmoid"),
    ActivationInfo("tanh", "tanh(a); derivative 1 - y^2", 4, lambda a, alpha, out: np.tanh(a, out=out),
                   lambda y, alpha: 1 - y * y, lambda y, d1, alpha: -2 * y * d1, torch="Tanh"),
    ActivationInfo("softplus", "max(a, 0) + log1p(e^-abs(a)); derivative 1 - e^-y (= sigmoid(a))", 5, _softplus,
                   lambda y, alpha: -np.expm1(-y), _softplus_second, torch="Softplus", torch_fixed={"beta": 1.0}),
):
    _register_activation(_entry)
del _entry


# ----------------------------------------------------------------------------- helpers


def _float_array(x, name: str, ndim: int | None = 2) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected {name} of dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"expected {name} with {ndim} dimensions, got shape {x.shape}")
    return x


def _like(x: np.ndarray, other, name: str, shape=None) -> np.ndarray:
    """``other`` as an array of x's dtype, with ``shape`` (default: x's shape)."""
    other = np.asarray(other, dtype=x.dtype)
    expected = x.shape if shape is None else shape
    if other.shape != tuple(expected):
        raise ValueError(f"expected {name} of shape {tuple(expected)}, got {other.shape}")
    return other


def _buffer(out, shape, dtype, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"expected {name} buffer of shape {tuple(shape)} and dtype {dtype}, got {out.shape} {out.dtype}")
    return out


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")


def _reduce(rows: np.ndarray, reduction: str, per_row: int):
    """Reduce per-example sums ``rows`` (B,); ``per_row`` is the number of elements in each row."""
    if reduction == "none":
        return rows
    total = rows.sum(dtype=np.float64)
    if reduction == "batchmean":
        total /= rows.shape[0]
    elif reduction == "mean":
        total /= rows.shape[0] * per_row
    return rows.dtype.type(total)


def _row_scale(dloss, reduction: str, batch: int, per_row: int, dtype) -> np.ndarray:
    """The upstream gradient as one factor per example (B,): dL/d(rows[i])."""
    if reduction == "none":
        scale = np.asarray(dloss, dtype=dtype)
        if scale.shape != (batch,):
            raise ValueError(f"expected dloss of shape ({batch},) for reduction 'none', got {scale.shape}")
        return scale
    if np.ndim(dloss) != 0:
        raise ValueError(f"expected a scalar dloss for reduction {reduction!r}, got shape {np.shape(dloss)}")
    dloss = float(dloss)
    if reduction == "batchmean":
        dloss /= batch
    elif reduction == "mean":
        dloss /= batch * per_row
    return np.full(batch, dloss, dtype=dtype)


def _noise(like: np.ndarray, eps, rng, name: str = "eps") -> np.ndarray:
    if eps is not None:
        return _like(like, eps, name)
    if rng is None:
        raise ValueError("pass eps (the standard-normal noise) or rng (an np.random.Generator)")
    return rng.standard_normal(like.shape, dtype=like.dtype)


# ----------------------------------------------------------------------------- affine and activations


def affine_forward(x, w, b, out=None):
    """Affine map, weights in PyTorch ``nn.Linear`` layout.

    .. math:: \\text{out} = x W^T + b

    Parameters
    ----------
    x : (B, I) array
    w : (O, I) array
    b : (O,) array
    out : (B, O) array, optional
        Buffer for the result.

    Returns
    -------
    out : (B, O) array
    cache : tuple ``(x, w)``
    """
    out, (x, w, _, _, _) = dense_forward(x, w, b, "identity", out=out)
    return out, (x, w)


def _bias_sums(work, n: int) -> np.ndarray:
    """The float64 (n,) scratch in which bias gradients are summed (allocated when not given)."""
    return _buffer(work, (n,), np.dtype(np.float64), "work")


def affine_backward(dout, cache, dx=None, dw=None, db=None, work=None):
    """Backward of :func:`affine_forward`.

    .. math:: dx = dout\\, W, \\quad dW = dout^T x, \\quad db = \\textstyle\\sum_i dout_i

    Parameters
    ----------
    dout : (B, O) array
    cache : from :func:`affine_forward`
    dx, dw, db : arrays of shape (B, I), (O, I), (O,), optional
        Buffers for the results.
    work : (O,) float64 array, optional
        Scratch for db's float64 sums.

    Returns
    -------
    dx : (B, I) array, dw : (O, I) array, db : (O,) array
    """
    x, w = cache
    dout = _like(x, dout, "dout", (x.shape[0], w.shape[0]))
    dx = np.matmul(dout, w, out=_buffer(dx, x.shape, x.dtype, "dx"))
    dw = np.matmul(dout.T, x, out=_buffer(dw, w.shape, x.dtype, "dw"))
    db = _buffer(db, (w.shape[0],), x.dtype, "db")
    K.bias_grad(dout, db, _bias_sums(work, w.shape[0]))
    return dx, dw, db


def activation_code(name: str, alpha: float) -> int:
    """The kernels' code of activation ``name`` (its :data:`ACTIVATIONS` entry's ``code``); alpha >= 0."""
    # the derivative is read off the output (y > 0), which needs a negative slope >= 0
    if alpha < 0:
        raise ValueError(f"expected alpha >= 0 for leaky_relu, got {alpha}")
    return ACTIVATIONS[name].code


def activation_forward(a, name="relu", alpha=0.01, out=None):
    """Elementwise activation ``y = f(a)``, any entry of :data:`ACTIVATIONS` (its table gives f and f').

    The derivative is written through the output, so the cache holds ``y`` alone. At ``a = 0``,
    ReLU's derivative is 0 and LeakyReLU's is alpha (PyTorch's convention); ``alpha`` must be >= 0.

    Parameters
    ----------
    a : (B, H) array
    name : str, one of :data:`ACTIVATIONS`
    alpha : float
        LeakyReLU's negative slope.
    out : (B, H) array, optional (may be ``a`` itself)

    Returns
    -------
    y : (B, H) array
    cache : tuple ``(y, code, alpha)``
    """
    a = _float_array(a, "a")
    code = activation_code(name, alpha)
    out = _buffer(out, a.shape, a.dtype, "out")
    K.bias_act_forward(a, np.zeros(a.shape[1], dtype=a.dtype), code, float(alpha), out)
    return out, (out, code, float(alpha))


def activation_backward(dy, cache, out=None):
    """Backward of :func:`activation_forward`: ``da = dy * f'(a)``, f' read off the output y.

    Parameters
    ----------
    dy : (B, H) array
    cache : from :func:`activation_forward`
    out : (B, H) array, optional (may be ``dy`` itself)

    Returns
    -------
    da : (B, H) array
    """
    y, code, alpha = cache
    dy = _like(y, dy, "dy")
    out = _buffer(out, y.shape, y.dtype, "out")
    K.act_backward(dy, y, code, alpha, out)
    return out


def dense_forward(x, w, b, activation="identity", alpha=0.01, out=None):
    """A dense layer: affine map and activation fused, ``y = f(x W^T + b)``.

    Parameters
    ----------
    x : (B, I) array; w : (O, I) array; b : (O,) array
    activation : str, one of :data:`ACTIVATIONS`
    out : (B, O) array, optional

    Returns
    -------
    y : (B, O) array
    cache : tuple ``(x, w, y, code, alpha)``
    """
    x = _float_array(x, "x")
    w = _float_array(w, "w")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"expected x of shape (B, {w.shape[1]}) for w of shape {w.shape}, got {x.shape}")
    w = _like(x, w, "w", w.shape)
    b = _like(x, b, "b", (w.shape[0],))
    code = activation_code(activation, alpha)
    out = _buffer(out, (x.shape[0], w.shape[0]), x.dtype, "out")
    np.matmul(x, w.T, out=out)
    K.bias_act_forward(out, b, code, float(alpha), out)
    return out, (x, w, out, code, float(alpha))


def dense_backward(dy, cache, dx=None, dw=None, db=None, da=None, work=None):
    """Backward of :func:`dense_forward`.

    .. math:: da = dy \\odot f'(a), \\quad dx = da\\, W, \\quad dW = da^T x, \\quad db = \\textstyle\\sum_i da_i

    ``da`` may be ``dy`` itself (the upstream buffer is then overwritten); ``work`` is an (O,)
    float64 scratch for db's sums. Pass ``dx=False`` to skip the input gradient (a first layer
    does not need it).

    Returns
    -------
    dx : (B, I) array or None, dw : (O, I) array, db : (O,) array
    """
    x, w, y, code, alpha = cache
    dy = _like(y, dy, "dy")
    da = _buffer(da, y.shape, y.dtype, "da")
    K.act_backward(dy, y, code, alpha, da)
    dw = np.matmul(da.T, x, out=_buffer(dw, w.shape, x.dtype, "dw"))
    db = _buffer(db, (w.shape[0],), x.dtype, "db")
    K.bias_grad(da, db, _bias_sums(work, w.shape[0]))
    if dx is False:
        return None, dw, db
    dx = np.matmul(da, w, out=_buffer(dx, x.shape, x.dtype, "dx"))
    return dx, dw, db


# ----------------------------------------------------------------------------- reconstruction losses


def bce_with_logits_forward(logits, target, reduction="sum", probs=None, rows=None, work=None):
    """Bernoulli negative log-likelihood from logits (binary cross-entropy), stable softplus form.

    .. math:: \\ell = \\textstyle\\sum_j \\operatorname{softplus}(l_j) - x_j l_j,
              \\quad \\operatorname{softplus}(l) = \\max(l, 0) + \\log(1 + e^{-|l|})

    Finite for any finite logits. ``target`` is in [0, 1] (not checked here: the models check data).

    Parameters
    ----------
    logits : (B, D) array
    target : (B, D) array
    reduction : {"none", "sum", "batchmean", "mean"}
    probs : (B, D) array, optional
        Buffer for sigmoid(logits), computed from the same exp(-|l|) and kept for backward.
    rows, work : (B,) and (B, D) arrays, optional
        Buffers for the per-example losses and for the per-element ones.

    Returns
    -------
    loss : scalar or (B,) array
    cache : tuple ``(probs, target, reduction)``
    """
    logits = _float_array(logits, "logits")
    target = _like(logits, target, "target")
    _check_reduction(reduction)
    rows = _buffer(rows, (logits.shape[0],), logits.dtype, "rows")
    probs = _buffer(probs, logits.shape, logits.dtype, "probs")
    work = _buffer(work, logits.shape, logits.dtype, "work")
    K.bce_logits_forward(logits, target, rows, probs, work)
    return _reduce(rows, reduction, logits.shape[1]), (probs, target, reduction)


def bce_with_logits_backward(dloss, cache, out=None):
    """Backward of :func:`bce_with_logits_forward`: ``dlogits = (sigmoid(l) - x) * dloss_i``.

    Returns
    -------
    dlogits : (B, D) array
    """
    probs, target, reduction = cache
    scale = _row_scale(dloss, reduction, probs.shape[0], probs.shape[1], probs.dtype)
    out = _buffer(out, probs.shape, probs.dtype, "out")
    K.scaled_difference(probs, target, scale, out)
    return out


def mse_forward(pred, target, reduction="sum", rows=None):
    """Squared error.

    .. math:: \\ell = \\textstyle\\sum_j (\\hat x_j - x_j)^2

    Parameters
    ----------
    pred, target : (B, D) arrays
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    loss : scalar or (B,) array
    cache : tuple ``(pred, target, reduction)``
    """
    pred = _float_array(pred, "pred")
    target = _like(pred, target, "target")
    _check_reduction(reduction)
    rows = _buffer(rows, (pred.shape[0],), pred.dtype, "rows")
    K.squared_error_rows(pred, target, rows)
    return _reduce(rows, reduction, pred.shape[1]), (pred, target, reduction)


def mse_backward(dloss, cache, out=None):
    """Backward of :func:`mse_forward`: ``dpred = 2 (pred - x) * dloss_i``."""
    pred, target, reduction = cache
    scale = 2 * _row_scale(dloss, reduction, pred.shape[0], pred.shape[1], pred.dtype)
    out = _buffer(out, pred.shape, pred.dtype, "out")
    K.scaled_difference(pred, target, scale, out)
    return out


LOG_2PI = math.log(2 * math.pi)


def gaussian_nll_forward(pred, target, reduction="sum", rows=None):
    """Negative log-likelihood of ``target`` under N(pred, I): half the squared error plus a constant.

    .. math:: \\ell = \\tfrac12 \\textstyle\\sum_j (\\hat x_j - x_j)^2 + \\tfrac{D}{2} \\log 2\\pi

    Returns
    -------
    loss : scalar or (B,) array
    cache : tuple ``(pred, target, reduction)``
    """
    pred = _float_array(pred, "pred")
    target = _like(pred, target, "target")
    _check_reduction(reduction)
    rows = _buffer(rows, (pred.shape[0],), pred.dtype, "rows")
    K.squared_error_rows(pred, target, rows)
    rows *= 0.5
    rows += 0.5 * pred.shape[1] * LOG_2PI
    return _reduce(rows, reduction, pred.shape[1]), (pred, target, reduction)


def gaussian_nll_backward(dloss, cache, out=None):
    """Backward of :func:`gaussian_nll_forward`: ``dpred = (pred - x) * dloss_i``."""
    pred, target, reduction = cache
    scale = _row_scale(dloss, reduction, pred.shape[0], pred.shape[1], pred.dtype)
    out = _buffer(out, pred.shape, pred.dtype, "out")
    K.scaled_difference(pred, target, scale, out)
    return out


def cb_log_norm_forward(logits, reduction="sum"):
    """Log-normaliser of the continuous Bernoulli distribution (Loaiza-Ganem & Cunningham, 2019).

    For lambda = sigmoid(l), :math:`C(\\lambda) = 2\\,\\operatorname{artanh}(1 - 2\\lambda) / (1 - 2\\lambda)`,
    which in logits is

    .. math:: \\log C(l) = \\log \\frac{l}{\\tanh(l/2)}, \\qquad \\log C(0) = \\log 2,

    evaluated by its Taylor series for abs(l) < 0.1. The continuous-Bernoulli NLL is BCE - log C.

    Parameters
    ----------
    logits : (B, D) array
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    log_c : scalar or (B,) array
    cache : tuple ``(logits, reduction)``
    """
    logits = _float_array(logits, "logits")
    _check_reduction(reduction)
    rows = np.empty(logits.shape[0], dtype=logits.dtype)
    K.cb_log_norm_rows(logits, rows)
    return _reduce(rows, reduction, logits.shape[1]), (logits, reduction)


def cb_log_norm_backward(dloss, cache, out=None):
    """Backward of :func:`cb_log_norm_forward`.

    .. math:: \\frac{d}{dl} \\log C(l) = \\frac{1}{l} - \\frac{1}{\\sinh l}

    Returns
    -------
    dlogits : (B, D) array
    """
    logits, reduction = cache
    scale = _row_scale(dloss, reduction, logits.shape[0], logits.shape[1], logits.dtype)
    out = _buffer(out, logits.shape, logits.dtype, "out")
    K.cb_log_norm_backward(logits, scale, out)
    return out


def continuous_bernoulli_nll_forward(logits, target, reduction="sum"):
    """Continuous-Bernoulli negative log-likelihood, a proper density for targets in [0, 1].

    .. math:: \\ell = \\textstyle\\sum_j \\operatorname{softplus}(l_j) - x_j l_j - \\log C(l_j)

    Returns
    -------
    loss : scalar or (B,) array
    cache : tuple of the BCE and log-normaliser caches
    """
    bce, bce_cache = bce_with_logits_forward(logits, target, "none")
    log_c, cb_cache = cb_log_norm_forward(logits, "none")
    rows = bce - log_c
    _check_reduction(reduction)
    return _reduce(rows, reduction, logits.shape[1]), (bce_cache, cb_cache, reduction)


def continuous_bernoulli_nll_backward(dloss, cache, out=None):
    """Backward of :func:`continuous_bernoulli_nll_forward`: ``(sigmoid(l) - x - 1/l + 1/sinh l) * dloss_i``."""
    bce_cache, cb_cache, reduction = cache
    probs = bce_cache[0]
    scale = _row_scale(dloss, reduction, probs.shape[0], probs.shape[1], probs.dtype)
    out = bce_with_logits_backward(scale, bce_cache, out=out)
    out -= cb_log_norm_backward(scale, cb_cache)
    return out


# ----------------------------------------------------------------------------- sampling and KL


def reparameterize_forward(mu, logvar, eps=None, rng=None, out=None, std=None):
    """The reparameterization trick: a sample of N(mu, exp(logvar)) as a differentiable function.

    .. math:: z = \\mu + \\sigma \\odot \\epsilon, \\quad \\sigma = e^{\\frac12 \\log\\sigma^2},
              \\quad \\epsilon \\sim N(0, I)

    Parameters
    ----------
    mu, logvar : (B, Z) arrays
    eps : (B, Z) array, optional
        The noise; drawn from ``rng`` when not given. Kept in the cache for backward.
    rng : np.random.Generator, optional
    out : (B, Z) array, optional

    Returns
    -------
    z : (B, Z) array
    cache : tuple ``(eps, std)``
    """
    mu = _float_array(mu, "mu")
    logvar = _like(mu, logvar, "logvar")
    eps = _noise(mu, eps, rng)
    std = _buffer(std, mu.shape, mu.dtype, "std")
    out = _buffer(out, mu.shape, mu.dtype, "out")
    K.reparameterize(mu, logvar, eps, out, std)
    return out, (eps, std)


def reparameterize_backward(dz, cache, dmu=None, dlogvar=None):
    """Backward of :func:`reparameterize_forward`.

    .. math:: d\\mu = dz, \\quad d\\log\\sigma^2 = \\tfrac12\\, dz \\odot \\epsilon \\odot \\sigma

    Returns
    -------
    dmu, dlogvar : (B, Z) arrays
    """
    eps, std = cache
    dz = _like(std, dz, "dz")
    dmu = _buffer(dmu, std.shape, std.dtype, "dmu")
    dlogvar = _buffer(dlogvar, std.shape, std.dtype, "dlogvar")
    K.reparameterize_backward(dz, eps, std, dmu, dlogvar)
    return dmu, dlogvar


def kl_normal_forward(mu, logvar, reduction="batchmean", rows=None):
    """Analytic KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions.

    .. math:: \\mathrm{KL} = \\tfrac12 \\textstyle\\sum_j \\mu_j^2 + (e^{\\log\\sigma_j^2} - 1) - \\log\\sigma_j^2

    with ``e^v - 1 - v`` computed as ``expm1(v) - v``, and from its series below abs(v) < 0.01, where
    that difference cancels; so KL is accurate to rounding (and >= 0) near the prior too.

    Parameters
    ----------
    mu, logvar : (B, Z) arrays
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    kl : scalar or (B,) array
    cache : tuple ``(mu, logvar, reduction)``
    """
    mu = _float_array(mu, "mu")
    logvar = _like(mu, logvar, "logvar")
    _check_reduction(reduction)
    rows = _buffer(rows, (mu.shape[0],), mu.dtype, "rows")
    K.kl_normal_rows(mu, logvar, rows)
    return _reduce(rows, reduction, mu.shape[1]), (mu, logvar, reduction)


def kl_normal_backward(dkl, cache, dmu=None, dlogvar=None, accumulate=False):
    """Backward of :func:`kl_normal_forward`.

    .. math:: d\\mu = dkl_i\\, \\mu, \\quad d\\log\\sigma^2 = \\tfrac12\\, dkl_i\\, (e^{\\log\\sigma^2} - 1)

    With ``accumulate=True`` the gradients are added into the given ``dmu``/``dlogvar`` (the
    sampler's gradients), which is how a VAE combines the two paths into mu and logvar.

    Returns
    -------
    dmu, dlogvar : (B, Z) arrays
    """
    mu, logvar, reduction = cache
    if accumulate and (dmu is None or dlogvar is None):
        raise ValueError("accumulate=True needs the dmu and dlogvar buffers to add into")
    scale = _row_scale(dkl, reduction, mu.shape[0], mu.shape[1], mu.dtype)
    dmu = _buffer(dmu, mu.shape, mu.dtype, "dmu")
    dlogvar = _buffer(dlogvar, mu.shape, mu.dtype, "dlogvar")
    K.kl_normal_backward(mu, logvar, scale, bool(accumulate), dmu, dlogvar)
    return dmu, dlogvar


def kl_gaussians_forward(mu, logvar, mu_p, logvar_p, reduction="batchmean", rows=None):
    """Analytic KL(q || p) between diagonal Gaussians q = N(mu, e^logvar), p = N(mu_p, e^logvar_p).

    .. math:: \\mathrm{KL} = \\tfrac12 \\textstyle\\sum_j (e^{\\delta_j} - 1) - \\delta_j
              + (\\mu_j - \\mu_{p,j})^2 e^{-\\log\\sigma_{p,j}^2}, \\quad \\delta = \\log\\sigma^2 - \\log\\sigma_p^2

    Both Gaussians receive gradients (the conditional VAE's learned prior).

    Parameters
    ----------
    mu, logvar, mu_p, logvar_p : (B, Z) arrays
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    kl : scalar or (B,) array
    cache : tuple ``(mu, logvar, mu_p, logvar_p, reduction)``
    """
    mu = _float_array(mu, "mu")
    logvar = _like(mu, logvar, "logvar")
    mu_p = _like(mu, mu_p, "mu_p")
    logvar_p = _like(mu, logvar_p, "logvar_p")
    _check_reduction(reduction)
    rows = _buffer(rows, (mu.shape[0],), mu.dtype, "rows")
    K.kl_gaussians_rows(mu, logvar, mu_p, logvar_p, rows)
    return _reduce(rows, reduction, mu.shape[1]), (mu, logvar, mu_p, logvar_p, reduction)


def kl_gaussians_backward(dkl, cache, dmu=None, dlogvar=None, dmu_p=None, dlogvar_p=None, accumulate=False):
    """Backward of :func:`kl_gaussians_forward`.

    .. math::
        d\\mu = dkl_i\\, (\\mu - \\mu_p) e^{-\\log\\sigma_p^2}, \\quad d\\mu_p = -d\\mu, \\\\
        d\\log\\sigma^2 = \\tfrac12\\, dkl_i\\, (e^{\\delta} - 1), \\quad
        d\\log\\sigma_p^2 = \\tfrac12\\, dkl_i\\, (1 - e^{\\delta} - (\\mu - \\mu_p)^2 e^{-\\log\\sigma_p^2})

    ``accumulate=True`` adds into ``dmu``/``dlogvar`` (the q side); the p side is always written.

    Returns
    -------
    dmu, dlogvar, dmu_p, dlogvar_p : (B, Z) arrays
    """
    mu, logvar, mu_p, logvar_p, reduction = cache
    if accumulate and (dmu is None or dlogvar is None):
        raise ValueError("accumulate=True needs the dmu and dlogvar buffers to add into")
    scale = _row_scale(dkl, reduction, mu.shape[0], mu.shape[1], mu.dtype)
    dmu, dlogvar, dmu_p, dlogvar_p = (
        _buffer(buf, mu.shape, mu.dtype, name)
        for buf, name in ((dmu, "dmu"), (dlogvar, "dlogvar"), (dmu_p, "dmu_p"), (dlogvar_p, "dlogvar_p"))
    )
    K.kl_gaussians_backward(mu, logvar, mu_p, logvar_p, scale, bool(accumulate), dmu, dlogvar, dmu_p, dlogvar_p)
    return dmu, dlogvar, dmu_p, dlogvar_p


# ----------------------------------------------------------------------------- the poor man's VAE


def add_noise_forward(h, eps=None, rng=None, scale=1.0):
    """Additive Gaussian noise on the code: ``z = h + scale * eps``, eps ~ N(0, I).

    Parameters
    ----------
    h : (B, Z) array
    eps : (B, Z) array, optional (drawn from ``rng`` when not given)
    rng : np.random.Generator, optional
    scale : float
        Noise standard deviation.

    Returns
    -------
    z : (B, Z) array
    cache : tuple ``(eps,)``
    """
    h = _float_array(h, "h")
    eps = _noise(h, eps, rng)
    return h + h.dtype.type(scale) * eps, (eps,)


def add_noise_backward(dz, cache):
    """Backward of :func:`add_noise_forward`: ``dh = dz`` (the noise is a constant shift)."""
    (eps,) = cache
    return _like(eps, dz, "dz").copy()


def l2_norm_forward(z, reduction="sum"):
    """Euclidean norm of each code, the poor man's VAE's regulariser (distance to the origin).

    .. math:: r_i = \\lVert z_i \\rVert_2 = \\sqrt{\\textstyle\\sum_j z_{ij}^2}

    Parameters
    ----------
    z : (B, Z) array
    reduction : {"none", "sum", "batchmean", "mean"}; "mean" equals "batchmean" (one norm per example)

    Returns
    -------
    norm : scalar or (B,) array
    cache : tuple ``(z, norms, reduction)``
    """
    z = _float_array(z, "z")
    _check_reduction(reduction)
    norms = np.empty(z.shape[0], dtype=z.dtype)
    K.l2_norm_rows(z, norms)
    return _reduce(norms, reduction, 1), (z, norms, reduction)


def l2_norm_backward(dloss, cache, out=None):
    """Backward of :func:`l2_norm_forward`.

    .. math:: dz_i = dloss_i\\, z_i / \\lVert z_i \\rVert_2, \\qquad dz_i = 0 \\text{ where } z_i = 0

    At z = 0 the norm has no gradient; 0 is its minimal-norm subgradient (PyTorch returns the same).

    Returns
    -------
    dz : (B, Z) array
    """
    z, norms, reduction = cache
    scale = _row_scale(dloss, reduction, z.shape[0], 1, z.dtype)
    out = _buffer(out, z.shape, z.dtype, "out")
    K.l2_norm_backward(z, norms, scale, out)
    return out


# ----------------------------------------------------------------------------- decoder means


def continuous_bernoulli_mean(logits):
    """Mean of the continuous Bernoulli with logits ``l`` (forward only; for pictures).

    .. math:: \\mathbb{E}[x] = \\frac{\\sigma(l)}{\\tanh(l/2)} - \\frac{1}{l}
              = \\tfrac12 + \\tfrac{l}{12} - \\tfrac{l^3}{720} + \\tfrac{l^5}{30240} - \\tfrac{l^7}{1209600} + O(l^9)

    The closed form cancels near 0 (20x at abs(l) = 0.1), so the series is used below 0.1.

    Parameters
    ----------
    logits : (B, D) array

    Returns
    -------
    mean : (B, D) array in [0, 1]
    """
    logits = _float_array(logits, "logits")
    small = np.abs(logits) < 0.1
    safe = np.where(small, logits.dtype.type(1), logits)
    sig = np.empty_like(logits)
    K.bias_act_forward(safe, np.zeros(logits.shape[1], logits.dtype), ACTIVATIONS["sigmoid"].code, 0.0, sig)
    mean = sig / np.tanh(0.5 * safe) - 1 / safe
    l2 = logits * logits
    series = 0.5 + logits * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 - l2 / 1209600)))
    return np.where(small, series, mean).astype(logits.dtype, copy=False)


# ----------------------------------------------------------------------------- log densities and log-sum-exp
#
# The pieces of importance-weighted bounds (npvae.study.likelihood): log q(z|x), log p(z) and a stable
# log-sum-exp over the samples. They are a few elementwise NumPy expressions over (B, Z) arrays,
# small next to the decoder's matmuls, so they have no kernels of their own.


def _rows_float64_sum(values: np.ndarray, dtype) -> np.ndarray:
    """Row sums (B,) accumulated in float64 and stored in ``dtype`` (as the kernels do)."""
    return values.sum(axis=1, dtype=np.float64).astype(dtype, copy=False)


def gaussian_log_prob_forward(z, mu, logvar, reduction="none"):
    """Log density of z under the diagonal Gaussian N(mu, exp(logvar)), summed over dimensions.

    .. math:: \\log q(z) = -\\tfrac12 \\textstyle\\sum_j \\log 2\\pi + \\log\\sigma_j^2
              + (z_j - \\mu_j)^2 e^{-\\log\\sigma_j^2}

    Parameters
    ----------
    z, mu, logvar : (B, Z) arrays
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    log_prob : scalar or (B,) array
    cache : tuple ``(u, inv_std, reduction)``: ``u = (z - mu) e^{-logvar / 2}`` (B, Z), the
        standardised code, and ``inv_std = e^{-logvar / 2}`` (B, Z)
    """
    z = _float_array(z, "z")
    mu = _like(z, mu, "mu")
    logvar = _like(z, logvar, "logvar")
    _check_reduction(reduction)
    u = (z - mu) * np.exp(-0.5 * logvar)  # (B, Z)
    rows = _rows_float64_sum(u * u + logvar, z.dtype)
    rows *= -0.5
    rows -= 0.5 * z.shape[1] * LOG_2PI
    return _reduce(rows, reduction, z.shape[1]), (u, np.exp(-0.5 * logvar), reduction)


def gaussian_log_prob_backward(dlogp, cache):
    """Backward of :func:`gaussian_log_prob_forward`, with ``u = (z - mu) / sigma``.

    .. math:: dz = -dlogp_i\\, u / \\sigma, \\quad d\\mu = -dz, \\quad
              d\\log\\sigma^2 = \\tfrac12\\, dlogp_i\\, (u^2 - 1)

    Returns
    -------
    dz, dmu, dlogvar : (B, Z) arrays
    """
    u, inv_std, reduction = cache
    scale = _row_scale(dlogp, reduction, u.shape[0], u.shape[1], u.dtype)[:, None]  # (B, 1)
    dz = -scale * u * inv_std
    dlogvar = 0.5 * scale * (u * u - 1)
    return dz, -dz, dlogvar


def standard_normal_log_prob_forward(z, reduction="none"):
    """Log density of z under the prior N(0, I), summed over dimensions.

    .. math:: \\log p(z) = -\\tfrac12 \\textstyle\\sum_j z_j^2 + \\log 2\\pi

    Parameters
    ----------
    z : (B, Z) array
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    log_prob : scalar or (B,) array
    cache : tuple ``(z, reduction)``
    """
    z = _float_array(z, "z")
    _check_reduction(reduction)
    rows = _rows_float64_sum(z * z, z.dtype)
    rows *= -0.5
    rows -= 0.5 * z.shape[1] * LOG_2PI
    return _reduce(rows, reduction, z.shape[1]), (z, reduction)


def standard_normal_log_prob_backward(dlogp, cache):
    """Backward of :func:`standard_normal_log_prob_forward`: ``dz = -dlogp_i z``.

    Returns
    -------
    dz : (B, Z) array
    """
    z, reduction = cache
    scale = _row_scale(dlogp, reduction, z.shape[0], z.shape[1], z.dtype)[:, None]
    return -scale * z


def logsumexp_forward(a):
    """Log-sum-exp of each row, shifted by the row maximum so nothing overflows.

    .. math:: s_i = m_i + \\log \\textstyle\\sum_j e^{a_{ij} - m_i}, \\quad m_i = \\max_j a_{ij}

    A row of all ``-inf`` gives ``-inf`` (an empty sum) and zero weights, so a sample of zero
    likelihood contributes nothing; a ``+inf`` entry gives ``+inf`` and NaN weights.

    Parameters
    ----------
    a : (B, K) array

    Returns
    -------
    s : (B,) array
    cache : tuple ``(w,)`` with ``w = softmax(a)`` (B, K), the normalised weights
    """
    a = _float_array(a, "a")
    if a.shape[1] < 1:
        raise ValueError(f"expected a of shape (B, K) with K >= 1, got {a.shape}")
    m = a.max(axis=1)  # (B,)
    shift = np.where(np.isfinite(m), m, 0).astype(a.dtype)[:, None]  # all -inf rows: shift by 0
    e = np.exp(a - shift)
    total = e.sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s = (np.log(total) + shift[:, 0]).astype(a.dtype)
        w = np.divide(e, total[:, None], out=np.zeros_like(e), where=total[:, None] > 0)
    return s, (w.astype(a.dtype, copy=False),)


def logsumexp_backward(ds, cache):
    """Backward of :func:`logsumexp_forward`: the softmax weights times the upstream gradient.

    .. math:: da_{ij} = ds_i\\, \\frac{e^{a_{ij}}}{\\sum_k e^{a_{ik}}}

    Parameters
    ----------
    ds : (B,) array

    Returns
    -------
    da : (B, K) array
    """
    (w,) = cache
    ds = _like(w[:, 0], ds, "ds")
    return w * ds[:, None]


def reparameterized_log_prob_forward(eps, logvar, reduction="none"):
    """Log density of the reparameterized sample ``z = mu + std * eps`` under its own q = N(mu, exp(logvar)).

    The same number as ``gaussian_log_prob_forward(z, mu, logvar)``, written through eps so it stays
    exact when ``std`` is below the resolution of ``mu`` (where ``(z - mu) / std`` would be rounding
    noise); and as a function of (mu, logvar) at fixed eps it is the total derivative through z too.

    .. math:: \\log q(\\mu + \\sigma\\epsilon) = -\\tfrac12 \\textstyle\\sum_j \\log 2\\pi + \\log\\sigma_j^2 + \\epsilon_j^2

    Parameters
    ----------
    eps, logvar : (B, Z) arrays
    reduction : {"none", "sum", "batchmean", "mean"}

    Returns
    -------
    log_prob : scalar or (B,) array
    cache : tuple ``(shape, dtype, reduction)``
    """
    eps = _float_array(eps, "eps")
    logvar = _like(eps, logvar, "logvar")
    _check_reduction(reduction)
    rows = _rows_float64_sum(eps * eps + logvar, eps.dtype)
    rows *= -0.5
    rows -= 0.5 * eps.shape[1] * LOG_2PI
    return _reduce(rows, reduction, eps.shape[1]), (eps.shape, eps.dtype, reduction)


def reparameterized_log_prob_backward(dlogp, cache):
    """Backward of :func:`reparameterized_log_prob_forward` to (mu, logvar) at fixed eps.

    .. math:: d\\mu = 0, \\quad d\\log\\sigma^2 = -\\tfrac12\\, dlogp_i

    (mu appears only through z - mu = std * eps, which eps fixes.)

    Returns
    -------
    dlogvar : (B, Z) array
    """
    shape, dtype, reduction = cache
    scale = _row_scale(dlogp, reduction, shape[0], shape[1], dtype)[:, None]
    return np.broadcast_to(-0.5 * scale, shape).copy()


# ----------------------------------------------------------------------------- bounds


def clamp_forward(x, lo, hi, out=None, mask=None):
    """Clamp into [lo, hi] (e.g. bounds on logvar), keeping where the gradient passes.

    .. math:: y = \\min(\\max(x, lo), hi)

    Parameters
    ----------
    x : (B, H) array
    lo, hi : float, lo < hi
    out : (B, H) array, optional (may be ``x`` itself)
    mask : (B, H) bool array, optional
        Buffer for where ``lo <= x <= hi``.

    Returns
    -------
    y : (B, H) array
    cache : tuple ``(mask,)``
    """
    x = _float_array(x, "x")
    if not lo < hi:
        raise ValueError(f"expected lo < hi, got lo={lo}, hi={hi}")
    mask = _buffer(mask, x.shape, np.dtype(bool), "mask")
    np.greater_equal(x, lo, out=mask)
    mask &= x <= hi
    out = _buffer(out, x.shape, x.dtype, "out")
    np.clip(x, lo, hi, out=out)
    return out, (mask,)


def clamp_backward(dy, cache, out=None):
    """Backward of :func:`clamp_forward`: ``dx = dy`` where ``lo <= x <= hi``, else 0.

    At the bounds themselves the gradient passes (PyTorch's ``clamp`` convention).

    Returns
    -------
    dx : (B, H) array
    """
    (mask,) = cache
    dy = _float_array(dy, "dy")
    if dy.shape != mask.shape:
        raise ValueError(f"expected dy of shape {mask.shape}, got {dy.shape}")
    out = _buffer(out, dy.shape, dy.dtype, "out")
    np.multiply(dy, mask, out=out)
    return out


# ----------------------------------------------------------------------------- pixels


def pixels_to_range(x: np.ndarray, lo: float, hi: float, dtype) -> np.ndarray:
    """uint8 pixels 0..255 (any shape) -> a new ``dtype`` array in [lo, hi], as the trainer reads them.

    .. math:: x = lo + (hi - lo) \\cdot \\text{pixel} / 255

    First to [0, 1] in ``dtype`` (0 -> 0.0, 255 -> 1.0 exactly), then ``x * (hi - lo) + lo`` when the
    range is not (0, 1). Shared by :func:`npvae.data.to_model_range` and every model's input check, so
    that ``fit`` and ``model.evaluate`` read uint8 alike.
    """
    dtype = np.dtype(dtype)
    out = x.astype(dtype)
    out /= 255
    if (lo, hi) != (0.0, 1.0):
        out = out * dtype.type(hi - lo) + dtype.type(lo)
    return out
