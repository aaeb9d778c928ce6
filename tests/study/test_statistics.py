"""Tests of npvae.study.statistics: PCA against the covariance's eigenvectors, active units, and the
standard-normal quantiles to 1e-12 (Hypothesis) with the latent grid on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae.study import statistics


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# ----------------------------------------------------------------------------- PCA


def _reference_pca(z):
    zc = z - z.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(zc, rowvar=False))
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order[:2]].T  # (2, Z)
    idx = np.argmax(np.abs(evecs), axis=1)
    evecs *= np.sign(evecs[np.arange(2), idx])[:, None]
    return zc @ evecs.T, evals[:2] / evals.sum()


@pytest.mark.parametrize("n, zdim", [(200, 5), (50, 2), (30, 16), (3, 10)])
def test_pca_2d_matches_eigh_of_covariance(n, zdim):
    rng = np.random.default_rng(n + zdim)
    z = rng.normal(size=(n, zdim)) @ rng.normal(size=(zdim, zdim)) + rng.normal(size=zdim)
    proj, ratio = statistics.pca_2d(z)
    ref_proj, ref_ratio = _reference_pca(z)
    assert proj.shape == (n, 2) and ratio.shape == (2,)
    np.testing.assert_allclose(proj, ref_proj, atol=1e-9)
    np.testing.assert_allclose(ratio, ref_ratio, atol=1e-12)
    assert ratio.sum() <= 1 + 1e-12 and ratio[0] >= ratio[1] >= 0


def test_pca_2d_sign_convention_is_deterministic():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(100, 4)) * [3.0, 2.0, 1.0, 0.5]
    proj, _ = statistics.pca_2d(z)
    proj_neg, _ = statistics.pca_2d(-z)  # same components, same signs: the projection flips
    np.testing.assert_allclose(proj_neg, -proj, atol=1e-10)
    # the largest-magnitude loading of each component is positive: here axes 0 and 1
    assert proj[np.argmax(z[:, 0]), 0] > 0 and proj[np.argmax(z[:, 1]), 1] > 0


def test_pca_2d_constant_codes_and_errors():
    proj, ratio = statistics.pca_2d(np.ones((5, 3)))
    np.testing.assert_array_equal(ratio, 0.0)
    np.testing.assert_allclose(proj, 0.0)
    for shape in [(1, 3), (5, 1), (5,)]:
        with pytest.raises(ValueError, match="pca_2d expects z of shape"):
            statistics.pca_2d(np.zeros(shape))


# ----------------------------------------------------------------------------- normal quantiles and the manifold grid


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.floats(1e-10, 1 - 1e-10),
                 st.floats(-10, math.log10(0.5)).map(lambda e: 10.0 ** e),
                 st.floats(-10, math.log10(0.5)).map(lambda e: 1.0 - 10.0 ** e)))
def test_norm_ppf_round_trip(p):
    x = statistics.norm_ppf(p)
    assert isinstance(x, float)
    assert abs(phi(x) - p) <= 1e-12
    # and relatively, in whichever tail p lies
    if p <= 0.5:
        assert abs(phi(x) - p) <= 1e-13 * p
    else:
        assert abs(0.5 * math.erfc(x / math.sqrt(2.0)) - (1.0 - p)) <= 1e-13 * (1.0 - p)


def test_norm_ppf_known_values_symmetry_and_shape():
    assert statistics.norm_ppf(0.5) == 0.0
    assert statistics.norm_ppf(0.975) == pytest.approx(1.959963984540054, abs=1e-14)
    assert statistics.norm_ppf(0.05) == pytest.approx(-1.6448536269514722, abs=1e-14)
    assert statistics.norm_ppf(1e-10) == pytest.approx(-6.361340902404056, abs=1e-12)
    p = np.linspace(0.01, 0.5, 50)
    np.testing.assert_allclose(statistics.norm_ppf(p), -statistics.norm_ppf(1 - p), atol=1e-14)
    out = statistics.norm_ppf(np.full((2, 3), 0.3))
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    assert np.all(np.diff(statistics.norm_ppf(np.linspace(1e-6, 1 - 1e-6, 1001))) > 0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), [0.2, 1.0]])
def test_norm_ppf_rejects_outside_open_unit_interval(bad):
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        statistics.norm_ppf(bad)


def test_manifold_grid_symmetric_and_on_quantiles():
    n = 7
    z = statistics.manifold_grid(n, (0.05, 0.95))
    assert z.shape == (n * n, 2)
    grid = z.reshape(n, n, 2)
    v = grid[0, :, 0]  # z[0] along the top row, left to right
    np.testing.assert_allclose([phi(x) for x in v], np.linspace(0.05, 0.95, n), atol=1e-14)
    np.testing.assert_allclose(v, -v[::-1], atol=1e-12)  # symmetric about 0
    assert v[n // 2] == pytest.approx(0.0, abs=1e-12)
    # picture order: z[0] constant down columns, z[1] decreasing down rows (up is positive)
    np.testing.assert_array_equal(grid[:, :, 0], np.broadcast_to(v, (n, n)))
    np.testing.assert_array_equal(grid[:, :, 1], np.broadcast_to(v[::-1, None], (n, n)))
    assert grid[0, 0, 1] > 0 > grid[-1, 0, 1]


def test_manifold_grid_errors():
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        statistics.manifold_grid(1)
    with pytest.raises(ValueError, match="0 < lo < hi < 1"):
        statistics.manifold_grid(5, (0.0, 0.95))


# ----------------------------------------------------------------------------- active units


def test_active_units_counts_strictly_above_threshold():
    kl = [2.0, 0.5, 0.011, 0.01, 0.009, 0.0, 1e-5]
    assert statistics.active_units(kl) == 3
    assert statistics.active_units(kl, threshold=0.001) == 5
    assert statistics.active_units(kl, threshold=10.0) == 0
    assert statistics.active_units(np.zeros(8)) == 0


def test_active_units_cov_matches_variance_of_means():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 0.5, 0.2, 0.05, 0.0])  # variances 1, .25, .04, .0025, 0
    mu = rng.standard_normal((20000, 5)) * scales + 3.0
    count, variances = statistics.active_units_cov(mu)
    assert count == 3
    np.testing.assert_allclose(variances, mu.var(axis=0))
    np.testing.assert_allclose(variances, scales ** 2, rtol=0.05, atol=1e-12)
    assert statistics.active_units_cov(mu, threshold=0.001)[0] == 4
    with pytest.raises(ValueError, match=r"mu of shape \(N, Z\)"):
        statistics.active_units_cov(np.zeros((1, 4)))


def test_kl_per_dim_must_be_one_finite_non_negative_value_per_unit():
    with pytest.raises(ValueError, match=r"kl_per_dim of shape \(Z,\)"):
        statistics.active_units(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        statistics.check_kl_per_dim([1.0, np.nan])
    with pytest.raises(ValueError, match="non-negative"):
        statistics.check_kl_per_dim([1.0, -0.5])
    np.testing.assert_array_equal(statistics.check_kl_per_dim([0.0, -1e-9, 2.0]), [0.0, -1e-9, 2.0])  # rounding
