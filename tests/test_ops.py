"""Op-level tests for :mod:`npvae.ops`, in both kernel backends.

1. Every op's forward and every gradient against a float64 PyTorch reference written from the math
   (relative error <= 1e-10), Hypothesis-drawn shapes and values including extremes.
2. Every gradient against central finite differences (float64).
3. The gradient through sampling of a small reparameterize -> affine -> BCE + KL composite.
4. float32: the forward agrees with float64, and nothing comes back float64.
5. Stability at extreme logits and log-variances; KL >= 0, BCE >= 0; the l2 norm's subgradient at 0.
6. Errors name the offending argument.

The op table (inputs, our calls, references) lives in ``tests/helpers.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npvae import ops
from npvae.backend import use_backend
from tests.helpers import (
    ACTIVATIONS,
    BACKENDS,
    OP_SPECS,
    RANGES,
    REDUCTIONS,
    HypothesisSource,
    draw_dout,
    numeric_gradient,
    rel_error,
    to_torch,
    torch_bce_rows,
    torch_cb_log_norm,
    torch_cb_mean,
    torch_errors,
    torch_exp_excess,
    torch_kl_normal_rows,
)

torch = pytest.importorskip("torch")

TORCH_TOL = 1e-10
FD_TOL = 1e-6
F32_FWD_TOL = 1e-5
# float32 gradients: cb_log_norm's 1/l - 1/sinh(l) cancels by up to 600x just above its series
# switch (|l| = 0.1), which costs ~2e-5 relative in float32; every other op stays below ~3e-6.
F32_GRAD_TOL = 1e-4
TINY32 = float(np.finfo(np.float32).tiny)

SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
ALL_SPECS = sorted(OP_SPECS)
GRAD_SPECS = sorted(name for name, spec in OP_SPECS.items() if spec.wrt)


def _floats(inputs: dict, dtype) -> dict:
    return {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}


# ----------------------------------------------------------------------------- 1. against torch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL_SPECS)
@settings(max_examples=25, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_matches_torch_float64(name, backend, data):
    spec = OP_SPECS[name]
    src = HypothesisSource(data, max_dim=64)
    # a margin of 1e-9 keeps dense ReLU pre-activations off 0, where numpy's and torch's matmul
    # rounding could disagree on the sign
    inputs = spec.build(src, RANGES["torch"], 1e-9)
    with use_backend(backend):
        errors = torch_errors(spec, inputs, src)
    assert max(errors.values()) <= TORCH_TOL, f"{name} [{backend}] relative errors: {errors}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_kink_convention_matches_torch(name, backend):
    """At a = 0 exactly: ReLU's derivative is 0 and LeakyReLU's is alpha, as in PyTorch."""
    a = np.array([[0.0, -0.0, 1.0, -1.0]])
    dy = np.array([[1.5, -2.0, 0.5, 3.0]])
    with use_backend(backend):
        y, cache = ops.activation_forward(a, name, alpha=0.3)
        da = ops.activation_backward(dy, cache)
    ta = torch.tensor(a, requires_grad=True)
    ref = torch.relu(ta) if name == "relu" else torch.nn.functional.leaky_relu(ta, 0.3)
    ref.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y, ref.detach().numpy())
    np.testing.assert_array_equal(da, ta.grad.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@settings(max_examples=10, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_sum_and_mean_reductions_are_torchs(reduction, backend, data):
    """'mean' is torch's default (over elements) and 'sum' its sum, for BCE and MSE. (|l| <= 10:
    F.binary_cross_entropy_with_logits skips log1p and loses digits further out.)"""
    src = HypothesisSource(data, max_dim=32)
    B, D = src.dim(), src.dim()
    logits, target = src.array((B, D), -10, 10), src.array((B, D), 0, 1)
    with use_backend(backend):
        bce = ops.bce_with_logits_forward(logits, target, reduction)[0]
        mse = ops.mse_forward(logits, target, reduction)[0]
    tl, tt = torch.tensor(logits), torch.tensor(target)
    F = torch.nn.functional
    assert rel_error(bce, F.binary_cross_entropy_with_logits(tl, tt, reduction=reduction).numpy()) <= TORCH_TOL
    assert rel_error(mse, F.mse_loss(tl, tt, reduction=reduction).numpy()) <= TORCH_TOL


@settings(max_examples=20, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_cb_log_norm_matches_torch_distribution(data):
    """Cross-check against torch.distributions.ContinuousBernoulli where its probability-space
    formula is accurate (|l| <= 10; beyond, log(1 - p) loses digits)."""
    src = HypothesisSource(data, max_dim=32)
    logits = src.array((src.dim(), src.dim()), -10, 10)
    ours = ops.cb_log_norm_forward(logits, "none")[0]
    dist = torch.distributions.ContinuousBernoulli(logits=torch.tensor(logits))
    assert rel_error(ours, dist._cont_bern_log_norm().sum(1).numpy()) <= TORCH_TOL


def test_series_references_match_mpmath():
    """The exact-series references in helpers (and the ops themselves) against 50-digit mpmath,
    element by element, across the series switch points and out to |l| = 1e4."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    mag = np.concatenate([np.geomspace(1e-9, 1e4, 120), [0.0099, 0.01, 0.0101, 0.0999, 0.1, 0.1001]])
    x = np.concatenate([mag, -mag])

    def exact(f):
        return np.array([float(f(mp.mpf(float(v)))) for v in x])

    log_c = exact(lambda l: mp.log(l / mp.tanh(l / 2)))
    dlog_c = exact(lambda l: 1 / l - 1 / mp.sinh(l))
    mean = exact(lambda l: 1 / (1 - mp.exp(-l)) - 1 / l)
    excess = exact(lambda d: mp.expm1(d) - d)

    def elementwise(a, b):
        return float(np.max(np.abs(a - b) / np.abs(b)))

    tx = torch.tensor(x, requires_grad=True)
    ref = torch_cb_log_norm(tx)
    ref.sum().backward()
    assert elementwise(ref.detach().numpy(), log_c) <= 1e-14
    assert elementwise(tx.grad.numpy(), dlog_c) <= 1e-12
    assert elementwise(torch_cb_mean(torch.tensor(x)).numpy(), mean) <= 1e-13
    assert elementwise(torch_exp_excess(torch.tensor(x[np.abs(x) <= 50])).numpy(), excess[np.abs(x) <= 50]) <= 1e-14

    col = x[:, None]  # one element per row: "none" gives element-wise values
    for backend in ("numpy", "numba"):
        with use_backend(backend):
            value, cache = ops.cb_log_norm_forward(col, "none")
            assert elementwise(value, log_c) <= 1e-14
            # 1/l - 1/sinh(l) just above the series switch cancels ~600x: ~1e-12, well inside 1e-10
            assert elementwise(ops.cb_log_norm_backward(np.ones(len(x)), cache)[:, 0], dlog_c) <= 1e-11
            assert elementwise(ops.continuous_bernoulli_mean(col)[:, 0], mean) <= 1e-13
            small = np.abs(x) <= 30
            kl = ops.kl_normal_forward(np.zeros((small.sum(), 1)), col[small], "none")[0]
            assert elementwise(kl, 0.5 * excess[small]) <= 1e-13


