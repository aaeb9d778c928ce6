"""Optimizers against torch.optim, step for step, in both backends and both float dtypes.

Each optimizer runs 20 steps over a flat vector on one fixed sequence of random gradients (with a
learning-rate change half way, as a schedule would make); torch runs the same steps on one parameter
tensor holding that vector (single-tensor code path, ``foreach=False``). Float64 parameters and state
agree to 1e-10 relative; torch's CPU kernels use FMA and a vectorised sqrt that is not always
correctly rounded, so bit equality is not expected. Float32 agrees to about a hundred ulps of the
largest entry. The Numba loops and their NumPy twins agree bit for bit.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

from npvae import backend, optim
from npvae.backend import numba_available

torch = pytest.importorskip("torch")

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("numba", id="numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not installed")),
]
N = 300
STEPS = 20

# (name, kwargs): every switch, and both branches of torch's lerp (weight 1 - beta below/above 0.5).
GRID = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1)),
    ("rmsprop", dict(lr=1e-2)),
    ("rmsprop", dict(lr=1e-2, centered=True)),
    ("rmsprop", dict(lr=1e-2, momentum=0.9)),
    ("rmsprop", dict(lr=1e-2, alpha=0.3, eps=1e-6, centered=True, momentum=0.5, weight_decay=0.1)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, amsgrad=True)),
    ("adam", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, amsgrad=True)),
    ("adamw", dict(lr=1e-2, betas=(0.3, 0.8), weight_decay=0.5)),
]
GRID_IDS = [name + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for name, kw in GRID]
TORCH = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def problem(dtype, seed=0):
    """Initial parameters and a gradient sequence: mixed scales, and some gradients exactly zero."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(N).astype(dtype)
    grads = []
    for _ in range(STEPS):
        g = rng.standard_normal(N) * np.exp(rng.standard_normal(N))
        g[rng.random(N) < 0.1] = 0.0
        grads.append(g.astype(dtype))
    return p0, grads


def run_ours(name, kw, p0, grads, be):
    params = p0.copy()
    g = np.zeros_like(params)
    with backend.use_backend(be):
        opt = optim.make_optimizer(name, params, g, **kw)
        for t, gt in enumerate(grads):
            if t == STEPS // 2:
                opt.lr = kw["lr"] / 2
            g[...] = gt
            opt.step()
    return params, opt


def run_torch(name, kw, p0, grads):
    tp = torch.tensor(p0, requires_grad=True)
    opt = TORCH[name]([tp], foreach=False, **kw)
    for t, gt in enumerate(grads):
        if t == STEPS // 2:
            opt.param_groups[0]["lr"] = kw["lr"] / 2
        tp.grad = torch.tensor(gt)
        opt.step()
    state = {k: v.numpy() for k, v in opt.state[tp].items() if k != "step" and v is not None}
    return tp.detach().numpy(), state


def assert_close(ours, ref, tol, what):
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.max(np.abs(ref)), err_msg=what)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("name, kw", GRID, ids=GRID_IDS)
def test_matches_torch(name, kw, dtype, tol, be):
    p0, grads = problem(dtype)
    params, opt = run_ours(name, kw, p0, grads, be)
    ref_params, ref_state = run_torch(name, kw, p0, grads)
    assert params.dtype == dtype
    assert_close(params, ref_params, tol, "params")
    state = opt.state_dict()
    assert state["step"] == STEPS
    assert set(ref_state) <= set(state)
    for key, ref in ref_state.items():
        assert_close(state[key], ref, tol, key)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, kw", GRID, ids=GRID_IDS)
