"""npvae.torch: every preset crosses to PyTorch and back with the same forward, the same gradients
(float64) and the same weights; parts replaced in torch come back as npvae layers; the round trip
of docs/torch.md runs as written.

Two independent witnesses: npvae's own forward and gradients, and (for the presets they cover) the
reference models of tests/torch_models.py, written from the math without npvae.torch.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npvae
from npvae import layers as L

torch = pytest.importorskip("torch")
from npvae.torch import LAYERS, NpvaeModule, from_torch, to_torch  # noqa: E402
from tests.torch_models import gradient_errors, gradients, reference_for, rel_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
F64 = np.float64
PRESETS = {
    "vae": lambda: npvae.VAE(12, (7, 5), 3, dtype=F64),
    "vae-gaussian-tanh": lambda: npvae.VAE(12, (7,), 3, "tanh", "gaussian", beta=0.5, dtype=F64),
    "vae-cb-softplus": lambda: npvae.VAE(12, (7,), 3, "softplus", "continuous_bernoulli", dtype=F64),
    "vae-bounds-leaky": lambda: npvae.VAE(12, (7,), 3, "leaky_relu", alpha=0.2, logvar_bounds=(-1.0, 0.5), dtype=F64),
    "vae-images": lambda: npvae.VAE(hidden=(7,), latent_dim=2, input_shape=(3, 4), dtype=F64),
    "cvae": lambda: npvae.CVAE(12, 4, (7,), 3, prior_hidden=(5,), dtype=F64),
    "cvae-fixed-prior": lambda: npvae.CVAE(12, 4, (7,), 3, learned_prior=False, dtype=F64),
    "cvae-linear-prior": lambda: npvae.CVAE(12, 4, (7,), 3, prior_hidden=(), beta=2.0, dtype=F64),
    "ae": lambda: npvae.Autoencoder(12, (7, 5), 2, dtype=F64),
    "dae": lambda: npvae.DenoisingAutoencoder(12, (7,), 2, dtype=F64),
    "dae-gaussian": lambda: npvae.DenoisingAutoencoder(12, (7,), 2, noise="gaussian", noise_level=0.3, dtype=F64),
    "poor": lambda: npvae.PoorMansVAE(12, (7,), 3, dtype=F64),
    "own-layers": lambda: npvae.VAE(
        encoder=L.Sequential(L.Flatten(), L.Dense(12, 6), L.Activation("tanh"), L.Dense(6, 5, "sigmoid")),
        decoder=L.Sequential(L.Dense(2, 6, "relu"), L.Dense(6, 12), L.Reshape((3, 4))),
        latent_dim=2, input_shape=(3, 4), dtype=F64),
    # the conv presets, on small images (conv-dae's stacks fit 12x20 as they fit 28x28; conv-ae's only 28x28)
    "conv-vae": lambda: npvae.ConvVAE(input_shape=(6, 8), latent_dim=2, dtype=F64),
    "conv-vae-log-sigma": lambda: npvae.ConvVAE(input_shape=(1, 6, 8), latent_dim=3, parameterization="log_sigma",
                                                beta=0.5, logvar_bounds=(-1.0, 0.5), dtype=F64),
    "conv-dae": lambda: npvae.ConvDenoisingAutoencoder(input_shape=(12, 20), dtype=F64),
    "conv-ae": lambda: npvae.ConvAutoencoder(784, dtype=F64),
    "conv-doc-dae": lambda: npvae.ConvDocumentDAE(input_shape=(6, 10), dtype=F64),
}
CONV = [name for name in PRESETS if name.startswith("conv-")]
examples = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def batch(model, b: int, seed: int):
    """x (B, *input_shape) in the model's range, labels (or None), eps (or None): one draw from ``seed``."""
    rng = np.random.default_rng(seed)
    lo, hi = model.value_range
    x = lo + (hi - lo) * rng.random((b, *model.input_shape))
    y = rng.integers(0, model.num_classes, b) if isinstance(model, npvae.Conditional) else None
    eps = rng.standard_normal((b, model.config.latent_dim)) if model.needs_noise else None
    return x, y, eps


def t(a):
    return None if a is None else torch.from_numpy(np.asarray(a))


