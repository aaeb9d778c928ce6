"""Whole-model tests for :mod:`npvae.models`.

1. Gradients of every model against a PyTorch reference written from the math (tests/torch_models.py),
   same weights, same noise, float64, on both kernel backends: loss to 1e-12, gradients to 1e-9.
2. Central finite differences of the whole model on a random subset of parameter entries.
3. The VAE's gradient splits exactly into its reconstruction and KL parts.
4. State dicts: keys, order, PyTorch ``nn.Linear`` shapes, round trips, errors.
5. Input checks; 6. float32 models; 7. inference shapes and ranges.

Errors are relative to each array's scale (:func:`tests.torch_models.rel_error`); a gradient's scale is
floored at max(1e-5 x the model's largest gradient, 1e-4), for layers behind a saturated sigmoid or
tanh (:func:`tests.torch_models.gradient_errors`).
"""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npvae import ops
from npvae.backend import numba_available, use_backend
from npvae.models import (LIKELIHOODS, VAE, Autoencoder, ContractiveAutoencoder, DenoisingAutoencoder, PoorMansVAE,
                          SparseAutoencoder)
from tests.helpers import parameter_differences

torch = pytest.importorskip("torch")
nn = torch.nn
from tests.torch_models import TorchVAE, gradient_errors, gradients, reference_for, rel_error, to_torch  # noqa: E402

BACKENDS = ("numpy", "numba") if numba_available() else ("numpy",)
LOSS_RTOL = 1e-12  # relative to max(|loss|, 1 nat): a continuous-Bernoulli NLL (a density) can cancel to ~0
GRAD_RTOL = 1e-9

examples = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
input_dims = st.integers(1, 12)
latent_dims = st.integers(1, 6)
batch_sizes = st.integers(1, 16)
widths = st.integers(1, 10)
# Multiplies the default (nn.Linear) init: larger weights push activations into their tails.
weight_scales = st.sampled_from([0.5, 1.0, 3.0])


# ----------------------------------------------------------------------------- helpers


def data_batch(model, size: int, rng: np.random.Generator, binary: bool = False) -> np.ndarray:
    """(size, D) float64 data in the model's value range: uniform, or only its two ends."""
    lo, hi = model.value_range
    u = rng.random((size, model.config.input_dim))
    return np.where(u < 0.5, lo, hi) if binary else lo + (hi - lo) * u


def noise_draws(model, x, seed: int):
    """What ``model.loss_and_grads(x, rng=np.random.default_rng(seed))`` draws, reproduced.

    Returns
    -------
    x_in : (B, D) array, the denoising autoencoder's corrupted input (x itself for other models)
    eps : (B, Z) array or None, the code noise of the VAE and the poor man's VAE
    """
    rng = np.random.default_rng(seed)
    x = model.check_input(x)
    x_in = model.corrupt(x, rng) if isinstance(model, DenoisingAutoencoder) else x
    eps = None
    if isinstance(model, (VAE, PoorMansVAE)):
        eps = rng.standard_normal((len(x), model.config.latent_dim), dtype=model.dtype)
    return x_in, eps


def _tensor(a):
    return None if a is None else torch.tensor(np.asarray(a), dtype=torch.float64)


def torch_loss_and_grads(model, x, x_in, eps):
    """The float64 reference's batch means ``(total, recon, reg)`` and its gradients, keyed like ours."""
    ref = reference_for(model)
    args = (x, eps) if isinstance(model, VAE) else (x_in, x, eps)
    total, recon, reg = ref.loss(*map(_tensor, args))
    total.backward()
    return (total.item(), recon.item(), reg.item()), gradients(ref)


def assert_matches_torch(model, x, seed: int) -> None:
    """``loss_and_grads`` on every backend, noise from a seeded rng, against the torch reference."""
    x_in, eps = noise_draws(model, x, seed)
    expected, expected_grads = torch_loss_and_grads(model, model.check_input(x), x_in, eps)
    for backend in BACKENDS:
        with use_backend(backend):
            terms, grads = model.loss_and_grads(x, rng=np.random.default_rng(seed))
        for name, ours, theirs in zip(("total", "recon", "reg"), (terms.total, terms.recon, terms.reg), expected):
            err = rel_error(ours, theirs, floor=1.0)
            assert err <= LOSS_RTOL, f"[{backend}] {name}: {ours!r} vs torch {theirs!r} (relative error {err:.1e})"
        for key, err in gradient_errors(grads, expected_grads).items():
            assert err <= GRAD_RTOL, f"[{backend}] d{key}: relative error {err:.1e} vs torch"


