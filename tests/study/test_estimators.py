"""Tests of npvae.objectives (its estimators and k-sample objectives): every estimator against a PyTorch autograd
implementation of its definition (stop-gradients as .detach()), on the same fixed noise, in float64.

Two levels: each estimator's d bound / d[mu, logvar] per row against torch with mu and logvar as
leaf tensors; and the full parameter gradient of each training objective (encoder and decoder)
against torch through a VAE written from the math with the same weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npvae.gradcheck import relative_error
from npvae.models import VAE
from npvae.objectives import TRAINING_OBJECTIVES, Objective
from npvae.objectives import estimators as E
from npvae.study.gradflow import sample_draws

torch = pytest.importorskip("torch")
from test_likelihood import _TORCH_ACT, TorchVAE  # noqa: E402  (the torch VAE written from the math)

TOL = 1e-9
WORST = {}  # estimator/objective -> worst relative error seen, printed by the last test


def _record(key, err):
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert err < TOL, (key, err)


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    d, z, b, k = draw(st.integers(2, 7)), draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(1, 5))
    hidden = tuple(draw(st.lists(st.integers(2, 5), min_size=0, max_size=2)))
    model = VAE(d, hidden, z, draw(st.sampled_from(sorted(_TORCH_ACT))), draw(st.sampled_from(["bernoulli", "gaussian"])),
                dtype=np.float64, seed=int(rng.integers(1000)))
    x = rng.random((b, d))
    if model.config.likelihood == "bernoulli" and draw(st.booleans()):
        x = (x < 0.5).astype(np.float64)
    return model, x, rng.standard_normal((b, k, z))


def _torch_log_w(ref, xt, mu, logvar, eps, objective, stop_q=False, detach_z=False):
    """log w (B, k) from the math; q's parameters behind a stop-gradient with stop_q, z with detach_z."""
    b, k, zdim = eps.shape
    mu_r, lv_r = mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)
    std = torch.exp(0.5 * lv_r)
    z = mu_r + std * torch.tensor(eps.reshape(b * k, zdim))
    if detach_z:
        z = z.detach()
    log_w = ref.log_px(z, xt.repeat_interleave(k, 0))
    if objective != "recon":
        normal = torch.distributions.Normal
        q = normal(mu_r.detach(), std.detach()) if stop_q else normal(mu_r, std)
        log_w = log_w + normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1)
    return log_w.reshape(b, k)


def _torch_bound(log_w, objective):
    k = log_w.shape[1]
    return torch.logsumexp(log_w, 1) - math.log(k) if objective == "iwae" else log_w.mean(1)


def torch_surrogate(ref, xt, mu, logvar, eps, objective, name):
    """A scalar whose gradient is the sum over rows of estimator ``name``'s estimate, by definition."""
    if name == "reparam":
        return _torch_bound(_torch_log_w(ref, xt, mu, logvar, eps, objective), objective).sum()
    if name == "stl":
        return _torch_bound(_torch_log_w(ref, xt, mu, logvar, eps, objective, stop_q=True), objective).sum()
    if name == "dreg":  # Tucker et al.: the squared normalized weights, held fixed, on log w with q's parameters fixed
        log_w = _torch_log_w(ref, xt, mu, logvar, eps, objective, stop_q=True)
        w = torch.softmax(log_w, 1).detach()
        return (w**2 * log_w).sum()
    # score functions: z held fixed; the bound times sum_j log q(z_j), plus the bound's own direct dependence
    b, k, zdim = eps.shape
    log_w = _torch_log_w(ref, xt, mu, logvar, eps, objective, detach_z=True)
    bound = _torch_bound(log_w, objective)
    mu_r, lv_r = mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)
    z = (mu_r + torch.exp(0.5 * lv_r) * torch.tensor(eps.reshape(b * k, zdim))).detach()
    log_q = torch.distributions.Normal(mu_r, torch.exp(0.5 * lv_r)).log_prob(z).sum(1).reshape(b, k).sum(1)
    centre = bound.detach()
    if name == "baseline":
        centre = centre - (centre.sum() - centre) / (b - 1)
    return (centre * log_q).sum() + bound.sum()