def run_torch(module, model, x, y, eps, seed):
    """The module's per-example terms and its gradients of the batch-mean loss."""
    kw = {}
    if isinstance(model, npvae.DenoisingAutoencoder):  # the corruption npvae draws from rng(seed)
        kw["corrupted"] = t(model.corrupt(x, np.random.default_rng(seed)))
    module.zero_grad()
    recon, reg = module(t(x), t(y), t(eps), **kw)
    total = recon.mean() + module.reg_weight * reg.mean()
    total.backward()
    return recon.detach().numpy(), reg.detach().numpy(), gradients(module)


@pytest.mark.parametrize("name", PRESETS)
@examples
@given(b=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 3.0]))
def test_forward_and_gradients_match_npvae(name, b, seed, scale):
    model = PRESETS[name]()
    for p in model.parameters().values():
        p *= scale  # larger weights reach the activations' tails
    x, y, eps = batch(model, b, seed)
    module = to_torch(model)
    assert list(module.state_dict()) == list(model.state_dict())
    recon, reg, grads = run_torch(module, model, x, y, eps, seed)
    rng = np.random.default_rng(seed)
    terms, ours = model.loss_and_grads(x, y, eps=eps, rng=rng)
    ours = {k: v.copy() for k, v in ours.items()}
    ours_recon, ours_reg = model.forward(x, y, eps=eps, rng=np.random.default_rng(seed))
    assert rel_error(ours_recon, recon, 1.0) < 1e-12 and rel_error(ours_reg, reg, 1.0) < 1e-12
    assert terms.total == pytest.approx(recon.mean() + module.reg_weight * reg.mean(), rel=1e-12, abs=1e-12)
    errors = gradient_errors(ours, grads)
    assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("name", ["vae", "vae-gaussian-tanh", "vae-cb-softplus", "vae-bounds-leaky", "ae", "poor"])
def test_the_module_computes_what_the_reference_written_from_the_math_computes(name):
    model = PRESETS[name]()
    x, _, eps = batch(model, 6, 3)
    ref = reference_for(model)
    theirs = ref(t(x), t(eps)) if isinstance(model, npvae.VAE) else ref(t(x), t(x), t(eps))
    ours = to_torch(model)(t(x), eps=t(eps))
    for a, b in zip(ours, theirs):
        assert rel_error(a.detach().numpy(), b.detach().numpy(), 1.0) < 1e-12


@pytest.mark.parametrize("name", PRESETS)
def test_the_round_trip_keeps_spec_weights_and_inference(name):
    model = PRESETS[name]()
    module = to_torch(model)
    back = from_torch(module)
    assert type(back) is type(model) and back.spec() == model.spec() and back.dtype == model.dtype
    for key, value in model.state_dict().items():
        assert np.array_equal(back.state_dict()[key], value), key
    x, y, _ = batch(model, 5, 1)
    codes = model.codes(x, y)
    assert np.allclose(back.decode(codes, y), model.decode(codes, y), rtol=0, atol=1e-14)
    ours = module.decode(t(codes), t(y)).detach().numpy()
    assert np.allclose(ours, model.decode(codes, y), rtol=0, atol=1e-12)  # decode means the same in both
    copy = pickle.loads(pickle.dumps(module))  # torch.save(module) pickles it
    assert from_torch(copy).spec() == model.spec()
    encoded = module.encode(t(x), t(y))
    encoded = encoded[0] if isinstance(encoded, tuple) else encoded
    assert np.allclose(encoded.detach().numpy(), codes, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["vae", "cvae", "dae", "poor", "conv-vae", "conv-doc-dae"])
