"""The conditional VAE: whole-model gradients against PyTorch, finite differences, labels, behaviour."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae.backend import numba_available, use_backend
from npvae.models import CVAE, LIKELIHOODS, VAE, Conditional, Model, build_model
from tests.helpers import parameter_differences

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = ["numpy", "numba"] if numba_available() else ["numpy"]


def rel_error(a, b) -> float:
    """max|a - b| / max|b|: the error relative to the reference array's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


# ----------------------------------------------------------------------------- the PyTorch reference


def torch_cvae(state: dict, config, x, y, eps):
    """Negative conditional ELBO of a CVAE written directly from the math, and its gradients.

    Takes the npvae state dict (nn.Linear layout), so both models share weights; float64 throughout.

    Returns
    -------
    loss : float, the batch mean of recon + beta * KL
    grads : dict of name -> array, keyed like the state dict
    """
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in state.items()}
    act = {
        "relu": F.relu,
        "leaky_relu": lambda a: F.leaky_relu(a, config.alpha),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": lambda a: torch.logaddexp(a, torch.zeros_like(a)),  # F.softplus is linear past 20 (2e-9 off)
    }[config.activation]

    def linear(name, h):
        return h @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    x, eps = torch.tensor(x, dtype=torch.float64), torch.tensor(eps, dtype=torch.float64)
    onehot = F.one_hot(torch.as_tensor(np.asarray(y, np.int64)), config.num_classes).double()

    h = torch.cat([x, onehot], 1)  # q(z | x, y)
    for i in range(len(config.hidden)):
        h = act(linear(f"encoder.{i}", h))
    mu, logvar = linear("mu", h), linear("logvar", h)
    z = mu + torch.exp(0.5 * logvar) * eps

    if config.learned_prior:  # p(z | y)
        g = onehot
        for i in range(len(config.prior_hidden)):
            g = act(linear(f"prior.{i}", g))
        mu_p, logvar_p = linear("prior_mu", g), linear("prior_logvar", g)
        kl = 0.5 * (logvar_p - logvar + (torch.exp(logvar) + (mu - mu_p) ** 2) / torch.exp(logvar_p) - 1).sum(1)
    else:
        kl = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)

    h = torch.cat([z, onehot], 1)  # p(x | z, y)
    for i in range(len(config.hidden)):
        h = act(linear(f"decoder.{i}", h))
    out = linear(f"decoder.{len(config.hidden)}", h)
    if config.likelihood == "gaussian":
        mean = torch.sigmoid(out)
        recon = 0.5 * ((mean - x) ** 2).sum(1) + 0.5 * x.shape[1] * math.log(2 * math.pi)
    else:
        recon = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        if config.likelihood == "continuous_bernoulli":
            recon = recon - torch.log(out / torch.tanh(out / 2)).sum(1)  # log C(l), finite for l != 0

    loss = (recon + config.beta * kl).mean()
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


# ----------------------------------------------------------------------------- whole-model gradients


@st.composite
def cvae_cases(draw):
    """A small CVAE's sizes, its data, noise and labels, and the backend to run under."""
    sizes = st.integers(1, 6)
    case = dict(
        input_dim=draw(st.integers(1, 7)),
        num_classes=draw(st.integers(1, 4)),
        hidden=tuple(draw(st.lists(sizes, max_size=2))),
        latent_dim=draw(st.integers(1, 4)),
        activation=draw(st.sampled_from(["relu", "leaky_relu", "tanh", "softplus"])),
        beta=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        prior_hidden=tuple(draw(st.lists(sizes, max_size=2))),
        seed=draw(st.integers(0, 2**16)),
    )
    batch = draw(st.integers(1, 5))
    weight_scale = draw(st.sampled_from([0.5, 1.0, 3.0]))  # 3: large logits, logvars far from 0
    backend = draw(st.sampled_from(BACKENDS))
    return case, batch, weight_scale, backend


def _data(rng, batch, d, c, z):
    x = rng.random((batch, d))
    x[rng.random((batch, d)) < 0.2] = 1.0  # the value range's ends, where BCE is exact
    x[rng.random((batch, d)) < 0.2] = 0.0
    return x, rng.integers(0, c, batch), rng.standard_normal((batch, z))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("learned_prior", [True, False], ids=["learned_prior", "fixed_prior"])
@settings(max_examples=15, deadline=None)
@given(cvae_cases())
def test_gradients_match_torch(learned_prior, likelihood, case):
    kwargs, batch, weight_scale, backend = case
    model = CVAE(**kwargs, likelihood=likelihood, learned_prior=learned_prior, dtype=np.float64)
    model.params.data *= weight_scale
    rng = np.random.default_rng(kwargs["seed"])
    x, y, eps = _data(rng, batch, model.config.input_dim, model.config.num_classes, model.config.latent_dim)

    with use_backend(backend):
        terms, grads = model.loss_and_grads(x, y, eps=eps)
    loss, expected = torch_cvae(model.state_dict(), model.config, x, y, eps)

    assert abs(terms.total - loss) <= 1e-12 * max(1.0, abs(loss))
    assert list(grads) == list(expected)
    for name in expected:
        assert rel_error(grads[name], expected[name]) < 1e-9, name