def small_models(dtype=np.float64):
    """One small instance of each model kind (Z <= D), keyed by a test id."""
    return {
        "vae-bernoulli": VAE(7, (6, 5), 3, "tanh", "bernoulli", beta=0.7, dtype=dtype, seed=1),
        "vae-gaussian": VAE(7, (6,), 3, "softplus", "gaussian", beta=2.0, dtype=dtype, seed=2),
        "vae-cb": VAE(7, (6,), 3, "sigmoid", "continuous_bernoulli", beta=0.5, dtype=dtype, seed=3),
        "vae-no-hidden": VAE(5, (), 2, "tanh", "bernoulli", dtype=dtype, seed=4),
        "vae-logvar-bounds": VAE(7, (6,), 3, "tanh", "bernoulli", logvar_bounds=(-0.3, 0.2), dtype=dtype, seed=9),
        "ae": Autoencoder(7, (6, 5), 3, "tanh", "tanh", dtype=dtype, seed=5),
        "dae-salt-pepper": DenoisingAutoencoder(7, (6,), 3, "softplus", "sigmoid", (0.0, 1.0), noise="salt_pepper",
                                                noise_level=0.3, dtype=dtype, seed=6),
        "dae-gaussian": DenoisingAutoencoder(7, (6,), 3, "tanh", "tanh", noise="gaussian", noise_level=0.5,
                                             dtype=dtype, seed=7),
        "poor": PoorMansVAE(7, (6,), 3, "sigmoid", "sigmoid", noise_std=0.8, dtype=dtype, seed=8),
        "poor-batch-norm": PoorMansVAE(7, (6,), 3, "sigmoid", "sigmoid", noise_std=0.8, code_penalty="batch",
                                       dtype=dtype, seed=14),
        "sparse-kl": SparseAutoencoder(7, (), 4, sparsity_weight=2.0, sparsity_target=0.1, dtype=dtype, seed=10),
        "sparse-l1": SparseAutoencoder(7, (6,), 3, "tanh", "sigmoid", code_activation="softplus",
                                       sparsity_penalty="l1", sparsity_weight=0.5, dtype=dtype, seed=11),
        "contractive": ContractiveAutoencoder(7, (), 4, contraction_weight=0.7, dtype=dtype, seed=12),
        "contractive-deep": ContractiveAutoencoder(7, (6, 5), 3, "softplus", "sigmoid", code_activation="tanh",
                                                   contraction_weight=1.5, dtype=dtype, seed=13),
    }


MODEL_IDS = list(small_models())


# ----------------------------------------------------------------------------- 1. gradients vs PyTorch


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(examples, max_examples=8)  # per likelihood and depth: 72 in all
@given(d=input_dims, sizes=st.lists(widths, min_size=2, max_size=2), z=latent_dims, b=batch_sizes,
       activation=st.sampled_from(list(ops.ACTIVATIONS)), alpha=st.sampled_from([0.0, 0.01, 0.3]),
       beta=st.sampled_from([0.0, 0.3, 1.0, 4.0]), logvar_bounds=st.sampled_from([None, (-0.5, 0.3), (-8.0, 8.0)]),
       scale=weight_scales, binary=st.booleans(), seed=seeds)
def test_vae_gradients_match_torch(likelihood, depth, d, sizes, z, b, activation, alpha, beta, logvar_bounds, scale,
                                   binary, seed):
    model = VAE(d, sizes[:depth], z, activation, likelihood, beta, alpha, logvar_bounds, dtype=np.float64, seed=seed)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed), binary), seed)


@examples
@given(d=input_dims, hidden=st.lists(widths, max_size=2), z=latent_dims, b=batch_sizes,
       activation=st.sampled_from(list(ops.ACTIVATIONS)), output_activation=st.sampled_from(list(ops.ACTIVATIONS)),
       value_range=st.sampled_from([(-1.0, 1.0), (0.0, 1.0)]), scale=weight_scales, seed=seeds)
def test_autoencoder_gradients_match_torch(d, hidden, z, b, activation, output_activation, value_range, scale, seed):
    model = Autoencoder(d, hidden, z, activation, output_activation, value_range, dtype=np.float64, seed=seed)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


@pytest.mark.parametrize("noise, levels", [("salt_pepper", [0.0, 0.2, 0.7, 1.0]), ("gaussian", [0.0, 0.3, 2.0])])
@settings(examples, max_examples=12)
@given(data=st.data(), d=input_dims, hidden=st.lists(widths, max_size=2), z=latent_dims, b=batch_sizes,
       activation=st.sampled_from(list(ops.ACTIVATIONS)), output_activation=st.sampled_from(["identity", "sigmoid", "tanh"]),
       value_range=st.sampled_from([(-1.0, 1.0), (0.0, 1.0)]), seed=seeds)
