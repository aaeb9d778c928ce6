"""Tests of npvae.study.likelihood and its ops (log densities, log-sum-exp).

Three tiers, as everywhere: the ops against finite differences and torch in float64; the IWAE
objective's hand-derived gradient against autograd through a torch VAE written from the math with
the same weights and the same eps; and statistical properties of the bound (above the ELBO,
increasing in k) on a briefly trained model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npvae import ops
from npvae.backend import numba_available, use_backend
from npvae.gradcheck import check_op, relative_error
from npvae.study.likelihood import iwae_log_likelihood, iwae_loss_and_grads
from npvae.models import VAE
from npvae.optim import make_optimizer

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]
FAST = settings(deadline=None, max_examples=25)


def _arrays(draw, shape, lo=-3.0, hi=3.0):
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).uniform(lo, hi, shape)


@st.composite
def gaussian_inputs(draw):
    b, z = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    logvar_range = draw(st.sampled_from([(-2.0, 2.0), (-12.0, 12.0)]))  # ordinary and extreme widths
    return _arrays(draw, (b, z)), _arrays(draw, (b, z)), _arrays(draw, (b, z), *logvar_range)


# ----------------------------------------------------------------------------- ops


@FAST
@given(gaussian_inputs(), st.sampled_from(ops.REDUCTIONS))
def test_gaussian_log_prob_matches_torch(inputs, reduction):
    z, mu, logvar = inputs
    ours, cache = ops.gaussian_log_prob_forward(z, mu, logvar, reduction)
    tz, tmu, tlv = (torch.tensor(a, requires_grad=True) for a in inputs)
    rows = torch.distributions.Normal(tmu, torch.exp(0.5 * tlv)).log_prob(tz).sum(1)
    ref = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / len(z), "mean": rows.sum() / z.size}[reduction]
    assert relative_error(ours, ref.detach().numpy()) < 1e-12
    dout = np.random.default_rng(0).standard_normal(np.shape(ours))
    ref.backward(torch.tensor(dout))
    grads = ops.gaussian_log_prob_backward(dout if reduction == "none" else float(dout), cache)
    for ours_g, t in zip(grads, (tz, tmu, tlv)):
        assert relative_error(ours_g, t.grad.numpy()) < 1e-10


@FAST
@given(gaussian_inputs(), st.sampled_from(ops.REDUCTIONS))
def test_standard_normal_log_prob_matches_torch(inputs, reduction):
    z = inputs[0] * 10  # far into the tails too
    ours, cache = ops.standard_normal_log_prob_forward(z, reduction)
    tz = torch.tensor(z, requires_grad=True)
    rows = torch.distributions.Normal(0.0, 1.0).log_prob(tz).sum(1)
    ref = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / len(z), "mean": rows.sum() / z.size}[reduction]
    assert relative_error(ours, ref.detach().numpy()) < 1e-12
    dout = np.random.default_rng(1).standard_normal(np.shape(ours))
    ref.backward(torch.tensor(dout))
    dz = ops.standard_normal_log_prob_backward(dout if reduction == "none" else float(dout), cache)
    assert relative_error(dz, tz.grad.numpy()) < 1e-12


@FAST
@given(gaussian_inputs())
def test_log_prob_ops_match_finite_differences(inputs):
    z, mu, logvar = inputs
    logvar = np.clip(logvar, -3, 3)  # keep the curvature within central differences' reach
    report = check_op(ops.gaussian_log_prob_forward, ops.gaussian_log_prob_backward,
                      {"z": z, "mu": mu, "logvar": logvar}, reduction="none")
    assert report.max_error < 1e-6, str(report)
    report = check_op(ops.standard_normal_log_prob_forward, ops.standard_normal_log_prob_backward, {"z": z})
    assert report.max_error < 1e-6, str(report)


@FAST
@given(gaussian_inputs())
def test_reparameterized_log_prob_is_the_density_at_the_sample(inputs):
    eps, mu, logvar = inputs
    z = mu + np.exp(0.5 * logvar) * eps
    ours, cache = ops.reparameterized_log_prob_forward(eps, logvar)
    assert relative_error(ours, ops.gaussian_log_prob_forward(z, mu, logvar)[0]) < 1e-9
    # Its gradient at fixed eps is the total derivative of log N(mu + std eps; mu, std) (torch, through z).
    tmu, tlv = torch.tensor(mu, requires_grad=True), torch.tensor(logvar, requires_grad=True)
    std = torch.exp(0.5 * tlv)
    ref = torch.distributions.Normal(tmu, std).log_prob(tmu + std * torch.tensor(eps)).sum(1)
    dout = np.random.default_rng(2).standard_normal(len(eps))
    ref.backward(torch.tensor(dout))
    assert np.abs(tmu.grad.numpy()).max() < 1e-9 * max(1.0, np.abs(eps / np.exp(0.5 * logvar)).max())
    assert relative_error(ops.reparameterized_log_prob_backward(dout, cache), tlv.grad.numpy()) < 1e-9
    report = check_op(ops.reparameterized_log_prob_forward, ops.reparameterized_log_prob_backward,
                      {"logvar": logvar}, eps=eps)
    assert report.max_error < 1e-7, str(report)


def test_reparameterized_log_prob_stays_exact_below_float32_resolution():
    mu, logvar, eps = (np.array([[100.0]], np.float32), np.array([[-120.0]], np.float32), np.array([[1.5]], np.float32))
    z = mu + np.exp(0.5 * logvar) * eps  # rounds to mu: std = 1e-26 is far below the ulp of 100
    exact = -0.5 * (math.log(2 * math.pi) - 120.0 + 1.5**2)
    assert ops.reparameterized_log_prob_forward(eps, logvar)[0][0] == pytest.approx(exact, rel=1e-6)
    assert z[0, 0] == mu[0, 0]  # the generic density cannot tell where in q this z was drawn


@FAST
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from([1.0, 50.0, 1e4]))
def test_logsumexp_matches_torch_and_finite_differences(b, k, seed, scale):
    a = np.random.default_rng(seed).standard_normal((b, k)) * scale  # 1e4: exp overflows unshifted
    s, cache = ops.logsumexp_forward(a)
    ta = torch.tensor(a, requires_grad=True)
    ref = torch.logsumexp(ta, dim=1)
    assert np.isfinite(s).all()
    assert relative_error(s, ref.detach().numpy()) < 1e-12
    ds = np.random.default_rng(seed + 1).standard_normal(b)
    ref.backward(torch.tensor(ds))
    assert relative_error(ops.logsumexp_backward(ds, cache), ta.grad.numpy()) < 1e-12
    if scale == 1.0:
        assert check_op(ops.logsumexp_forward, ops.logsumexp_backward, {"a": a}).max_error < 1e-7


def test_logsumexp_edge_rows_and_float32():
    a = np.array([[-np.inf, -np.inf], [-np.inf, 0.0], [1e30, 1e30]])
    s, cache = ops.logsumexp_forward(a)
    assert s[0] == -np.inf and s[1] == 0.0 and s[2] == pytest.approx(1e30)
    np.testing.assert_array_equal(ops.logsumexp_backward(np.ones(3), cache), [[0, 0], [0, 1], [0.5, 0.5]])
    s32, _ = ops.logsumexp_forward(np.array([[100.0, 100.0]], dtype=np.float32))
    assert s32.dtype == np.float32 and s32[0] == pytest.approx(100 + math.log(2), rel=1e-6)
    lp, _ = ops.gaussian_log_prob_forward(*(np.zeros((2, 3), np.float32),) * 3)
    assert lp.dtype == np.float32 and lp[0] == pytest.approx(-1.5 * math.log(2 * math.pi), rel=1e-6)


# ----------------------------------------------------------------------------- the IWAE objective vs torch


_TORCH_ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
              "softplus": torch.nn.functional.softplus,
              "leaky_relu": lambda a: torch.nn.functional.leaky_relu(a, 0.01)}


class TorchVAE:
    """A VAE in torch, float64, written from the math with ``model``'s weights (leaf tensors in ``params``)."""

    def __init__(self, model: VAE):
        self.config = c = model.config
        self.params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.state_dict().items()}
        self.act = _TORCH_ACT[c.activation]

    def _linear(self, h, name):
        return h @ self.params[f"{name}.weight"].T + self.params[f"{name}.bias"]

    def encode(self, x):
        """x (B, D) -> mu, logvar (B, Z)."""
        h = x
        for i in range(len(self.config.hidden)):
            h = self.act(self._linear(h, f"encoder.{i}"))
        return self._linear(h, "mu"), self._linear(h, "logvar")

    def log_px(self, z, x):
        """log p(x | z) per row (B,)."""
        h = z
        for i in range(len(self.config.hidden)):
            h = self.act(self._linear(h, f"decoder.{i}"))
        out = self._linear(h, f"decoder.{len(self.config.hidden)}")
        if self.config.likelihood == "bernoulli":
            return -torch.nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        return torch.distributions.Normal(torch.sigmoid(out), 1.0).log_prob(x).sum(1)

    def grads(self) -> dict:
        return {k: (v.grad.numpy().copy() if v.grad is not None else np.zeros(v.shape)) for k, v in self.params.items()}