def test_backends_bit_identical(name, kw, dtype):
    p0, grads = problem(dtype, seed=1)
    a, opt_a = run_ours(name, kw, p0, grads, "numpy")
    b, opt_b = run_ours(name, kw, p0, grads, "numba")
    np.testing.assert_array_equal(a, b)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def npz_round_trip(state):
    """The state dict through an .npz loaded without pickle: numbers come back as 0-d arrays."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, kw", GRID, ids=GRID_IDS)
def test_state_dict_resume_is_exact(name, kw, dtype):
    p0, grads = problem(dtype, seed=2)
    straight = p0.copy()
    g = np.zeros_like(straight)
    opt = optim.make_optimizer(name, straight, g, **kw)
    for gt in grads:
        g[...] = gt
        opt.step()

    first = p0.copy()
    g1 = np.zeros_like(first)
    opt1 = optim.make_optimizer(name, first, g1, **kw)
    for gt in grads[: STEPS // 2]:
        g1[...] = gt
        opt1.step()
    saved = opt1.state_dict()
    for key, value in saved.items():
        assert isinstance(value, (np.ndarray, float, int)), key
    resumed = first.copy()  # the parameters travel with the model's own checkpoint
    g1[...] = grads[0]
    opt1.step()  # the saved dict holds copies: this step must not leak into it
    assert saved["step"] == STEPS // 2

    opt2 = optim.make_optimizer(name, resumed, np.zeros_like(resumed), **{**kw, "lr": 123.0})
    opt2.load_state_dict(npz_round_trip(saved))
    assert opt2.lr == kw["lr"] and opt2.step_count == STEPS // 2
    for gt in grads[STEPS // 2 :]:
        opt2.grads[...] = gt
        opt2.step()
    np.testing.assert_array_equal(resumed, straight)
    final, ref = opt2.state_dict(), opt.state_dict()
    for key in ref:
        np.testing.assert_array_equal(final[key], ref[key], err_msg=key)


def make(name="adam", n=10, dtype=np.float64, **kw):
    params = np.zeros(n, dtype=dtype)
    return optim.make_optimizer(name, params, np.zeros_like(params), lr=kw.pop("lr", 1e-3), **kw)


def test_load_state_dict_errors_leave_optimizer_unchanged():
    opt = make("adam")
    opt.grads[...] = 1.0
    opt.step()
    good = opt.state_dict()
    before = {k: np.copy(v) for k, v in good.items()}

    cases = [
        ({k: v for k, v in good.items() if k != "exp_avg"}, r"missing keys \['exp_avg'\]"),
        ({**good, "momentum_buffer": good["exp_avg"]}, r"unexpected keys \['momentum_buffer'\]"),
        ({**good, "exp_avg": np.zeros(11)}, r"'exp_avg': expected a float array of shape \(10,\), got float64 \(11,\)"),
        ({**good, "exp_avg": np.zeros(10, dtype=np.int64)}, r"'exp_avg': expected a float array"),
        ({**good, "step": -1}, "non-negative integer"),
        ({**good, "step": 1.5}, "non-negative integer"),
        ({**good, "lr": np.zeros(2)}, "'lr': expected a number"),
        ({**good, "lr": -1.0}, r"expected lr in \[0.0, inf\]"),
        ({**good, "beta2": 1.0}, r"expected betas\[1\] in \[0.0, 1.0\)"),
        ({**good, "amsgrad": 1, "max_exp_avg_sq": good["exp_avg"]}, "unexpected keys"),
        (make("adamw").state_dict(), "saved with decoupled_weight_decay=True"),
        (make("sgd", momentum=0.9).state_dict(), "missing keys"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(state)
        after = opt.state_dict()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: optim.SGD(np.zeros((2, 3)), np.zeros((2, 3)), lr=0.1), r"flat 1-D buffer, got shape \(2, 3\)"),
        (lambda: optim.SGD(np.zeros(3, np.int64), np.zeros(3, np.int64), lr=0.1), "float32 or float64, got int64"),
        (lambda: optim.SGD(np.zeros(3, np.float16), np.zeros(3, np.float16), lr=0.1), "got float16"),
        (lambda: optim.SGD([0.0, 1.0], [0.0, 1.0], lr=0.1), "NumPy array, got list"),
        (lambda: optim.SGD(np.zeros(3), np.zeros(4), lr=0.1), r"params is float64 \(3,\), grads is float64 \(4,\)"),
        (lambda: optim.SGD(np.zeros(3), np.zeros(3, np.float32), lr=0.1), "grads is float32"),
        (lambda: optim.SGD(np.zeros(6)[::2], np.zeros(3), lr=0.1), "contiguous"),
        (lambda: optim.SGD(*[np.zeros(3)] * 2, lr=0.1), "separate buffers"),
        (lambda b=np.zeros(4): optim.SGD(b[:3], b[1:], lr=0.1), "separate buffers"),
        (lambda: make("sgd", lr=-0.1), r"expected lr in \[0.0, inf\] and finite, got -0.1"),
        (lambda: make("sgd", lr=float("nan")), "expected lr"),
        (lambda: make("sgd", lr="fast"), "expected lr to be a number"),
        (lambda: make("sgd", momentum=-0.5), "momentum"),
        (lambda: make("sgd", nesterov=True), "Nesterov momentum needs momentum > 0 and dampening = 0"),
        (lambda: make("sgd", momentum=0.9, dampening=0.1, nesterov=True), "dampening = 0"),
        (lambda: make("rmsprop", alpha=-0.1), "alpha"),
        (lambda: make("rmsprop", eps=-1e-8), "eps"),
        (lambda: make("adam", betas=(1.0, 0.999)), r"betas\[0\] in \[0.0, 1.0\)"),
        (lambda: make("adam", betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda: make("adam", betas=0.9), "betas to be a pair"),
        (lambda: make("adamw", weight_decay=-1), "weight_decay"),
        (lambda: make("lbfgs"), "unknown optimizer 'lbfgs': expected one of sgd, rmsprop, adam, adamw"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_lr_setter_validates():
    opt = make("adam")
    opt.lr = 0.0  # warm-up schedules start at zero
    with pytest.raises(ValueError, match="expected lr"):
        opt.lr = -1e-3
    assert opt.lr == 0.0


def test_zero_grad_make_optimizer_and_repr():
    opt = make("AdamW", n=4, dtype=np.float32)
    assert type(opt) is optim.AdamW and opt.weight_decay == 1e-2 and opt.betas == (0.9, 0.999)
    grads_id = id(opt.grads)
    opt.grads[...] = 3.0
    opt.zero_grad()
    assert id(opt.grads) == grads_id and not opt.grads.any()
    assert repr(opt).startswith("AdamW(N=4, dtype=float32, lr=0.001, beta1=0.9, beta2=0.999")


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm, dtype, tol, be):
    g = (np.random.default_rng(3).standard_normal(1000) * 3).astype(dtype)
    tg = torch.tensor(g)
    tp = torch.zeros_like(tg, requires_grad=True)
    tp.grad = tg
    ref_norm = float(torch.nn.utils.clip_grad_norm_([tp], max_norm, foreach=False))
    with backend.use_backend(be):
        norm = optim.clip_grad_norm(g, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(ref_norm, rel=tol)
    np.testing.assert_allclose(g, tg.numpy(), rtol=tol, atol=0)
    if max_norm < norm:
        assert np.linalg.norm(g.astype(np.float64)) == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_edge_cases():
    zeros = np.zeros(5)
    assert optim.clip_grad_norm(zeros, 1.0) == 0.0 and not zeros.any()
    bad = np.array([1.0, np.nan, 2.0])
    assert np.isnan(optim.clip_grad_norm(bad, 1.0))
    assert np.isnan(bad).all()  # like torch: a NaN norm poisons every gradient rather than hiding
    for max_norm in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="max_norm"):
            optim.clip_grad_norm(np.ones(3), max_norm)
    with pytest.raises(ValueError, match="flat 1-D buffer"):
        optim.clip_grad_norm(np.ones((2, 2)), 1.0)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize(
    "name, kw",
    [
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
        ("rmsprop", dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1)),
        ("adam", dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
        ("adamw", dict(lr=1e-3)),
    ],
)
def test_numba_step_allocates_nothing(name, kw):
    # 100k float32 parameters: one temporary array would be >= 400 KB. The 1 KiB of slack covers
    # what a step creates and frees in Python: a dozen NumPy scalars for the cast hyperparameters,
    # the argument tuple of the kernel call, Python floats for the bias corrections.
    params = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    grads = np.ones_like(params)
    with backend.use_backend("numba"):
        opt = optim.make_optimizer(name, params, grads, **kw)
        for _ in range(3):
            opt.step()  # compile and settle
        tracemalloc.start()
        try:
            opt.step()
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            for _ in range(50):
                opt.step()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak - base < 1024, f"step() allocated: peak {peak - base} B above the baseline"
    assert current - base < 256, f"step() kept {current - base} B"
