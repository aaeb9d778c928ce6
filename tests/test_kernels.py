"""Every loop kernel in :mod:`npvae._kernels`, compiled by Numba, against its NumPy twin.

The kernels are found by scanning the module for :class:`~npvae.backend.Kernel` instances, so a new
kernel is covered automatically and fails here until it has an input builder below. Each builder
returns argument tuples (all the variants worth running: every activation code, accumulate on and
off, aliased buffers, optimizer flags); every array argument is compared after the call (outputs
and in-place state alike), except ``work``, the twins' scratch.

Tolerance, relative to each array's scale (max|a| + |b|): float64 1e-12 (summation order is all that
may differ); float32 2e-6 (~16 ulps: the loops may evaluate a float32 expression in float64 where
a float64 literal promotes it, the twins stay in float32), except ``cb_log_norm_backward``:
1/l - 1/sinh(l) cancels ~600x just above its series switch, so two correct float32 evaluations
may differ by 2e-5 there.
"""

from __future__ import annotations

import copy
import inspect
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npvae._kernels as K
from npvae import ops
from npvae.backend import Kernel, numba_available
from tests.helpers import random_array, rel_error

KERNELS = sorted(name for name, value in vars(K).items() if isinstance(value, Kernel))
TOL = {np.float64: 1e-12, np.float32: 2e-6}
F32_CANCELLING = {"cb_log_norm_backward": 5e-5}


class Draw:
    """Arrays for one example: (n, m) matrices, (m,) or (n,) vectors, (n * m,) flat buffers."""

    def __init__(self, rng: np.random.Generator, dtype, n: int, m: int):
        self.rng, self.dtype, self.n, self.m = rng, dtype, n, m

    def __call__(self, lo, hi, shape=None):
        return random_array(self.rng, (self.n, self.m) if shape is None else shape, lo, hi).astype(self.dtype)

    def empty(self, shape=None):
        return np.full((self.n, self.m) if shape is None else shape, np.nan, dtype=self.dtype)

    def flat(self, lo, hi):
        return self(lo, hi, (self.n * self.m,))

    def work(self):
        return np.full((2, self.n * self.m), np.nan, dtype=self.dtype)

    def scalar(self, value):
        return self.dtype(value)


CODES = [entry.code for entry in ops.ACTIVATIONS.values()]


def _bias_act_forward(d):
    cases = []
    for code in CODES:
        cases.append((d(-100, 100), d(-3, 3, (d.m,)), code, 0.1, d.empty()))
        a = d(-100, 100)
        cases.append((a, d(-3, 3, (d.m,)), code, 0.1, a))  # a aliases out, as dense_forward does
    return cases


def _act_backward(d):
    cases = []
    for code in CODES:
        y = d.empty()
        K.bias_act_forward.twin(d(-30, 30), np.zeros(d.m, d.dtype), code, 0.1, y)  # a valid output
        cases.append((d(-2, 2), y, code, 0.1, d.empty()))
        dy = d(-2, 2)
        cases.append((dy, y.copy(), code, 0.1, dy))  # dy aliases out, as dense_backward allows
    return cases


def _kl_gaussians_backward(d):
    return [
        (d(-10, 10), d(-30, 30), d(-10, 10), d(-30, 30), d(-2, 2, (d.n,)), acc, d(-1, 1), d(-1, 1), d.empty(), d.empty())
        for acc in (False, True)
    ]


def _sgd_step(d):
    cases = []
    for weight_decay in (0.0, 0.01):
        for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
            for first in (True, False):
                buf = d.flat(-1, 1) if momentum else d.empty((0,))
                keep = 1.0 if nesterov else 0.8
                s = d.scalar
                cases.append(
                    (d.flat(-3, 3), d.flat(-1, 1), buf, s(-0.1), s(weight_decay), s(momentum), s(keep), nesterov, first, d.work())
                )
    return cases