def torch_iwae_loss(ref: TorchVAE, x: np.ndarray, eps: np.ndarray):
    """The IWAE loss (scalar tensor) from the math, eps (B, k, Z)."""
    b, k, _ = eps.shape
    xt = torch.tensor(x)
    mu, logvar = (a.repeat_interleave(k, 0) for a in ref.encode(xt))  # (B k, Z)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.tensor(eps.reshape(b * k, -1))
    normal = torch.distributions.Normal
    log_w = ref.log_px(z, xt.repeat_interleave(k, 0)) + normal(0.0, 1.0).log_prob(z).sum(1) - normal(mu, std).log_prob(z).sum(1)
    return -(torch.logsumexp(log_w.reshape(b, k), 1) - math.log(k)).mean()


@st.composite
def iwae_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    d, z, b, k = draw(st.integers(2, 8)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    hidden = tuple(draw(st.lists(st.integers(2, 6), min_size=0, max_size=2)))
    model = VAE(d, hidden, z, draw(st.sampled_from(sorted(_TORCH_ACT))), draw(st.sampled_from(["bernoulli", "gaussian"])),
                dtype=np.float64, seed=int(rng.integers(1000)))
    x = rng.random((b, d))
    if model.config.likelihood == "bernoulli" and draw(st.booleans()):
        x = (x < 0.5).astype(np.float64)
    return model, x, rng.standard_normal((b, k, z))


@pytest.mark.parametrize("be", BACKENDS)
@settings(deadline=None, max_examples=30)
@given(case=iwae_cases())
def test_iwae_loss_and_gradients_match_torch(be, case):
    model, x, eps = case
    with use_backend(be):
        loss, grads = iwae_loss_and_grads(model, x, eps.shape[1], eps=eps)
    ref = TorchVAE(model)
    ref_loss = torch_iwae_loss(ref, x, eps)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-12)
    ref_grads = ref.grads()
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < 1e-9, name