def test_weights_trained_in_torch_come_back(name):
    model = PRESETS[name]()
    module = to_torch(model, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    x, y, eps = batch(model, 8, 0)
    for _ in range(3):
        opt.zero_grad()
        module.loss(t(x).float(), t(y), None if eps is None else t(eps).float())[0].backward()
        opt.step()
    back = from_torch(module)
    assert back.dtype == np.float32
    for key, p in module.state_dict().items():
        assert np.array_equal(back.state_dict()[key], p.numpy()), key
    key = next(k for k in model.state_dict() if k.startswith("decoder."))  # the decoder's first weight
    assert not np.allclose(back.state_dict()[key], model.state_dict()[key])
    assert from_torch(module, dtype=np.float64).dtype == np.float64


def test_samples_follow_the_prior_and_the_labels():
    model = PRESETS["cvae"]()
    module = to_torch(model)
    images = module.sample(6, t(np.arange(6) % 4), generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 12) and ((images >= 0) & (images <= 1)).all()
    with pytest.raises(ValueError, match="pass its labels y"):
        module.sample(2)


def test_a_part_replaced_in_torch_comes_back_as_npvae_layers():
    model = PRESETS["vae"]()
    module = to_torch(model)
    module.encoder = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.LeakyReLU(0.1), torch.nn.Linear(9, 5),
                                         torch.nn.Softplus()).double()
    back = from_torch(module)
    assert back.config.hidden is None
    assert repr(back.parts["encoder"]) == ("Sequential(Dense(12 -> 9), Activation('leaky_relu', alpha=0.1), "
                                           "Dense(9 -> 5), Activation('softplus'))")
    x, _, eps = batch(back, 5, 2)
    with torch.no_grad():
        theirs = [a.numpy() for a in module(t(x), eps=t(eps))]
    ours = back.forward(x, eps=eps)
    assert all(rel_error(a, b, 1.0) < 1e-12 for a, b in zip(ours, theirs))
    assert from_torch(to_torch(back)).spec() == back.spec()  # own layers cross again


def test_what_cannot_cross_is_named():
    with pytest.raises(TypeError, match="from_torch reads the modules npvae.torch.to_torch builds"):
        from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="to_torch expects an npvae model"):
        to_torch(torch.nn.Linear(2, 2))
    module = to_torch(PRESETS["vae"]())
    module.encoder.append(torch.nn.Dropout(0.1))
    with pytest.raises(TypeError, match=r"encoder\.2 is a torch Dropout, which npvae has no layer for"):
        from_torch(module)
    module = to_torch(PRESETS["vae"]())
    module.encoder = torch.nn.Sequential(torch.nn.Linear(12, 4)).double()  # the heads read 5 features
    with pytest.raises(ValueError, match=r"the module.s heads is GaussianHeads\(5 -> 2 x 3\), but a VAE with these other parts has GaussianHeads\(4 -> 2 x 3\)"):
        from_torch(module)
    module = to_torch(PRESETS["vae"]())
    module.encoder[0] = torch.nn.Linear(12, 7, bias=False).double()
    with pytest.raises(ValueError, match="has no bias"):
        from_torch(module)

    for penalised in (npvae.SparseAutoencoder(12, (7,), 3), npvae.ContractiveAutoencoder(12, (7,), 3)):
        with pytest.raises(TypeError, match=f"npvae.torch has no module for {type(penalised).__name__}"):
            to_torch(penalised)

    class Negate(L.Layer, register=False):
        pass

    with pytest.raises(TypeError, match="no torch module for Negate: register one with npvae.torch.register_layer"):
        npvae.torch.layer_to_torch(Negate())


def test_every_npvae_layer_type_is_registered():
    assert {cls for cls in L.LAYER_TYPES.values() if cls.__module__ == L.__name__} <= set(LAYERS)


def test_every_activation_crosses_as_its_torch_module_names_it():
    a = torch.linspace(-30, 30, 121, dtype=torch.float64)[None]  # beyond nn.Softplus' threshold of 20
    for name, entry in npvae.ops.ACTIVATIONS.items():
        alpha = 0.2 if entry.takes_alpha else 0.01
        ours, _ = npvae.ops.activation_forward(a.numpy().copy(), name, alpha)
        module = getattr(torch.nn, entry.torch)(*([alpha] if entry.takes_alpha else []))
        assert npvae.torch.layer_from_torch(module).get_config() == {"name": name, "alpha": alpha}
        assert rel_error(npvae.torch.layer_to_torch(L.Activation(name, alpha))(a).numpy(), ours) < 1e-15, name
        assert rel_error(module(a).numpy(), ours) < 1e-8, name  # torch's own, nn.Softplus 2e-9 off above 20
    with pytest.raises(ValueError, match="npvae's softplus is Softplus with beta=1"):
        npvae.torch.layer_from_torch(torch.nn.Softplus(beta=2))