@settings(deadline=None, max_examples=20)
@given(case=cases(), objective=st.sampled_from(E.OBJECTIVES))
def test_each_estimator_matches_its_torch_definition(case, objective):
    model, x, eps = case
    if objective == "recon":
        eps = eps[:, :1]  # the reconstruction study draws one z per row
    draws = sample_draws(model, x, eps, objective)
    mu_np, logvar_np = model.encode(x)
    ref = TorchVAE(model)
    xt = torch.tensor(x)
    for est in E.ESTIMATORS.values():
        if objective not in est.objectives:
            continue
        mu, logvar = torch.tensor(mu_np, requires_grad=True), torch.tensor(logvar_np, requires_grad=True)
        torch_surrogate(ref, xt, mu, logvar, eps, objective, est.name).backward()
        expected = torch.cat([mu.grad, logvar.grad], 1).numpy()
        _record(f"{est.name}/{objective} d/d[mu, logvar]", relative_error(est.estimate(draws), expected))
    assert draws.bound == pytest.approx(_torch_bound(_torch_log_w(ref, xt, torch.tensor(mu_np), torch.tensor(logvar_np),
                                                                  eps, objective), objective).detach().numpy(), rel=1e-12)


@pytest.mark.parametrize("combo", [(o, e) for o, es in TRAINING_OBJECTIVES.items() for e in es])
@settings(deadline=None, max_examples=8)
@given(case=cases())
def test_each_training_objective_matches_torch_on_every_parameter(case, combo):
    model, x, eps = case
    name, estimator = combo
    objective = Objective(name, eps.shape[1], estimator)
    if objective.is_default:
        eps = eps[:, :1]
        objective = Objective(name, 1, "stl")  # the default's k = 1 reparam is the model's own, tested elsewhere
    terms, grads = objective.loss_and_grads(model, x, eps=eps)
    ref = TorchVAE(model)
    xt = torch.tensor(x)
    b = len(x)
    decoder = [v for key, v in ref.params.items() if key.startswith("decoder.")]
    encoder = [v for key, v in ref.params.items() if not key.startswith("decoder.")]
    mu, logvar = ref.encode(xt)
    loss = -torch_surrogate(ref, xt, mu, logvar, eps, name, "reparam") / b
    assert terms.total == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
    dec = torch.autograd.grad(loss, decoder, retain_graph=True)  # every estimator's decoder gradient: the bound's
    enc = torch.autograd.grad(-torch_surrogate(ref, xt, mu, logvar, eps, name, objective.estimator) / b, encoder)
    expected = dict(zip([k for k in ref.params if k.startswith("decoder.")], dec))
    expected.update(zip([k for k in ref.params if not k.startswith("decoder.")], enc))
    for key, g in grads.items():
        _record(f"{objective.estimator}/{name} all parameters", relative_error(g, expected[key].numpy()))


def test_dreg_is_stl_at_k1_and_stl_is_reparam_for_the_reconstruction():
    rng = np.random.default_rng(0)
    model = VAE(6, (5,), 2, "tanh", dtype=np.float64, seed=1)
    x = rng.random((3, 6))
    d = sample_draws(model, x, rng.standard_normal((3, 1, 2)), "iwae")
    np.testing.assert_allclose(E.doubly_reparameterized(d), E.sticking_the_landing(d), rtol=1e-13)
    d = sample_draws(model, x, rng.standard_normal((3, 1, 2)), "recon")
    np.testing.assert_allclose(E.sticking_the_landing(d), E.reparameterization(d), rtol=1e-13)


def test_stl_has_zero_variance_at_the_exact_posterior_and_reparam_does_not():
    # Linear Gaussian decoder N(W z + b, I), prior N(0, I): with orthogonal columns of W the posterior is
    # N(S W^T (x - b), S), S = diag(1 / (1 + |W_j|^2)), which a linear encoder represents exactly.
    model = VAE(5, (), 2, likelihood="gaussian", dtype=np.float64, seed=3)
    model.decoder.layers[-1].activation = "identity"
    w = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 2)))[0] * [1.5, 0.7]
    p = model.parameters()
    p["decoder.0.weight"][...] = w
    s = 1.0 / (1.0 + (w**2).sum(0))
    p["mu.weight"][...] = s[:, None] * w.T
    p["mu.bias"][...] = -(s[:, None] * w.T) @ p["decoder.0.bias"]
    p["logvar.weight"][...] = 0.0
    p["logvar.bias"][...] = np.log(s)
    x = np.random.default_rng(2).random((1, 5))
    d = sample_draws(model, np.repeat(x, 200, 0), np.random.default_rng(3).standard_normal((200, 1, 2)), "elbo")
    assert np.abs(E.sticking_the_landing(d)).max() < 1e-12
    assert E.reparameterization(d).std(0).min() > 0.1


