"""The write-ups' recipes (:mod:`npvae.recipes`) and what they need: each builds the write-up's network and
validates; the conversions their derivations state hold numerically; ``loss_scale`` moves an optimizer's
step only through its epsilon; the fixed noisy copies; ``npvae train --recipe`` and its departures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npvae import data
from npvae.cli import build_parser, main
from npvae.cli.options import model_knobs, train_knobs
from npvae.cli.recipes import apply_recipe, record_recipe
from npvae.cli.train import new_run_config
from npvae.models import ConvDenoisingAutoencoder, DenoisingAutoencoder
from npvae.recipes import RECIPES
from npvae.train import Trainer, TrainConfig

WRITEUPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "writeups"


# ----------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_builds_the_write_ups_network_and_its_settings_validate(name):
    recipe = RECIPES[name]
    model = recipe.build()
    assert model.kind == recipe.model
    if recipe.parameters is not None:
        assert model.num_parameters == recipe.parameters
    else:  # no network in the write-up: the recipe says so and says what it chose
        assert any("gives no network" in text or "elides" in text for text in recipe.differs), recipe.differs
    config = recipe.train_config()
    assert config.recipe == name
    for key, value in recipe.train.items():
        assert getattr(config, key) == value, key
    knobs = model_knobs()
    for key, value in recipe.model_config.items():  # every model setting is an option the preset takes
        assert recipe.model in knobs[key].presets, key
        assert getattr(model.config, key) == value, key
    assert set(recipe.train) <= set(train_knobs())
    assert recipe.dataset is None or recipe.dataset in data.builtin_datasets()
    assert recipe.derivation.strip() and recipe.loss and recipe.network and recipe.data
    if WRITEUPS.is_dir():
        assert (WRITEUPS / recipe.writeup).is_file(), recipe.writeup


def test_the_recipes_cover_every_named_system():
    assert set(RECIPES) >= {"keras-conv-vae", "keras-conv-dae", "keras-doc-cleaner", "pytorch-mlp-ae",
                            "pytorch-conv-ae", "pytorch-vae", "poor-mans-vae", "cvae-learned-prior", "sparse-ae",
                            "contractive-ae", "linear-ae"}


def test_keras_conv_vae_is_the_write_ups_system():
    recipe = RECIPES["keras-conv-vae"]
    config, model = recipe.train_config(), recipe.build()
    assert model.config.beta == pytest.approx(0.392, rel=1e-12) and model.config.latent_dim == 2
    assert (config.optimizer, config.lr, config.rho, config.epsilon) == ("keras-rmsprop", 1e-3, 0.9, 1e-7)
    assert (config.batch_size, config.epochs, config.patience) == (16, 20, None)
    assert config.loss_scale == 1 / 784
    assert recipe.optimizer_text() == "keras-rmsprop lr 0.001, rho 0.9, epsilon 1e-07; loss x 1/784"


def test_keras_conv_vae_loss_is_784_times_the_write_ups():
    """The derivation checked on the model: the write-up's loss, computed from the model's own mu, logvar
    and decoder output with its formula (BCE mean over B x 784, 5e-4 * mean_j(...)), is npvae's / 784."""
    recipe = RECIPES["keras-conv-vae"]
    model = recipe.build(dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    x = (rng.random((4, 784)) < 0.3).astype(np.float64) * rng.random((4, 784))
    eps = rng.standard_normal((4, 2))
    terms, _ = model.loss_and_grads(x, eps=eps)
    mu, logvar = (a.copy() for a in model.posterior_forward(x))
    p = model.decode(mu + np.exp(0.5 * logvar) * eps).reshape(4, -1)
    bce = -(x * np.log(p) + (1 - x) * np.log1p(-p)).mean()  # over the flattened batch
    kl_term = -5e-4 * np.mean(1 + logvar - mu**2 - np.exp(logvar), axis=-1)  # (B,)
    written = np.mean(bce + kl_term)
    assert terms.total * recipe.train["loss_scale"] == pytest.approx(written, rel=1e-9)


def test_cvae_recipe_loss_is_the_write_ups_scaled():
    """MSELoss(mean) + 1e-5 * sum KL / B equals (unit-Gaussian NLL + 0.00392 KL) * 2/784 up to a constant."""
    recipe = RECIPES["cvae-learned-prior"]
    model = recipe.build(dtype=np.float64, seed=1)
    assert model.config.beta == pytest.approx(0.00392, rel=1e-12)
    rng = np.random.default_rng(2)
    x, y = rng.random((5, 784)), rng.integers(0, 10, 5)
    eps = rng.standard_normal((5, model.config.latent_dim))
    terms, _ = model.loss_and_grads(x, y, eps=eps)
    mu, logvar = (a.copy() for a in model.posterior_forward(x, y))
    se = ((model.decode(mu + np.exp(0.5 * logvar) * eps, y) - x) ** 2).sum(1)  # (B,)
    written = np.mean(se) / 784 + 1e-5 * terms.reg  # MSELoss(mean) + 1e-5 * sum KL / B
    constant = 784 * 0.5 * np.log(2 * np.pi)  # the unit Gaussian's normaliser per image: no gradient
    assert (terms.total - constant) * recipe.train["loss_scale"] == pytest.approx(written, rel=1e-9)


def test_poor_mans_recipe_penalty_is_one_norm_of_the_batch():
    recipe = RECIPES["poor-mans-vae"]
    model = recipe.build(dtype=np.float64)
    rng = np.random.default_rng(0)
    x, eps = rng.random((6, 784)), rng.standard_normal((6, 20))
    terms, _ = model.loss_and_grads(x, eps=eps)
    z = model.encode(x) + eps
    written = ((model.decode(z) - x) ** 2).sum() + np.sqrt((z**2).sum())  # MSE(sum) + z.pow(2).sum().sqrt()
    assert terms.total * len(x) == pytest.approx(written, rel=1e-9)


# ----------------------------------------------------------------------------- loss_scale


def _tiny_run(tmp_path, name, **settings):
    from npvae.models import Autoencoder

    rng = np.random.default_rng(0)
    x = rng.random((40, 6))
    model = Autoencoder(6, (5,), 2, "tanh", "sigmoid", (0.0, 1.0), dtype=np.float64, seed=0)
    dataset = data.Dataset.from_arrays(x, val_x=x[:8], name="tiny")
    config = TrainConfig(epochs=2, batch_size=8, pictures=False, patience=None, **settings)
    Trainer(model, dataset, config, tmp_path / name, progress=False, echo=lambda s: None).run()
    return model.params.data.copy()


def test_loss_scale_moves_rmsprop_only_through_epsilon_and_sgd_by_its_factor(tmp_path):
    c = 1 / 784
    scaled = _tiny_run(tmp_path, "a", optimizer="keras-rmsprop", rho=0.9, epsilon=1e-7, loss_scale=c)
    same = _tiny_run(tmp_path, "b", optimizer="keras-rmsprop", rho=0.9, epsilon=1e-7 / c**2)  # eps inside the root
    plain = _tiny_run(tmp_path, "c", optimizer="keras-rmsprop", rho=0.9, epsilon=1e-7)
    np.testing.assert_allclose(scaled, same, rtol=1e-9, atol=1e-12)
    assert np.abs(scaled - plain).max() > 1e-6  # the epsilon matters at this scale
    np.testing.assert_allclose(_tiny_run(tmp_path, "d", optimizer="sgd", lr=0.1, loss_scale=0.5),
                               _tiny_run(tmp_path, "e", optimizer="sgd", lr=0.05), rtol=1e-12, atol=1e-14)


def test_loss_scale_is_checked():
    with pytest.raises(ValueError, match="loss_scale"):
        TrainConfig(loss_scale=0.0).validate()
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe=3).validate()


