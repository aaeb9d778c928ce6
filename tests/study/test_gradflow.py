"""Tests of npvae.study.gradflow: the exact reconstruction/KL split, and the two gradient estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npvae.study import gradflow
from npvae.viz import plots
from npvae.backend import use_backend
from npvae.gradcheck import relative_error
from npvae.models import CVAE, VAE

torch = pytest.importorskip("torch")
from test_likelihood import BACKENDS, TorchVAE  # noqa: E402  (the torch VAE written from the math)


# ----------------------------------------------------------------------------- reconstruction vs KL


@st.composite
def decomposition_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    d, z, b = draw(st.integers(2, 7)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    hidden = tuple(draw(st.lists(st.integers(2, 5), min_size=0, max_size=2)))
    model = VAE(d, hidden, z, draw(st.sampled_from(["tanh", "softplus", "relu"])),
                draw(st.sampled_from(["bernoulli", "gaussian"])), beta=draw(st.sampled_from([1.0, 0.25, 4.0])),
                dtype=np.float64, seed=int(rng.integers(1000)))
    return model, rng.random((b, d)), rng.standard_normal((b, z))


@pytest.mark.parametrize("be", BACKENDS)
@settings(deadline=None, max_examples=20)
@given(case=decomposition_cases())
def test_parts_sum_to_the_total_and_each_matches_torch(be, case):
    model, x, eps = case
    with use_backend(be):
        parts = gradflow.decompose_gradients(model, x, eps)
    ref = TorchVAE(model)
    xt = torch.tensor(x)
    mu, logvar = ref.encode(xt)
    z = mu + torch.exp(0.5 * logvar) * torch.tensor(eps)
    recon = -ref.log_px(z, xt).mean()
    kl = model.config.beta * (0.5 * (mu**2 + torch.exp(logvar) - 1 - logvar).sum(1)).mean()
    recon.backward(retain_graph=True)
    recon_grads = ref.grads()
    for p in ref.params.values():
        p.grad = None
    kl.backward()
    kl_grads = ref.grads()
    for name, (r, k, total) in parts.items():
        np.testing.assert_allclose(r + k, total, rtol=1e-12, atol=1e-14)
        assert relative_error(r, recon_grads[name]) < 1e-9, name
        assert relative_error(k, kl_grads[name]) < 1e-9, name
        if name.startswith("decoder"):
            assert not k.any(), f"{name}: the KL does not reach the decoder"


def test_decomposition_rows_text_and_picture(tmp_path):
    rng = np.random.default_rng(0)
    model = VAE(12, (6,), 2, beta=2.0, dtype=np.float64)
    parts = gradflow.decompose_gradients(model, rng.random((5, 12)), rng.standard_normal((5, 2)))
    rows = gradflow.decomposition_rows(parts)
    assert [r["param"] for r in rows] == list(model.state_dict())
    for row, (r, k, total) in zip(rows, parts.values()):
        assert row["recon_norm"] == pytest.approx(np.linalg.norm(r))
        assert row["total_norm"] == pytest.approx(np.linalg.norm(total))
        if k.any():
            assert -1 <= row["cosine"] <= 1
            assert row["cosine"] == pytest.approx(np.dot(r.ravel(), k.ravel()) / np.linalg.norm(r) / np.linalg.norm(k))
        else:
            assert math.isnan(row["cosine"]) and row["kl_share"] == 0
    text = gradflow.decomposition_text(rows)
    assert "decoder.1.weight" in text and "n/a" in text and len(text.splitlines()) == len(rows) + 1
    path = plots.plot_gradient_decomposition(rows, tmp_path / "decomposition.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conditional_models_split_too():
    rng = np.random.default_rng(1)
    model = CVAE(8, 3, (5,), 2, dtype=np.float64)
    x, y, eps = rng.random((4, 8)), np.array([0, 1, 2, 1]), rng.standard_normal((4, 2))
    parts = gradflow.decompose_gradients(model, x, eps, y=y)
    _, grads = model.loss_and_grads(x, y, eps=eps)
    for name, (r, k, total) in parts.items():
        np.testing.assert_allclose(r + k, grads[name], rtol=1e-12, atol=1e-14)
    for name in ("prior.0.weight", "prior_mu.bias", "prior_logvar.weight"):  # the learned prior: KL only
        recon, kl, _ = parts[name]
        assert not recon.any() and kl.any(), name
    with pytest.raises(ValueError, match="pass its labels"):
        gradflow.decompose_gradients(model, x, eps)


# ----------------------------------------------------------------------------- the two estimators


@pytest.fixture(scope="module")
def estimator_table():
    rng = np.random.default_rng(0)
    model = VAE(20, (16,), 2, "tanh", dtype=np.float64, seed=0)
    x = (rng.random((3, 20)) < 0.5).astype(np.float64)
    return gradflow.compare_estimators(model, x, 4000, np.random.default_rng(1), batch_size=1500)


def test_all_three_estimators_agree_within_monte_carlo_error(estimator_table):
    t = estimator_table
    assert len(t["param"]) == 3 * 2 * 2 and t["n_draws"] == 4000 and t["objective"] == "E_q[log p(x|z)]"
    for other in ("score", "baseline"):
        diff = np.abs(np.subtract(t["reparam_mean"], t[f"{other}_mean"]))
        se = np.hypot(t["reparam_se"], t[f"{other}_se"])
        assert (diff < 4 * se).all(), (other, diff / se)


def test_the_score_function_is_far_noisier_and_a_baseline_helps(estimator_table):
    t = estimator_table
    ratio = np.divide(t["score_var"], t["reparam_var"])
    assert (ratio > 10).all() and np.median(ratio) > 1000  # observed: 1.5e3 to 5e4
    assert (np.divide(t["baseline_var"], t["score_var"]) < 0.1).all()  # observed: under 0.01


def test_estimators_find_the_closed_form_gradient_of_a_linear_gaussian_decoder():
    # With decoder mean W z + b and unit variance, f(z) = -||x - W z - b||^2 / 2 + const, so
    #   E_q f = -||x - W mu - b||^2 / 2 - sum_j std_j^2 ||W[:, j]||^2 / 2 + const,
    #   dE_q f / dmu = W^T (x - W mu - b),   dE_q f / dlogvar_j = -std_j^2 ||W[:, j]||^2 / 2.
    model = VAE(5, (), 2, likelihood="gaussian", dtype=np.float64, seed=3)
    model.decoder.layers[-1].activation = "identity"  # a linear mean instead of the sigmoid, for the closed form
    w, b = model.parameters()["decoder.0.weight"], model.parameters()["decoder.0.bias"]
    x = np.random.default_rng(2).random((1, 5))
    t = gradflow.compare_estimators(model, x, 3000, np.random.default_rng(4))
    mu, logvar = model.encode(x)
    exact = np.concatenate([w.T @ (x[0] - w @ mu[0] - b), -0.5 * np.exp(logvar[0]) * (w**2).sum(0)])
    for e in ("reparam", "score", "baseline"):
        assert (np.abs(np.subtract(t[f"{e}_mean"], exact)) < 4 * np.array(t[f"{e}_se"])).all(), e


def test_estimator_text_and_picture(estimator_table, tmp_path):
    text = gradflow.estimator_text(estimator_table)
    assert "x2 logvar[1]" in text and "4000 draws" in text
    path = plots.plot_estimator_comparison(estimator_table, tmp_path / "estimators.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimators_refuse_bad_arguments():
    model = VAE(4, (3,), 2, dtype=np.float64)
    with pytest.raises(ValueError, match="n_draws >= 2"):
        gradflow.compare_estimators(model, np.zeros((1, 4)), 1, np.random.default_rng(0))
    from npvae.models import Autoencoder

    with pytest.raises(ValueError, match="needs a VAE or CVAE"):
        gradflow.decompose_gradients(Autoencoder(4, (3,), 2), np.zeros((1, 4)), np.zeros((1, 2)))


def test_a_registered_estimator_reaches_the_table_the_text_and_the_picture(monkeypatch, tmp_path):
    from npvae.objectives import estimators
    from npvae.registry import Registry

    extended = Registry("estimator")  # the registry as it is, plus one entry
    for entry in estimators.ESTIMATORS.values():
        extended.register(entry)
    extended.register(estimators.Estimator("half", "half the reparameterization",
                                           lambda d: 0.5 * estimators.reparameterization(d)))
    monkeypatch.setattr(estimators, "ESTIMATORS", extended)
    model = VAE(6, (4,), 2, dtype=np.float64, seed=1)
    x = (np.random.default_rng(0).random((1, 6)) < 0.5).astype(np.float64)
    t = gradflow.compare_estimators(model, x, 50, np.random.default_rng(2), names=["reparam", "half"])
    assert t["estimators"] == ("reparam", "half") and "score_mean" not in t
    np.testing.assert_allclose(t["half_mean"], 0.5 * np.array(t["reparam_mean"]), rtol=1e-12)
    np.testing.assert_allclose(t["half_var"], 0.25 * np.array(t["reparam_var"]), rtol=1e-12)
    assert "var half/reparam" in gradflow.estimator_text(t)
    assert plots.plot_estimator_comparison(t, tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown estimators \\['vimco'\\]"):
        gradflow.compare_estimators(model, x, 50, np.random.default_rng(2), names=["reparam", "vimco"])
    with pytest.raises(ValueError, match=r"\['dreg'\] do not estimate the gradient of E_q\[log p\(x\|z\)\] \(they are for iwae\)"):
        gradflow.compare_estimators(model, x, 50, np.random.default_rng(2), names=["reparam", "dreg"])