def test_fixed_prior_has_no_prior_parameters():
    model = CVAE(input_dim=5, num_classes=3, hidden=(4,), latent_dim=2, learned_prior=False, prior_hidden=(7,))
    assert not any(key.startswith("prior") for key in model.state_dict())
    mu_p, logvar_p = model.prior(2, [0, 2])
    assert mu_p.shape == logvar_p.shape == (2, 2) and not mu_p.any() and not logvar_p.any()


def test_recon_and_kl_gradients_split_exactly():
    model = CVAE(input_dim=6, num_classes=3, hidden=(5,), latent_dim=2, prior_hidden=(4,), beta=0.7, dtype=np.float64)
    rng = np.random.default_rng(1)
    x, y, eps = _data(rng, 4, 6, 3, 2)
    model.loss_and_grads(x, y, eps=eps)
    total = model.params.grad.copy()
    model.forward(x, y, eps)
    model.backward(np.full(4, 1 / 4), np.zeros(4))
    recon_flat, recon_part = model.params.grad.copy(), {k: g.copy() for k, g in model.gradients().items()}
    model.backward(np.zeros(4), np.full(4, 0.7 / 4))
    kl_part = model.gradients()
    np.testing.assert_allclose(recon_flat + model.params.grad, total, rtol=1e-12, atol=1e-15)
    # the decoder gets no KL gradient; the prior network gets no reconstruction gradient
    assert not kl_part["decoder.1.weight"].any() and not kl_part["decoder.0.weight"].any()
    assert not recon_part["prior_mu.weight"].any() and not recon_part["prior.0.weight"].any()


def test_finite_differences_on_random_parameters():
    model = CVAE(input_dim=7, num_classes=3, hidden=(6, 5), latent_dim=3, activation="tanh",
                 prior_hidden=(4,), beta=1.3, dtype=np.float64, seed=3)
    rng = np.random.default_rng(3)
    x, y, eps = _data(rng, 5, 7, 3, 3)

    def loss():
        recon, kl = model.forward(x, y, eps)
        return float(np.mean(recon + model.config.beta * kl))

    model.loss_and_grads(x, y, eps=eps)
    analytic = model.params.grad.copy()
    idx = rng.choice(model.params.size, 40, replace=False)
    for i, numeric in zip(idx, parameter_differences(model.params.data, idx, loss)):
        assert abs(numeric - analytic[i]) / max(1e-8, abs(numeric) + abs(analytic[i])) < 1e-6, i


def test_float32_matches_float64():
    kwargs = dict(input_dim=9, num_classes=4, hidden=(8,), latent_dim=3, prior_hidden=(5,))
    m32, m64 = CVAE(**kwargs, dtype=np.float32), CVAE(**kwargs, dtype=np.float64)
    rng = np.random.default_rng(2)
    x, y, eps = _data(rng, 6, 9, 4, 3)
    t32, g32 = m32.loss_and_grads(x.astype(np.float32), y, eps=eps.astype(np.float32))
    t64, g64 = m64.loss_and_grads(x, y, eps=eps)
    assert m32.params.grad.dtype == np.float32
    assert abs(t32.total - t64.total) < 1e-4 * abs(t64.total)
    for name in g64:
        assert g32[name].dtype == np.float32
        assert rel_error(g32[name], g64[name]) < 1e-4, name