# ----------------------------------------------------------------------------- 2. finite differences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GRAD_SPECS)
@settings(max_examples=10, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_matches_finite_differences(name, backend, data):
    """Every coordinate of every gradient (shapes up to 8 x 8 so the differences stay cheap), with
    pre-activations and l2-norm rows at least 1e-3 from their kinks, step 1e-6."""
    spec = OP_SPECS[name]
    src = HypothesisSource(data, max_dim=8)
    inputs = spec.build(src, RANGES["fd"], 1e-3)
    with use_backend(backend):
        out, cache = spec.forward(inputs)
        dout = draw_dout(src, out)
        grads = spec.backward(dout, cache)
        for k in spec.wrt:
            numeric, _ = numeric_gradient(lambda i: spec.forward(i)[0], inputs, k, dout)
            err = rel_error(grads[k], numeric)
            if err <= FD_TOL:
                continue
            # the difference quotient cannot resolve gradients below its own rounding and truncation
            # errors (all there is where the true gradient is 0); estimating them takes a second pass
            numeric, noise = numeric_gradient(lambda i: spec.forward(i)[0], inputs, k, dout, truncation=True)
            if spec.scale:  # a forward that cancels rounds at its terms' scale, not its result's
                noise += float(np.finfo(np.float64).eps * spec.scale(inputs) * np.abs(dout).sum() / 1e-6)
            assert np.max(np.abs(grads[k] - numeric)) <= noise, (
                f"{name} [{backend}] d{k}: relative error {err:.2e}, beyond the quotient's noise {noise:.1e}"
            )


# ----------------------------------------------------------------------------- 3. through sampling


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=SLOW)
@given(data=st.data(), reduction=st.sampled_from(["sum", "batchmean"]))
def test_gradient_through_sampling_matches_torch(backend, reduction, data):
    """reparameterize -> affine -> BCE, plus KL: d loss / d (mu, logvar, W, b) equal torch's with
    the same eps, the two paths into mu and logvar joined by kl_normal_backward(accumulate=True)."""
    src = HypothesisSource(data, max_dim=16)
    B, Z, D = src.dim(), src.dim(), src.dim()
    mu, logvar, eps = src.array((B, Z), -3, 3), src.array((B, Z), -8, 8), src.array((B, Z), -3, 3)
    w, b, x = src.array((D, Z), -1, 1), src.array((D,), -1, 1), src.array((B, D), 0, 1)
    with use_backend(backend):
        z, z_cache = ops.reparameterize_forward(mu, logvar, eps=eps)
        logits, a_cache = ops.affine_forward(z, w, b)
        recon, r_cache = ops.bce_with_logits_forward(logits, x, reduction)
        kl, k_cache = ops.kl_normal_forward(mu, logvar, reduction)
        dz, dw, db = ops.affine_backward(ops.bce_with_logits_backward(1.0, r_cache), a_cache)
        dmu, dlogvar = ops.reparameterize_backward(dz, z_cache)
        ops.kl_normal_backward(1.0, k_cache, dmu, dlogvar, accumulate=True)

    t = to_torch({"mu": mu, "logvar": logvar, "w": w, "b": b}, ("mu", "logvar", "w", "b"))
    tz = t["mu"] + torch.exp(0.5 * t["logvar"]) * torch.tensor(eps)
    per_example = torch_bce_rows(tz @ t["w"].T + t["b"], torch.tensor(x)) + torch_kl_normal_rows(t["mu"], t["logvar"])
    loss = per_example.sum() / (B if reduction == "batchmean" else 1)
    loss.backward()
    assert rel_error(recon + kl, loss.detach().numpy()) <= TORCH_TOL
    for ours, k in ((dmu, "mu"), (dlogvar, "logvar"), (dw, "w"), (db, "b")):
        assert rel_error(ours, t[k].grad.numpy()) <= TORCH_TOL, k