def test_denoising_autoencoder_gradients_match_torch(noise, levels, data, d, hidden, z, b, activation,
                                                     output_activation, value_range, seed):
    level = data.draw(st.sampled_from(levels), "noise_level")
    model = DenoisingAutoencoder(d, hidden, z, activation, output_activation, value_range, noise=noise,
                                 noise_level=level, dtype=np.float64, seed=seed)
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


@examples
@given(d=input_dims, hidden=st.lists(widths, max_size=2), z=latent_dims, b=batch_sizes,
       activation=st.sampled_from(list(ops.ACTIVATIONS)), output_activation=st.sampled_from(["identity", "sigmoid", "tanh"]),
       noise_std=st.sampled_from([0.0, 0.5, 1.0, 2.0]), scale=weight_scales, seed=seeds,
       code_penalty=st.sampled_from(["per_image", "batch"]))
def test_poor_mans_vae_gradients_match_torch(d, hidden, z, b, activation, output_activation, noise_std, scale, seed,
                                             code_penalty):
    model = PoorMansVAE(d, hidden, z, activation, output_activation, noise_std=noise_std, dtype=np.float64, seed=seed,
                        code_penalty=code_penalty)
    model.params.data *= scale
    assert_matches_torch(model, data_batch(model, b, np.random.default_rng(seed)), seed)


def test_denoising_autoencoder_corrupts_inside_loss_and_grads():
    """The reference above only matches because the DAE really trains on the corrupted input."""
    model = small_models()["dae-salt-pepper"]
    x = data_batch(model, 6, np.random.default_rng(0))
    x_in, _ = noise_draws(model, x, 5)
    assert not np.array_equal(x_in, x)
    (noisy, _, _), _ = torch_loss_and_grads(model, x, x_in, None)
    (clean, _, _), _ = torch_loss_and_grads(model, x, x, None)
    terms, _ = model.loss_and_grads(x, rng=np.random.default_rng(5))
    assert rel_error(terms.total, noisy, floor=1.0) <= LOSS_RTOL
    assert rel_error(terms.total, clean) > 1e-6


@pytest.mark.parametrize("kind", [VAE, PoorMansVAE])
@pytest.mark.parametrize("d, z", [(6, 3), (4, 4), (2, 5)], ids=["Z<D", "Z=D", "Z>D"])
def test_explicit_eps_equals_the_draw_from_rng(kind, d, z):
    """Passing eps gives exactly the loss and gradients of drawing the same eps from rng."""
    model = kind(d, (5,), z, dtype=np.float64, seed=0)
    x = data_batch(model, 4, np.random.default_rng(1))
    _, eps = noise_draws(model, x, 9)
    drawn, grads = model.loss_and_grads(x, rng=np.random.default_rng(9))
    drawn_grads = {k: g.copy() for k, g in grads.items()}
    given_eps, grads = model.loss_and_grads(x, eps=eps)
    assert given_eps == drawn
    for key, grad in grads.items():
        np.testing.assert_array_equal(grad, drawn_grads[key], err_msg=key)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_results_do_not_depend_on_earlier_calls(name):
    """Buffers are kept per batch size and reused: interleaved batch sizes and inference calls must
    not leak into a later step, and inference must not touch the gradients."""
    used = small_models()[name]
    rng = np.random.default_rng(0)
    batches = [data_batch(used, b, rng) for b in (5, 3, 5, 1, 3, 5)]
    for i, x in enumerate(batches):
        expected, expected_grads = small_models()[name].loss_and_grads(x, rng=np.random.default_rng(i))
        terms, grads = used.loss_and_grads(x, rng=np.random.default_rng(i))
        assert terms == expected
        for key, grad in grads.items():
            np.testing.assert_array_equal(grad, expected_grads[key], err_msg=key)
        after_step = used.params.grad.copy()
        used.encode(batches[(i + 1) % len(batches)])
        used.reconstruct(batches[i - 1], batch_size=2)
        used.sample(len(x), rng)
        used.evaluate(x, rng=np.random.default_rng(9), batch_size=2)
        np.testing.assert_array_equal(used.params.grad, after_step)


# ----------------------------------------------------------------------------- 2. finite differences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODEL_IDS)
def test_finite_differences(name, backend):
    """Central differences of the batch loss over 30 random parameter entries (smooth activations only)."""
    model = small_models()[name]
    rng = np.random.default_rng(11)
    x = data_batch(model, 5, rng)
    _, eps = noise_draws(model, x, 0)

    def loss() -> float:
        return model.loss_and_grads(x, eps=eps, rng=np.random.default_rng(3))[0].total

    with use_backend(backend):
        loss()
        analytic = model.params.grad.copy()
        idx = rng.choice(model.params.size, size=30, replace=False)
        numeric = parameter_differences(model.params.data, idx, loss)
    assert rel_error(analytic[idx], numeric) <= 1e-6