# ----------------------------------------------------------------------------- fixed noisy copies


def test_noise_once_gives_each_image_one_fixed_copy():
    model = DenoisingAutoencoder(784, (8,), 2, "relu", "sigmoid", (0.0, 1.0), noise_level=0.1, noise_draws="once")
    x = np.random.default_rng(0).random((50, 784)).astype(np.float32)
    first = model.corrupt(x, None)
    again = model.corrupt(x[::-1].copy(), np.random.default_rng(9))[::-1]  # another batch order, another rng
    np.testing.assert_array_equal(first, again)
    hit = first != x
    assert 0.08 < hit.mean() < 0.12 and set(np.unique(first[hit])) <= {0.0, 1.0}
    assert not np.array_equal(hit[0], hit[1])  # each image its own draw
    other = DenoisingAutoencoder(784, (8,), 2, "relu", "sigmoid", (0.0, 1.0), noise_level=0.1, noise_draws="once",
                                 noise_seed=1)
    assert not np.array_equal(other.corrupt(x, None), first)
    float64 = DenoisingAutoencoder(784, (8,), 2, "relu", "sigmoid", (0.0, 1.0), noise_level=0.1, noise_draws="once",
                                   dtype=np.float64)
    np.testing.assert_array_equal(float64.corrupt(x.astype(np.float64), None), first)
    fresh = DenoisingAutoencoder(784, (8,), 2, "relu", "sigmoid", (0.0, 1.0), noise_level=0.1)
    assert not np.array_equal(fresh.corrupt(x, np.random.default_rng(1)), fresh.corrupt(x, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="noise_draws"):
        DenoisingAutoencoder(noise_draws="twice")


def test_noise_once_survives_the_spec_and_trains_the_same_on_every_pass():
    from npvae.models import from_spec

    model = ConvDenoisingAutoencoder(noise_level=0.1, noise_draws="once", noise_seed=4)
    rebuilt = from_spec(model.spec())
    assert (rebuilt.config.noise_draws, rebuilt.config.noise_seed) == ("once", 4)
    x = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    a, _ = model.loss_and_grads(x, rng=np.random.default_rng(1))
    b, _ = model.loss_and_grads(x, rng=np.random.default_rng(2))
    assert a == b


# ----------------------------------------------------------------------------- the linear autoencoder


def test_a_linear_autoencoder_from_the_command_line(tmp_path):
    args = build_parser().parse_args(["train", "--model", "ae", "--activation", "identity",
                                      "--output-activation", "identity"])
    assert (args.activation, args.output_activation) == ("identity", "identity")
    assert "conv-ae" not in model_knobs()["output_activation"].presets  # its output layer is the write-up's
    model = RECIPES["linear-ae"].build(dtype=np.float64)
    z = np.random.default_rng(0).standard_normal((3, model.config.latent_dim))
    lin = model.decode(2 * z) - model.decode(np.zeros_like(z))
    np.testing.assert_allclose(lin, 2 * (model.decode(z) - model.decode(np.zeros_like(z))), atol=1e-12)


# ----------------------------------------------------------------------------- the command line


def _train_args(argv):
    from npvae.cli.parser import explicit_dests

    args = build_parser().parse_args(["train", *argv])
    args.explicit = explicit_dests(["train", *argv])
    return args


def test_recipe_fills_the_options_and_reports_each_departure(capsys):
    args = _train_args(["--recipe", "keras-conv-vae", "--epochs", "1", "--rho", "0.99", "--seed", "3"])
    recipe, departures = apply_recipe(args)
    assert recipe.name == "keras-conv-vae" and args.model == "conv-vae" and args.dataset == "fashion-mnist"
    assert (args.batch_size, args.optimizer, args.epsilon, args.beta, args.patience) == (16, "keras-rmsprop", 1e-7,
                                                                                         0.392, 0)
    assert departures == ["--epochs 1 (the write-up trains 20)", "--rho 0.99 (the write-up's: 0.9)"]
    assert "departing from keras-conv-vae: --epochs 1 (the write-up trains 20)" in capsys.readouterr().out
    args = _train_args(["--recipe", "keras-conv-vae", "--latent-dim", "4", "--dataset", "mnist"])
    _, departures = apply_recipe(args)
    assert departures == ["--latent-dim 4 (the write-up's: 2)", "--dataset mnist (the write-up's: Fashion-MNIST)"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "vae"], "trains --model conv-vae"),
    (["--config", "x.json"], "--config"),
    (["--resume"], "--resume"),
])
def test_recipe_refuses_what_contradicts_it(argv, message):
    from npvae.cli.common import CLIError

    with pytest.raises(CLIError, match=message):
        apply_recipe(_train_args(["--recipe", "keras-conv-vae", *argv]))


