"""Keras' conventions (``keras-rmsprop``, ``keras-adam``) against Keras 3: its source, and Keras itself.

Two references, each over 50 float64 steps of a gradient that changes every step, with a learning-rate
change half way:

- a NumPy transcription of Keras 3.15's generic ``update_step`` (``keras/src/optimizers/rmsprop.py``,
  ``keras/src/optimizers/adam.py``) and of ``BaseOptimizer._apply_weight_decay``
  (``keras/src/optimizers/base_optimizer.py``): always runs, so the update rule is pinned even where
  Keras is not installed;
- Keras itself on the torch backend (``KERAS_BACKEND=torch``), whose optimizers take the
  ``_parallel_update_step`` path (``keras/src/backend/torch/optimizers/torch_rmsprop.py``,
  ``torch_adam.py``): skipped when keras is missing.

Keras keeps its learning rate in a float32 variable and computes ``1 - weight_decay * lr`` from it in
float32, so the learning rates and weight decay here are powers of two (exact in float32): the
comparison then tests the update rule, not float32 rounding of the hyperparameters.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from npvae import optim

# Keras' variables warn on NumPy 2's copy keyword; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
STEPS = 50
N = 200
LR = 2.0**-6  # exact in float32, as Keras stores it; halved half way
CASES = [
    ("keras-rmsprop", dict()),
    ("keras-rmsprop", dict(centered=True)),
    ("keras-rmsprop", dict(momentum=0.9)),
    ("keras-rmsprop", dict(rho=0.3, epsilon=1e-4, centered=True, momentum=0.5, weight_decay=0.5)),
    ("keras-adam", dict()),
    ("keras-adam", dict(amsgrad=True)),
    ("keras-adam", dict(beta1=0.3, beta2=0.8, epsilon=1e-4, weight_decay=0.5, amsgrad=True)),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def problem(seed=0):
    """Initial parameters, 50 gradients (mixed scales, some exactly zero) and the learning rate per step."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(N)
    grads = []
    for _ in range(STEPS):
        g = rng.standard_normal(N) * np.exp(rng.standard_normal(N))
        g[rng.random(N) < 0.1] = 0.0
        grads.append(g)
    lrs = [LR if t < STEPS // 2 else LR / 2 for t in range(STEPS)]
    return p0, grads, lrs


def run_ours(name, settings, p0, grads, lrs):
    params, g = p0.copy(), np.zeros_like(p0)
    entry = optim.OPTIMIZERS[name]
    opt = entry.build(params, g, lrs[0], entry.options_from(settings))
    for gt, lr in zip(grads, lrs):
        opt.lr = lr
        g[...] = gt
        opt.step()
    return params


def keras_rmsprop_from_source(p, grads, lrs, rho=0.9, epsilon=1e-7, momentum=0.0, centered=False,
                              weight_decay=0.0):
    """Keras 3.15 ``RMSprop.update_step`` after ``_apply_weight_decay``, line for line."""
    velocity, average_grad, moment = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for gradient, lr in zip(grads, lrs):
        p = p - p * weight_decay * lr
        velocity = rho * velocity + (1 - rho) * np.square(gradient)
        if centered:
            average_grad = rho * average_grad + (1 - rho) * gradient
            denominator = velocity - np.square(average_grad) + epsilon
        else:
            denominator = velocity + epsilon
        increment = lr * gradient / np.sqrt(denominator)
        if momentum > 0:
            moment = momentum * moment + increment
            p = p - moment
        else:
            p = p - increment
    return p


def keras_adam_from_source(p, grads, lrs, beta1=0.9, beta2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=0.0):
    """Keras 3.15 ``Adam.update_step`` after ``_apply_weight_decay``, line for line."""
    m, v, v_hat = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for iterations, (gradient, lr) in enumerate(zip(grads, lrs)):
        p = p - p * weight_decay * lr
        local_step = iterations + 1
        alpha = lr * np.sqrt(1 - beta2**local_step) / (1 - beta1**local_step)
        m = m + (gradient - m) * (1 - beta1)
        v = v + (np.square(gradient) - v) * (1 - beta2)
        if amsgrad:
            v_hat = np.maximum(v_hat, v)
            p = p - m * alpha / (np.sqrt(v_hat) + epsilon)
        else:
            p = p - m * alpha / (np.sqrt(v) + epsilon)
    return p


FROM_SOURCE = {"keras-rmsprop": keras_rmsprop_from_source, "keras-adam": keras_adam_from_source}


def assert_close(ours, ref, what):
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10 * np.max(np.abs(ref)), err_msg=what)