def test_iwae_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    model = VAE(6, (5,), 2, "tanh", dtype=np.float64, seed=2)
    x, eps = rng.random((3, 6)), rng.standard_normal((3, 4, 2))
    _, grads = iwae_loss_and_grads(model, x, 4, eps=eps)
    grads = {k: g.copy() for k, g in grads.items()}
    from npvae.gradcheck import check_gradients

    params = model.parameters()
    copies = {k: np.ascontiguousarray(v).copy() for k, v in params.items()}

    def loss():
        for k, v in params.items():
            v[...] = copies[k]
        return iwae_loss_and_grads(model, x, 4, eps=eps)[0]

    assert check_gradients(loss, copies, grads).max_error < 1e-6


def test_k1_is_the_elbo_with_a_monte_carlo_kl():
    rng = np.random.default_rng(4)
    model = VAE(7, (5,), 3, "tanh", dtype=np.float64, seed=5)
    x, eps = rng.random((4, 7)), rng.standard_normal((4, 1, 3))
    loss, grads = iwae_loss_and_grads(model, x, 1, eps=eps)
    grads = {k: g.copy() for k, g in grads.items()}
    terms, elbo_grads = model.loss_and_grads(x, eps=eps[:, 0])
    # Same eps: the reconstruction term and the whole decoder gradient are identical...
    for name in grads:
        if name.startswith("decoder"):
            np.testing.assert_allclose(grads[name], elbo_grads[name], rtol=1e-12, atol=1e-15)
    # ...and the losses differ by the Monte-Carlo KL minus the analytic KL, exactly.
    mu, logvar = model.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps[:, 0]
    mc_kl = ops.gaussian_log_prob_forward(z, mu, logvar)[0] - ops.standard_normal_log_prob_forward(z)[0]
    assert loss - terms.total == pytest.approx(float(np.mean(mc_kl - ops.kl_normal_forward(mu, logvar, "none")[0])), abs=1e-12)

    # Averaged over many eps the encoder gradients agree too (the MC KL is unbiased): tile the batch.
    reps = 20000
    xs, es = np.repeat(x, reps, axis=0), np.random.default_rng(5).standard_normal((4 * reps, 1, 3))
    _, grads = iwae_loss_and_grads(model, xs, 1, eps=es)
    grads = {k: g.copy() for k, g in grads.items()}
    _, elbo_grads = model.loss_and_grads(xs, eps=es[:, 0])
    for name in ("mu.weight", "mu.bias", "logvar.weight", "logvar.bias", "encoder.0.weight"):
        assert relative_error(grads[name], elbo_grads[name]) < 0.02, name