# ----------------------------------------------------------------------------- 3. VAE gradient decomposition


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(examples, max_examples=5)
@given(d=input_dims, hidden=st.lists(widths, max_size=2), z=latent_dims, b=batch_sizes,
       activation=st.sampled_from(list(ops.ACTIVATIONS)), beta=st.sampled_from([0.0, 0.5, 3.0]), seed=seeds)
def test_vae_gradient_splits_into_recon_and_kl(likelihood, backend, d, hidden, z, b, activation, beta, seed):
    model = VAE(d, hidden, z, activation, likelihood, beta, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    x = model.check_input(data_batch(model, b, rng))
    eps = rng.standard_normal((b, z))
    ref = reference_for(model)
    ref_recon, ref_kl = ref(_tensor(x), _tensor(eps))

    def ours(drecon, dkl):
        model.backward(drecon, dkl)
        return {k: g.copy() for k, g in model.gradients().items()}

    def theirs(drecon, dkl):
        ref.zero_grad(set_to_none=True)
        (ref_recon @ _tensor(drecon) + ref_kl @ _tensor(dkl)).sum().backward(retain_graph=True)
        return gradients(ref)

    with use_backend(backend):
        recon, kl = model.forward(x, eps=eps)
        assert rel_error(recon, ref_recon.detach().numpy(), floor=1.0) <= LOSS_RTOL
        assert rel_error(kl, ref_kl.detach().numpy(), floor=1.0) <= LOSS_RTOL
        zero = np.zeros(b)
        # Arbitrary per-example weights: the parts add up to the whole, to rounding.
        drecon, dkl = rng.standard_normal(b), rng.standard_normal(b)
        recon_part, kl_part, both = ours(drecon, zero), ours(zero, dkl), ours(drecon, dkl)
        for key in both:
            assert rel_error(recon_part[key] + kl_part[key], both[key]) <= 1e-12, key
        # The loss's own weights: each part is torch's gradient of mean recon / beta * mean KL alone.
        drecon, dkl = np.full(b, 1 / b), np.full(b, beta / b)
        recon_part, kl_part = ours(drecon, zero), ours(zero, dkl)
    for part, ours_part, torch_part in (("recon", recon_part, theirs(drecon, zero)), ("KL", kl_part, theirs(zero, dkl))):
        for key, err in gradient_errors(ours_part, torch_part).items():
            assert err <= GRAD_RTOL, f"{part} part of d{key}: relative error {err:.1e} vs torch"
    for key in kl_part:
        if key.startswith("decoder."):
            assert not kl_part[key].any(), f"the KL does not depend on {key}"


# ----------------------------------------------------------------------------- 4. state dicts

DEFAULT_VAE_SHAPES = {
    "encoder.0.weight": (400, 784), "encoder.0.bias": (400,),
    "mu.weight": (20, 400), "mu.bias": (20,),
    "logvar.weight": (20, 400), "logvar.bias": (20,),
    "decoder.0.weight": (400, 20), "decoder.0.bias": (400,),
    "decoder.1.weight": (784, 400), "decoder.1.bias": (784,),
}


def sequential_layout(state: dict) -> dict:
    """Our keys renamed for the classic ``nn.Sequential`` layout, where an activation module follows
    each ``nn.Linear``: ``encoder.{i}`` -> ``encoder.{2i}``, ``decoder.{i}`` -> ``decoder.{2i}``."""
    renamed = {}
    for key, value in state.items():
        part, *rest = key.split(".")
        if part in ("encoder", "decoder"):
            key = f"{part}.{2 * int(rest[0])}.{rest[1]}"
        renamed[key] = value
    return renamed


def test_default_vae_state_dict_has_the_documented_keys_and_nn_linear_shapes():
    state = VAE().state_dict()
    assert list(state) == list(DEFAULT_VAE_SHAPES)
    assert {k: v.shape for k, v in state.items()} == DEFAULT_VAE_SHAPES
    assert all(v.dtype == np.float32 for v in state.values())
    ref = TorchVAE()  # torch's own nn.Linear shapes for 784-400-20, no key mapping
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == DEFAULT_VAE_SHAPES
    ref.load_state_dict(to_torch(state, torch.float32), strict=True)


def test_default_vae_loads_into_torch_sequential_modules_and_computes_the_same():
    model = VAE(dtype=np.float64)
    torch_vae = nn.ModuleDict({
        "encoder": nn.Sequential(nn.Linear(784, 400), nn.ReLU()),
        "mu": nn.Linear(400, 20),
        "logvar": nn.Linear(400, 20),
        "decoder": nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784)),
    }).double()
    torch_vae.load_state_dict(to_torch(sequential_layout(model.state_dict())), strict=True)
    x = data_batch(model, 3, np.random.default_rng(0))
    mu, logvar = model.encode(x)
    with torch.no_grad():
        h = torch_vae["encoder"](_tensor(x))
        assert rel_error(mu, torch_vae["mu"](h).numpy()) <= 1e-12
        assert rel_error(logvar, torch_vae["logvar"](h).numpy()) <= 1e-12
        assert rel_error(model.decode(mu), torch.sigmoid(torch_vae["decoder"](_tensor(mu))).numpy()) <= 1e-12


