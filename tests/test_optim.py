"""Optimizers against torch.optim, step for step, in both backends and both float dtypes.

Each optimizer runs 50 steps over a flat vector on one fixed sequence of random gradients (with a
learning-rate change half way, as a schedule would make); torch runs the same steps on one parameter
tensor holding that vector (single-tensor code path, ``foreach=False``). Float64 parameters and state
agree to 1e-10 relative; torch's CPU kernels use FMA and a vectorised sqrt that is not always
correctly rounded, so bit equality is not expected. Float32 agrees to about a hundred ulps of the
largest entry. The Numba loops and their NumPy twins agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import tracemalloc

import numpy as np
import pytest

from npvae import backend, optim
from npvae.backend import numba_available
from npvae.registry import field_help

torch = pytest.importorskip("torch")

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("numba", id="numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not installed")),
]
N = 300
STEPS = 50

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
# Keras' conventions (tests/test_optim_keras.py checks their updates against Keras and its source)
KERAS_GRID = [
    ("keras-rmsprop", dict(lr=1e-2)),
    ("keras-rmsprop", dict(lr=1e-2, rho=0.3, epsilon=1e-4, centered=True, momentum=0.5, weight_decay=0.1)),
    ("keras-adam", dict(lr=1e-2)),
    ("keras-adam", dict(lr=1e-2, betas=(0.3, 0.8), eps=1e-4, weight_decay=0.1, amsgrad=True)),
]


def ids(grid):
    return [name + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for name, kw in grid]


GRID_IDS = ids(GRID)
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
@pytest.mark.parametrize("name, kw", GRID + KERAS_GRID, ids=ids(GRID + KERAS_GRID))
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
@pytest.mark.parametrize("name, kw", GRID + KERAS_GRID, ids=ids(GRID + KERAS_GRID))
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
        ("keras-rmsprop", dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=0.1)),
        ("keras-adam", dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
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


# ----------------------------------------------------------------------------- the registry and its options

# Settings in the options' vocabulary (rho, epsilon, beta1, beta2) and torch's names for the same.
TORCH_NAMES = {"rho": "alpha", "epsilon": "eps"}
OPTION_GRID = [
    ("sgd", dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    ("sgd", dict(momentum=0.5, nesterov=True)),
    ("rmsprop", dict(rho=0.5, epsilon=1e-5, momentum=0.7, centered=True, weight_decay=0.1)),
    ("adam", dict(beta1=0.8, beta2=0.9, epsilon=1e-5, amsgrad=True, weight_decay=0.1)),
    ("adamw", dict(beta1=0.3, beta2=0.7, epsilon=1e-6, weight_decay=0.3)),
]


def torch_kwargs(settings):
    kw = {TORCH_NAMES.get(k, k): v for k, v in settings.items() if k not in ("beta1", "beta2")}
    if "beta1" in settings:
        kw["betas"] = (settings["beta1"], settings["beta2"])
    return kw


@pytest.mark.parametrize("name, settings", OPTION_GRID, ids=ids(OPTION_GRID))
def test_registry_options_reach_torch_semantics(name, settings):
    """Options set through the registry (the trainer's path) give torch.optim's update, 50 float64 steps."""
    p0, grads = problem(np.float64, seed=5)
    params, g = p0.copy(), np.zeros_like(p0)
    entry = optim.OPTIMIZERS[name]
    opt = entry.build(params, g, 1e-2, entry.options_from(settings))
    for gt in grads:
        g[...] = gt
        opt.step()
    tp = torch.tensor(p0, requires_grad=True)
    topt = TORCH[name]([tp], lr=1e-2, foreach=False, **torch_kwargs(settings))
    for gt in grads:
        tp.grad = torch.tensor(gt)
        topt.step()
    assert_close(params, tp.detach().numpy(), 1e-10, f"{name} {settings}")


def test_registry_defaults_are_the_classes_defaults():
    """Each entry's default options build exactly its class with no keywords (today's optimizers unchanged)."""
    for name, entry in optim.OPTIMIZERS.items():
        a, b = np.zeros(4), np.zeros(4)
        built = entry.build(a, np.zeros(4), 1e-3).state_dict()
        plain = entry.cls(b, np.zeros(4), lr=1e-3).state_dict()
        assert built.keys() == plain.keys(), name
        for key in plain:
            np.testing.assert_array_equal(built[key], plain[key], err_msg=f"{name} {key}")
    assert list(optim.OPTIMIZERS)[:4] == ["sgd", "rmsprop", "adam", "adamw"]
    assert {e.convention for e in optim.OPTIMIZERS.values()} == {"pytorch", "keras"}
    keras = optim.OPTIMIZERS["keras-rmsprop"].options()
    assert (keras.rho, keras.epsilon) == (0.9, 1e-7)
    torch_rms = optim.OPTIMIZERS["rmsprop"].options()
    assert (torch_rms.rho, torch_rms.epsilon) == (0.99, 1e-8)
    assert optim.OPTIMIZERS["keras-adam"].options().epsilon == 1e-7


def test_every_option_has_help():
    for name, entry in optim.OPTIMIZERS.items():
        assert entry.help
        for f in dataclasses.fields(entry.options):
            assert field_help(f), f"{name}.{f.name} has no help"
    assert set(optim.hyperparameter_names()) == {
        "momentum", "dampening", "nesterov", "weight_decay", "rho", "epsilon", "centered", "beta1", "beta2", "amsgrad"}


@pytest.mark.parametrize(
    "name, settings, match",
    [
        ("sgd", dict(momentum=1.0), r"optimizer sgd: expected momentum in \[0.0, 1.0\)"),
        ("rmsprop", dict(momentum=1.5), r"optimizer rmsprop: expected momentum in \[0.0, 1.0\)"),
        ("keras-rmsprop", dict(momentum=-0.1), "expected momentum"),
        ("keras-rmsprop", dict(rho=1.0), r"expected rho in \[0.0, 1.0\)"),
        ("rmsprop", dict(rho=float("nan")), "expected rho"),
        ("adam", dict(beta1=1.0), r"expected beta1 in \[0.0, 1.0\)"),
        ("keras-adam", dict(beta2=-0.5), "expected beta2"),
        ("adam", dict(epsilon=-1e-8), "expected epsilon"),
        ("adamw", dict(weight_decay=-1.0), "expected weight_decay"),
        ("sgd", dict(dampening=1.5), r"expected dampening in \[0.0, 1.0\]"),
        ("sgd", dict(nesterov=True), "Nesterov momentum needs momentum > 0"),
        ("adam", dict(amsgrad=1), "expected amsgrad to be True or False"),
        ("adam", dict(beta1=True), "expected beta1 to be a number"),
        ("adam", dict(epsilon="small"), "expected epsilon to be a number"),
        ("adam", dict(rho=0.9), "optimizer adam takes no rho; its options are beta1, beta2, epsilon"),
        ("keras-rmsprop", dict(nesterov=True, beta1=0.9), "optimizer keras-rmsprop takes no beta1, nesterov"),
    ],
)
def test_options_refuse_bad_values_in_one_line(name, settings, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        optim.OPTIMIZERS[name].options_from(settings)
    assert "\n" not in str(info.value)


def test_class_constructors_refuse_momentum_of_one():
    for build in (lambda: make("sgd", momentum=1.0), lambda: make("rmsprop", momentum=1.0),
                  lambda: make("keras-rmsprop", momentum=1.0), lambda: make("rmsprop", alpha=1.0)):
        with pytest.raises(ValueError, match=r"in \[0.0, 1.0\)"):
            build()


def test_build_wants_its_own_options():
    with pytest.raises(TypeError, match="optimizer adam needs TorchAdamOptions, got KerasAdamOptions"):
        optim.OPTIMIZERS["adam"].build(np.zeros(2), np.zeros(2), 1e-3, optim.KerasAdamOptions())


def test_state_does_not_cross_conventions():
    """A torch Adam state cannot be loaded into Keras' Adam (different buffers): no silent switch of update rule."""
    torch_state = make("adam").state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        make("keras-adam").load_state_dict(torch_state)
    with pytest.raises(ValueError, match="missing keys"):
        make("keras-rmsprop").load_state_dict(make("rmsprop").state_dict())
