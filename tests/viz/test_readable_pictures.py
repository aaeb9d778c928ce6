"""Pictures a person reads at a glance: no blank band along any edge, the KL axis fitted to the data,
manifold ticks on the grid's own codes, and a denoiser's picture that shows the denoising."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from npvae.models import CVAE, VAE, Autoencoder, ConvAutoencoder, ConvDenoisingAutoencoder, ConvDocumentDAE, DenoisingAutoencoder
from npvae.study import statistics
from npvae.viz import figures, plots
from tests.helpers import load_script

pytest.importorskip("matplotlib")

blank_bands_script = load_script("blank_bands")
blank_bands, MAX_BAND = blank_bands_script.blank_bands, blank_bands_script.MAX_BAND


def digits(n: int, seed: int = 0) -> np.ndarray:
    """(n, 784) images in [0, 1] with a bright blob each, not a flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, size=(n, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 20.0)
    return blobs.reshape(n, 784).astype(np.float32)


# ----------------------------------------------------------------------------- the measure itself


def test_blank_bands_counts_uniform_rows_and_columns_from_each_edge():
    image = np.full((60, 50, 3), 255, np.uint8)
    image[5:20, 7:44] = 0  # drawing: rows 5..19, columns 7..43
    image[12, 2] = 128  # a speck in the left margin stops the left count at column 2
    assert blank_bands(image) == {"top": 5, "bottom": 40, "left": 2, "right": 6}
    assert blank_bands(np.zeros((4, 4), np.uint8)) == {"top": 4, "bottom": 4, "left": 4, "right": 4}


def test_the_script_flags_a_picture_with_a_blank_band(tmp_path, capsys):
    from PIL import Image

    image = np.full((100, 80), 255, np.uint8)
    image[4:60, 4:76] = 30  # 40 blank rows under the drawing, like samples.png had
    Image.fromarray(image).save(tmp_path / "band.png")
    assert blank_bands_script.main([str(tmp_path / "band.png")]) == 1
    assert "bottom 40" in capsys.readouterr().out and "<- blank band" not in blank_bands_script.__doc__