def test_default_autoencoder_loads_into_torch_sequential_modules_and_computes_the_same():
    model = Autoencoder(dtype=np.float64)
    assert list(model.state_dict()) == [f"{part}.{i}.{p}" for part in ("encoder", "decoder") for i in range(4)
                                        for p in ("weight", "bias")]
    sizes = [784, 128, 64, 12, 3]
    encoder, decoder = [], []
    for i, o in zip(sizes[:-1], sizes[1:]):
        encoder += [nn.Linear(i, o), nn.ReLU()]
    for i, o in zip(sizes[::-1][:-1], sizes[::-1][1:]):
        decoder += [nn.Linear(i, o), nn.ReLU()]
    torch_ae = nn.ModuleDict({"encoder": nn.Sequential(*encoder[:-1]),
                              "decoder": nn.Sequential(*decoder[:-1], nn.Tanh())}).double()
    torch_ae.load_state_dict(to_torch(sequential_layout(model.state_dict())), strict=True)
    x = data_batch(model, 3, np.random.default_rng(0))
    with torch.no_grad():
        code = torch_ae["encoder"](_tensor(x))
        assert rel_error(model.encode(x), code.numpy()) <= 1e-12
        assert rel_error(model.reconstruct(x), torch_ae["decoder"](code).numpy()) <= 1e-12


@pytest.mark.parametrize("name", MODEL_IDS)
def test_state_dict_keys_match_the_torch_reference_in_order(name):
    model = small_models()[name]
    expected = [f"{part}.{p}" for part in _layer_names(model) for p in ("weight", "bias")]
    assert list(model.state_dict()) == expected == list(reference_for(model).state_dict())
    assert list(model.parameters()) == list(model.gradients()) == expected


def _layer_names(model):
    hidden = len(model.config.hidden)
    if isinstance(model, VAE):
        return [f"encoder.{i}" for i in range(hidden)] + ["mu", "logvar"] + [f"decoder.{i}" for i in range(hidden + 1)]
    return [f"{part}.{i}" for part in ("encoder", "decoder") for i in range(hidden + 1)]


@pytest.mark.parametrize("name", MODEL_IDS)
def test_state_dict_round_trip(name):
    source, target = small_models()[name], small_models()[name]
    target.params.data[:] = np.random.default_rng(0).standard_normal(target.params.size)
    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(target.params.data, source.params.data)
    x = data_batch(source, 4, np.random.default_rng(1))
    _, eps = noise_draws(source, x, 2)
    assert target.loss_and_grads(x, eps=eps, rng=np.random.default_rng(2))[0] == \
        source.loss_and_grads(x, eps=eps, rng=np.random.default_rng(2))[0]


def test_state_dict_is_a_copy_and_parameters_are_views():
    model = small_models()["vae-bernoulli"]
    before = model.params.data.copy()
    model.state_dict()["mu.weight"][:] = 5.0
    np.testing.assert_array_equal(model.params.data, before)
    model.parameters()["mu.weight"][:] = 5.0
    assert np.all(model.state_dict()["mu.weight"] == 5.0)
    assert not np.array_equal(model.params.data, before)


def test_load_state_dict_accepts_a_torch_state_dict():
    model = small_models()["vae-cb"]
    ref = reference_for(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(-2.0)
    model.load_state_dict(ref.state_dict())
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value.numpy(), err_msg=key)


