"""scripts/estimator_study.py end to end with tiny sizes: the SNR and landing parts on the demo digits and
the linear Gaussian model, and the likelihood part's pieces (the README's reproductions)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from tests.helpers import load_script

study = load_script("estimator_study")


def test_the_linear_gaussian_encoder_is_the_exact_posterior():
    model, exact, w = study.linear_gaussian(6, 2, 0)
    params = model.parameters()
    for key, value in exact.items():
        params[key][...] = value
    x = np.random.default_rng(0).random((3, 6))
    assert study.posterior_kl(model, x, exact) == pytest.approx(0.0, abs=1e-12)
    # The posterior of N(0, I) and N(x | W z + b, I): precision I + W^T W, mean (I + W^T W)^-1 W^T (x - b)
    precision = np.eye(2) + w.T @ w
    mu, logvar = model.encode(x)
    b = params["decoder.0.bias"]
    np.testing.assert_allclose(mu, np.linalg.solve(precision, w.T @ (x - b).T).T, rtol=1e-12)
    np.testing.assert_allclose(np.exp(logvar[0]), np.diag(np.linalg.inv(precision)), rtol=1e-12)


def test_rainforths_gaussian_model_has_the_stated_posterior():
    from npvae.study.gradflow import sample_draws

    d = 5
    model, x, kl = study.rainforth_gaussian(d, 0.0, 0)
    # q = N((x - b) / 2, 2/3 I) against p(z|x) = N((x - b) / 2, I / 2): only the variances differ
    assert kl == pytest.approx(d * 0.5 * (math.log(0.75) + 1 / 3), rel=1e-12)
    model.parameters()["logvar.bias"][...] = math.log(0.5)  # now q is the posterior: every weight is p(x)
    log_w = sample_draws(model, x, np.random.default_rng(0).standard_normal((1, 7, d)), "iwae").log_w
    b = model.parameters()["decoder.0.bias"]
    log_px = -0.5 * (((x - b) ** 2).sum() / 2 + d * math.log(2 * math.pi * 2))  # x ~ N(b, 2 I)
    np.testing.assert_allclose(log_w, log_px, rtol=1e-12)
    _, _, kl_far = study.rainforth_gaussian(d, 0.3, 0)
    assert kl_far > kl


def test_toy_part_shows_the_papers_signs_near_the_posterior(tmp_path, monkeypatch):
    # Near the posterior (s = 0.01) the plain encoder SNR falls with k and DReG's and the decoder's rise.
    monkeypatch.setattr(sys, "argv", ["estimator_study.py", "toy", "--out", str(tmp_path), "--toy-perturbations", "0.01",
                                      "--toy-k", "1,10,100", "--toy-draws", "100", "--toy-dim", "5"])
    study.main()
    run = json.loads((tmp_path / "toy.json").read_text())["runs"][0]
    assert run["slopes"]["encoder reparam"] < -0.2 and run["slopes"]["encoder dreg"] > 0.2 and run["slopes"]["decoder"] > 0.2
    assert "slope" in (tmp_path / "toy.txt").read_text() and (tmp_path / "toy.png").stat().st_size > 0


@pytest.mark.slow
def test_snr_and_landing_parts_run_and_write_their_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["estimator_study.py", "snr", "--out", str(tmp_path), "--snr-epochs", "1",
                                      "--snr-k", "1,3", "--snr-draws", "3"])
    study.main()
    rows = json.loads((tmp_path / "snr_z20.json").read_text())
    assert {(r["estimator"], r["k"], r["group"]) for r in rows} == {
        (e, k, g) for e in ("reparam", "score", "stl", "dreg") for k in (1, 3) for g in ("encoder", "decoder")}
    assert (tmp_path / "snr_z20.png").stat().st_size > 0 and "SNR" in (tmp_path / "snr_z20.txt").read_text()
    progress = capsys.readouterr().err  # each k said as it finishes, on stderr (the tables stay on stdout)
    assert "snr: training" in progress and "k = 1 done (1/2" in progress and "k = 3 done (2/2" in progress
    monkeypatch.setattr(sys, "argv", ["estimator_study.py", "landing", "--out", str(tmp_path), "--landing-draws", "20"])
    study.main()
    table = json.loads((tmp_path / "landing.json").read_text())
    assert table[-1]["t"] == 1.0 and table[-1]["var_stl"] < 1e-20 < 1e-3 < table[-1]["var_reparam"]
    assert (tmp_path / "landing.png").stat().st_size > 0
    assert "landing: t = 1.0 done" in capsys.readouterr().err