def _rmsprop_step(d):
    cases = []
    s = d.scalar
    for alpha in (0.99, 0.3):
        for centered in (False, True):
            for momentum, weight_decay in ((0.0, 0.0), (0.9, 0.01)):
                grad_avg = d.flat(-1, 1) if centered else d.empty((0,))
                square_avg = d.flat(0.5, 2) + (grad_avg * grad_avg if centered else 0)  # s - a^2 stays > 0
                buf = d.flat(-1, 1) if momentum else d.empty((0,))
                one_minus_alpha = s(1 - alpha)
                cases.append(
                    (d.flat(-3, 3), d.flat(-1, 1), square_avg.astype(d.dtype), grad_avg, buf, s(-0.01), s(alpha),
                     one_minus_alpha, s(1) - one_minus_alpha, bool(abs(one_minus_alpha) < 0.5), s(1e-8),
                     s(weight_decay), s(momentum), centered, d.work())
                )
    return cases


def _adam_step(d):
    cases = []
    s = d.scalar
    t, lr, beta2 = 3, 1e-3, 0.999
    for beta1 in (0.9, 0.3):
        for amsgrad in (False, True):
            for decoupled in (False, True):
                w1 = s(1 - beta1)
                l2, decay = (s(0), s(1 - lr * 0.01)) if decoupled else (s(0.01), s(1))
                cases.append(
                    (d.flat(-3, 3), d.flat(-1, 1), d.flat(-1, 1), d.flat(0, 1), d.flat(0, 1) if amsgrad else d.empty((0,)),
                     w1, s(1) - w1, bool(abs(w1) < 0.5), s(beta2), s(1 - beta2), s(-lr / (1 - beta1**t)),
                     s(math.sqrt(1 - beta2**t)), s(1e-8), l2, decay, amsgrad, d.work())
                )
    return cases


def _l2_norm_backward(d):
    z = d(-10, 10)
    z[0] = 0  # the zero row: a zero gradient in both
    norms = d.empty((d.n,))
    K.l2_norm_rows.twin(z, norms)
    return [(z, norms, d(-2, 2, (d.n,)), d.empty())]


def _bce_logits_forward(d):
    return [(d(-100, 100), d(0, 1), d.empty((d.n,)), d.empty(), d.empty())]


def _l2_norm_rows(d):
    z = d(-100, 100)
    z[0] = 0
    return [(z, d.empty((d.n,)))]


def _reparameterize_backward(d):
    return [(d(-2, 2), d(-5, 5), np.exp(0.5 * d(-30, 30)).astype(d.dtype), d.empty(), d.empty())]


def _images(d, lo, hi, channels=2):
    """A (2, channels, H, W) batch with H, W in 1..9 from the example's (n, m)."""
    return d(lo, hi, (2, channels, d.n % 9 + 1, d.m % 9 + 1))


def _max_pool_forward(d):
    cases = []
    for (kh, kw), (sh, sw), (pt, pl) in (((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 1)), ((1, 3), (2, 1), (0, 1))):
        for x in (_images(d, -5, 5), np.round(_images(d, 0, 2))):  # the second has ties
            h, w = x.shape[2:]
            if h + 2 * pt < kh or w + 2 * pl < kw:
                continue
            oh, ow = (h + 2 * pt - kh) // sh + 1, (w + 2 * pl - kw) // sw + 1
            x.flat[3::7] = np.nan  # NaN propagates (the last NaN of a window wins), as in PyTorch
            cases.append((x, kh, kw, sh, sw, pt, pl, d.empty((2, 2, oh, ow)), np.zeros((2, 2, oh, ow), np.int64)))
    return cases


def _max_pool_backward(d):
    x = _images(d, -5, 5)
    out, argmax = d.empty((2, 2, x.shape[2], x.shape[3])), np.zeros((2, 2, x.shape[2], x.shape[3]), np.int64)
    K.max_pool_forward.twin(x, 2, 2, 1, 1, 1, 1, out, argmax)  # overlapping windows: shared winners add up
    return [(d(-2, 2, out.shape), argmax, d.empty(x.shape))]


def _channel_bias_act(d):
    p = d.m
    zeros = np.zeros(p, d.dtype)
    return [(d(-100, 100, (2, 3, p)), d(-3, 3, (3,)), code, 0.1, zeros) for code in CODES]