# ----------------------------------------------------------------------------- 4. float32


def _reduction_factor(name: str, inputs: dict) -> float:
    """d(reduced loss) / d(row) for the op's reduction (1 for non-losses)."""
    arrays = [v for v in inputs.values() if isinstance(v, np.ndarray)]
    B, D = arrays[0].shape
    if name.endswith("[batchmean]") or (name.endswith("[mean]") and name.startswith("l2_norm")):
        return 1.0 / B
    if name.endswith("[mean]"):
        return 1.0 / (B * D)
    return 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL_SPECS)
@settings(max_examples=8, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_float32_agrees_with_float64_and_stays_float32(name, backend, data):
    """float32 in, float32 out (values, scalar losses, gradients); the forward within 1e-5 of the
    float64 forward on the same (rounded) inputs, relative to the op's scale (the magnitude of its
    terms where the result cancels); gradients within 1e-4, judged against max|dout| times the
    reduction's factor where the float64 gradient is smaller (saturated tanh: float32 cannot hold
    1 - tanh(10)^2)."""
    spec = OP_SPECS[name]
    src = HypothesisSource(data, max_dim=64)
    x32 = _floats(spec.build(src, RANGES["torch"], 1e-3), np.float32)
    x64 = _floats(x32, np.float64)
    with use_backend(backend):
        out32, cache32 = spec.forward(x32)
        out64, cache64 = spec.forward(x64)
        assert np.asarray(out32).dtype == np.float32, f"{name} forward returned {np.asarray(out32).dtype}"
        # float32 cannot hold results below its smallest normal number to float32 precision
        scale = max(float(np.max(np.abs(out64))), spec.scale(x64) if spec.scale else 0.0, TINY32)
        err = float(np.max(np.abs(np.asarray(out32, np.float64) - out64))) / scale
        assert err <= F32_FWD_TOL, f"{name} [{backend}] float32 forward error {err:.2e}"
        if not spec.wrt:
            return
        # upstream gradients below 1e-20 are flushed to 0: scaled by 1/(B D) they would be float32
        # subnormals, which hold only a few bits (an input that float32 cannot carry, not an op error)
        dout = draw_dout(src, out64)
        dout = np.where(np.abs(dout) < 1e-20, 0.0, dout).astype(np.float32)
        if dout.ndim == 0:  # scalar losses take a plain float
            grads32, grads64 = spec.backward(float(dout), cache32), spec.backward(float(dout), cache64)
        else:
            grads32, grads64 = spec.backward(dout, cache32), spec.backward(dout.astype(np.float64), cache64)
    floor = float(np.max(np.abs(dout))) * _reduction_factor(name, x64)
    for k in spec.wrt:
        assert grads32[k].dtype == np.float32, f"{name} d{k} is {grads32[k].dtype}"
        g32, g64 = grads32[k].astype(np.float64), grads64[k]
        denom = max(float(np.max(np.abs(g32) + np.abs(g64))) if g64.size else 0.0, floor, TINY32)
        err = float(np.max(np.abs(g32 - g64))) / denom
        assert err <= F32_GRAD_TOL, f"{name} [{backend}] float32 d{k} error {err:.2e}"


# ----------------------------------------------------------------------------- 5. stability

DTYPES = [np.float32, np.float64]
EXTREME_LOGITS = np.array([-1e4, -100.0, -30.0, -0.05, -1e-40, 0.0, 5e-324, 0.05, 30.0, 100.0, 1e4])  # subnormals too


def _all_finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a))) for a in arrays)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logit_losses_finite_at_extremes(reduction, dtype, backend):
    logits = np.tile(EXTREME_LOGITS, (3, 1)).astype(dtype)  # (3, 11)
    target = np.array([[0.0], [0.5], [1.0]], dtype=dtype) * np.ones_like(logits)
    dloss = np.ones(3, dtype) if reduction == "none" else 1.0
    with use_backend(backend):
        for forward, backward, args in (
            (ops.bce_with_logits_forward, ops.bce_with_logits_backward, (logits, target)),
            (ops.continuous_bernoulli_nll_forward, ops.continuous_bernoulli_nll_backward, (logits, target)),
            (ops.cb_log_norm_forward, ops.cb_log_norm_backward, (logits,)),
        ):
            loss, cache = forward(*args, reduction=reduction)
            grad = backward(dloss, cache)
            assert _all_finite(loss, grad), forward.__name__
            assert np.asarray(loss).dtype == dtype and grad.dtype == dtype
        mean = ops.continuous_bernoulli_mean(logits)
        assert _all_finite(mean) and np.all((mean >= 0) & (mean <= 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_finite_at_extremes(name, dtype, backend):
    a = np.tile(EXTREME_LOGITS, (2, 1)).astype(dtype)
    with use_backend(backend):
        y, cache = ops.activation_forward(a, name)
        da = ops.activation_backward(np.ones_like(a), cache)
        out, dcache = ops.dense_forward(a, np.eye(a.shape[1], dtype=dtype), np.zeros(a.shape[1], dtype), name)
        dx, dw, db = ops.dense_backward(np.ones_like(a), dcache)
    assert _all_finite(y, da, out, dx, dw, db)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_ops_finite_at_extreme_logvar(reduction, dtype, backend):
    grid = np.array([-30.0, -1e-7, -5e-324, 0.0, 1e-40, 1e-7, 30.0])
    mu, logvar = (g.astype(dtype) for g in np.meshgrid([-10.0, 0.0, 1e-320, 10.0], grid))  # (7, 4)
    mu_p, logvar_p = mu[::-1].copy(), logvar[::-1].copy()  # logvar - logvar_p reaches +-60
    dkl = np.ones(mu.shape[0], dtype) if reduction == "none" else 1.0
    with use_backend(backend):
        kl, cache = ops.kl_normal_forward(mu, logvar, reduction)
        grads = ops.kl_normal_backward(dkl, cache)
        klg, gcache = ops.kl_gaussians_forward(mu, logvar, mu_p, logvar_p, reduction)
        ggrads = ops.kl_gaussians_backward(dkl, gcache)
        z, zcache = ops.reparameterize_forward(mu, logvar, eps=np.ones_like(mu))
        zgrads = ops.reparameterize_backward(np.ones_like(z), zcache)
    assert _all_finite(kl, klg, z, *grads, *ggrads, *zgrads)
    assert np.all(np.asarray(kl) >= 0) and np.all(np.asarray(klg) >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=25, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_kl_and_bce_are_nonnegative(dtype, backend, data):
    """KL >= 0 per example (it is 0 only at the prior) and BCE >= 0 for targets in {0, 1}, in
    floating point, not just in exact arithmetic."""
    src = HypothesisSource(data, max_dim=32)
    B, Z = src.dim(), src.dim()
    mu, logvar = src.array((B, Z), -10, 10).astype(dtype), src.array((B, Z), -30, 30).astype(dtype)
    mu_p, logvar_p = src.array((B, Z), -10, 10).astype(dtype), src.array((B, Z), -30, 30).astype(dtype)
    logits = src.array((B, Z), -1e4, 1e4).astype(dtype)
    target = (src.array((B, Z), 0, 1) > 0.5).astype(dtype)
    with use_backend(backend):
        assert np.all(ops.kl_normal_forward(mu, logvar, "none")[0] >= 0)
        assert np.all(ops.kl_gaussians_forward(mu, logvar, mu_p, logvar_p, "none")[0] >= 0)
        assert np.all(ops.kl_gaussians_forward(mu, logvar, mu, logvar, "none")[0] == 0)
        assert np.all(ops.bce_with_logits_forward(logits, target, "none")[0] >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l2_norm_gradient_is_zero_at_the_origin(reduction, dtype, backend):
    tiny = np.finfo(dtype).smallest_subnormal
    z = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0], [0.0, -0.0, 0.0], [tiny, 0.0, -tiny]], dtype=dtype)
    dloss = np.array([2.0, 1.0, -1.0, 1.0], dtype) if reduction == "none" else 1.0
    with use_backend(backend):
        norm, cache = ops.l2_norm_forward(z, reduction)
        dz = ops.l2_norm_backward(dloss, cache)
    assert np.all(dz[[0, 2]] == 0) and dz.dtype == dtype
    assert np.all(np.isfinite(dz)) and np.any(dz[1] != 0)
    # a row of subnormals has a (tiny) norm in float32, whose reciprocal overflows float32
    assert dtype is np.float64 or np.any(dz[3] != 0)


# ----------------------------------------------------------------------------- buffers and flags


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kl_normal", "kl_gaussians"])
def test_kl_accumulate_adds_into_the_buffers(name, backend):
    rng = np.random.default_rng(0)
    mu, logvar, mu_p, logvar_p = (rng.normal(size=(4, 3)) for _ in range(4))
    pre_mu, pre_logvar = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    with use_backend(backend):
        if name == "kl_normal":
            _, cache = ops.kl_normal_forward(mu, logvar, "sum")
            fresh = ops.kl_normal_backward(0.7, cache)
            added = ops.kl_normal_backward(0.7, cache, pre_mu.copy(), pre_logvar.copy(), accumulate=True)
        else:
            _, cache = ops.kl_gaussians_forward(mu, logvar, mu_p, logvar_p, "sum")
            fresh = ops.kl_gaussians_backward(0.7, cache)
            junk = [np.full((4, 3), np.nan) for _ in range(2)]  # the p side is written, not added to
            added = ops.kl_gaussians_backward(0.7, cache, pre_mu.copy(), pre_logvar.copy(), *junk, accumulate=True)
            np.testing.assert_array_equal(added[2:], fresh[2:])
    np.testing.assert_allclose(added[0], pre_mu + fresh[0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(added[1], pre_logvar + fresh[1], rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_are_used_and_may_alias(backend):
    """Results land in the buffers passed in, and the documented aliases (activation out=a,
    dense_backward da=dy) give the same numbers."""
    rng = np.random.default_rng(1)
    x, w, b, dy = rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=(5, 3))
    with use_backend(backend):
        y, cache = ops.dense_forward(x, w, b, "tanh")
        dx, dw, db = ops.dense_backward(dy, cache)
        da_buf = dy.copy()
        bufs = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        got = ops.dense_backward(da_buf, cache, *bufs, da=da_buf)
        assert all(g is buf for g, buf in zip(got, bufs))
        for g, ref in zip(got, (dx, dw, db)):
            np.testing.assert_array_equal(g, ref)
        assert ops.dense_backward(dy, cache, dx=False)[0] is None

        a = rng.normal(size=(5, 3))
        ref, _ = ops.activation_forward(a, "softplus")
        inplace, _ = ops.activation_forward(a, "softplus", out=a)
        assert inplace is a
        np.testing.assert_array_equal(inplace, ref)


# ----------------------------------------------------------------------------- 6. errors

X = np.ones((4, 3))
W = np.ones((2, 3))
LOSSES = [
    (ops.bce_with_logits_forward, (X, X)),
    (ops.mse_forward, (X, X)),
    (ops.gaussian_nll_forward, (X, X)),
    (ops.cb_log_norm_forward, (X,)),
    (ops.continuous_bernoulli_nll_forward, (X, X)),
    (ops.kl_normal_forward, (X, X)),
    (ops.kl_gaussians_forward, (X, X, X, X)),
    (ops.l2_norm_forward, (X,)),
]


@pytest.mark.parametrize("forward, args", LOSSES, ids=[f.__name__ for f, _ in LOSSES])
def test_unknown_reduction_is_named(forward, args):
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'.*batchmean"):
        forward(*args, reduction="avg")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.affine_forward(np.ones((2, 3, 1)), W, np.ones(2)), ValueError, r"expected x with 2 dimensions"),
        (lambda: ops.affine_forward(np.ones((4, 3), int), W, np.ones(2)), TypeError, r"expected x of dtype float32"),
        (lambda: ops.affine_forward(X, np.ones((2, 5)), np.ones(2)), ValueError, r"expected x of shape \(B, 5\)"),
        (lambda: ops.affine_forward(X, W.astype(int), np.ones(2)), TypeError, r"expected w of dtype"),
        (lambda: ops.affine_forward(X, W, np.ones(3)), ValueError, r"expected b of shape \(2,\)"),
        (lambda: ops.activation_forward(X, "gelu"), ValueError, r"unknown activation 'gelu'.*softplus"),
        (lambda: ops.dense_forward(X, W, np.ones(2), "swish"), ValueError, r"unknown activation 'swish'"),
        (lambda: ops.activation_forward(X, "leaky_relu", alpha=-0.1), ValueError, r"alpha >= 0"),
        (lambda: ops.dense_forward(X, W, np.ones(2), "leaky_relu", alpha=-0.1), ValueError, r"alpha >= 0"),
        (lambda: ops.activation_forward(X, out=np.empty((4, 3), np.float32)), ValueError, r"out buffer"),
        (lambda: ops.bce_with_logits_forward(X, np.ones((4, 2))), ValueError, r"expected target of shape \(4, 3\)"),
        (lambda: ops.bce_with_logits_forward(np.ones(3), np.ones(3)), ValueError, r"expected logits with 2"),
        (lambda: ops.mse_forward(X.astype(np.int64), X), TypeError, r"expected pred of dtype"),
        (lambda: ops.kl_normal_forward(X, np.ones((4, 2))), ValueError, r"expected logvar of shape"),
        (lambda: ops.kl_normal_forward(np.ones((4, 3), np.int32), X), TypeError, r"expected mu of dtype"),
        (lambda: ops.kl_gaussians_forward(X, X, np.ones((3, 3)), X), ValueError, r"expected mu_p of shape"),
        (lambda: ops.kl_gaussians_forward(X, X, X, np.ones((4, 1))), ValueError, r"expected logvar_p of shape"),
        (lambda: ops.reparameterize_forward(X, X), ValueError, r"pass eps .* or rng"),
        (lambda: ops.add_noise_forward(X), ValueError, r"pass eps .* or rng"),
        (lambda: ops.reparameterize_forward(X, X, eps=np.ones((4, 2))), ValueError, r"expected eps of shape"),
        (lambda: ops.add_noise_forward(X, eps=np.ones(3)), ValueError, r"expected eps of shape"),
        (lambda: ops.l2_norm_forward(np.ones(3)), ValueError, r"expected z with 2 dimensions"),
        (lambda: ops.continuous_bernoulli_mean(np.ones((2, 2), int)), TypeError, r"expected logits of dtype"),
    ],
)
def test_forward_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _cache(forward, *args, **kwargs):
    return forward(*args, **kwargs)[1]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.affine_backward(np.ones((4, 3)), _cache(ops.affine_forward, X, W, np.ones(2))), ValueError, r"dout of shape \(4, 2\)"),
        (lambda: ops.affine_backward(np.ones((4, 2)), _cache(ops.affine_forward, X, W, np.ones(2)), dx=np.empty((3, 3))), ValueError, r"dx buffer"),
        (lambda: ops.dense_backward(np.ones((4, 3)), _cache(ops.dense_forward, X, W, np.ones(2))), ValueError, r"dy of shape"),
        (lambda: ops.activation_backward(np.ones((2, 3)), _cache(ops.activation_forward, X)), ValueError, r"dy of shape"),
        (lambda: ops.bce_with_logits_backward(np.ones(3), _cache(ops.bce_with_logits_forward, X, X, "none")), ValueError, r"dloss of shape \(4,\)"),
        (lambda: ops.mse_backward(np.ones(4), _cache(ops.mse_forward, X, X, "sum")), ValueError, r"scalar dloss"),
        (lambda: ops.kl_normal_backward(np.ones((4, 1)), _cache(ops.kl_normal_forward, X, X, "batchmean")), ValueError, r"scalar dloss"),
        (lambda: ops.kl_normal_backward(1.0, _cache(ops.kl_normal_forward, X, X), accumulate=True), ValueError, r"accumulate=True needs the dmu and dlogvar"),
        (lambda: ops.kl_gaussians_backward(1.0, _cache(ops.kl_gaussians_forward, X, X, X, X), dmu=np.ones((4, 3)), accumulate=True), ValueError, r"accumulate=True needs"),
        (lambda: ops.kl_normal_backward(1.0, _cache(ops.kl_normal_forward, X, X), dmu=np.ones((4, 3), np.float32)), ValueError, r"dmu buffer"),
        (lambda: ops.reparameterize_backward(np.ones((4, 2)), _cache(ops.reparameterize_forward, X, X, eps=X)), ValueError, r"dz of shape"),
        (lambda: ops.add_noise_backward(np.ones((4, 2)), _cache(ops.add_noise_forward, X, eps=X)), ValueError, r"dz of shape"),
        (lambda: ops.l2_norm_backward(np.ones(2), _cache(ops.l2_norm_forward, X, "none")), ValueError, r"dloss of shape"),
    ],
)
def test_backward_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float32_stays_float32_with_float64_partners():
    """The first array fixes the dtype: float64 targets, weights and noise are cast, never upcast."""
    x32 = np.ones((4, 3), np.float32)
    assert ops.bce_with_logits_forward(x32, X)[0].dtype == np.float32
    assert ops.dense_forward(x32, W, np.ones(2))[0].dtype == np.float32
    assert ops.reparameterize_forward(x32, X, eps=X)[0].dtype == np.float32
    assert ops.add_noise_forward(x32, eps=X, scale=0.5)[0].dtype == np.float32
    z, cache = ops.reparameterize_forward(x32, X, rng=np.random.default_rng(0))
    assert z.dtype == np.float32 and cache[0].dtype == np.float32
    assert math.isfinite(float(ops.kl_gaussians_forward(x32, X, X, X)[0]))


def test_the_activation_registry_is_the_one_list():
    """Every entry is reachable by its kernel code (the twins dispatch on it); a code is taken once; an
    unknown name is one line naming the choices."""
    assert all(ops.activation_info(entry.code) is entry for entry in ops.ACTIVATIONS.values())
    assert len({entry.code for entry in ops.ACTIVATIONS.values()}) == len(ops.ACTIVATIONS)
    taken = ops.ACTIVATIONS["relu"]
    with pytest.raises(ValueError, match="activation code 1 is taken by 'relu'"):
        ops._register_activation(ops.ActivationInfo("relu6", "min(max(a, 0), 6)", taken.code, taken.forward,
                                                    taken.derivative, taken.second_derivative))
    assert "relu6" not in ops.ACTIVATIONS
    with pytest.raises(ValueError, match=r"^unknown activation 'gelu': expected one of identity, relu, leaky_relu"):
        ops.dense_forward(np.ones((1, 1)), np.ones((1, 1)), np.ones(1), "gelu")
