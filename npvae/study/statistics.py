"""Statistics behind the pictures: PCA of the codes, active units, and standard-normal quantiles.

Pure NumPy and ``math``; :mod:`npvae.viz.plots` draws what these return.

- :func:`pca_2d`: the codes projected on their first two principal components, and the share of the
  variance each keeps (the latent picture of a model with Z > 2).
- :func:`active_units` and :func:`active_units_cov`: how many latent units carry information, by
  their mean KL or by how much their posterior mean moves with the input (the KL picture).
- :func:`norm_ppf` and :func:`manifold_grid`: the standard-normal quantile function, and the grid of
  latent points on its quantiles that the manifold picture decodes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["active_units", "active_units_cov", "check_kl_per_dim", "manifold_grid", "norm_ppf", "pca_2d"]


# --------------------------------------------------------------------------------------------------
# Principal components
# --------------------------------------------------------------------------------------------------

def pca_2d(z: Any) -> tuple[np.ndarray, np.ndarray]:
    """Project codes onto their first two principal components (SVD of the centred data).

    .. math:: z - \\bar z = U S V^\\top, \\qquad \\text{proj} = (z - \\bar z)\\, V_{:, :2}, \\qquad
              \\text{ratio}_k = s_k^2 / \\textstyle\\sum_l s_l^2

    Sign convention (deterministic): each component's largest-magnitude loading is positive
    (the first such loading on ties).

    Parameters
    ----------
    z : array_like, shape ``(N, Z)``
        ``N >= 2``, ``Z >= 2``.

    Returns
    -------
    proj : ndarray, shape ``(N, 2)``, float64
        ``(z - mean(z)) @ V[:, :2]``.
    explained_ratio : ndarray, shape ``(2,)``
        Fraction of the total variance along each component (``s_k**2 / sum(s**2)``); sums to at
        most 1. Zeros if the codes do not vary at all.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(f"pca_2d expects z of shape (N, Z) with N >= 2 and Z >= 2, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or inf")
    zc = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)  # vt: (min(N, Z), Z)
    comps = vt[:2]
    idx = np.argmax(np.abs(comps), axis=1)
    comps = comps * np.sign(comps[np.arange(2), idx])[:, None]
    var = s ** 2
    total = var.sum()
    ratio = var[:2] / total if total > 0 else np.zeros(2)
    return zc @ comps.T, ratio


# --------------------------------------------------------------------------------------------------
# Active units
# --------------------------------------------------------------------------------------------------

def active_units(kl_per_dim: Any, threshold: float = 0.01) -> int:
    """Count latent units whose mean KL exceeds ``threshold`` nats.

    .. math:: A = \\#\\{\\, j : \\tfrac1N \\textstyle\\sum_i \\mathrm{KL}(q(z_j|x_i) \\,\\|\\, p(z_j)) > \\tau \\,\\}

    Parameters
    ----------
    kl_per_dim : array_like, shape ``(Z,)``
        Mean over the data of ``KL(q(z_j | x) || N(0, 1))`` per unit, in nats.
    threshold : float

    Returns
    -------
    count : int
        ``sum(kl_per_dim > threshold)``.
    """
    return int(np.sum(check_kl_per_dim(kl_per_dim) > threshold))


def active_units_cov(mu: Any, threshold: float = 0.01) -> tuple[int, np.ndarray]:
    """Active units in the sense of Burda et al. (2016): ``Cov_x(E_q[z_j | x]) > threshold``.

    .. math:: A_u = \\#\\{\\, j : \\mathrm{Var}_x\\big(\\mathbb E_{q}[z_j \\mid x]\\big) > \\tau \\,\\}

    A unit is active when its posterior mean moves with the input; a collapsed unit's mean stays
    at the same value (usually 0) for every ``x``.

    Parameters
    ----------
    mu : array_like, shape ``(N, Z)``
        Encoder means ``E_q[z | x]`` for ``N >= 2`` inputs.
    threshold : float

    Returns
    -------
    count : int
        Number of units with variance above ``threshold``.
    variances : ndarray, shape ``(Z,)``
        ``var(mu[:, j])`` over the ``N`` inputs (population variance, ``ddof=0``).
    """
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[0] < 2 or mu.shape[1] < 1:
        raise ValueError(f"expected mu of shape (N, Z) with N >= 2, got {mu.shape}")
    if not np.all(np.isfinite(mu)):
        raise ValueError("mu contains NaN or inf")
    variances = mu.var(axis=0)
    return int(np.sum(variances > threshold)), variances


def check_kl_per_dim(kl_per_dim: Any) -> np.ndarray:
    """``kl_per_dim`` as a float64 (Z,) array of finite, non-negative KLs (nats); a ValueError saying
    what is wrong otherwise."""
    kl = np.asarray(kl_per_dim, dtype=np.float64)
    if kl.ndim != 1 or kl.size == 0:
        raise ValueError(f"expected kl_per_dim of shape (Z,), got {kl.shape}; average the per-"
                         "example KL over the batch first (e.g. kl.mean(axis=0))")
    if not np.all(np.isfinite(kl)):
        raise ValueError("kl_per_dim contains NaN or inf")
    if kl.min() < -1e-6:
        raise ValueError(f"kl_per_dim must be non-negative (a KL divergence), "
                         f"got min {kl.min():.3g}")
    return kl


