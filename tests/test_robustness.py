"""Faults and stress: logvar bounds with their gradient, extreme settings that either train or stop
with a clear message, and no NumPy warning leaking out of training (warnings are errors here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae import data, ops
from npvae.backend import use_backend
from npvae.checkpoint import load_checkpoint
from npvae.gradcheck import check_model, check_op, relative_error
from npvae.models import VAE, Autoencoder, PoorMansVAE
from npvae.train import TrainConfig, Trainer, TrainingDiverged

BACKENDS = ["numpy", "numba"]
pytestmark = pytest.mark.filterwarnings("error")


# ----------------------------------------------------------------------------- clamp and logvar bounds


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 16), h=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_clamp_matches_torch(b, h, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3, size=(b, h))
    x[0, 0] = 1.0  # exactly on a bound: torch lets the gradient through there
    dy = rng.normal(size=(b, h))
    y, cache = ops.clamp_forward(x, -1.0, 1.0)
    dx = ops.clamp_backward(dy, cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.clamp(xt, -1.0, 1.0)
    (yt * torch.tensor(dy)).sum().backward()
    assert relative_error(y, yt.detach().numpy()) == 0
    assert relative_error(dx, xt.grad.numpy()) == 0


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 12), h=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_clamp_matches_finite_differences_away_from_the_bounds(b, h, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, size=(b, h))
    x[np.abs(np.abs(x) - 1) < 1e-3] = 0.5
    report = check_op(ops.clamp_forward, ops.clamp_backward, {"x": x}, lo=-1.0, hi=1.0, rng=rng)
    assert report.max_error < 1e-7  # a wrong clamp gradient is off by O(1); rounding in the differences reaches ~1e-8


def test_clamp_rejects_empty_interval():
    with pytest.raises(ValueError, match="lo < hi"):
        ops.clamp_forward(np.zeros((2, 2)), 1.0, -1.0)


def torch_vae_loss(state, x, eps, bounds):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in state.items()}
    xt = torch.tensor(x)
    h = torch.tanh(torch.nn.functional.linear(xt, t["encoder.0.weight"], t["encoder.0.bias"]))
    mu = torch.nn.functional.linear(h, t["mu.weight"], t["mu.bias"])
    logvar = torch.clamp(torch.nn.functional.linear(h, t["logvar.weight"], t["logvar.bias"]), *bounds)
    z = mu + torch.exp(0.5 * logvar) * torch.tensor(eps)
    h = torch.tanh(torch.nn.functional.linear(z, t["decoder.0.weight"], t["decoder.0.bias"]))
    logits = torch.nn.functional.linear(h, t["decoder.1.weight"], t["decoder.1.bias"])
    recon = torch.nn.functional.binary_cross_entropy_with_logits(logits, xt, reduction="none").sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    loss = (recon + kl).mean()
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in t.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.floats(0.05, 2.0))
def test_vae_with_logvar_bounds_matches_torch(backend, seed, width):
    rng = np.random.default_rng(seed)
    with use_backend(backend):
        model = VAE(12, (9,), 3, activation="tanh", logvar_bounds=(-width, width), dtype=np.float64, seed=seed)
        model.params.data[:] *= 3  # push logvar past the bounds for some entries
        x, eps = rng.random((7, 12)), rng.standard_normal((7, 3))
        terms, grads = model.loss_and_grads(x, eps=eps)
        loss, expected = torch_vae_loss(model.state_dict(), x, eps, (-width, width))
    assert abs(terms.total - loss) <= 1e-12 * abs(loss)
    for key, grad in grads.items():
        assert relative_error(grad, expected[key]) < 1e-9, key


def test_logvar_bounds_hold_and_check_numerically():
    model = VAE(10, (8,), 3, activation="tanh", logvar_bounds=(-0.5, 0.5), dtype=np.float64, seed=1)
    x = np.random.default_rng(0).random((5, 10))
    _, logvar = model.encode(x)
    assert logvar.min() >= -0.5 and logvar.max() <= 0.5
    assert check_model(model, x).max_error < 1e-6


def test_bad_logvar_bounds_are_named():
    with pytest.raises(ValueError, match="logvar_bounds"):
        VAE(10, (8,), 3, logvar_bounds=(1.0, -1.0))


# ----------------------------------------------------------------------------- stress


def tiny_dataset(n=120, images=None):
    demo = data.load_demo()
    train = demo.train_x[:n] if images is None else images
    labels = demo.train_y[: len(train)]
    return data.Dataset("demo", train, labels, demo.val_x[:40], demo.val_y[:40], demo.val_x[:40], demo.val_y[:40],
                        num_classes=10, description="tiny", is_demo=True)


def train(model, dataset, tmp_path, **kw):
    config = TrainConfig(**{"epochs": 2, "batch_size": 32, "pictures": False, "patience": None, **kw})
    return Trainer(model, dataset, config, tmp_path, progress=False, echo=lambda line: None).run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_absurd_learning_rate_stops_with_a_clear_message_or_trains(backend, tmp_path):
    with use_backend(backend):
        model = VAE(784, (32,), 4)
        try:
            result = train(model, tiny_dataset(), tmp_path, lr=1e4, epochs=3)
        except TrainingDiverged as exc:
            assert "not finite" in str(exc) and "step" in str(exc)
            if (tmp_path / "checkpoint.npz").exists():
                arrays, _ = load_checkpoint(tmp_path / "checkpoint.npz")
                assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")
        else:
            assert all(math.isfinite(r["train_loss"]) for r in result.history)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_and_bounds_keep_a_hot_learning_rate_finite(backend, tmp_path):
    with use_backend(backend):
        model = VAE(784, (32,), 4, logvar_bounds=(-6.0, 6.0))
        result = train(model, tiny_dataset(), tmp_path, lr=0.05, clip_grad_norm=5.0)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


@pytest.mark.parametrize("batch_size", [1, 10_000])
def test_extreme_batch_sizes_train(batch_size, tmp_path):
    result = train(VAE(784, (16,), 2), tiny_dataset(n=40), tmp_path, batch_size=batch_size)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert result.history[-1]["step"] == 2 * (40 if batch_size == 1 else 1)


@pytest.mark.parametrize("latent_dim", [1, 256])
def test_extreme_latent_sizes_train(latent_dim, tmp_path):
    result = train(VAE(784, (32,), latent_dim), tiny_dataset(), tmp_path)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("make", [lambda: VAE(784, (16,), 2), lambda: Autoencoder(784, (16,), 2),
                                  lambda: PoorMansVAE(784, (16,), 2)])
def test_constant_images_train(value, make, tmp_path):
    images = np.full((64, 784), value, np.uint8)
    result = train(make(), tiny_dataset(images=images), tmp_path, lr=1e-2)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


def test_numpy_backend_extremes_raise_no_warnings():
    """Logits of +-1e4 and logvar of +-30 through every loss: finite, and no RuntimeWarning."""
    with use_backend("numpy"):
        logits = np.array([[1e4, -1e4, 0.0, 30.0]], np.float32)
        target = np.array([[1.0, 0.0, 0.5, 1.0]], np.float32)
        for forward in (ops.bce_with_logits_forward, ops.continuous_bernoulli_nll_forward):
            loss, _ = forward(logits, target, "sum")
            assert np.isfinite(loss)
        kl, _ = ops.kl_normal_forward(np.zeros((1, 2), np.float32), np.array([[30.0, -30.0]], np.float32))
        assert np.isfinite(kl)