@pytest.mark.parametrize("name, settings", CASES, ids=IDS)
def test_matches_keras_source(name, settings):
    p0, grads, lrs = problem()
    assert_close(run_ours(name, settings, p0, grads, lrs), FROM_SOURCE[name](p0, grads, lrs, **settings), name)


def test_conventions_differ_where_it_matters():
    """The first RMSprop step (rho 0.9) on a tiny gradient: torch divides by sqrt(0.1) |g| + 1e-8 (a step of
    about 3 lr whatever the gradient's size), Keras by sqrt(0.1 g^2 + 1e-7), so a gradient of 1e-6 moves
    Keras' parameters about 1000x less."""
    g = np.full(1, 1e-6)
    steps = {}
    for name in ("rmsprop", "keras-rmsprop"):
        p = np.zeros(1)
        entry = optim.OPTIMIZERS[name]
        entry.build(p, g.copy(), 1e-3, entry.options_from({"rho": 0.9})).step()
        steps[name] = -p[0]
    assert steps["rmsprop"] == pytest.approx(1e-3 * 1e-6 / (np.sqrt(0.1) * 1e-6 + 1e-8), rel=1e-12)
    assert steps["keras-rmsprop"] == pytest.approx(1e-3 * 1e-6 / np.sqrt(0.1 * 1e-12 + 1e-7), rel=1e-12)
    assert steps["rmsprop"] / steps["keras-rmsprop"] > 900


# ----------------------------------------------------------------------------- Keras itself


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on the torch backend, or a skip (keras missing, or already imported with another backend)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if "keras" not in sys.modules and os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip(f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r}; these tests run Keras on torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    return keras


def run_keras(keras, name, settings, p0, grads, lrs):
    import torch

    s = dict(settings)
    weight_decay = s.pop("weight_decay", 0.0) or None
    if name == "keras-rmsprop":
        opt = keras.optimizers.RMSprop(learning_rate=lrs[0], rho=s.get("rho", 0.9), epsilon=s.get("epsilon", 1e-7),
                                       momentum=s.get("momentum", 0.0), centered=s.get("centered", False),
                                       weight_decay=weight_decay)
    else:
        opt = keras.optimizers.Adam(learning_rate=lrs[0], beta_1=s.get("beta1", 0.9), beta_2=s.get("beta2", 0.999),
                                    epsilon=s.get("epsilon", 1e-7), amsgrad=s.get("amsgrad", False),
                                    weight_decay=weight_decay)
    variable = keras.Variable(p0.copy(), dtype="float64")
    for gt, lr in zip(grads, lrs):
        opt.learning_rate = lr
        opt.apply_gradients([(torch.tensor(gt), variable)])
    assert int(opt.iterations.numpy()) == STEPS
    return np.asarray(variable.numpy(), dtype=np.float64)


@pytest.mark.parametrize("name, settings", CASES, ids=IDS)
def test_matches_keras(keras, name, settings):
    p0, grads, lrs = problem(seed=1)
    ref = run_keras(keras, name, settings, p0, grads, lrs)
    assert_close(run_ours(name, settings, p0, grads, lrs), ref, f"{name} against keras {keras.__version__}")


def test_keras_defaults_are_ours(keras):
    """What compile(optimizer='rmsprop' / 'adam') builds has our entries' defaults (and lr 1e-3)."""
    rms, adam = keras.optimizers.get("rmsprop"), keras.optimizers.get("adam")
    ours_rms = optim.OPTIMIZERS["keras-rmsprop"].options()
    ours_adam = optim.OPTIMIZERS["keras-adam"].options()
    assert (rms.rho, rms.epsilon, rms.momentum, rms.centered) == (
        ours_rms.rho, ours_rms.epsilon, ours_rms.momentum, ours_rms.centered)
    assert (adam.beta_1, adam.beta_2, adam.epsilon, adam.amsgrad) == (
        ours_adam.beta1, ours_adam.beta2, ours_adam.epsilon, ours_adam.amsgrad)
    assert float(rms.learning_rate) == pytest.approx(1e-3) and float(adam.learning_rate) == pytest.approx(1e-3)
