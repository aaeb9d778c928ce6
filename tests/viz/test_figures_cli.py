"""``npvae plot``, ``npvae grads`` and ``npvae evaluate --iw-samples`` end to end.

One tiny model trained by the CLI itself (module fixture, marked slow), plus untrained models
saved straight to checkpoints for the error paths and the conditional model (fast).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from npvae.cli import main
from npvae.viz.figures import FIGURES
from npvae.models import CVAE, VAE
from npvae.models import save_model

PNG = b"\x89PNG\r\n\x1a\n"


def assert_picture(path) -> None:
    """A PNG that decodes to an image with something drawn on it."""
    from matplotlib.image import imread

    path = Path(path)
    assert path.read_bytes()[:8] == PNG, path
    pixels = imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and np.ptp(pixels) > 0.5, (path, pixels.shape)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "demo", "--epochs", "1", "--hidden", "32", "--latent-dim", "2", "--out", str(out),
                 "--no-progress", "--log-grad-norms", "--no-pictures"]) == 0
    return out / "checkpoint.npz"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Untrained checkpoints, no training log: a VAE with Z = 3, the same marked as trained on
    binarized digits, and a CVAE with Z = 2."""
    out = tmp_path_factory.mktemp("saved")
    meta = {"dataset": "demo", "train_config": {"seed": 0, "binarize": "none"}}
    paths = {"z3": save_model(VAE(784, (16,), 3), out / "z3.npz", meta),
             "binary": save_model(VAE(784, (16,), 3), out / "binary.npz",
                                  {**meta, "train_config": {"seed": 0, "binarize": "dynamic"}}),
             "cvae": save_model(CVAE(784, 10, (16,), 2, prior_hidden=(8,)), out / "cvae.npz", meta)}
    return paths


# ----------------------------------------------------------------------------- plot