def _broken(model, edit):
    state = model.state_dict()
    edit(state)
    return state


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"mu.weight": s["mu.weight"].T}), r"mu\.weight: expected \(3, 6\), got \(6, 3\)"),
    (lambda s: s.update({"decoder.1.bias": s["decoder.1.bias"][:-1]}), r"decoder\.1\.bias: expected \(7,\), got \(6,\)"),
    (lambda s: s.pop("decoder.1.bias"), r"missing keys decoder\.1\.bias"),
    (lambda s: s.pop("logvar.weight"), r"missing keys logvar\.weight"),
    (lambda s: s.update({"decoder.7.weight": np.zeros((2, 2))}), r"unexpected keys decoder\.7\.weight"),
    (lambda s: s["decoder.1.bias"].__setitem__(2, np.nan), r"decoder\.1\.bias: contains NaN or Inf"),
], ids=["transposed", "wrong-length", "missing-output", "missing-logvar", "extra", "nan"])
def test_load_state_dict_rejects_a_wrong_state_dict_naming_the_key(edit, message):
    model = VAE(7, (6,), 3, dtype=np.float64)
    before = model.params.data.copy()
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(_broken(model, edit))
    np.testing.assert_array_equal(model.params.data, before)


def test_load_state_dict_rejects_sequential_layout_keys():
    model = VAE(7, (6, 5), 3)
    with pytest.raises(ValueError, match=r"missing keys encoder\.1\.weight.*unexpected keys encoder\.2\.weight"):
        model.load_state_dict(sequential_layout(model.state_dict()))


def test_load_state_dict_rejects_integer_arrays_and_leaves_the_model_unchanged():
    model = VAE(7, (6,), 3, dtype=np.float64)
    before = model.params.data.copy()
    state = model.state_dict()
    for key in state:
        state[key] = np.ones_like(state[key]) * 2.0
    state["decoder.1.bias"] = np.ones(7, dtype=np.int64)
    with pytest.raises(TypeError, match=r"decoder\.1\.bias"):
        model.load_state_dict(state)
    np.testing.assert_array_equal(model.params.data, before)


# ----------------------------------------------------------------------------- 5. input checks


@pytest.fixture(scope="module")
def default_vae():
    return VAE()


@pytest.mark.parametrize("shape, message", [
    ((28, 28), r"expected x of shape \(B, 784\) with B >= 1.*got \(28, 28\)"),
    ((5, 27, 28), r"expected x of shape \(B, 784\).*holding 784 values per row\), got \(5, 27, 28\)"),
    ((5, 783), r"expected x of shape \(B, 784\).*got \(5, 783\)"),
    ((784,), r"expected x of shape \(B, 784\).*got \(784,\)"),
    ((0, 784), r"with B >= 1.*got \(0, 784\)"),
])
@pytest.mark.parametrize("method", ["loss_and_grads", "encode", "reconstruct", "evaluate"])
def test_wrong_x_shape_is_rejected(default_vae, method, shape, message):
    args = (np.random.default_rng(0),) if method == "evaluate" else ()
    kwargs = {"rng": np.random.default_rng(0)} if method == "loss_and_grads" else {}
    with pytest.raises(ValueError, match=message):
        getattr(default_vae, method)(np.zeros(shape), *args, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x_is_rejected_with_its_index(default_vae, bad):
    x = np.zeros((3, 784))
    x[1, 17] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first at index \(1, 17\)\)"):
        default_vae.loss_and_grads(x, rng=np.random.default_rng(0))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("value", [-0.01, 1.5, 255.0])
def test_vae_x_outside_unit_interval_is_rejected(likelihood, value):
    model = VAE(6, (4,), 2, likelihood=likelihood)
    x = np.full((2, 6), 0.5)
    x[0, 3] = value
    with pytest.raises(ValueError, match=r"expected x values in \[0, 1\] for vae with " + likelihood):
        model.loss_and_grads(x, rng=np.random.default_rng(0))


def test_autoencoder_checks_its_own_value_range():
    model = Autoencoder(6, (4,), 2)  # data in [-1, 1]
    model.loss_and_grads(np.full((2, 6), -0.5))
    with pytest.raises(ValueError, match=r"expected x values in \[-1, 1\]"):
        model.loss_and_grads(np.full((2, 6), 1.5))


def test_integer_and_boolean_pixels_are_accepted():
    model = VAE(6, (4,), 2, dtype=np.float64)
    pixels = np.random.default_rng(0).random((3, 6)) < 0.5
    eps = np.random.default_rng(1).standard_normal((3, 2))
    expected = model.loss_and_grads(pixels.astype(np.float64), eps=eps)[0]
    assert model.loss_and_grads(pixels, eps=eps)[0] == expected
    assert model.loss_and_grads(pixels.astype(np.int64), eps=eps)[0] == expected
    # uint8 is pixels 0..255, read as npvae.fit reads it (issue 25): 255 is 1.0
    assert model.loss_and_grads(pixels.astype(np.uint8) * np.uint8(255), eps=eps)[0] == expected


