"""A newcomer's first hour (issue 25): what someone meets trying the README, their own data, the Python
API and the minimal install, each the way it once went wrong."""

from __future__ import annotations

import numpy as np
import pytest

import npvae
from npvae.cli import main
from npvae.models import VAE


# ----------------------------------------------------------------------------- 1. data viewed in the model's shape


@pytest.fixture(scope="module")
def square_vae(tmp_path_factory):
    """A model saved with input_shape=(28, 28), as the README's PyTorch round trip saves one."""
    path = tmp_path_factory.mktemp("square") / "square.npz"
    npvae.save_model(VAE(input_shape=(28, 28), hidden=(16,), latent_dim=2, seed=0), path)
    return path


@pytest.mark.parametrize("model_shape, data_shape", [((28, 28), (5, 784)), ((784,), (5, 28, 28)),
                                                     ((784,), (5, 1, 28, 28))])
@pytest.mark.parametrize("method", ["encode", "reconstruct", "evaluate", "loss_and_grads"])
def test_methods_view_rows_of_the_models_size_in_its_shape(model_shape, data_shape, method):
    model = VAE(input_shape=model_shape, hidden=(8,), latent_dim=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).random(data_shape)
    as_model = x.reshape(len(x), *model_shape)
    kwargs = {"rng": np.random.default_rng(2)} if method in ("evaluate", "loss_and_grads") else {}
    got = getattr(model, method)(x, **kwargs)
    kwargs = {"rng": np.random.default_rng(2)} if kwargs else {}
    want = getattr(model, method)(as_model, **kwargs)
    for a, b in zip(np.atleast_1d(got[0] if method == "loss_and_grads" else got),
                    np.atleast_1d(want[0] if method == "loss_and_grads" else want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_trains_a_flat_model_on_square_images():
    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    model = VAE(hidden=(8,), latent_dim=2, seed=0)
    result = npvae.fit(model, x, epochs=1, batch_size=16)
    assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("command", [["evaluate"], ["reconstruct", "--n", "4"], ["plot", "_", "latent", "--n", "50"],
                                     ["plot", "_", "kl", "--n", "50"], ["plot", "_", "interpolation"]])
def test_cli_uses_a_square_model_on_flat_builtin_data(square_vae, tmp_path, command):
    argv = [command[0], str(square_vae), *[a for a in command[1:] if a != "_"], "--dataset", "demo"]
    if command[0] != "evaluate":
        argv += ["--out", str(tmp_path / "out.png")]
    assert main(argv) == 0


@pytest.mark.slow
def test_cli_evaluates_a_flat_model_on_square_images(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
                 "--no-progress", "--out", str(run)]) == 0
    images = npvae.data.load_demo().test_x[:50].reshape(-1, 28, 28)  # (N, 28, 28) uint8: a user's PNGs
    np.savez(tmp_path / "images.npz", x=images)
    capsys.readouterr()
    assert main(["evaluate", str(run / "checkpoint.npz"), "--data", str(tmp_path / "images.npz"), "--split", "all"]) == 0
    assert "negative ELBO" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 5. uint8 and the default rng


@pytest.fixture(scope="module")
def pixels():
    return npvae.data.load_demo().test_x[:20]  # (20, 784) uint8


@pytest.mark.parametrize("method", ["encode", "codes", "reconstruct", "evaluate"])
def test_every_method_reads_uint8_as_fit_does(pixels, method):
    from npvae.train import prepare_split

    model = VAE(hidden=(8,), latent_dim=2, seed=0)
    scaled = prepare_split(pixels, model, "none", 0)  # what fit() and the trainer feed the model
    got, want = getattr(model, method)(pixels), getattr(model, method)(scaled)
    for a, b in zip(np.atleast_1d(got), np.atleast_1d(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decompose_gradients_reads_uint8(pixels):
    from npvae.study.gradflow import decompose_gradients

    model = VAE(hidden=(8,), latent_dim=2, dtype=np.float64, seed=0)
    eps = np.random.default_rng(0).standard_normal((len(pixels), 2))
    got = decompose_gradients(model, pixels, eps)
    want = decompose_gradients(model, pixels / 255.0, eps)
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["vae", "cvae", "ae"])
def test_sample_and_evaluate_without_an_rng_are_seeded(pixels, preset):
    from npvae.models import MODELS
    from npvae.models.base import DEFAULT_SEED

    model = MODELS[preset](seed=0)
    assert np.array_equal(model.sample(16), model.sample(16))
    assert np.array_equal(model.sample(16), model.sample(16, np.random.default_rng(DEFAULT_SEED)))
    y = np.arange(len(pixels)) % 10
    assert model.evaluate(pixels, y) == model.evaluate(pixels, y, np.random.default_rng(DEFAULT_SEED))