# ----------------------------------------------------------------------------- what torch shares


def _loss_pair(module, back, seed=2):
    x, _, eps = batch(back, 5, seed)
    with torch.no_grad():
        theirs = [a.numpy() for a in module(t(x), eps=t(eps))]
    return back.forward(x, eps=eps), theirs


def test_one_activation_module_at_two_places_comes_back_at_both():
    module = to_torch(PRESETS["vae"]())
    relu = torch.nn.ReLU()
    module.encoder = torch.nn.Sequential(torch.nn.Linear(12, 9), relu, torch.nn.Linear(9, 5), relu).double()
    back = from_torch(module)
    assert repr(back.parts["encoder"]) == ("Sequential(Dense(12 -> 9), Activation('relu'), Dense(9 -> 5), "
                                           "Activation('relu'))")
    ours, theirs = _loss_pair(module, back)
    assert all(rel_error(a, b, 1.0) < 1e-12 for a, b in zip(ours, theirs))


def test_a_module_with_parameters_at_two_places_is_refused_by_name():
    module = to_torch(PRESETS["vae"]())
    square = torch.nn.Linear(9, 9)
    module.encoder = torch.nn.Sequential(torch.nn.Linear(12, 9), square, torch.nn.ReLU(), square,
                                         torch.nn.Linear(9, 5)).double()
    with pytest.raises(ValueError, match=r"^encoder\.3 is the module encoder\.1 again \(one Linear at two places"):
        from_torch(module)


def test_tied_parameters_are_refused_by_name():
    module = to_torch(PRESETS["vae"]())
    module.logvar.weight = module.mu.weight  # both (3, 5)
    with pytest.raises(ValueError, match=r"^logvar\.weight and mu\.weight are one tensor \(tied parameters\)"):
        from_torch(module)
    module = to_torch(PRESETS["vae"]())
    module.logvar.weight = torch.nn.Parameter(module.mu.weight.data)  # two Parameters, one memory
    with pytest.raises(ValueError, match=r"^logvar\.weight and mu\.weight are one tensor"):
        from_torch(module)


def test_a_head_assigned_in_torch_is_registered_once_and_is_the_one_that_runs():
    model = PRESETS["vae"]()
    module = to_torch(model)
    module.mu = torch.nn.Linear(5, 3).double()
    assert list(module.state_dict()) == list(model.state_dict())
    assert sum(1 for _ in module.parameters()) == len(model.state_dict())
    back = from_torch(module)
    assert np.array_equal(back.state_dict()["mu.weight"], module.mu.weight.detach().numpy())
    ours, theirs = _loss_pair(module, back)
    assert all(rel_error(a, b, 1.0) < 1e-12 for a, b in zip(ours, theirs))
    module.mu = torch.nn.Linear(5, 4).double()
    with pytest.raises(ValueError, match=r"the heads differ \(mu 5 -> 4 and logvar 5 -> 3\)"):
        from_torch(module)
    module.mu = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"mu is Sequential\(Dense\(5 -> 3\)\): npvae's Gaussian heads are affine"):
        from_torch(module)


def test_importing_npvae_never_imports_torch():
    code = "import sys, npvae, npvae.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