@pytest.mark.parametrize("x", [np.array([["a"] * 784]), np.zeros((2, 784), dtype=complex)], ids=["str", "complex"])
def test_non_numeric_x_is_rejected(default_vae, x):
    with pytest.raises(TypeError, match="expected x with a numeric dtype"):
        default_vae.loss_and_grads(x, rng=np.random.default_rng(0))


@pytest.mark.parametrize("kind", [VAE, PoorMansVAE])
@pytest.mark.parametrize("shape", [(4, 4), (4, 2), (3, 3), (5, 3), (3,), (4, 3, 1)])
def test_wrong_eps_shape_is_rejected(kind, shape):
    model = kind(6, (5,), 3)
    x = np.full((4, 6), 0.5)
    with pytest.raises(ValueError, match=r"expected eps of shape \(4, 3\), got " + re_shape(shape)):
        model.loss_and_grads(x, eps=np.zeros(shape))


@pytest.mark.parametrize("kind", [VAE, PoorMansVAE])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_eps_is_rejected(kind, bad):
    model = kind(6, (5,), 3)
    eps = np.zeros((4, 3))
    eps[2, 1] = bad
    with pytest.raises(ValueError, match="eps contains NaN or Inf"):
        model.loss_and_grads(np.full((4, 6), 0.5), eps=eps)


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("kind", [VAE, PoorMansVAE])
def test_missing_eps_and_rng_is_rejected(kind):
    model = kind(6, (5,), 3)
    with pytest.raises(ValueError, match=r"pass eps \(B, Z\) or rng"):
        model.loss_and_grads(np.full((4, 6), 0.5))


def test_denoising_autoencoder_without_rng_is_rejected():
    model = DenoisingAutoencoder(6, (5,), 3)
    with pytest.raises(ValueError, match="needs rng"):
        model.loss_and_grads(np.zeros((4, 6)))


@pytest.mark.parametrize("kind", [VAE, PoorMansVAE, DenoisingAutoencoder])
@pytest.mark.parametrize("rng", [0, np.random.RandomState(0)], ids=["int-seed", "RandomState"])
def test_rng_that_is_not_a_generator_is_rejected(kind, rng):
    model = kind(6, (5,), 3)
    with pytest.raises(TypeError, match=r"rng.*np\.random\.Generator"):
        model.loss_and_grads(np.zeros((4, 6)), rng=rng)


@pytest.mark.parametrize("shape", [(4,), (4, 3), (2, 4, 2)])
@pytest.mark.parametrize("kind", [VAE, Autoencoder])
def test_decode_rejects_codes_of_the_wrong_shape(kind, shape):
    model = kind(6, (5,), 2)
    with pytest.raises(ValueError, match=r"expected z of shape \(N, 2\), got " + re_shape(shape)):
        model.decode(np.zeros(shape))


# ----------------------------------------------------------------------------- 6. dtypes


@pytest.mark.parametrize("name", MODEL_IDS)
def test_float32_model_agrees_with_float64_model(name, monkeypatch):
    m64, m32 = small_models(np.float64)[name], small_models(np.float32)[name]
    m32.load_state_dict(m64.state_dict())
    m64.load_state_dict(m32.state_dict())  # the float32-rounded weights in both
    x = data_batch(m64, 9, np.random.default_rng(0))
    x_in, eps = noise_draws(m32, x, 4)
    if isinstance(m64, DenoisingAutoencoder):  # the float32 model's corruption, fed to both
        monkeypatch.setattr(m64, "corrupt_input", lambda x, rng: x_in.astype(np.float64))
    terms32, grads32 = m32.loss_and_grads(x, eps=eps, rng=np.random.default_rng(4))
    terms64, grads64 = m64.loss_and_grads(x, eps=eps, rng=np.random.default_rng(4))
    for ours, exact in zip(astuple(terms32)[:3], astuple(terms64)[:3]):  # total, recon, kl (se: evaluate's)
        assert rel_error(ours, exact) <= 1e-5
    assert all(type(t) is float for t in astuple(terms32)[:3])
    assert m32.params.data.dtype == m32.params.grad.dtype == np.float32
    assert all(grad.dtype == np.float32 for grad in grads32.values())
    for key, err in gradient_errors(grads32, grads64).items():
        assert err <= 1e-4, f"d{key}: relative error {err:.1e} vs float64"


@pytest.mark.parametrize("name", MODEL_IDS)
def test_float32_model_outputs_are_float32(name):
    model = small_models(np.float32)[name]
    x = data_batch(model, 5, np.random.default_rng(0))  # float64 input, cast by the model
    codes = model.encode(x)
    for code in codes if isinstance(codes, tuple) else (codes,):
        assert code.dtype == np.float32
    assert model.decode(np.zeros((2, model.config.latent_dim))).dtype == np.float32
    assert model.reconstruct(x).dtype == np.float32
    assert model.sample(3, np.random.default_rng(0)).dtype == np.float32
    assert all(v.dtype == np.float32 for v in model.state_dict().values())


