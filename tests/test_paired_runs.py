"""Paired runs (input -> target, ``npvae train --data noisy --target clean``): evaluate scores the model
against the run's targets, not its noisy inputs, and reports the per-pixel RMSE of the inputs ("before")
and of the outputs ("after cleaning") against them, on the run's validation pages or on every page of
held-out data (``--split all``); plot reconstructions and reconstruct draw the
targets as a third row. Tiny pages from scripts/make_documents.py and tiny models, one epoch each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from npvae.cli import main
from npvae.data import load_path
from npvae.models import load_model
from npvae.viz import figures
from tests.helpers import load_script

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow
H, W, N = 16, 32, 20  # the smallest pages make_documents draws; 2 of the 20 are held out
HELD = 5  # pages of another seed, never trained on


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    make_documents = load_script("make_documents")
    root = tmp_path_factory.mktemp("paired")
    assert make_documents.main(["--out", str(root / "docs"), "--n", str(N), "--height", str(H), "--width", str(W),
                                "--seed", "0"]) == 0
    assert make_documents.main(["--out", str(root / "held"), "--n", str(HELD), "--height", str(H), "--width", str(W),
                                "--seed", "1"]) == 0
    pairs = ["--data", str(root / "docs" / "noisy"), "--target", str(root / "docs" / "clean"), "--epochs", "1",
             "--no-progress", "--no-pictures"]
    assert main(["train", "--model", "conv-doc-dae", *pairs, "--out", str(root / "doc")]) == 0
    vae = ["--model", "vae", "--hidden", "8", "--latent-dim", "2"]
    assert main(["train", *vae, *pairs, "--out", str(root / "vae")]) == 0
    return root


def pages(root: Path):
    """The held-out (noisy, clean) pages in [0, 1], read again as the run split them (seed 0)."""
    data = load_path(root / "docs" / "noisy", root / "docs" / "clean", seed=0)
    return data.test_x / 255.0, data.test_target / 255.0


def evaluate_json(capsys, *args) -> tuple[dict, str]:
    assert main(["evaluate", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_evaluate_scores_against_the_targets_and_reports_rmse_before_and_after(runs, capsys):
    result, text = evaluate_json(capsys, runs / "doc" / "best.npz")
    model, _ = load_model(runs / "doc" / "best.npz")
    x, clean = pages(runs)
    out = model.reconstruct(x.astype(np.float32)).astype(np.float64)
    assert result["paired"] is True and result["examples"] == len(x) == 2
    against_clean = ((out - clean) ** 2).sum((1, 2)).mean()  # the squared error per page, from the pixels
    against_noisy = ((out - x) ** 2).sum((1, 2)).mean()      # what evaluate reported before targets counted
    assert result["loss"] == pytest.approx(against_clean, rel=1e-5)
    assert abs(against_clean - against_noisy) > 1e-3 * against_clean
    assert result["rmse_input_target"] == pytest.approx(np.sqrt(((x - clean) ** 2).mean()), rel=1e-6)
    assert result["rmse_output_target"] == pytest.approx(np.sqrt(((out - clean) ** 2).mean()), rel=1e-5)
    assert result["rmse_output_target"] == pytest.approx(np.sqrt(result["recon"] / (H * W)), rel=1e-5)
    assert "against the targets" in text
    assert (f"RMSE per pixel against the targets ([0, 1] units): input {result['rmse_input_target']:.4f} (before), "
            f"output {result['rmse_output_target']:.4f} (after cleaning)") in text


def test_a_paired_vae_s_elbo_is_of_its_targets_and_iw_samples_are_refused(runs, capsys):
    best = runs / "vae" / "best.npz"
    result, _ = evaluate_json(capsys, best, "--split", "val")
    model, _ = load_model(best)
    x, clean = pages(runs)
    terms = model.evaluate(x.astype(np.float32), rng=np.random.default_rng(0), target=clean.astype(np.float32))
    assert result["paired"] is True and result["loss"] == pytest.approx(terms.total, rel=1e-6)
    assert main(["evaluate", str(best), "--iw-samples", "2"]) == 2
    assert "run was paired (input -> target), so its ELBO is of the targets" in capsys.readouterr().err


def test_the_pictures_show_the_targets(runs, tmp_path, monkeypatch):
    seen = []
    draw = figures.reconstructions

    def spy(*args, **kwargs):
        seen.append(kwargs.get("target"))
        return draw(*args, **kwargs)

    monkeypatch.setattr(figures, "reconstructions", spy)
    best = str(runs / "doc" / "best.npz")
    assert main(["plot", best, "reconstructions", "--n", "2", "--out", str(tmp_path / "p.png")]) == 0
    assert main(["reconstruct", best, "--n", "2", "--out", str(tmp_path / "r.png")]) == 0
    _, clean = pages(runs)
    assert len(seen) == 2
    for target in seen:
        assert target is not None and np.allclose(target, clean, rtol=0, atol=1e-7)
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0


def test_split_all_scores_every_page_of_held_out_data(runs, capsys):
    held = runs / "held"
    result, text = evaluate_json(capsys, runs / "doc" / "best.npz", "--data", held / "noisy", "--target",
                                 held / "clean", "--split", "all")
    model, _ = load_model(runs / "doc" / "best.npz")
    data = load_path(held / "noisy", held / "clean", seed=0)
    x = np.concatenate([data.train_x, data.val_x]) / 255.0
    clean = np.concatenate([data.train_target, data.val_target]) / 255.0
    assert result["split"] == "all" and result["examples"] == HELD and result["paired"] is True
    out = model.reconstruct(x.astype(np.float32)).astype(np.float64)
    assert result["loss"] == pytest.approx(((out - clean) ** 2).sum((1, 2)).mean(), rel=1e-5)
    assert result["rmse_input_target"] == pytest.approx(np.sqrt(((x - clean) ** 2).mean()), rel=1e-6)
    assert result["rmse_output_target"] == pytest.approx(np.sqrt(((out - clean) ** 2).mean()), rel=1e-5)
    # the default split of the same folder is its validation part only
    part, _ = evaluate_json(capsys, runs / "doc" / "best.npz", "--data", held / "noisy", "--target", held / "clean")
    assert part["examples"] == len(data.val_x) < HELD


def test_split_all_needs_held_out_data(runs, capsys):
    best = str(runs / "doc" / "best.npz")
    assert main(["evaluate", best, "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "--split all evaluates every example of held-out data: pass --data PATH" in err and len(err.strip().splitlines()) == 1
    docs = runs / "docs"
    assert main(["evaluate", best, "--data", str(docs / "noisy"), "--target", str(docs / "clean"), "--split", "all"]) == 2
    assert "is the data the run trained on" in capsys.readouterr().err