def test_iwae_refuses_what_it_cannot_do():
    model = VAE(4, (3,), 2, dtype=np.float64)
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="k >= 1"):
        iwae_log_likelihood(model, x, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pass eps"):
        iwae_loss_and_grads(model, x, 2)
    with pytest.raises(ValueError, match=r"expected eps of shape \(2, 3, 2\)"):
        iwae_loss_and_grads(model, x, 3, eps=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="beta = 2.0"):
        iwae_loss_and_grads(VAE(4, (3,), 2, beta=2.0), x, 2, rng=np.random.default_rng(0))
    from npvae.models import Autoencoder

    with pytest.raises(ValueError, match="needs a VAE"):
        iwae_log_likelihood(Autoencoder(4, (3,), 2), x, 2, np.random.default_rng(0))


# ----------------------------------------------------------------------------- the bound on a trained model


@pytest.fixture(scope="module")
def trained():
    """A 784-32-8 VAE after 150 Adam steps on the demo digits (binarized), and 100 held-out digits.

    Far from converged, so the ELBO is loose: k = 1, 10, 100 sit about 5 and 1.4 nats apart, with
    Monte-Carlo noise of about 0.3 nats in the mean over 100 digits."""
    from npvae import data

    ds = data.load_demo()
    rng = np.random.default_rng(0)
    x = data.binarize_static(data.to_float(ds.train_x[:2000]), rng)
    test = data.binarize_static(data.to_float(ds.val_x[:100]), rng)
    model = VAE(784, (32,), 8, seed=0)
    opt = make_optimizer("adam", model.params.data, model.params.grad, 3e-3)
    for step in range(150):
        idx = rng.integers(0, len(x), 64)
        model.loss_and_grads(x[idx], rng=rng)
        opt.step()
    return model, test


def test_iwae_is_above_the_elbo_and_rises_with_k(trained):
    model, x = trained
    elbo = -np.mean([model.evaluate(x, rng=np.random.default_rng(s)).total for s in range(10)])
    bounds = {k: iwae_log_likelihood(model, x, k, np.random.default_rng(k)).mean() for k in (1, 10, 100)}
    assert abs(bounds[1] - elbo) < 2.0  # k = 1 is a (noisier) one-sample ELBO
    assert elbo < bounds[10] < bounds[100]
    assert bounds[1] < bounds[10]


def test_the_running_logsumexp_over_sample_chunks_is_exact(trained):
    # The noise is drawn example-major, so one example per pass, in chunks of any size, reads the
    # same stream as one pass over everything: the answers agree to rounding.
    model, x = trained
    whole = iwae_log_likelihood(model, x[:6], 300, np.random.default_rng(1), batch_size=100_000)
    chunked = iwae_log_likelihood(model, x[:6], 300, np.random.default_rng(1), batch_size=7)  # 43 passes each
    assert whole.dtype == np.float64 and whole.shape == (6,)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


def test_iwae_is_finite_for_extreme_inputs_and_weights(trained):
    model, _ = trained
    x = np.stack([np.zeros(784), np.ones(784), np.tile([0.0, 1.0], 392)])
    assert np.isfinite(iwae_log_likelihood(model, x, 50, np.random.default_rng(0))).all()
    wild = VAE(784, (32,), 8, seed=1)
    wild.params.data[...] = model.params.data * 4  # logvar near -40: std 1e-9, below float32 resolution of mu
    log_px = iwae_log_likelihood(wild, x, 50, np.random.default_rng(0))
    assert np.isfinite(log_px).all() and (log_px < 0).all()  # binary x under a Bernoulli decoder: p(x) <= 1
    loss, grads = iwae_loss_and_grads(wild, x, 5, rng=np.random.default_rng(0))
    assert np.isfinite(loss) and np.isfinite(wild.params.grad).all()