def docs_section(title: str) -> list[str]:
    """The ```python blocks of docs/torch.md's section under ``## title``."""
    text = (REPO / "docs" / "torch.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.mark.slow
def test_the_documented_round_trip_runs_as_written(tmp_path, monkeypatch):
    blocks = docs_section("Train here on a CPU, continue in PyTorch on a GPU")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks:  # the second block continues the first
        exec(compile(code, "docs/torch.md", "exec"), namespace)
    assert isinstance(namespace["module"], NpvaeModule) and isinstance(namespace["model"], npvae.CVAE)
    assert namespace["sevens"].shape == (8, 28, 28)
    model, _ = npvae.load_model(tmp_path / "vae.npz")
    assert model.spec() == npvae.VAE(input_shape=(28, 28), hidden=(400,), latent_dim=20).spec()


# ----------------------------------------------------------------------------- the image layers


@st.composite
def image_layers(draw):
    """One npvae image layer of any registered type and its input shape (C, H, W); "same" paddings at
    every stride, odd and even sizes, kernels smaller than strides (a transposed "same" then appends)."""
    kind = draw(st.sampled_from(["Conv2d", "ConvTranspose2d", "MaxPool2d", "Upsample2d"]))
    pair = st.tuples(st.integers(1, 4), st.integers(1, 4))
    kernel, stride = draw(pair), draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    padding = draw(st.sampled_from(["same", "same", "same", 0, 1, (1, 0), (0, 2), "valid"]))  # "same" the most
    act = draw(st.sampled_from(["identity", "relu", "tanh", "softplus"]))
    try:
        if kind == "Conv2d":
            layer = L.Conv2d(2, 3, kernel, stride, padding, act)
        elif kind == "ConvTranspose2d":
            out_pad = (0, 0) if isinstance(padding, str) else draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
            layer = L.ConvTranspose2d(2, 3, kernel, stride, padding, out_pad, act)
        elif kind == "MaxPool2d":
            layer = L.MaxPool2d(kernel, draw(st.sampled_from([None, stride])), padding)
        else:
            layer = L.Upsample2d(stride)
        in_shape = (2, draw(st.integers(1, 7)), draw(st.integers(1, 7)))
        layer.output_shape(in_shape)
    except ValueError:  # a kernel larger than the padded image, output_padding >= stride, ...
        from hypothesis import reject
        reject()
    return layer, in_shape


def bound(layer, rng):
    """A single npvae layer bound to float64 parameters drawn from rng (as a model binds it)."""
    params = {k: rng.standard_normal(s) for k, s in layer.param_shapes().items()}
    grads = {k: np.zeros(s) for k, s in layer.param_shapes().items()}
    layer.bind(params, grads, L.Workspace(F64), "layer")
    return layer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=image_layers(), b=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_each_image_layer_crosses_with_its_forward_and_gradients(case, b, seed):
    layer, in_shape = case
    rng = np.random.default_rng(seed)
    bound(layer, rng)
    module = npvae.torch.layer_to_torch(layer).double()
    assert [k for k, _ in module.named_parameters()] == list(layer.param_shapes())
    module.load_state_dict({k: t(v.copy()) for k, v in layer.params.items()} if layer.param_shapes() else {})
    x = rng.standard_normal((b, *in_shape))
    y = layer.forward(x).copy()
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy).copy()
    tx = t(x).requires_grad_(True)
    ty = module(tx)
    (ty * t(dy)).sum().backward()
    assert ty.shape == y.shape and rel_error(y, ty.detach().numpy(), 1.0) < 1e-12
    assert rel_error(dx, tx.grad.numpy(), 1.0) < 1e-10
    for name, p in module.named_parameters():
        assert rel_error(layer.grads[name], p.grad.numpy(), 1.0) < 1e-10, name
    assert L.layer_spec(npvae.torch.layer_from_torch(module)) == L.layer_spec(layer)