def _warm_step_peak(model, *inputs) -> int:
    """Peak bytes allocated by a training step at a batch size the model has seen."""
    rng = np.random.default_rng(0)
    model.loss_and_grads(*inputs, rng=rng)
    tracemalloc.start()
    model.loss_and_grads(*inputs, rng=rng)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_warm_training_step_allocates_no_concatenations():
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, 64)
    model = CVAE(input_dim=784, num_classes=10, hidden=(32,), latent_dim=4, prior_hidden=(8,))
    buffers = model.workspace.get(64, "xy", (64, 794))
    cvae = _warm_step_peak(model, x, y)
    assert model.workspace.get(64, "xy", (64, 794)) is buffers
    # the VAE's step allocates its BCE probabilities (B, D); a (B, D + C) concatenation would add as much again
    vae = _warm_step_peak(VAE(input_dim=784, hidden=(32,), latent_dim=4), x)
    assert cvae < vae + x.nbytes // 4


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "y, got",
    [
        (np.array([0, 1, 2, 3, 4, 5, 6, 10]), "got 10 at index 7"),
        (np.array([0, 1, 2, -1, 4, 5, 6, 7]), "got -1 at index 3"),
        (np.arange(7), r"got shape \(7,\)"),
        (np.arange(8).reshape(8, 1), r"got shape \(8, 1\)"),
        (np.int64(3), r"got shape \(\)"),
        (np.arange(8.0), r"got dtype float64 \(cast integral floats with y.astype\(int\)\)"),
        (np.ones(8, dtype=bool), "got dtype bool"),
        (np.array(list("abcdefgh")), "got dtype <U1"),
    ],
    ids=["too_large", "negative", "wrong_length", "2d", "scalar", "float", "bool", "strings"],
)
def test_label_errors(y, got):
    model = CVAE(input_dim=5, num_classes=10, hidden=(4,), latent_dim=2)
    x = np.full((8, 5), 0.5)
    expected = r"expected y of shape \(8,\) with integer class labels in \[0, 10\), " + got
    with pytest.raises(ValueError, match=expected):
        model.loss_and_grads(x, y, rng=np.random.default_rng(0))


def test_labels_accepted_and_checked_everywhere():
    model = CVAE(input_dim=5, num_classes=3, hidden=(4,), latent_dim=2)
    rng = np.random.default_rng(0)
    x = rng.random((4, 5))
    for y in ([0, 1, 2, 0], np.array([0, 1, 2, 0], np.uint8), np.array([0, 1, 2, 0], np.int32)):
        assert model.check_labels(y, 4).tolist() == [0, 1, 2, 0]
        model.loss_and_grads(x, y, rng=rng)
    with pytest.raises(ValueError, match=r"expected y of shape \(B,\)"):
        model.check_labels([])
    for call in (lambda: model.encode(x, [0, 1]), lambda: model.reconstruct(x, [0, 1, 2, 3]),
                 lambda: model.decode(np.zeros((4, 2)), [0, 1, 2]), lambda: model.prior(1, [[0]]),
                 lambda: model.evaluate(x, [0, 0, 0, 5], rng)):
        with pytest.raises(ValueError, match="expected y of shape"):
            call()
    for label in (3, -1, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"expected label an integer class in \[0, 3\) or None"):
            model.sample(2, rng, y=label)


# ----------------------------------------------------------------------------- state dicts and the public surface


def test_state_dict_keys_in_forward_order():
    model = CVAE(input_dim=6, num_classes=3, hidden=(5, 4), latent_dim=2, prior_hidden=(3, 3))
    layers = ["encoder.0", "encoder.1", "mu", "logvar", "prior.0", "prior.1", "prior_mu", "prior_logvar",
              "decoder.0", "decoder.1", "decoder.2"]
    assert list(model.state_dict()) == [f"{n}.{p}" for n in layers for p in ("weight", "bias")]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes["encoder.0.weight"] == (5, 6 + 3) and shapes["decoder.0.weight"] == (4, 2 + 3)
    assert shapes["prior.0.weight"] == (3, 3) and shapes["prior_mu.weight"] == shapes["prior_logvar.weight"] == (2, 3)
    assert shapes["decoder.2.weight"] == (6, 5)
    bare = CVAE(input_dim=6, num_classes=3, hidden=(), latent_dim=2, prior_hidden=())
    assert list(bare.state_dict()) == [f"{n}.{p}" for n in ("mu", "logvar", "prior_mu", "prior_logvar", "decoder.0")
                                       for p in ("weight", "bias")]
    assert bare.state_dict()["prior_mu.weight"].shape == (2, 3)


def test_state_dict_round_trip():
    kwargs = dict(input_dim=6, num_classes=3, hidden=(5,), latent_dim=2, prior_hidden=(4,), dtype=np.float64)
    a, b = CVAE(**kwargs, seed=0), CVAE(**kwargs, seed=1)
    rng = np.random.default_rng(0)
    x, y, eps = _data(rng, 4, 6, 3, 2)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    assert a.loss_and_grads(x, y, eps=eps)[0] == b.loss_and_grads(x, y, eps=eps)[0]
    c = build_model("cvae", dataclasses.asdict(a.config), dtype=np.float64)
    assert isinstance(c, CVAE) and c.config == a.config and isinstance(c, Conditional)
    wrong = CVAE(input_dim=6, num_classes=4, hidden=(5,), latent_dim=2, prior_hidden=(4,))
    with pytest.raises(ValueError, match="prior.0.weight: expected"):
        wrong.load_state_dict(a.state_dict())


