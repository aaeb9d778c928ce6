"""Whole-model tests of the sparse and contractive autoencoders (:mod:`npvae.models.regularized`).

Their gradients against the float64 torch references of tests/torch_models.py (the contractive one takes the
encoder's Jacobian by autograd with ``create_graph=True`` and differentiates the penalty again), over sizes,
depths, activations and weights drawn by Hypothesis, loss to 1e-12 and gradients to 1e-9 on both backends;
the exact split of the gradient into reconstruction and penalty; settings kept in specs; bad input.
The per-model tests of test_models.py (finite differences, state dicts, float32, buffers reused across
batch sizes) run on these models too, through ``small_models``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae import ops
from npvae.layers import Activation, Dense, Sequential
from npvae.models import ContractiveAutoencoder, SparseAutoencoder, build_model, from_spec
from tests.models.test_models import assert_matches_torch, data_batch, examples, seeds, weight_scales

input_dims = st.integers(1, 10)
code_dims = st.integers(1, 6)
batch_sizes = st.integers(1, 12)
hidden_layers = st.lists(st.integers(1, 8), max_size=2)


@settings(examples, max_examples=15)
@given(d=input_dims, hidden=hidden_layers, z=code_dims, b=batch_sizes, activation=st.sampled_from(list(ops.ACTIVATIONS)),
       weight=st.sampled_from([0.0, 0.5, 3.0]), rho=st.sampled_from([0.02, 0.05, 0.3]), scale=weight_scales,
       seed=seeds)
def test_sparse_kl_gradients_match_torch(d, hidden, z, b, activation, weight, rho, scale, seed):
    model = SparseAutoencoder(d, hidden, z, activation, "sigmoid", sparsity_weight=weight, sparsity_target=rho,
                              dtype=np.float64, seed=seed)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


@settings(examples, max_examples=15)
@given(d=input_dims, hidden=hidden_layers, z=code_dims, b=batch_sizes, activation=st.sampled_from(list(ops.ACTIVATIONS)),
       code_activation=st.sampled_from(list(ops.ACTIVATIONS)), weight=st.sampled_from([0.0, 0.1, 2.0]), scale=weight_scales,
       seed=seeds)
def test_sparse_l1_gradients_match_torch(d, hidden, z, b, activation, code_activation, weight, scale, seed):
    model = SparseAutoencoder(d, hidden, z, activation, "sigmoid", code_activation=code_activation,
                              sparsity_penalty="l1", sparsity_weight=weight, dtype=np.float64, seed=seed)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


@settings(examples, max_examples=20)
@given(d=input_dims, hidden=hidden_layers, z=code_dims, b=batch_sizes, activation=st.sampled_from(list(ops.ACTIVATIONS)),
       code_activation=st.sampled_from(list(ops.ACTIVATIONS)), output_activation=st.sampled_from(["sigmoid", "identity"]),
       weight=st.sampled_from([0.0, 0.1, 1.0, 10.0]), scale=weight_scales, seed=seeds)
def test_contractive_gradients_match_torch_double_backward(d, hidden, z, b, activation, code_activation,
                                                           output_activation, weight, scale, seed):
    model = ContractiveAutoencoder(d, hidden, z, activation, output_activation, code_activation=code_activation,
                                   contraction_weight=weight, dtype=np.float64, seed=seed)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


@pytest.mark.parametrize("model", [
    SparseAutoencoder(6, (5,), 4, "tanh", dtype=np.float64, seed=1),
    SparseAutoencoder(6, (), 4, code_activation="relu", sparsity_penalty="l1", dtype=np.float64, seed=2),
    ContractiveAutoencoder(6, (5, 4), 3, "softplus", dtype=np.float64, seed=3),
], ids=["sparse-kl", "sparse-l1", "contractive-deep"])
def test_gradient_splits_exactly_into_recon_and_penalty(model):
    x = data_batch(model, 5, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    drecon, dreg = rng.random(5), rng.random(5)
    parts = []
    for a, b in ((drecon, dreg), (drecon, 0 * dreg), (0 * drecon, dreg)):
        model.forward(x)
        model.backward(a, b)
        parts.append(model.params.grad.copy())
    np.testing.assert_allclose(parts[0], parts[1] + parts[2], rtol=1e-12, atol=1e-14)
    assert np.abs(parts[2]).max() > 0


def test_presets_and_settings_survive_specs_and_build_model():
    sparse = build_model("sparse-ae", {"latent_dim": 9, "sparsity_penalty": "l1", "code_activation": "relu"})
    assert sparse.config.sparsity_weight == 0.1 and sparse.reg_weight == 0.1  # l1's default weight
    contractive = build_model("contractive-ae", {"contraction_weight": 0.3})
    assert (contractive.config.latent_dim, contractive.reg_weight) == (196, 0.3)
    for model in (sparse, contractive):
        rebuilt = from_spec(model.spec())
        assert type(rebuilt) is type(model) and rebuilt.config == model.config
        assert rebuilt.reg_weight == model.reg_weight and rebuilt.eval_weight == model.eval_weight


def test_kl_sparsity_is_the_batch_value_in_every_row():
    model = SparseAutoencoder(5, (), 3, sparsity_target=0.2, dtype=np.float64, seed=0)
    x = data_batch(model, 4, np.random.default_rng(0))
    _, reg = model.forward(x)
    h = model.encode(x)
    rho_hat = h.mean(0)
    expected = (0.2 * np.log(0.2 / rho_hat) + 0.8 * np.log(0.8 / (1 - rho_hat))).sum()
    np.testing.assert_allclose(reg, np.full(4, expected), rtol=1e-13)


def test_bad_settings_are_refused_with_one_clear_error():
    with pytest.raises(ValueError, match="KL sparsity penalty needs codes in \\[0, 1\\]"):
        SparseAutoencoder(code_activation="relu")
    with pytest.raises(ValueError, match="unknown sparsity penalty 'l2'"):
        SparseAutoencoder(sparsity_penalty="l2")
    with pytest.raises(ValueError, match="sparsity target rho in \\(0, 1\\)"):
        SparseAutoencoder(sparsity_target=0.0)
    with pytest.raises(ValueError, match="sparsity_weight a finite number >= 0"):
        SparseAutoencoder(sparsity_weight=-1)
    with pytest.raises(ValueError, match="contraction_weight a finite number >= 0"):
        ContractiveAutoencoder(contraction_weight=float("nan"))
    encoder = Sequential(Dense(6, 4), Activation("tanh"), Dense(4, 2))
    decoder = Sequential(Dense(2, 6, "sigmoid"))
    with pytest.raises(ValueError, match="encoder of Dense layers.*encoder.1 Activation\\('tanh'\\)"):
        ContractiveAutoencoder(6, latent_dim=2, encoder=encoder, decoder=decoder)
