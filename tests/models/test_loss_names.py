"""Each model names its own loss and unit, and every report uses those names: an autoencoder's squared
error is never called a negative ELBO in nats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npvae.cli import main
from npvae.models import (CVAE, VAE, Autoencoder, ConvAutoencoder, ConvDenoisingAutoencoder, ConvDocumentDAE, ConvVAE,
                          Denoising, DenoisingAutoencoder, LossNames, PoorMansVAE)
from npvae.train import fit


@pytest.mark.parametrize("model, total, reg, unit", [
    (VAE(784, (8,), 2), "negative ELBO", "KL", "nats"),
    (VAE(784, (8,), 2, likelihood="gaussian"), "negative ELBO", "KL", "nats"),
    (VAE(784, (8,), 2, beta=0.5), "recon + 0.5 KL", "KL", "nats"),
    (CVAE(784, 10, (8,), 2, prior_hidden=(4,)), "negative conditional ELBO", "KL", "nats"),
    (Autoencoder(784, (8,), 2), "squared error", None, None),
    (DenoisingAutoencoder(784, (8,), 2), "squared error", None, None),
    (PoorMansVAE(784, (8,), 2), "squared error + code norm", "code norm", None),
    (ConvVAE(input_shape=(8, 8)), "negative ELBO", "KL", "nats"),
    (ConvVAE(input_shape=(8, 8), parameterization="log_sigma"), "negative ELBO", "KL", "nats"),
    (ConvVAE(input_shape=(8, 8), beta=5e-4), "recon + 0.0005 KL", "KL", "nats"),
    (ConvDenoisingAutoencoder(), "squared error", None, None),
    (ConvAutoencoder(), "squared error", None, None),
    (ConvDocumentDAE(input_shape=(8, 16)), "squared error", None, None),
])
def test_each_model_declares_its_loss_and_unit(model, total, reg, unit):
    names = model.loss_names
    assert isinstance(names, LossNames) and (names.total, names.reg, names.unit) == (total, reg, unit)


def test_the_denoisers_and_only_they_are_denoising():
    assert isinstance(ConvDenoisingAutoencoder(), Denoising) and isinstance(DenoisingAutoencoder(784, (8,), 2), Denoising)
    for model in (ConvAutoencoder(), ConvDocumentDAE(input_shape=(8, 16)), ConvVAE(input_shape=(8, 8)),
                  Autoencoder(784, (8,), 2)):
        assert not isinstance(model, Denoising), model.kind


def test_loss_names_format_the_terms_a_model_has():
    vae = LossNames("negative ELBO", "recon", "KL", "nats")
    assert vae.format(248.2, 230.1, 18.1) == "negative ELBO 248.20 nats (recon 230.10, KL 18.10)"
    assert LossNames("squared error", "squared error").format(41.3, 41.3, 0.0, digits=3) == "squared error 41.300"


def _lines_of_fit(model, x) -> list[str]:
    lines = []
    fit(model, x, epochs=1, batch_size=32, echo=lines.append)
    return lines


def test_the_training_lines_use_the_models_names():
    x = np.random.default_rng(0).random((64, 16)).astype(np.float32)
    (ae_line,) = _lines_of_fit(Autoencoder(16, (8,), 2, output_activation="sigmoid", value_range=(0, 1)), x)
    assert ae_line.startswith("epoch 1/1  squared error: train ")
    assert "ELBO" not in ae_line and "nats" not in ae_line and "KL" not in ae_line and "recon" not in ae_line
    (vae_line,) = _lines_of_fit(VAE(16, (8,), 2), x)
    assert vae_line.startswith("epoch 1/1  negative ELBO (nats): train ") and "KL" in vae_line
    images = np.random.default_rng(1).random((32, 8, 8)).astype(np.float32)
    (conv_vae_line,) = _lines_of_fit(ConvVAE(input_shape=(8, 8)), images)
    assert conv_vae_line.startswith("epoch 1/1  negative ELBO (nats): train ") and "KL" in conv_vae_line
    (conv_dae_line,) = _lines_of_fit(ConvDenoisingAutoencoder(), np.random.default_rng(2).random((32, 784)).astype(np.float32))
    assert conv_dae_line.startswith("epoch 1/1  squared error: train ")
    assert "ELBO" not in conv_dae_line and "nats" not in conv_dae_line and "KL" not in conv_dae_line


def test_the_cli_reports_a_denoising_autoencoder_by_its_own_loss(tmp_path, capsys):
    out = tmp_path / "dae"
    assert main(["train", "--model", "dae", "--dataset", "demo", "--epochs", "1", "--hidden", "16", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "ELBO" not in text and "nats" not in text, text
    assert "squared error: train" in text and "validation (this data has no separate test split): squared error" in text
    assert main(["evaluate", str(out / "best.npz"), "--n", "50", "--json"]) == 0
    text = capsys.readouterr().out
    assert "ELBO" not in text and "nats" not in text and "test: squared error" in text
    result = json.loads(text.strip().splitlines()[-1])
    assert result["loss_name"] == "squared error" and result["unit"] is None and result["loss"] == result["recon"]