def test_inference_shapes():
    model = CVAE(input_dim=6, num_classes=3, hidden=(5,), latent_dim=2, prior_hidden=(4,))
    rng = np.random.default_rng(0)
    x, y = rng.random((7, 6)), rng.integers(0, 3, 7)
    mu, logvar = model.encode(x, y, batch_size=3)
    assert mu.shape == logvar.shape == (7, 2)
    np.testing.assert_allclose(mu, model.encode(x, y)[0], rtol=1e-6)
    assert model.decode(mu, y).shape == model.reconstruct(x, y).shape == (7, 6)
    assert 0 <= model.reconstruct(x, y).min() and model.reconstruct(x, y).max() <= 1
    mu_p, _ = model.prior(4, [0, 1, 2, 1])
    np.testing.assert_array_equal(mu_p[1], mu_p[3])
    assert model.sample(5, rng).shape == (5, 6) and model.sample(2, rng, y=2).shape == (2, 6)
    assert model.class_grid(4, rng).shape == (3, 4, 6)
    terms = model.evaluate(x, y, rng, batch_size=3)
    assert terms.reg >= 0 and math.isclose(terms.total, terms.recon + terms.reg)
    assert issubclass(CVAE, Conditional) and not issubclass(Model, Conditional) and not issubclass(VAE, Conditional)


# ----------------------------------------------------------------------------- behaviour


def _patterns(c: int, d: int) -> np.ndarray:
    """One distinct binary pattern per class: class k lights pixel block k."""
    p = np.zeros((c, d))
    for k, block in enumerate(np.array_split(np.arange(d), c)):
        p[k, block] = 1.0
    return p


def _train(model, x, y, steps, lr, rng, batch=32):
    """Plain Adam on the flat parameter buffer."""
    m, v = np.zeros_like(model.params.data), np.zeros_like(model.params.data)
    for t in range(1, steps + 1):
        rows = rng.integers(0, len(x), batch)
        model.loss_and_grads(x[rows], y[rows], rng=rng)
        g = model.params.grad
        m += 0.1 * (g - m)
        v += 0.001 * (g * g - v)
        model.params.data -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)


def test_trained_cvae_generates_the_class_asked_for():
    # 16 pixels show class k's pattern; 16 more share one brightness s ~ U(0, 1) (a "style" that the
    # label does not tell, so the latent has to carry it)
    c, d, ds, n = 4, 16, 16, 512
    rng = np.random.default_rng(0)
    patterns = _patterns(c, d)
    y = rng.integers(0, c, n)
    style = rng.random(n)
    x = np.concatenate([patterns[y], np.repeat(style[:, None], ds, 1)], 1)  # (n, d + ds)
    model = CVAE(input_dim=d + ds, num_classes=c, hidden=(32,), latent_dim=2, prior_hidden=(16,), seed=0)
    before = model.evaluate(x, y, np.random.default_rng(1))
    _train(model, x.astype(np.float32), y, steps=400, lr=1e-2, rng=rng)
    after = model.evaluate(x, y, np.random.default_rng(1))
    assert after.total < 0.5 * before.total
    mu, _ = model.encode(x, y)
    assert after.reg > 0.3
    for k in range(c):  # within each class the codes carry the style (classes may orient it differently)
        assert max(abs(np.corrcoef(mu[y == k, j], style[y == k])[0, 1]) for j in range(2)) > 0.7

    # samples of class k look like pattern k, not the others, and vary in style
    grid = model.class_grid(50, np.random.default_rng(2))  # (C, 50, d + ds)
    distance = ((grid[:, :, :d].mean(1)[:, None, :] - patterns[None]) ** 2).sum(-1)  # (C sampled, C patterns)
    np.testing.assert_array_equal(distance.argmin(1), np.arange(c))
    for k in range(c):
        assert distance[k, k] < 0.25 * np.delete(distance[k], k).min()
        rows = model.sample(20, np.random.default_rng(k), y=k)[:, :d]
        assert (((rows - patterns[k]) ** 2).sum(1) < ((rows - patterns[(k + 1) % c]) ** 2).sum(1)).all()
    assert grid[:, :, d:].mean(2).std(1).min() > 0.1

    # the same code decoded under each label follows the label
    decoded = model.decode(np.zeros((c, 2)), np.arange(c))[:, :d]
    np.testing.assert_array_equal(((decoded[:, None, :] - patterns[None]) ** 2).sum(-1).argmin(1), np.arange(c))

    # the learned prior of class k sits where class k's posterior means are (the KL's optimum), and the
    # classes' priors differ. (With y given to the decoder, where each class's codes sit is not
    # identifiable, so "differ" alone is weak; tracking the posteriors is the real check.)
    mu_p, _ = model.prior(c, np.arange(c))
    class_means = np.stack([mu[y == k].mean(0) for k in range(c)])
    spread = np.sqrt(np.stack([mu[y == k].var(0).sum() for k in range(c)]))
    assert (np.linalg.norm(class_means - mu_p, axis=1) < 0.5 * spread).all()
    assert np.ptp(mu_p, axis=0).max() > 0.1
