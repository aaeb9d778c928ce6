"""The convolutional presets (:mod:`npvae.models.convnets`) against torch models written from the write-ups.

1. Each preset's parameters load, in order and shape for shape, into the write-up's architecture as a
   torch ``nn.Sequential`` (tests/torch_models.py); with the same noise, the loss and every gradient
   agree in float64 (loss 1e-12, gradients 1e-9 relative to each gradient's scale), both backends.
2. The log-sigma parameterization is the logvar one with the second head halved: same loss, the
   head's gradient doubled.
3. Specs and checkpoints rebuild the presets; the presets' shape errors name the layer and the shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

from npvae.backend import numba_available, use_backend
from npvae.models import (MODELS, ConvAutoencoder, ConvDenoisingAutoencoder, ConvDocumentDAE, ConvVAE, from_spec,
                          load_model, save_model)

torch = pytest.importorskip("torch")
from tests.torch_models import (TorchConvVAE, load_in_order, rel_error, squared_error_loss,  # noqa: E402
                                torch_conv_ae, torch_conv_dae, torch_conv_doc_dae)

BACKENDS = ("numpy", "numba") if numba_available() else ("numpy",)
LOSS_TOL, GRAD_TOL = 1e-12, 1e-9


def _data(model, batch, rng):
    lo, hi = model.value_range
    return lo + (hi - lo) * rng.random((batch, *model.input_shape))


def _grads_agree(ours: dict, ref: torch.nn.Module) -> None:
    theirs = [p.grad.numpy() for p in ref.parameters()]
    assert len(theirs) == len(ours)
    for (key, g), t in zip(ours.items(), theirs):
        assert rel_error(g, t) <= GRAD_TOL, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parameterization", ["logvar", "log_sigma"])
def test_conv_vae_matches_torch(backend, parameterization):
    model = ConvVAE(latent_dim=3, parameterization=parameterization, beta=0.7, dtype=np.float64, seed=1)
    assert list(model.state_dict())[10:12] == ["mu.weight", "mu.bias"]
    assert list(model.state_dict())[12] == f"{parameterization}.weight"
    rng = np.random.default_rng(0)
    x, eps = _data(model, 3, rng), rng.standard_normal((3, 3))
    with use_backend(backend):
        terms, grads = model.loss_and_grads(x, eps=eps)
    ref = load_in_order(TorchConvVAE(28, 3, parameterization, beta=0.7), model.state_dict())
    total, recon, kl = ref.loss(torch.tensor(x), torch.tensor(eps))
    total.backward()
    assert rel_error(terms.total, total.item()) <= LOSS_TOL
    assert rel_error(terms.reg, kl.item()) <= LOSS_TOL
    _grads_agree(grads, ref)


def test_log_sigma_is_logvar_with_the_head_halved():
    """h = log sigma reads as logvar = 2 h in the sampler and the KL alike: a log-sigma model equals the
    logvar model whose second head is twice as large, and its head's gradient is twice that model's."""
    sigma = ConvVAE(latent_dim=2, parameterization="log_sigma", dtype=np.float64, seed=3)
    logvar = ConvVAE(latent_dim=2, dtype=np.float64)
    state = sigma.state_dict()
    logvar.load_state_dict({k.replace("log_sigma", "logvar"): 2 * v if k.startswith("log_sigma") else v
                            for k, v in state.items()})
    rng = np.random.default_rng(1)
    x, eps = _data(sigma, 2, rng), rng.standard_normal((2, 2))
    a, ga = sigma.loss_and_grads(x, eps=eps)
    b, gb = logvar.loss_and_grads(x, eps=eps)
    assert rel_error(a.total, b.total) <= LOSS_TOL
    for key in ga:
        other = key.replace("log_sigma", "logvar")
        expected = 2 * gb[other] if key.startswith("log_sigma") else gb[other]
        assert rel_error(ga[key], expected) <= GRAD_TOL, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_dae_matches_torch_with_the_same_noise(backend):
    model = ConvDenoisingAutoencoder(noise_level=0.3, dtype=np.float64, seed=2)
    assert model.config.latent_dim == 16 * 4 * 4
    rng = np.random.default_rng(5)
    x = _data(model, 2, rng)
    with use_backend(backend):
        terms, grads = model.loss_and_grads(x, rng=np.random.default_rng(9))
    noisy = model.corrupt(model.check_input(x), np.random.default_rng(9))  # what loss_and_grads drew
    ref = load_in_order(torch_conv_dae(), model.state_dict())
    loss = squared_error_loss(ref, torch.tensor(noisy), torch.tensor(x))
    loss.backward()
    assert rel_error(terms.total, loss.item()) <= LOSS_TOL
    _grads_agree(grads, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_ae_matches_torch(backend):
    model = ConvAutoencoder(dtype=np.float64, seed=4)
    assert model.value_range == (-1.0, 1.0) and model.config.latent_dim == 8 * 2 * 2
    x = _data(model, 3, np.random.default_rng(2))
    with use_backend(backend):
        terms, grads = model.loss_and_grads(x)
    ref = load_in_order(torch_conv_ae(), model.state_dict())
    loss = squared_error_loss(ref, torch.tensor(x), torch.tensor(x))
    loss.backward()
    assert rel_error(terms.total, loss.item()) <= LOSS_TOL
    _grads_agree(grads, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_doc_dae_matches_torch_on_pairs_of_any_even_size(backend):
    model = ConvDocumentDAE(input_shape=(6, 10), dtype=np.float64, seed=5)
    rng = np.random.default_rng(3)
    noisy, clean = _data(model, 2, rng), _data(model, 2, rng)
    with use_backend(backend):
        terms, grads = model.loss_and_grads(noisy, target=clean)
    ref = load_in_order(torch_conv_doc_dae(6, 10), model.state_dict())
    loss = squared_error_loss(ref, torch.tensor(noisy.reshape(2, -1)), torch.tensor(clean))
    loss.backward()
    assert rel_error(terms.total, loss.item()) <= LOSS_TOL
    _grads_agree(grads, ref)


@pytest.mark.parametrize("make", [lambda: ConvVAE(parameterization="log_sigma", beta=5e-4),
                                  ConvDenoisingAutoencoder, ConvAutoencoder,
                                  lambda: ConvDocumentDAE(input_shape=(8, 12))])
def test_presets_rebuild_from_spec_and_checkpoint(make, tmp_path):
    model = make()
    assert MODELS[model.kind] is type(model)
    again = from_spec(model.spec(), seed=7)
    assert repr(again) == repr(model) and repr(again.encoder) == repr(model.encoder)
    save_model(model, tmp_path / "m.npz")
    loaded, _ = load_model(tmp_path / "m.npz")
    x = _data(model, 2, np.random.default_rng(0)).astype(np.float32)
    np.testing.assert_array_equal(loaded.reconstruct(x), model.reconstruct(x))


def test_presets_take_rows_images_and_channel_images():
    rows, images, channels = (ConvDenoisingAutoencoder(input_shape=s) for s in ((784,), (28, 28), (1, 28, 28)))
    x = np.random.default_rng(0).random((2, 28, 28)).astype(np.float32)
    out = [m.reconstruct(x.reshape(2, *m.input_shape)) for m in (rows, images, channels)]
    assert out[0].shape == (2, 784) and out[1].shape == (2, 28, 28) and out[2].shape == (2, 1, 28, 28)


def test_preset_shape_errors_name_the_layer_and_the_shapes():
    with pytest.raises(ValueError, match=r"conv-dae: the write-up's layers turn images of shape \(1, 32, 32\) into "
                                         r"\(1, 28, 28\)"):
        ConvDenoisingAutoencoder(input_shape=(32, 32))
    with pytest.raises(ValueError, match=r"conv-dae takes single-channel images .* got \(B, 3, 28, 28\)"):
        ConvDenoisingAutoencoder(input_shape=(3, 28, 28))
    with pytest.raises(ValueError, match=r"rows of 700 values, not a square"):
        ConvVAE(input_dim=700)
    with pytest.raises(ValueError, match=r"conv-doc-dae .* needs an even height and width; got images of 9x12"):
        ConvDocumentDAE(input_shape=(9, 12))
    with pytest.raises(ValueError, match=r"layer 2 MaxPool2d\(2x2\) on inputs \(B, 16, 1, 1\): max_pool2d: kernel 2x2 "
                                         r"is larger than the padded input 1x1"):
        ConvAutoencoder(input_shape=(1, 1))
    with pytest.raises(ValueError, match=r"conv-ae's code is its encoder's output \(32 values .*\); a latent_dim of 5"):
        ConvAutoencoder(latent_dim=5)
    with pytest.raises(ValueError, match="hidden widths do not apply"):
        ConvVAE(hidden=(400,))
    with pytest.raises(ValueError, match="unknown parameterization 'sigma'"):
        ConvVAE(parameterization="sigma")
    model = ConvVAE()
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 784\) with B >= 1.*got \(2, 1, 32, 32\)"):
        model.loss_and_grads(np.zeros((2, 1, 32, 32)), rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- the command line


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["conv-vae", "conv-dae", "conv-ae"])
def test_cli_trains_a_conv_preset_and_draws_its_pictures(preset, tmp_path, capsys):
    from npvae.cli import main
    from npvae.data import load_dataset

    images = load_dataset("demo").train_x[:96].reshape(96, 28, 28)  # image-shaped uint8 data, as a user's folder gives it
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "run"
    assert main(["train", "--model", preset, "--data", str(tmp_path / "x.npy"), "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    model, meta = load_model(out / "checkpoint.npz")
    assert model.kind == preset and model.input_shape == (28, 28)
    expected_batch = {"conv-dae": 2048}.get(preset, 128)  # the write-up's default for conv-dae
    assert meta["train_config"]["batch_size"] == expected_batch
    assert meta["train_config"]["patience"] == {"conv-dae": 10}.get(preset, 5)
    for name in ("best.npz", "log.jsonl", "reconstructions.png"):
        assert (out / name).exists(), name
    assert (out / "samples.png").exists() == (preset == "conv-vae")  # an autoencoder has no prior to sample
    assert main(["sample", str(out / "checkpoint.npz"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", str(out / "checkpoint.npz"), "--n", "3", "--out", str(tmp_path / "r.png")]) == 0
    if preset == "conv-vae":
        assert main(["plot", str(out / "checkpoint.npz"), "manifold", "--n", "3", "--out", str(tmp_path / "m.png")]) == 0
        assert main(["plot", str(out / "checkpoint.npz"), "latent", "--out", str(tmp_path / "l.png")]) == 0
    capsys.readouterr()
    assert main(["train", "--model", preset, "--data", str(tmp_path / "x.npy"), "--hidden", "8", "--epochs", "1",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "--hidden sets MLP widths" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_conv_doc_dae_on_pairs(tmp_path):
    from npvae.cli import main

    rng = np.random.default_rng(0)
    clean = (rng.random((40, 8, 12)) < 0.3).astype(np.float32)  # "pages": ink on paper
    noisy = np.clip(clean + 0.3 * rng.random(clean.shape, dtype=np.float32), 0, 1)
    np.savez(tmp_path / "pages.npz", x=noisy, target=clean)
    out = tmp_path / "run"
    assert main(["train", "--model", "conv-doc-dae", "--data", str(tmp_path / "pages.npz"), "--epochs", "2",
                 "--out", str(out), "--no-progress"]) == 0
    model, meta = load_model(out / "best.npz")
    assert model.kind == "conv-doc-dae" and model.input_shape == (8, 12)
    assert meta["train_config"]["batch_size"] == 16 and (out / "reconstructions.png").exists()
    np.savez(tmp_path / "odd.npz", x=noisy[:, :7], target=clean[:, :7])
    assert main(["train", "--model", "conv-doc-dae", "--data", str(tmp_path / "odd.npz"), "--epochs", "1",
                 "--out", str(tmp_path / "odd"), "--no-progress"]) == 2


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
def test_conv_vae_steady_state_step_allocates_no_arrays():
    """After warm-up, a conv-VAE step (forward, backward, Adam) allocates nothing of array size: every
    column matrix, padded copy and gradient comes from the workspace. One (32, 784) float32 temporary
    alone would be 100,352 bytes; the allowance covers the Python objects of a step. Nothing
    accumulates either: what is held after the 3rd measured step is held after the 8th.
    (gc.collect() empties the interpreter's free lists, which tracemalloc otherwise counts as held.)"""
    import gc
    import tracemalloc

    from npvae import optim

    with use_backend("numba"):
        model = ConvVAE(latent_dim=4, seed=0)
        opt = optim.Adam(model.params.data, model.params.grad, 1e-3)
        rng = np.random.default_rng(0)
        x = rng.random((32, 784), dtype=np.float32)
        for _ in range(3):
            model.loss_and_grads(x, rng=rng, check=False)
            opt.step()
        held = []
        tracemalloc.start()
        try:
            for _ in range(8):
                gc.collect()
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                model.loss_and_grads(x, rng=rng, check=False)
                opt.step()
                peak = tracemalloc.get_traced_memory()[1]
                assert peak - before < 32_768, f"a step allocated {peak - before} bytes at its peak"
                gc.collect()
                held.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
    assert held[-1] - held[2] < 1024, f"the heap grew by {held[-1] - held[2]} bytes in 5 steps"