# ----------------------------------------------------------------------------- every picture, measured


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Every picture of npvae.viz.figures, drawn from small untrained models (layout does not need training)."""
    out = tmp_path_factory.mktemp("pictures")
    x, y = digits(40), np.arange(40) % 10
    rng = np.random.default_rng(0)
    vae2, vae8 = VAE(784, (16,), 2), VAE(784, (16,), 8)
    cvae = CVAE(784, 10, (16,), 2, prior_hidden=(8,))
    dae = DenoisingAutoencoder(784, (16,), 3)
    log = out / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for e in range(1, 6) for r in (
        {"event": "epoch", "epoch": e, "train_loss": 200 / e, "val_loss": 210 / e, "train_recon": 180 / e,
         "val_recon": 190 / e, "train_kl": 20.0, "val_kl": 20.0},
        {"event": "grad_norms", "step": e, "encoder.0": 1.0 / e, "decoder.0": 2.0 / e})))
    paths = {
        "samples": figures.samples(vae2, out / "samples.png", rng),
        "samples_cvae": figures.samples(cvae, out / "samples_cvae.png", rng, n=32, label=7),
        "reconstructions": figures.reconstructions(vae2, x, out / "reconstructions.png"),
        "reconstructions_dae": figures.reconstructions(dae, 2 * x - 1, out / "reconstructions_dae.png"),
        "interpolation": figures.interpolation(vae2, x, out / "interpolation.png", y),
        "classes": figures.class_grid(cvae, out / "classes.png", rng),
        "manifold": figures.manifold(vae2, out / "manifold.png", n=12),
        "latent": figures.latent_scatter(vae8, x, y, out / "latent.png")[0],
        "kl": figures.kl_per_dim(vae8, x, out / "kl.png")[0],
        "curves": figures.training_curves(log, out / "curves.png", vae2.loss_names),
        "curves_ae": figures.training_curves(log, out / "curves_ae.png", dae.loss_names),
        "grad_norms": figures.grad_norms(log, out / "grad_norms.png"),
    }
    return paths


@pytest.mark.parametrize("name", ["samples", "samples_cvae", "reconstructions", "reconstructions_dae", "interpolation",
                                  "classes", "manifold", "latent", "kl", "curves", "curves_ae", "grad_norms"])
def test_no_picture_has_a_blank_band_along_an_edge(pictures, name):
    bands = blank_bands(blank_bands_script.read_pixels(pictures[name]))
    assert max(bands.values()) <= MAX_BAND, (name, bands)


# ----------------------------------------------------------------------------- the KL axis


def test_the_kl_axis_is_linear_and_starts_at_zero_when_every_unit_is_active_and_alike():
    kl = np.array([1.5, 1.4, 0.9, 0.36])
    assert plots.kl_axis(kl, 0.01) == ("linear", 0.0, pytest.approx(1.15 * 1.5))


@pytest.mark.parametrize("kl, bottom", [
    (np.array([2.0, 1.0, 1e-4, 0.0]), 0.5e-4),  # a collapsed unit: down to it, zeros marked on the floor
    (np.array([2.0, 1.0, 0.003]), 0.0015),       # an inactive unit below the threshold
    (np.array([50.0, 0.2]), 0.005),              # active, but 250x apart: log, the threshold in view
    (np.zeros(3), 0.005),                         # everything collapsed
])
def test_the_kl_axis_is_log_and_reaches_down_to_the_smallest_unit_otherwise(kl, bottom):
    scale, lo, hi = plots.kl_axis(kl, 0.01)
    assert scale == "log" and lo == pytest.approx(bottom) and hi == pytest.approx(2 * max(kl.max(), 0.01))
    assert lo < 0.01 and all(v >= 2 * lo for v in kl[kl > 0])  # every positive bar and the threshold show


# ----------------------------------------------------------------------------- manifold ticks


def test_labelled_cells_labels_every_cell_that_fits_and_both_ends_always():
    assert plots.labelled_cells(20, 0.45, 0.3) == list(range(20))
    cells = plots.labelled_cells(50, 0.28, 0.3)
    assert cells[0] == 0 and cells[-1] == 49 and len(cells) < 50
    assert min(np.diff(cells)) * 0.28 >= 0.3  # labels never overlap
    assert plots.labelled_cells(1, 0.5, 0.3) == [0]


def test_manifold_ticks_name_the_code_of_the_cells_under_them(monkeypatch, tmp_path):
    drawn = {}

    def keep(fig, path):
        drawn["ax"] = fig.axes[0]
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    n = 20
    plots.plot_manifold(lambda z: np.full((len(z), 784), 0.5), tmp_path / "m.png", n=n)
    ax, z = drawn["ax"], statistics.manifold_grid(n)
    xs, ys = ax.get_xticks(), ax.get_yticks()
    assert len(xs) == len(ys) == n  # at the default size every cell is labelled
    assert [t.get_text() for t in ax.get_xticklabels()] == [plots._fmt_code(v) for v in z[:n, 0]]
    assert [t.get_text() for t in ax.get_yticklabels()] == [plots._fmt_code(z[i * n, 1]) for i in range(n)]
    np.testing.assert_allclose(xs, np.arange(n) * 28 + 13.5)  # at the cells' centres
    assert "quantiles 5% to 95%" in ax.get_xlabel()
    plots.plot_manifold(lambda z: np.full((len(z), 784), 0.5), tmp_path / "m.png", n=60)  # 14 in wide: too narrow
    labels = [t.get_text() for t in drawn["ax"].get_xticklabels()]
    assert len(labels) == 60 and labels[0] == "-1.64" and labels[-1] == "1.64" and 3 < sum(map(bool, labels)) < 60


# ----------------------------------------------------------------------------- what each reconstruction shows


@pytest.fixture
def captured(monkeypatch):
    calls = []

    def capture(originals, reconstructions, path, **kw):
        calls.append({"originals": np.asarray(originals), "reconstructions": np.asarray(reconstructions), **kw})
        return Path(path)

    monkeypatch.setattr(plots, "plot_reconstructions", capture)
    return calls


def test_a_denoisers_picture_shows_corrupted_input_output_and_clean_original(captured, tmp_path):
    dae = DenoisingAutoencoder(784, (16,), 3, noise_level=0.3)
    x = 2 * digits(6) - 1
    figures.reconstructions(dae, x, tmp_path / "r.png", rng=np.random.default_rng(5))
    call = captured[0]
    assert call["row_labels"] == ("corrupted input", "output", "clean original")
    np.testing.assert_array_equal(call["originals"], dae.corrupt(x, np.random.default_rng(5)))
    assert not np.array_equal(call["originals"], x)  # the corruption is visible
    np.testing.assert_array_equal(call["targets"], x)
    np.testing.assert_allclose(call["reconstructions"], np.clip(dae.reconstruct(call["originals"]), -1, 1))
    assert "corrupted" in call["title"] and "clean originals" in call["title"]


def test_the_conv_denoiser_shows_corrupted_input_output_and_clean_original(captured, tmp_path):
    dae = ConvDenoisingAutoencoder(input_shape=(28, 28))
    x = digits(4).reshape(4, 28, 28)
    figures.reconstructions(dae, x, tmp_path / "r.png", rng=np.random.default_rng(3))
    call = captured[0]
    assert call["row_labels"] == ("corrupted input", "output", "clean original")
    corrupted = dae.corrupt(x, np.random.default_rng(3))
    np.testing.assert_array_equal(call["originals"], corrupted)
    assert {0.0, 1.0} <= set(np.unique(corrupted[corrupted != x]))  # salt and pepper
    np.testing.assert_array_equal(call["targets"], x)
    np.testing.assert_allclose(call["reconstructions"], np.clip(dae.reconstruct(corrupted), 0, 1))


@pytest.mark.parametrize("model, paired, rows", [
    (ConvDocumentDAE(input_shape=(8, 16)), True, ("input", "output", "target")),
    (ConvAutoencoder(input_shape=(28, 28)), False, ("input", "reconstruction")),
])
def test_the_other_conv_autoencoders_show_their_inputs_as_they_are(captured, tmp_path, model, paired, rows):
    lo, hi = model.value_range
    x = lo + (hi - lo) * np.random.default_rng(4).random((3, *model.input_shape)).astype(np.float32)
    target = np.clip(x + 0.1, lo, hi) if paired else None
    figures.reconstructions(model, x, tmp_path / "r.png", target=target)
    call = captured[0]
    assert call["row_labels"] == rows
    np.testing.assert_array_equal(call["originals"], x)
    assert (call["targets"] is None) == (not paired)


def test_paired_data_adds_its_targets_and_a_plain_model_shows_two_rows(captured, tmp_path):
    ae = Autoencoder(784, (16,), 3)
    noisy, clean = 2 * digits(5, 1) - 1, 2 * digits(5, 2) - 1
    figures.reconstructions(ae, noisy, tmp_path / "p.png", target=clean)
    figures.reconstructions(ae, noisy, tmp_path / "q.png")
    paired, plain = captured
    assert paired["row_labels"] == ("input", "output", "target")
    np.testing.assert_array_equal(paired["originals"], noisy)
    np.testing.assert_array_equal(paired["targets"], clean)
    assert plain["row_labels"] == ("input", "reconstruction") and plain["targets"] is None


def test_plot_reconstructions_draws_three_rows_per_block_and_checks_shapes(tmp_path):
    x = digits(4)
    path = plots.plot_reconstructions(x, x, tmp_path / "r3.png", targets=x,
                                      row_labels=("corrupted input", "output", "clean original"))
    two = plots.plot_reconstructions(x, x, tmp_path / "r2.png")
    h3, h2 = (blank_bands_script.read_pixels(p).shape[0] for p in (path, two))
    assert h3 > 1.3 * h2  # a third row of images
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_reconstructions(x, x, tmp_path / "bad.png", targets=x[:3])
    with pytest.raises(ValueError, match="row_labels has 2 entries but there are 3 rows per block"):
        plots.plot_reconstructions(x, x, tmp_path / "bad.png", targets=x, row_labels=("a", "b"))