def _col2im(d):
    """Contributions of (2, C_out kh kw, h w) scattered into outputs cropped, or extended (a negative
    crop), at stride 1, 2 and (2, 1)."""
    h, w = d.n % 5 + 1, d.m % 5 + 1
    cases = []
    for (kh, kw), (sh, sw), (top, bottom), (left, right) in (
            ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (0, 1), (0, 1)), ((2, 3), (2, 1), (0, 0), (1, 0)),
            ((1, 1), (2, 2), (0, -1), (0, -1))):
        oh, ow = (h - 1) * sh + kh - top - bottom, (w - 1) * sw + kw - left - right
        if oh < 1 or ow < 1:
            continue
        cases.append((d(-2, 2, (2, 2 * kh * kw, h * w)), kh, kw, sh, sw, top, left, h, w, d.empty((2, 2, oh, ow))))
    return cases


def _direct_geometry(d):
    """(xp, (kh, kw), (sh, sw), (oh, ow)) of padded inputs (2, 3, Hp, Wp) for a few kernels and strides."""
    hp, wp = d.n % 9 + 3, d.m % 9 + 3
    out = []
    for (kh, kw), (sh, sw) in (((3, 3), (1, 1)), ((2, 3), (2, 1)), ((3, 2), (1, 2)), ((1, 1), (1, 1))):
        out.append((d(-2, 2, (2, 3, hp, wp)), (kh, kw), (sh, sw), ((hp - kh) // sh + 1, (wp - kw) // sw + 1)))
    return out


def _conv_direct_forward(d):
    return [(xp, d(-1, 1, (c_out, 3, kh, kw)), sh, sw, d.empty((2, c_out, oh, ow)))
            for xp, (kh, kw), (sh, sw), (oh, ow) in _direct_geometry(d) for c_out in (1, 2)]


def _conv_direct_weight_grad(d):
    return [(xp, d(-1, 1, (2, c_out, oh, ow)), sh, sw, np.full((c_out, 3, kh, kw, ow), np.nan),
             d.empty((c_out, 3, kh, kw)))
            for xp, (kh, kw), (sh, sw), (oh, ow) in _direct_geometry(d) for c_out in (1, 2)]


BUILDERS = {
    "max_pool_forward": _max_pool_forward,
    "col2im": _col2im,
    "conv_direct_forward": _conv_direct_forward,
    "conv_direct_weight_grad": _conv_direct_weight_grad,
    "channel_bias_act": _channel_bias_act,
    "channel_sum": lambda d: [(d(-10, 10, (2, d.n % 7 + 1, d.m)), np.empty(d.n % 7 + 1), d.empty((d.n % 7 + 1,)))],
    "max_pool_backward": _max_pool_backward,
    "upsample_forward": lambda d: [(x, 2, 3, d.empty((2, 2, x.shape[2] * 2, x.shape[3] * 3))) for x in [_images(d, -5, 5)]],
    "upsample_backward": lambda d: [(d(-2, 2, (2, 2, 3 * (d.n % 5 + 1), 2 * (d.m % 5 + 1))), 3, 2,
                                     d.empty((2, 2, d.n % 5 + 1, d.m % 5 + 1)))],
    "bias_act_forward": _bias_act_forward,
    "act_backward": _act_backward,
    "bias_grad": lambda d: [(d(-10, 10), d.empty((d.m,)), np.empty(d.m))],
    "bce_logits_forward": _bce_logits_forward,
    "scaled_difference": lambda d: [(d(0, 1), d(0, 1), d(-2, 2, (d.n,)), d.empty())],
    "squared_error_rows": lambda d: [(d(-100, 100), d(-100, 100), d.empty((d.n,)))],
    "cb_log_norm_rows": lambda d: [(d(-100, 100), d.empty((d.n,)))],
    "cb_log_norm_backward": lambda d: [(d(-100, 100), d(-2, 2, (d.n,)), d.empty())],
    "reparameterize": lambda d: [(d(-10, 10), d(-30, 30), d(-5, 5), d.empty(), d.empty())],
    "reparameterize_backward": _reparameterize_backward,
    "kl_normal_rows": lambda d: [(d(-10, 10), d(-30, 30), d.empty((d.n,)))],
    "kl_normal_backward": lambda d: [
        (d(-10, 10), d(-30, 30), d(-2, 2, (d.n,)), acc, d(-1, 1), d(-1, 1)) for acc in (False, True)
    ],
    "kl_gaussians_rows": lambda d: [(d(-10, 10), d(-30, 30), d(-10, 10), d(-30, 30), d.empty((d.n,)))],
    "kl_gaussians_backward": _kl_gaussians_backward,
    "l2_norm_rows": _l2_norm_rows,
    "l2_norm_backward": _l2_norm_backward,
    "sgd_step": _sgd_step,
    "rmsprop_step": _rmsprop_step,
    "adam_step": _adam_step,
    "sum_squares": lambda d: [(d.flat(-100, 100), np.full(1, np.nan))],
}


def test_every_kernel_has_an_input_builder():
    assert KERNELS, "no Kernel instances found in npvae._kernels"
    missing = sorted(set(KERNELS) - set(BUILDERS))
    assert not missing, f"add input builders in tests/test_kernels.py for: {', '.join(missing)}"
    stale = sorted(set(BUILDERS) - set(KERNELS))
    assert not stale, f"builders for kernels that no longer exist: {', '.join(stale)}"


def _compared(kernel, args):
    """(position, array) of every array argument except ``work``, the twins' scratch."""
    names = list(inspect.signature(kernel.loop).parameters)
    return [(i, a) for i, a in enumerate(args) if isinstance(a, np.ndarray) and names[i] != "work"]


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 64), m=st.integers(1, 64))
def test_compiled_loop_agrees_with_twin(name, dtype, seed, n, m):
    if name not in BUILDERS:
        pytest.fail(f"kernel {name} has no input builder in tests/test_kernels.py")
    kernel = getattr(K, name)
    tol = F32_CANCELLING.get(name, TOL[np.float32]) if dtype is np.float32 else TOL[np.float64]
    for case, args in enumerate(BUILDERS[name](Draw(np.random.default_rng(seed), dtype, n, m))):
        loop_args, twin_args = copy.deepcopy(args), copy.deepcopy(args)  # deepcopy keeps aliasing
        kernel.compiled()(*loop_args)
        kernel.twin(*twin_args)
        for i, got in _compared(kernel, loop_args):
            want = twin_args[i]
            assert got.dtype == want.dtype == args[i].dtype, f"{name} case {case} argument {i}: dtype changed"
            both_nan = np.isnan(got) & np.isnan(want)
            assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name} case {case} argument {i}: NaNs differ"
            err = rel_error(np.where(both_nan, 0, got), np.where(both_nan, 0, want))
            assert err <= tol, f"{name} case {case} argument {i}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- float32 exp and log1p


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the exact value (float64 reference)."""
    return np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)


def _exp_arguments() -> np.ndarray:
    """x from subnormal and zero results to overflow on a fine grid, plus magnitudes down to 1e-40."""
    grid = np.linspace(-110, 88.7, 800_001)
    tiny = 10.0 ** -np.arange(0, 40, 0.01)
    return np.concatenate([grid, tiny, -tiny]).astype(np.float32)


def _log1p_arguments() -> np.ndarray:
    return np.concatenate([np.linspace(0, 1, 400_001), 10.0 ** -np.arange(0, 45, 0.01)]).astype(np.float32)


@pytest.fixture(scope="module")
def compiled_helpers():
    """fast_exp, fast_expm1 and fast_log1p_unit mapped over an array by a compiled loop."""
    numba = pytest.importorskip("numba")
    K.sum_squares.compiled()  # the first compile registers the helpers with Numba

    @numba.njit
    def exp_map(x, out):
        for i in range(x.shape[0]):
            out[i] = K.fast_exp(x[i])

    @numba.njit
    def expm1_map(x, out):
        for i in range(x.shape[0]):
            out[i] = K.fast_expm1(x[i])

    @numba.njit
    def log1p_map(x, out):
        for i in range(x.shape[0]):
            out[i] = K.fast_log1p_unit(x[i])

    def apply(fn, x):
        out = np.empty_like(x)
        fn(x, out)
        return out

    maps = {"exp": exp_map, "expm1": expm1_map, "log1p": log1p_map}
    return {name: (lambda x, fn=fn: apply(fn, x)) for name, fn in maps.items()}


@pytest.mark.parametrize("name, exact, arguments, max_ulps", [
    ("exp", np.exp, _exp_arguments, 1.0),
    ("expm1", np.expm1, _exp_arguments, 2.0),
    ("log1p", np.log1p, _log1p_arguments, 2.0),
])
def test_float32_helpers_within_their_ulp_bounds(compiled_helpers, name, exact, arguments, max_ulps):
    x = arguments()
    got = compiled_helpers[name](x)
    assert got.dtype == np.float32
    want = exact(x.astype(np.float64))
    finite = np.isfinite(want.astype(np.float32)) & (want != 0)
    ulps = _ulps(got[finite], want[finite])
    assert ulps.max() <= max_ulps, f"{name}: {ulps.max():.2f} ulp at x = {x[finite][ulps.argmax()]!r}"
    assert np.array_equal(got[~finite], want[~finite].astype(np.float32)), f"{name}: zeros or overflow differ"


def test_float32_exp_edges(compiled_helpers):
    x = np.array([0.0, -0.0, 88.73, 1000.0, np.inf, -104.0, -1000.0, -np.inf, np.nan], np.float32)
    assert compiled_helpers["exp"](x).tolist()[:-1] == [1.0, 1.0, math.inf, math.inf, math.inf, 0.0, 0.0, 0.0]
    assert np.isnan(compiled_helpers["exp"](x)[-1]) and np.isnan(compiled_helpers["expm1"](x)[-1])
    assert compiled_helpers["expm1"](x[:-1]).tolist() == [0.0, 0.0, math.inf, math.inf, math.inf, -1.0, -1.0, -1.0]


def test_float64_helpers_are_libm(compiled_helpers):
    x = np.concatenate([_exp_arguments(), [-700.0, -745.2, 700.0]]).astype(np.float64)
    assert np.array_equal(compiled_helpers["exp"](x), np.array([math.exp(v) for v in x]))
    assert np.array_equal(compiled_helpers["expm1"](x), np.array([math.expm1(v) for v in x]))
    y = _log1p_arguments().astype(np.float64)
    assert np.array_equal(compiled_helpers["log1p"](y), np.array([math.log1p(v) for v in y]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_float32_helpers_compile_to_their_python_formulas(compiled_helpers, seed):
    """The compiled helpers (LLVM bitcast included) compute exactly what their Python source says."""
    rng = np.random.default_rng(seed)
    x = (rng.choice([-1, 1], 200) * np.exp(rng.uniform(-90, 4.4, 200))).astype(np.float32)
    assert np.array_equal(compiled_helpers["exp"](x), [K._exp_f32(v) for v in x])
    assert np.array_equal(compiled_helpers["expm1"](x), [K._expm1_f32(v) for v in x])
    u = rng.uniform(0, 1, 200).astype(np.float32)
    assert np.array_equal(compiled_helpers["log1p"](u), [K._log1p_unit_f32(v) for v in u])


# Array constructors: none may run inside a compiled loop, so a training step allocates nothing.
# (tracemalloc, in tests/test_train.py, cannot see Numba's heap, and Numba's own allocation counter
# also counts the wrappers it makes for every array argument, so this reads the source instead.)
_ALLOCATING = re.compile(r"\bnp\.(zeros|empty|ones|full|array|arange|copy|concatenate|stack)(_like)?\(|\.copy\(")
_LOOP_HELPERS = ("_bias_act_loops", "_act_backward_loops", "_loop_row_sum", "_exp_f32", "_expm1_f32", "_log1p_unit_f32")


@pytest.mark.parametrize("name", KERNELS + list(_LOOP_HELPERS))
def test_compiled_loops_make_no_arrays(name):
    fn = getattr(K, name)
    source = inspect.getsource(fn.loop if isinstance(fn, Kernel) else fn)
    found = _ALLOCATING.search(source)
    assert found is None, f"{name} makes an array in its loop ({found.group(0)}): take a buffer argument instead"