def test_the_conv_modules_compute_what_the_references_written_from_the_write_ups_compute():
    """tests/torch_models.py's conv presets (torch's own modules, Keras' "same" padded explicitly) with
    npvae's weights: the same per-example terms and the same gradients as the translated modules."""
    from tests.torch_models import (TorchConvVAE, load_in_order, squared_error_loss, torch_conv_ae, torch_conv_dae,
                                    torch_conv_doc_dae)

    cases = [(npvae.ConvVAE(64, latent_dim=2, dtype=F64), lambda: TorchConvVAE(8, 2)),
             (npvae.ConvVAE(64, latent_dim=3, parameterization="log_sigma", beta=0.5, dtype=F64),
              lambda: TorchConvVAE(8, 3, "log_sigma", 0.5)),
             (npvae.ConvDenoisingAutoencoder(144, dtype=F64), lambda: torch_conv_dae(12)),
             (npvae.ConvAutoencoder(784, dtype=F64), torch_conv_ae),
             (npvae.ConvDocumentDAE(input_shape=(6, 10), dtype=F64), lambda: torch_conv_doc_dae(6, 10))]
    for model, build in cases:
        ref = load_in_order(build(), model.state_dict())
        module = to_torch(model)
        x, _, eps = batch(model, 4, 5)
        rows = t(x.reshape(len(x), -1))
        if isinstance(model, npvae.VAE):
            ours, theirs = module(t(x), eps=t(eps)), ref(rows, t(eps))
            for a, b in zip(ours, theirs):
                assert rel_error(a.detach().numpy(), b.detach().numpy(), 1.0) < 1e-12, type(model).__name__
            loss_ours, loss_theirs = module.loss(t(x), eps=t(eps))[0], ref.loss(rows, t(eps))[0]
        else:
            ours = module(t(x), corrupted=t(x)) if isinstance(model, npvae.DenoisingAutoencoder) else module(t(x))
            loss_ours, loss_theirs = ours[0].mean(), squared_error_loss(ref, rows, rows)
        assert float(loss_ours) == pytest.approx(float(loss_theirs), rel=1e-12)
        loss_ours.backward()
        loss_theirs.backward()
        theirs = dict(zip(model.state_dict(), (p.grad.numpy() for p in ref.parameters())))
        errors = gradient_errors(gradients(module), theirs)
        assert max(errors.values()) < 1e-9, (type(model).__name__, errors)


def test_a_decoder_of_torch_s_own_image_modules_comes_back_as_npvae_layers():
    nn = torch.nn
    model = PRESETS["conv-doc-dae"]()
    module = to_torch(model)
    module.decoder = nn.Sequential(
        nn.Unflatten(1, (64, 3, 5)), nn.Conv2d(64, 4, 3, padding="same"), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.ConvTranspose2d(4, 3, 3, padding=1), nn.Tanh(),
        nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(3, 2, (2, 4), padding="same"), nn.Softplus(),
        nn.Conv2d(2, 1, 3, padding=(1, 1)), nn.Sigmoid(), nn.Flatten(), nn.Unflatten(1, (6, 10))).double()
    back = from_torch(module)
    assert repr(back.parts["decoder"]) == (
        "Sequential(Reshape((64, 3, 5)), Conv2d(64 -> 4, 3x3, padding 'same'), Activation('relu'), Upsample2d(2), "
        "ConvTranspose2d(4 -> 3, 3x3, padding 1), Activation('tanh'), MaxPool2d(3x3, stride (1, 1), padding 1), "
        "Conv2d(3 -> 2, 2x4, padding 'same'), Activation('softplus'), Conv2d(2 -> 1, 3x3, padding 1), "
        "Activation('sigmoid'), Flatten(), Reshape((6, 10)))")
    x, _, _ = batch(back, 3, 4)
    with torch.no_grad():
        theirs = module(t(x))[0].numpy()
    assert rel_error(back.forward(x)[0], theirs, 1.0) < 1e-12
    assert from_torch(to_torch(back)).spec() == back.spec()


def test_image_modules_npvae_cannot_read_are_named():
    from tests.torch_models import SameConv2d

    nn = torch.nn
    read = npvae.torch.layer_from_torch
    with pytest.raises(TypeError, match="module is a SameConv2d, a torch Conv2d with a forward of its own"):
        read(SameConv2d(1, 2, 3))
    with pytest.raises(ValueError, match="groups=1, dilation=1 and padding_mode='zeros'"):
        read(nn.Conv2d(1, 2, 3, dilation=2))
    with pytest.raises(ValueError, match="groups=1, dilation=1 and padding_mode='zeros'"):
        read(nn.ConvTranspose2d(2, 2, 3, groups=2))
    with pytest.raises(ValueError, match="has no bias"):
        read(nn.Conv2d(1, 2, 3, bias=False))
    with pytest.raises(ValueError, match="ceil_mode=False"):
        read(nn.MaxPool2d(2, ceil_mode=True))
    for bad in (nn.Upsample(scale_factor=2, mode="bilinear"), nn.Upsample(size=(4, 4)), nn.Upsample(scale_factor=1.5)):
        with pytest.raises(ValueError, match="integer factors"):
            read(bad)