def test_recipe_without_data_of_its_own_asks_for_it(capsys):
    assert main(["train", "--recipe", "keras-doc-cleaner"]) == 2
    assert "trains on your data" in capsys.readouterr().err


def test_recipes_command_lists_every_recipe_and_shows_one(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, recipe in RECIPES.items():
        assert f"{name}: {recipe.writeup}" in out
    assert main(["recipes", "keras-conv-vae"]) == 0
    out = capsys.readouterr().out
    assert "beta = 784 * 5e-4 * 2/2 = 0.392" in out and "keras-rmsprop lr 0.001, rho 0.9, epsilon 1e-07" in out
    assert main(["recipes", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_keras_conv_vae_recipe_on_small_data_and_info_shows_it(tmp_path, capsys):
    """The issue's check: the write-up's optimizer and batch on 90 demo digits, one epoch, no divergence;
    info shows the KL weight 0.392, Keras' RMSprop settings and the recipe with its departures."""
    small = tmp_path / "small.npz"
    np.savez(small, x=data.load_demo().train_x[:100])
    out = tmp_path / "run"
    assert main(["train", "--recipe", "keras-conv-vae", "--data", str(small), "--epochs", "1", "--out", str(out),
                 "--no-progress", "--no-pictures"]) == 0
    printed = capsys.readouterr().out
    assert "departing from keras-conv-vae: --epochs 1 (the write-up trains 20)" in printed
    assert main(["info", str(out / "checkpoint.npz"), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    tc = info["train_config"]
    assert (tc["optimizer"], tc["rho"], tc["epsilon"], tc["lr"], tc["batch_size"]) == ("keras-rmsprop", 0.9, 1e-7,
                                                                                       1e-3, 16)
    assert tc["recipe"] == "keras-conv-vae" and "--epochs 1" in tc["departures"]
    assert "beta=0.392" in info["description"]
    assert np.isfinite(info["best_val_loss"]) and info["best_val_loss"] < 544  # below the untrained ~784 log 2
    assert main(["info", str(out / "checkpoint.npz")]) == 0
    text = capsys.readouterr().out
    assert "recipe: keras-conv-vae" in text and "rho=0.9 epsilon=1e-07" in text and "beta=0.392" in text
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress", "--no-pictures"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "checkpoint.npz"), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)["train_config"]
    assert (resumed["recipe"], resumed["departures"], resumed["loss_scale"]) == (tc["recipe"], tc["departures"],
                                                                                 1 / 784)
    settings = tmp_path / "settings.json"  # a new run from its settings, without --recipe, follows none
    settings.write_text(json.dumps({"train_config": resumed}))
    config, _ = new_run_config(_train_args(["--config", str(settings)]))
    record_recipe(config, None, [])
    assert (config.recipe, config.departures, config.optimizer, config.loss_scale) == (None, None, "keras-rmsprop",
                                                                                       1 / 784)


def test_the_torch_bridge_computes_the_batch_norm_and_refuses_to_redraw_fixed_copies():
    torch = pytest.importorskip("torch")
    from npvae.models import PoorMansVAE
    from npvae.torch import to_torch

    model = PoorMansVAE(7, (6,), 3, code_penalty="batch", dtype=np.float64, seed=2)
    rng = np.random.default_rng(0)
    x, eps = rng.random((5, 7)), rng.standard_normal((5, 3))
    terms, _ = model.loss_and_grads(x, eps=eps)
    total, _, reg = to_torch(model).loss(torch.tensor(x), eps=torch.tensor(eps))
    assert total.item() == pytest.approx(terms.total, rel=1e-12) and reg.item() == pytest.approx(terms.reg, rel=1e-12)
    dae = to_torch(DenoisingAutoencoder(7, (6,), 3, noise_draws="once", dtype=np.float64))
    with pytest.raises(ValueError, match="fixed noisy copy"):
        dae.loss(torch.tensor(x))
