"""The public gradient checker: passes correct gradients, catches wrong ones, names the worst."""

from __future__ import annotations

import numpy as np
import pytest

from npvae import ops
from npvae.gradcheck import check_gradients, check_model, check_op, relative_error
from npvae.models import CVAE, VAE, DenoisingAutoencoder, PoorMansVAE


def test_check_op_passes_a_correct_backward():
    rng = np.random.default_rng(0)
    report = check_op(ops.affine_forward, ops.affine_backward,
                      {"x": rng.normal(size=(4, 3)), "w": rng.normal(size=(2, 3)), "b": rng.normal(size=2)})
    assert set(report.errors) == {"x", "w", "b"} and report.max_error < 1e-8


def test_check_op_catches_a_wrong_backward_and_names_it():
    def wrong_backward(dout, cache):
        dx, dw, db = ops.affine_backward(dout, cache)
        return dx, dw, 2 * db  # a classic slip

    rng = np.random.default_rng(1)
    report = check_op(ops.affine_forward, wrong_backward,
                      {"x": rng.normal(size=(4, 3)), "w": rng.normal(size=(2, 3)), "b": rng.normal(size=2)})
    assert report.worst[0] == "b" and report.worst[1] > 0.1
    assert report.errors["x"] < 1e-8
    assert "worst: b" in str(report)


@pytest.mark.parametrize("make", [
    lambda: VAE(12, (8,), 3, activation="tanh", dtype=np.float64),
    lambda: VAE(12, (8,), 3, activation="softplus", likelihood="continuous_bernoulli", dtype=np.float64),
    lambda: PoorMansVAE(12, (8,), 3, dtype=np.float64),
    lambda: DenoisingAutoencoder(12, (8,), 3, activation="tanh", value_range=(0, 1), dtype=np.float64),
])
def test_check_model_passes_every_model(make):
    model = make()
    x = np.random.default_rng(2).random((6, 12))
    report = check_model(model, x)
    assert set(report.errors) == set(model.state_dict()) and report.max_error < 1e-6


def test_check_model_handles_conditional_models():
    model = CVAE(12, 3, (8,), 2, activation="tanh", dtype=np.float64)
    x = np.random.default_rng(3).random((5, 12))
    assert check_model(model, x, y=np.array([0, 1, 2, 0, 1])).max_error < 1e-6
    with pytest.raises(ValueError, match="labels y"):
        check_model(model, x)


def test_check_model_catches_a_broken_model_and_leaves_it_unchanged():
    model = VAE(12, (8,), 3, activation="tanh", dtype=np.float64)
    before = model.params.data.copy()
    backward = model.backward

    def broken(drecon, dkl):  # forgets the KL's contribution to the encoder
        backward(drecon, 0 * dkl)

    model.backward = broken
    report = check_model(model, np.random.default_rng(4).random((6, 12)))
    assert report.worst[0] in ("mu.weight", "mu.bias", "logvar.weight", "logvar.bias", "encoder.0.weight",
                               "encoder.0.bias") and report.worst[1] > 1e-3
    assert report.errors[f"decoder.{len(model.config.hidden)}.weight"] < 1e-6  # the decoder never sees the KL
    np.testing.assert_array_equal(model.params.data, before)


def test_checks_need_float64():
    with pytest.raises(TypeError, match="float64"):
        check_model(VAE(12, (8,), 3), np.zeros((2, 12)))
    with pytest.raises(TypeError, match="float64"):
        check_gradients(lambda: 0.0, {"a": np.zeros(3, np.float32)}, {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        check_gradients(lambda: 0.0, {"a": np.zeros(3)}, {"a": np.zeros(4)})


def test_relative_error_is_the_cs231n_measure():
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0
    assert relative_error([1.0], [-1.0]) == 1.0
    assert relative_error([0.0], [0.0]) == 0