@pytest.mark.slow
@pytest.mark.parametrize("what", [w for w in FIGURES if w != "classes"])  # classes: CVAE only, in test_cli.py
def test_every_picture_of_a_trained_run(run, what, tmp_path, capsys):
    out = tmp_path / f"{what}.png"
    assert main(["plot", str(run), what, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out}"
    assert_picture(out)


@pytest.mark.slow
def test_kl_prints_each_unit_and_the_active_count(run, tmp_path, capsys):
    assert main(["plot", str(run), "kl", "--out", str(tmp_path / "kl.png"), "--threshold", "0.05"]) == 0
    text = capsys.readouterr().out
    values = [float(v) for v in re.search(r"\(nats\): ([\d. ]+)\n", text).group(1).split()]
    active, total_units = map(int, re.search(r"active units: (\d+) of (\d+) \(mean KL > 0.05 nats\)", text).groups())
    assert len(values) == total_units == 2 and active == sum(v > 0.05 for v in values)
    assert float(re.search(r"total KL ([\d.]+)", text).group(1)) == pytest.approx(sum(values), abs=2e-3)


def test_manifold_needs_a_2d_latent_space(saved, tmp_path, capsys):
    assert main(["plot", str(saved["z3"]), "manifold", "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "2-D latent space" in err and "Z = 3" in err and "--latent-dim 2" in err
    assert not (tmp_path / "m.png").exists()


def test_latent_projects_higher_dimensional_codes_and_says_how_much_it_keeps(saved, tmp_path, capsys):
    assert main(["plot", str(saved["z3"]), "latent", "--out", str(tmp_path / "l.png")]) == 0
    kept = re.search(r"keep ([\d.]+)% and ([\d.]+)% of their variance", capsys.readouterr().out).groups()
    assert 0 < float(kept[1]) <= float(kept[0]) <= 100
    assert_picture(tmp_path / "l.png")


def test_logs_and_labels_are_asked_for_clearly(saved, tmp_path, capsys):
    assert main(["plot", str(saved["z3"]), "curves", "--out", str(tmp_path / "c.png")]) == 2
    assert "no training log" in capsys.readouterr().err
    assert main(["plot", str(saved["z3"]), "samples", "--label", "3", "--out", str(tmp_path / "s.png")]) == 2
    assert "needs a conditional model" in capsys.readouterr().err
    assert main(["plot", str(saved["cvae"]), "manifold", "--out", str(tmp_path / "m.png")]) == 2
    assert "--label" in capsys.readouterr().err


def test_conditional_models_draw_what_makes_sense(saved, tmp_path, capsys):
    cvae = str(saved["cvae"])
    for what, extra in (("manifold", ["--label", "4", "--n", "8"]), ("samples", ["--label", "7"]),
                        ("interpolation", ["--n", "3"]), ("latent", []), ("kl", []), ("reconstructions", [])):
        out = tmp_path / f"{what}.png"
        assert main(["plot", cvae, what, "--out", str(out), *extra]) == 0, what
        assert_picture(out)


# ----------------------------------------------------------------------------- evaluate --iw-samples


@pytest.mark.slow
def test_the_iwae_estimate_is_tighter_than_the_elbo(run, capsys):
    assert main(["evaluate", str(run), "--iw-samples", "50", "--n", "100", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    printed = re.search(r"IWAE estimate of -log p\(x\), k = 50: ([\d.]+) ± ([\d.]+) per image", "\n".join(lines))
    assert float(printed.group(1)) == pytest.approx(result["iwae_nll"], abs=5e-3)
    assert float(printed.group(2)) == pytest.approx(result["iwae_nll_se"], abs=5e-3)
    assert result["examples"] == 100 and result["iw_samples"] == 50
    assert result["iwae_nll"] <= result["loss"] + 1.0  # -log p estimate below the one-sample -ELBO


def test_binarized_runs_say_which_draw_they_evaluate(saved, capsys):
    assert main(["evaluate", str(saved["binary"]), "--n", "20", "--json"]) == 0
    run_draw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "one Bernoulli draw" in run_draw["binarization"] and "run's seed" in run_draw["binarization"]
    assert main(["evaluate", str(saved["binary"]), "--n", "20", "--json", "--fresh-binarization", "--seed", "3"]) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fresh Bernoulli draw" in fresh["binarization"] and "--seed 3" in fresh["binarization"]
    assert fresh["recon"] != run_draw["recon"]  # other images


def test_iwae_evaluation_refuses_conditional_models(saved, capsys):
    assert main(["evaluate", str(saved["cvae"]), "--iw-samples", "10"]) == 2
    assert "unconditional VAE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- grads


def test_grads_prints_both_tables_and_writes_both_pictures(saved, tmp_path, capsys):
    out = tmp_path / "grads"
    assert main(["grads", str(saved["z3"]), "--n", "16", "--draws", "200", "--dims", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    decomposition = dict(re.findall(r"^(\S+\.(?:weight|bias))\s+([\d.e+-]+)\s", text, flags=re.M))
    assert set(decomposition) == set(VAE(784, (16,), 3).state_dict())
    estimator_rows = re.findall(r"^x[01] (?:mu|logvar)\[\d\]\s+(\S+)", text, flags=re.M)
    assert len(estimator_rows) == 2 * 2 * 2 and all(np.isfinite(float(v)) for v in estimator_rows)
    median = float(re.search(r"reparameterization variance: median ([\d.e+]+)", text).group(1))
    assert median > 10
    assert_picture(out / "decomposition.png")
    assert_picture(out / "estimators.png")


def test_grads_works_for_conditional_models(saved, tmp_path, capsys):
    assert main(["grads", str(saved["cvae"]), "--n", "8", "--draws", "50", "--out", str(tmp_path)]) == 0
    assert "prior_mu.weight" in capsys.readouterr().out
    assert_picture(tmp_path / "estimators.png")


def test_grads_compares_the_estimators_asked_for(saved, tmp_path, capsys):
    assert main(["grads", str(saved["z3"]), "--n", "4", "--draws", "50", "--estimators", "baseline,reparam",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "var reparam/baseline" in text and "score function variance" not in text
    assert main(["grads", str(saved["z3"]), "--estimators", "reparam,vimco", "--out", str(tmp_path)]) == 2
    assert "unknown estimators ['vimco']" in capsys.readouterr().err
    assert main(["grads", str(saved["z3"]), "--n", "4", "--draws", "20", "--estimators", "reparam,dreg",
                 "--out", str(tmp_path)]) == 0
    assert "(dreg: for the ELBO and IWAE bounds, not E_q[log p(x|z)]; pass --k to study them)" in capsys.readouterr().out


def test_grads_measures_signal_to_noise_against_k(saved, tmp_path, capsys):
    assert main(["grads", str(saved["z3"]), "--n", "4", "--draws", "20", "--examples", "1", "--estimators",
                 "reparam,score,stl,dreg", "--k", "1,3", "--snr-draws", "4", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^(reparam|score|stl|dreg)\s+(\d+)\s+\S+\s+(encoder|decoder)\s+(\S+)\s+(\S+)\s+(\S+)", text, flags=re.M)
    assert {(r[0], r[1], r[2]) for r in rows} == {(e, k, g) for e in ("reparam", "score", "stl", "dreg")
                                                  for k in ("1", "3") for g in ("encoder", "decoder")}
    assert all(float(r[5]) > 0 for r in rows)
    decoder = {(r[1], r[5]) for r in rows if r[2] == "decoder"}
    assert len(decoder) == 2  # one decoder gradient per k, whatever the estimator
    assert "(stl, dreg: for the ELBO and IWAE bounds, not E_q[log p(x|z)]; in the k study below)" in text
    assert re.search(r"^reparam\s+3 .* reparam$", text, flags=re.M)  # the signal column: its own mean by default
    assert main(["grads", str(saved["z3"]), "--n", "4", "--examples", "1", "--estimators", "reparam,score,stl,dreg",
                 "--k", "3", "--snr-draws", "4", "--snr-signal", "best", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^score\s+3 .* best$", text, flags=re.M) and re.search(r"^stl\s+3 .* stl$", text, flags=re.M)
    assert_picture(tmp_path / "snr.png")
    assert_picture(tmp_path / "estimators.png")
    assert main(["grads", str(saved["z3"]), "--estimators", "dreg", "--k", "2", "--objective", "elbo",
                 "--out", str(tmp_path)]) == 2
    assert "none of --estimators dreg estimates the elbo gradient" in capsys.readouterr().err
    assert main(["grads", str(saved["z3"]), "--estimators", "reparam,stl", "--k", "2", "--snr-signal", "stl",
                 "--out", str(tmp_path)]) == 2
    assert "--snr-signal stl: expected own, best or one of the measured estimators unbiased for the iwae " \
           "gradient (reparam)" in capsys.readouterr().err
    assert main(["grads", str(saved["z3"]), "--estimators", "stl", "--k", "2", "--snr-signal", "best",
                 "--out", str(tmp_path)]) == 2
    assert "--snr-signal best: none of stl is unbiased for the iwae gradient" in capsys.readouterr().err
    assert main(["grads", str(saved["cvae"]), "--k", "2", "--out", str(tmp_path)]) == 2
    assert "a prior of its own" in capsys.readouterr().err
    assert main(["grads", str(saved["z3"]), "--k", "0,5"]) == 2
    assert "expected integers from 1 to 10,000" in capsys.readouterr().err