# --------------------------------------------------------------------------------------------------
# Standard-normal quantiles and the latent grid on them
# --------------------------------------------------------------------------------------------------

# Acklam's rational approximation to the standard-normal quantile (relative error < 1.15e-9).
_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
      1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
      6.680131188771972e+01, -1.328068155288572e+01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
      -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
      3.754408661907416e+00)
_P_LOW = 0.02425
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _tail(q: float) -> float:
    """Acklam's tail formula for ``q = sqrt(-2 log p)``: the lower-tail quantile of ``p``."""
    c, d = _C, _D
    return ((((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
            / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0))


def _ppf_scalar(p: float) -> float:
    if p < _P_LOW:
        x = _tail(math.sqrt(-2.0 * math.log(p)))
    elif p <= 1.0 - _P_LOW:
        q = p - 0.5
        r = q * q
        a, b = _A, _B
        x = ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
             / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0))
    else:
        x = -_tail(math.sqrt(-2.0 * math.log1p(-p)))
    # One Halley step on f(x) = Phi(x) - p. In the upper half 1 - p is exact (Sterbenz), so
    # writing the residual as (1 - p) - Q(x) keeps full relative precision in the upper tail.
    if p > 0.5:
        e = (1.0 - p) - 0.5 * math.erfc(x / _SQRT2)
    else:
        e = 0.5 * math.erfc(-x / _SQRT2) - p
    pdf = math.exp(-0.5 * x * x) / _SQRT2PI
    if pdf > 0.0:  # pdf underflows only for p below ~1e-300, where Acklam alone is already best
        u = e / pdf
        x -= u / (1.0 + 0.5 * x * u)
    return x


_ppf_vec = np.vectorize(_ppf_scalar, otypes=[np.float64])


def norm_ppf(p: Any) -> float | np.ndarray:
    """Inverse of the standard-normal CDF, in pure NumPy/``math``.

    Acklam's rational approximation followed by one Halley step
    :math:`x \\leftarrow x - u / (1 + x u / 2)`, :math:`u = (\\Phi(x) - p) / \\varphi(x)`,
    with :math:`\\Phi` from ``math.erfc``. Accurate to about 1e-14 relative in ``Phi(x)`` for
    ``p`` in ``(1e-10, 1 - 1e-10)`` (tested: ``|Phi(norm_ppf(p)) - p| <= 1e-12``).

    Parameters
    ----------
    p : float or array_like, any shape
        Probabilities strictly inside ``(0, 1)``.

    Returns
    -------
    x : float, or ndarray of ``p``'s shape (float64)

    Raises
    ------
    ValueError
        If any ``p`` is outside ``(0, 1)`` or NaN (the quantile of 0 or 1 is infinite).
    """
    arr = np.asarray(p, dtype=np.float64)
    if arr.size and not np.all((arr > 0.0) & (arr < 1.0)):
        bad = arr[~((arr > 0.0) & (arr < 1.0))].ravel()[0]
        raise ValueError(f"norm_ppf needs probabilities strictly inside (0, 1), got {bad!r} "
                         "(the quantile of 0 or 1 is infinite)")
    out = _ppf_vec(arr)
    return float(out) if out.ndim == 0 else out


def manifold_grid(n: int, quantile_range: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """Latent points on an ``n x n`` grid of standard-normal quantiles (Kingma & Welling, Fig. 4).

    .. math:: v_j = \\Phi^{-1}\\big(lo + j\\, (hi - lo) / (n - 1)\\big), \\quad j = 0 \\ldots n - 1

    Equally spaced probabilities ``q = linspace(lo, hi, n)`` are mapped through
    :func:`norm_ppf`, so the grid covers the prior evenly in probability mass.

    Parameters
    ----------
    n : int
        Points per side, ``n >= 2``.
    quantile_range : (lo, hi)
        Probabilities of the outermost points, ``0 < lo < hi < 1``.

    Returns
    -------
    z : ndarray, shape ``(n * n, 2)``
        Row-major in picture order: point ``i * n + j`` belongs in row ``i`` (top to bottom) and
        column ``j`` (left to right), with ``z[:, 0] = v[j]`` increasing to the right and
        ``z[:, 1] = v[n - 1 - i]`` increasing upwards, where ``v = norm_ppf(q)``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    try:
        lo, hi = (float(v) for v in quantile_range)
    except (TypeError, ValueError):
        raise ValueError(f"quantile_range must be a pair (lo, hi), "
                         f"got {quantile_range!r}") from None
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"quantile_range must satisfy 0 < lo < hi < 1, got ({lo}, {hi})")
    v = norm_ppf(np.linspace(lo, hi, int(n)))
    zx, zy = np.meshgrid(v, v[::-1])  # (n, n) each; row 0 is the top row
    return np.stack([zx.ravel(), zy.ravel()], axis=1)
