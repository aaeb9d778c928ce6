"""The sparse and contractive autoencoders from the command line: train, resume, evaluate, plot filters and
code histograms, on the demo digits (small codes, one epoch)."""

from __future__ import annotations

import json

import pytest

from npvae.checkpoint import load_checkpoint
from npvae.cli import main
from npvae.models import CVAE, Autoencoder, ContractiveAutoencoder, save_model
from tests.viz.test_figures_cli import assert_picture

pytestmark = pytest.mark.slow
SMALL = ["--dataset", "demo", "--latent-dim", "16", "--no-progress", "--no-pictures", "--epochs", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("regularized")
    assert main(["train", "--model", "contractive-ae", *SMALL, "--contraction-weight", "0.3",
                 "--out", str(out / "cae")]) == 0
    assert main(["train", "--model", "sparse-ae", *SMALL, "--sparsity-penalty", "l1", "--sparsity-weight", "0.02",
                 "--out", str(out / "sae")]) == 0
    return out


def evaluate_json(path, capsys, *extra) -> dict:
    assert main(["evaluate", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_settings_are_stored_and_kept_on_resume(runs):
    _, meta = load_checkpoint(runs / "cae" / "checkpoint.npz")
    assert meta["model"] == "contractive-ae" and meta["model_config"]["contraction_weight"] == 0.3
    _, meta = load_checkpoint(runs / "sae" / "checkpoint.npz")
    config = meta["model_config"]
    assert (config["sparsity_penalty"], config["sparsity_weight"], config["latent_dim"]) == ("l1", 0.02, 16)
    assert main(["train", "--model", "contractive-ae", *SMALL[:-1], "2", "--resume", "--out", str(runs / "cae")]) == 0
    _, meta = load_checkpoint(runs / "cae" / "checkpoint.npz")
    assert meta["epoch"] == 2 and meta["model_config"]["contraction_weight"] == 0.3


def test_evaluate_reports_sparsity_and_contraction(runs, capsys):
    cae = evaluate_json(runs / "cae" / "best.npz", capsys)
    # the penalty is the mean of ||J||_F^2, the report the mean of ||J||_F: Jensen orders them
    assert 0 < cae["mean_jacobian_frobenius"] ** 2 <= cae["reg"]
    assert cae["loss"] == pytest.approx(cae["recon"] + 0.3 * cae["reg"])
    sae = evaluate_json(runs / "sae" / "best.npz", capsys, "--near-zero", "0.1")
    assert sae["near_zero_threshold"] == 0.1 and 0 <= sae["code_near_zero"] <= 1
    assert sae["code_mean_abs"] == pytest.approx(sae["reg"] / 16)  # l1: sum of |h| over 16 units
    main(["evaluate", str(runs / "sae" / "best.npz")])
    text = capsys.readouterr().out
    assert "sparsity" in text and "near zero (|h| <= 0.05)" in text and "mean ||d code / d x||_F" in text


def test_filters_and_code_histogram(runs, tmp_path, capsys):
    for what in ("filters", "code-histogram"):
        out = tmp_path / f"{what}.png"
        assert main(["plot", str(runs / "sae" / "best.npz"), what, "--out", str(out)]) == 0
        assert_picture(out)
    assert "near zero (|h| <= 0.05)" in capsys.readouterr().out


def test_plain_autoencoders_are_measured_too_and_errors_are_clear(tmp_path, capsys):
    meta = {"dataset": "demo", "train_config": {"seed": 0, "binarize": "none"}}
    ae = save_model(Autoencoder(784, (32, 16), 3, value_range=(0.0, 1.0), output_activation="sigmoid"),
                    tmp_path / "ae.npz", meta)
    result = evaluate_json(ae, capsys, "--n", "50")
    assert result["mean_jacobian_frobenius"] > 0 and result["reg"] == 0
    cvae = save_model(CVAE(784, 10, (16,), 2, prior_hidden=(8,)), tmp_path / "cvae.npz", meta)
    assert main(["plot", str(cvae), "filters", "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "dense layer over 784 inputs" in err and "(16, 794)" in err
    small = save_model(ContractiveAutoencoder(100, latent_dim=4), tmp_path / "small.npz", meta)
    assert main(["plot", str(small), "filters", "--out", str(tmp_path / "f.png")]) == 2
    assert "(4, 100)" in capsys.readouterr().err
    assert main(["train", "--model", "vae", *SMALL, "--contraction-weight", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--contraction-weight applies to --model contractive-ae" in capsys.readouterr().err
    assert main(["train", "--model", "sparse-ae", *SMALL, "--sparsity-target", "2", "--out", str(tmp_path / "y")]) == 2
    assert "rho in (0, 1)" in capsys.readouterr().err
    assert main(["evaluate", str(ae), "--near-zero", "-1"]) == 2
    assert "--near-zero must be >= 0" in capsys.readouterr().err