def test_objectives_refuse_bad_combinations_and_models():
    with pytest.raises(ValueError, match="dreg is IWAE's estimator"):
        Objective("elbo", 5, "dreg")
    with pytest.raises(ValueError, match="unknown objective 'vimco'"):
        Objective("vimco", 5, "reparam")
    with pytest.raises(ValueError, match="k >= 1"):
        Objective("iwae", 0, "dreg")
    with pytest.raises(ValueError, match="does not train objective 'iwae'"):
        Objective("iwae", 5, "score")
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="beta = 2.0"):
        Objective("iwae", 2, "dreg").loss_and_grads(VAE(4, (3,), 2, beta=2.0), x, rng=np.random.default_rng(0))
    from npvae.models import Autoencoder

    with pytest.raises(ValueError, match="needs a VAE with the prior"):
        Objective("iwae", 2, "dreg").loss_and_grads(Autoencoder(4, (3,), 2), x, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expected eps of shape \(2, 3, 2\)"):
        Objective("iwae", 3, "dreg").loss_and_grads(VAE(4, (3,), 2), x, eps=np.zeros((2, 1, 2)))


def test_report_worst_errors():
    print("\nworst relative error vs torch:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


@pytest.mark.parametrize("objective,estimator", [("iwae", "reparam"), ("iwae", "dreg"), ("elbo", "stl")])
def test_estimator_snr_summarises_the_draws_it_was_given(objective, estimator):
    # Brute force: the same noise through the training objective, one full gradient per draw.
    from npvae.study.gradflow import estimator_snr

    model = VAE(6, (5,), 2, "tanh", dtype=np.float64, seed=4)
    x = np.random.default_rng(0).random((2, 6))
    k, n = 3, 40
    rows = estimator_snr(model, x, [k], n, np.random.default_rng(1), names=[estimator], objective=objective)
    rng = np.random.default_rng(1)
    grads = []
    for _ in range(n):
        eps = rng.standard_normal((2, k, 2))
        Objective(objective, k, estimator).loss_and_grads(model, x, eps=eps)
        grads.append(-model.params.grad)  # the loss is minus the batch-mean bound
    g = np.array(grads)
    decoder = np.concatenate([np.full(v.size, key.startswith("decoder.")) for key, v in model.gradients().items()])
    for group, mask in (("encoder", ~decoder), ("decoder", decoder)):
        row = next(r for r in rows if r["group"] == group)
        mean, var = g[:, mask].mean(0), g[:, mask].var(0, ddof=1)
        assert row["mean_abs"] == pytest.approx(np.abs(mean).mean(), rel=1e-10)
        assert row["var"] == pytest.approx(var.mean(), rel=1e-8)
        assert row["snr"] == pytest.approx((np.abs(mean) / np.sqrt(var)).mean(), rel=1e-8)
        assert row["ess"] == pytest.approx(k) if objective == "elbo" else 1 <= row["ess"] < k


def test_estimator_snr_takes_the_signal_from_the_named_unbiased_estimator():
    # Brute force as above: reparam's SNR with dreg's mean as the signal, stl (biased for IWAE) with its own.
    from npvae.study.gradflow import estimator_snr

    model = VAE(6, (5,), 2, "tanh", dtype=np.float64, seed=4)
    x = np.random.default_rng(0).random((2, 6))
    k, n = 4, 30
    names = ["reparam", "stl", "dreg"]
    rows = estimator_snr(model, x, [k], n, np.random.default_rng(1), names=names, signal="dreg")
    rng = np.random.default_rng(1)
    grads = {name: [] for name in names}
    for _ in range(n):
        eps = rng.standard_normal((2, k, 2))
        for name in names:
            Objective("iwae", k, name).loss_and_grads(model, x, eps=eps)
            grads[name].append(-model.params.grad.copy())
    g = {name: np.array(v) for name, v in grads.items()}
    encoder = ~np.concatenate([np.full(v.size, key.startswith("decoder.")) for key, v in model.gradients().items()])
    std = {name: v[:, encoder].std(0, ddof=1) for name, v in g.items()}
    signal = {"reparam": g["dreg"], "dreg": g["dreg"], "stl": g["stl"]}
    for name in names:
        row = next(r for r in rows if r["estimator"] == name and r["group"] == "encoder")
        assert row["signal"] == ("stl" if name == "stl" else "dreg")
        assert row["snr"] == pytest.approx((np.abs(signal[name][:, encoder].mean(0)) / std[name]).mean(), rel=1e-8)
        floor = math.sqrt(2 / (math.pi * n)) * signal[name][:, encoder].std(0, ddof=1) / std[name]
        assert row["floor"] == pytest.approx(floor.mean(), rel=1e-8)
    reparam = next(r for r in rows if r["estimator"] == "reparam" and r["group"] == "encoder")
    assert reparam["floor"] < math.sqrt(2 / (math.pi * n))  # dreg's mean is the more precise one
    # "best": per parameter, the mean of whichever unbiased estimator (reparam, dreg) varies least; with
    # larger weights q is poor enough that reparam wins on some encoder parameters
    model.params.data[...] *= 3
    rows = estimator_snr(model, x, [k], n, np.random.default_rng(1), names=["reparam", "dreg"], signal="best")
    rng = np.random.default_rng(1)
    g = {"reparam": [], "dreg": []}
    for _ in range(n):
        eps = rng.standard_normal((2, k, 2))
        for name in g:
            Objective("iwae", k, name).loss_and_grads(model, x, eps=eps)
            g[name].append(-model.params.grad[encoder].copy())
    g = {name: np.array(v) for name, v in g.items()}
    std = {name: v.std(0, ddof=1) for name, v in g.items()}
    pick = std["dreg"] <= std["reparam"]
    assert 0 < pick.mean() < 1  # both are picked somewhere
    best = np.where(pick, g["dreg"].mean(0), g["reparam"].mean(0))
    for name in g:
        row = next(r for r in rows if r["estimator"] == name and r["group"] == "encoder")
        assert row["signal"] == "best" and row["snr"] == pytest.approx((np.abs(best) / std[name]).mean(), rel=1e-8)


def test_estimator_snr_refuses_what_it_cannot_measure():
    from npvae.study.gradflow import estimator_snr

    model = VAE(4, (3,), 2, dtype=np.float64)
    x = np.random.default_rng(0).random((2, 4))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\['baseline'\] pool several draws"):
        estimator_snr(model, x, [2], 3, rng, names=["baseline"])
    with pytest.raises(ValueError, match=r"\['dreg'\] do not estimate the gradient of the elbo"):
        estimator_snr(model, x, [2], 3, rng, names=["dreg"], objective="elbo")
    with pytest.raises(ValueError, match="k values >= 1"):
        estimator_snr(model, x, [0], 3, rng)
    with pytest.raises(ValueError, match="n_draws >= 2"):
        estimator_snr(model, x, [1], 1, rng)
    with pytest.raises(ValueError, match="signal 'best' needs an estimator unbiased for the iwae gradient among stl"):
        estimator_snr(model, x, [2], 3, rng, names=["stl"], signal="best")
    with pytest.raises(ValueError, match="signal 'stl' is biased for the iwae gradient"):
        estimator_snr(model, x, [2], 3, rng, names=["reparam", "stl"], signal="stl")
    with pytest.raises(ValueError, match=r"signal 'dreg' is not among the estimators measured \(reparam\)"):
        estimator_snr(model, x, [2], 3, rng, names=["reparam"], signal="dreg")
    rows = estimator_snr(model, x, [1, 2], 2, rng)  # the default: every one-draw estimator of the IWAE gradient
    assert [r["estimator"] for r in rows[::2]][:4] == ["reparam", "score", "stl", "dreg"]


@settings(max_examples=20, deadline=None)
@given(case=cases(), name=st.sampled_from(["elbo", "iwae"]), pick=st.integers(0, 2**31 - 1))
def test_reparameterized_k_sample_gradients_match_finite_differences(case, name, pick):
    """With the noise fixed, the k-sample bounds are plain functions of the parameters, and their
    reparameterized estimator is their exact gradient: central differences on up to 30 entries."""
    model, x, eps = case
    objective = Objective(name, eps.shape[1], "reparam")
    noise = eps[:, 0] if objective.is_default else eps  # the default step takes (B, Z)

    def loss():
        return objective.loss_and_grads(model, x, eps=noise)[0].total

    loss()
    analytic = model.params.grad.copy()
    theta, h = model.params.data, 1e-6
    for i in np.random.default_rng(pick).choice(theta.size, size=min(30, theta.size), replace=False):
        old = theta[i]
        theta[i] = old + h
        up = loss()
        theta[i] = old - h
        down = loss()
        theta[i] = old
        numeric = (up - down) / (2 * h)
        assert abs(numeric - analytic[i]) <= 1e-6 * max(1.0, abs(numeric)), (name, i, numeric, analytic[i])