# ----------------------------------------------------------------------------- 7. inference


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vae_inference_shapes_and_means(likelihood):
    model = VAE(10, (8,), 4, "tanh", likelihood, dtype=np.float64, seed=3)
    x = data_batch(model, 7, np.random.default_rng(0))
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (7, 4)
    ref = reference_for(model)
    with torch.no_grad():
        ref_mu, ref_logvar = ref.encode(_tensor(x))
        assert rel_error(mu, ref_mu.numpy()) <= 1e-12
        assert rel_error(logvar, ref_logvar.numpy()) <= 1e-12
    # Encoding in slices changes nothing.
    np.testing.assert_allclose(model.encode(x, batch_size=3)[0], mu, rtol=1e-14)
    np.testing.assert_allclose(model.reconstruct(x, batch_size=2), model.decode(mu), rtol=1e-14)
    assert model.reconstruct(x).shape == (7, 10)

    # The decoder's mean of p(x | z), against the math, on codes spanning small to extreme logits.
    z = np.random.default_rng(1).standard_normal((50, 4)) * np.logspace(-3, 3, 50)[:, None]
    with torch.no_grad():
        out = ref.decode(_tensor(z)).numpy()
    if likelihood == "bernoulli":
        expected = 1 / (1 + np.exp(-out))
    elif likelihood == "gaussian":
        expected = out
    else:  # E[x] = 1 / (1 - e^-l) - 1 / l
        expected = -1 / np.expm1(-out) - 1 / out
    means = model.decode(z)
    assert means.shape == (50, 10)
    np.testing.assert_allclose(means, expected, rtol=0, atol=1e-8)
    model.params.data *= 100  # logits in the hundreds: means stay in [0, 1]
    for means in (model.decode(z), model.sample(20, np.random.default_rng(2)), model.reconstruct(x)):
        assert np.isfinite(means).all() and means.min() >= 0 and means.max() <= 1


@pytest.mark.parametrize("name", MODEL_IDS)
def test_sample_shape_range_and_reproducibility(name):
    model = small_models()[name]
    samples = model.sample(6, np.random.default_rng(5))
    assert samples.shape == (6, model.config.input_dim)
    np.testing.assert_array_equal(samples, model.sample(6, np.random.default_rng(5)))
    assert not np.array_equal(samples, model.sample(6, np.random.default_rng(6)))
    lo, hi = model.value_range
    assert samples.min() >= lo and samples.max() <= hi


@pytest.mark.parametrize("name", [n for n in MODEL_IDS if not n.startswith("vae")])
def test_autoencoder_inference_shapes_match_torch(name):
    model = small_models()[name]
    x = data_batch(model, 7, np.random.default_rng(0))
    code = model.encode(x)
    assert code.shape == (7, model.config.latent_dim)
    ref = reference_for(model)
    with torch.no_grad():
        assert rel_error(code, ref.encode(_tensor(x)).numpy()) <= 1e-12
        assert rel_error(model.decode(code), ref.decode(_tensor(code)).numpy()) <= 1e-12
    np.testing.assert_allclose(model.reconstruct(x, batch_size=3), model.decode(code), rtol=1e-14)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_evaluate_equals_the_training_loss_on_one_batch(name):
    model = small_models()[name]
    x = data_batch(model, 6, np.random.default_rng(0))
    expected = model.loss_and_grads(x, rng=np.random.default_rng(3))[0]
    terms = model.evaluate(x, rng=np.random.default_rng(3))
    for ours, theirs in zip(astuple(terms)[:3], astuple(expected)[:3]):  # the means (evaluate adds se)
        assert rel_error(ours, theirs) <= 1e-13


def test_evaluate_weights_slices_by_their_size():
    model = small_models()["ae"]
    x = data_batch(model, 7, np.random.default_rng(0))
    expected = model.loss_and_grads(x)[0]
    for ours, theirs in zip(astuple(model.evaluate(x, rng=np.random.default_rng(0), batch_size=3))[:3],
                            astuple(expected)[:3]):
        assert rel_error(ours, theirs) <= 1e-13


def test_every_preset_describes_itself():
    from npvae.models import MODELS
    from npvae.registry import UnknownName

    for name, cls in MODELS.items():
        assert cls.kind == name and len(cls.help) > 20, name
        model = cls(input_shape=(28, 28))
        assert type(model.config) is cls.config_class, name  # the config the command line's flags come from
    with pytest.raises(UnknownName, match="unknown model preset 'vea': expected one of vae, ae"):
        MODELS["vea"]
