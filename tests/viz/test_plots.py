"""Tests for npvae.viz.plots: every picture is a real, non-blank PNG; the NumPy helpers are exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npvae.data import DATASETS
from npvae.viz import figures, plots

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


def assert_real_png(path: Path) -> np.ndarray:
    """The file is a PNG, decodes to a non-empty image, and is not a single flat colour."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    rgb = np.round(img[..., :3] * 255).astype(np.uint32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]  # one int per colour: fast unique
    assert np.unique(packed).size > 10, "image is (nearly) one flat colour"
    return img


def digits(n: int, seed: int = 0) -> np.ndarray:
    """(n, 784) digit-like images in [0, 1]: bright strokes on a black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28))
    for i in range(n):
        cy, cx, r = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(4, 8)
        ring = np.exp(-((np.hypot(yy - cy, xx - cx) - r) ** 2) / 2.0)
        out[i] = np.clip(ring + 0.05 * rng.random((28, 28)), 0, 1)
    return out.reshape(n, 784)


# --------------------------------------------------------------------------------------------------
# Every plot writes a real PNG
# --------------------------------------------------------------------------------------------------

def _epoch_records(n=6):
    return [{"epoch": e, "train_loss": 200 / e + 100, "train_recon": 180 / e + 80,
             "train_kl": 20 - 5 / e, "val_loss": 210 / e + 102, "val_recon": 190 / e + 82,
             "val_kl": 20 - 5 / e} for e in range(1, n + 1)]


PLOTS = {
    "image_grid": lambda p: plots.image_grid(digits(10), p, ncols=4, title="grid",
                                             row_labels=["a", "b", "c"]),
    "samples": lambda p: plots.plot_samples(digits(16).reshape(16, 28, 28), p),
    "reconstructions": lambda p: plots.plot_reconstructions(digits(12), digits(12, 1), p, ncols=5),
    "interpolation": lambda p: plots.plot_interpolation(digits(3 * 7).reshape(3, 7, 784), p),
    "class_grid": lambda p: plots.plot_class_grid(digits(40).reshape(10, 4, 784), p,
                                                  class_names=DATASETS["fashion-mnist"].class_names),
    "manifold": lambda p: plots.plot_manifold(
        lambda z: digits(len(z)) * (0.5 + 0.5 * np.tanh(z[:, :1]) ** 2), p, n=6),
    "scatter_1d": lambda p: plots.plot_latent_scatter(
        np.random.default_rng(0).normal(size=(200, 1)), np.arange(200) % 10, p),
    "scatter_2d": lambda p: plots.plot_latent_scatter(
        np.random.default_rng(0).normal(size=(200, 2)), np.arange(200) % 10, p,
        class_names=DATASETS["mnist"].class_names),
    "scatter_pca": lambda p: plots.plot_latent_scatter(
        np.random.default_rng(0).normal(size=(200, 8)), np.arange(200) % 10, p),
    "scatter_unlabelled": lambda p: plots.plot_latent_scatter(
        np.random.default_rng(0).normal(size=(50, 3)), None, p),
    "training_curves": lambda p: plots.plot_training_curves(_epoch_records(), p),
    "kl_per_dim": lambda p: plots.plot_kl_per_dim([2.0, 0.0, 1e-4, 0.5, 0.02], p),
    "grad_norms": lambda p: plots.plot_grad_norms(
        [{"step": s, "enc.W": 1.0 / (s + 1), "dec.W": 0.5 + 0.0 * s} for s in range(20)], p),
    "estimators": lambda p: plots.plot_estimator_comparison(
        {"param": ["mu[0]", "logvar[0]"], "reparam_mean": [0.5, 0.1],
         "reparam_var": [0.01, 0.02], "score_mean": [0.4, 0.3], "score_var": [2.0, 5.0],
         "exact": [0.5, 0.1]}, p, n_draws=100),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_each_plot_writes_a_real_png(tmp_path, name):
    target = tmp_path / "nested" / "dirs" / f"{name}.png"
    written = PLOTS[name](str(target))
    assert isinstance(written, Path) and written == target
    assert_real_png(written)


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, npvae.viz.plots; assert 'matplotlib' not in sys.modules, 'eager import'"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


def test_without_matplotlib_grids_are_bare_pngs_and_axes_give_the_install_hint(tmp_path, monkeypatch):
    from npvae.data.png import read_png

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    images = digits(5)
    pixels = read_png(plots.plot_samples(images, tmp_path / "x.png", ncols=3))
    mosaic = plots.tile_images(images, ncols=3, empty=1.0)  # (2 * 28 + 1, 3 * 28 + 2)
    expected = np.rint(255 * np.kron(mosaic, np.ones((plots.PNG_SCALE, plots.PNG_SCALE)))).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    with pytest.raises(plots.MatplotlibMissing, match=r"need matplotlib: pip install 'npvae\[plot\]'"):
        plots.plot_kl_per_dim(np.array([0.5, 0.0]), tmp_path / "kl.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_value_range_minus_one_to_one(tmp_path):
    imgs = digits(9) * 2 - 1
    assert_real_png(plots.image_grid(imgs, tmp_path / "tanh.png", value_range=(-1, 1)))
    with pytest.raises(ValueError, match="outside value_range"):
        plots.image_grid(imgs, tmp_path / "bad.png")  # [-1, 1] data, default (0, 1) range


def test_uint8_pixels_need_their_value_range(tmp_path):
    imgs = (digits(4) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"value_range=\(0, 255\)"):
        plots.plot_samples(imgs, tmp_path / "bad.png")
    assert_real_png(plots.plot_samples(imgs, tmp_path / "ok.png", value_range=(0, 255)))


def colour_images(n: int, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) images in [0, 1]: a red-to-blue ramp with a green blob at a random place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w, 3))
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        out[i, ..., 0] = xx / (w - 1)
        out[i, ..., 1] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        out[i, ..., 2] = 1 - xx / (w - 1)
    return out


def assert_colourful(img: np.ndarray) -> None:
    """Some pixels are strongly red and some strongly blue: drawn in colour, not in gray."""
    r, g, b = (img[..., c].astype(float) for c in range(3))
    assert np.mean((r - b) > 0.5) > 0.01 and np.mean((b - r) > 0.5) > 0.01


def test_rgb_images_are_drawn_in_colour(tmp_path):
    imgs = colour_images(7)
    assert_colourful(assert_real_png(plots.image_grid(imgs, tmp_path / "grid.png", ncols=3)))
    assert_colourful(assert_real_png(plots.plot_samples((imgs * 255).astype(np.uint8), tmp_path / "u8.png",
                                                        value_range=(0, 255))))
    assert_colourful(assert_real_png(plots.plot_reconstructions(imgs, imgs[:, ::-1], tmp_path / "rec.png")))
    assert_colourful(assert_real_png(plots.plot_class_grid(imgs[:6].reshape(2, 3, 12, 16, 3), tmp_path / "cls.png")))
    assert_colourful(assert_real_png(plots.plot_interpolation(imgs[:6].reshape(3, 2, 12, 16, 3) * 2 - 1,
                                                              tmp_path / "int.png", value_range=(-1, 1))))


def test_rgb_mosaic_layout():
    imgs = plots._as_images(colour_images(3, 4, 5))
    assert imgs.shape == (3, 4, 5, 3)
    mosaic = plots._tile(plots._pad_to_grid(imgs, 2), 1, 0.5, 1.0)
    assert mosaic.shape == (2 * 4 + 1, 2 * 5 + 1, 3)
    np.testing.assert_array_equal(mosaic[:4, :5], imgs[0])
    np.testing.assert_array_equal(mosaic[:4, 6:], imgs[1])
    np.testing.assert_array_equal(mosaic[5:, :5], imgs[2])
    np.testing.assert_array_equal(mosaic[4, :5], 0.5)   # gutter under image 0, in every channel
    np.testing.assert_array_equal(mosaic[5:, 6:], 1.0)  # the empty fourth cell
    # A last axis of 1 is gray; 4 channels (RGBA) are refused with a hint.
    assert plots._as_images(np.zeros((2, 4, 5, 1))).shape == (2, 4, 5)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 4\).*3 channels \(RGB; drop an alpha channel first\)"):
        plots._as_images(np.zeros((2, 4, 5, 4)))


def test_non_mnist_sizes(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.random((10, 20, 20))
    assert_real_png(plots.image_grid(small, tmp_path / "20x20.png"))
    assert_real_png(plots.image_grid(small.reshape(10, 400), tmp_path / "flat400.png"))
    assert_real_png(plots.plot_reconstructions(rng.random((4, 9, 30)), rng.random((4, 9, 30)), tmp_path / "wide.png"))
    with pytest.raises(ValueError, match=r"\(3, 300\): 300 pixels is not a square image"):
        plots.image_grid(rng.random((3, 300)), tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------
# Clear errors on bad inputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, match", [
    ((5, 783), r"\(5, 783\).*not a square"),
    ((784,), r"images\[None\]"),
    ((2, 3, 28, 28), r"expected images of shape"),
    ((0, 784), r"empty"),
])
def test_image_grid_rejects_bad_shapes(tmp_path, shape, match):
    with pytest.raises(ValueError, match=match):
        plots.image_grid(np.zeros(shape), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_other_image_errors(tmp_path):
    out = tmp_path / "x.png"
    bad = digits(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_samples(bad, out)
    with pytest.raises(ValueError, match="sigmoid"):
        plots.plot_samples(digits(4) * 10 - 5, out)  # logits, not probabilities
    with pytest.raises(ValueError, match="same shape"):
        plots.plot_reconstructions(digits(4), digits(5), out)
    with pytest.raises(ValueError, match=r"\(P, K, 784\)"):
        plots.plot_interpolation(digits(4), out)
    with pytest.raises(ValueError, match="K >= 2"):
        plots.plot_interpolation(digits(3).reshape(3, 1, 784), out)
    with pytest.raises(ValueError, match="row_labels has 1 entries but there are 2 rows"):
        plots.image_grid(digits(4), out, ncols=2, row_labels=["only one"])
    with pytest.raises(ValueError, match="class_names has 2 entries but there are 3 classes"):
        plots.plot_class_grid(digits(6).reshape(3, 2, 784), out, class_names=["a", "b"])
    with pytest.raises(ValueError, match="ncols"):
        plots.image_grid(digits(4), out, ncols=0)
    with pytest.raises(ValueError, match="value_range"):
        plots.image_grid(digits(4), out, value_range=(1, 0))
    assert not out.exists()


def test_small_overshoot_is_clipped_not_refused(tmp_path):
    imgs = digits(4) * 1.005  # e.g. a Gaussian decoder mean slightly above 1
    assert_real_png(plots.plot_samples(imgs, tmp_path / "ok.png"))


# --------------------------------------------------------------------------------------------------
# Mosaic layout
# --------------------------------------------------------------------------------------------------

def test_tile_images_exact_layout():
    # three 2x3 images, each a distinct constant, on a 2x2 grid: the fourth cell is empty
    imgs = np.stack([np.full((2, 3), v) for v in (10.0, 20.0, 30.0)])
    m = plots.tile_images(imgs, ncols=2, gutter=1, fill=-1.0, empty=-2.0)
    expected = np.array([
        [10, 10, 10, -1, 20, 20, 20],
        [10, 10, 10, -1, 20, 20, 20],
        [-1, -1, -1, -1, -2, -2, -2],
        [30, 30, 30, -2, -2, -2, -2],
        [30, 30, 30, -2, -2, -2, -2],
    ], dtype=float)
    np.testing.assert_array_equal(m, expected)


def test_tile_images_pixel_placement_and_flat_input():
    rng = np.random.default_rng(0)
    imgs = rng.random((7, 4, 4))
    m = plots.tile_images(imgs.reshape(7, 16), ncols=3, gutter=2, fill=0.5)
    assert m.shape == (3 * 4 + 2 * 2, 3 * 4 + 2 * 2)
    for k in range(7):
        y, x = (k // 3) * (4 + 2), (k % 3) * (4 + 2)
        np.testing.assert_array_equal(m[y:y + 4, x:x + 4], imgs[k])
    np.testing.assert_array_equal(m[4:6, :], 0.5)  # horizontal gutter below the first row
    np.testing.assert_array_equal(m[:4, 4:6], 0.5)  # vertical gutter right of image 0
    np.testing.assert_array_equal(m[12:, 4:], 0.5)  # empty cells default to fill


def test_tile_images_defaults_and_errors():
    m = plots.tile_images(np.zeros((10, 28, 28)))  # ncols = ceil(sqrt(10)) = 4, 3 rows
    assert m.shape == (3 * 28 + 2, 4 * 28 + 3)
    assert plots.tile_images(np.ones((3, 2, 2)), gutter=0).shape == (4, 4)
    with pytest.raises(ValueError, match="not a square"):
        plots.tile_images(np.zeros((2, 783)))
    with pytest.raises(ValueError, match="gutter"):
        plots.tile_images(np.zeros((2, 4, 4)), gutter=-1)


# --------------------------------------------------------------------------------------------------
# The latent scatter
# --------------------------------------------------------------------------------------------------

def test_latent_scatter_errors(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"labels of shape \(10,\)"):
        plots.plot_latent_scatter(np.zeros((10, 2)), np.zeros(9, dtype=int), out)
    with pytest.raises(ValueError, match="integer class indices"):
        plots.plot_latent_scatter(np.zeros((3, 2)), [0.5, 1.0, 2.0], out)
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        plots.plot_latent_scatter(np.zeros((3, 2)), [0, 1, 2], out, class_names=["a", "b"])
    with pytest.raises(ValueError, match="at most 20"):
        plots.plot_latent_scatter(np.zeros((25, 2)), np.arange(25), out)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# The manifold
# --------------------------------------------------------------------------------------------------

def test_plot_manifold_checks_latent_dim_and_decoder(tmp_path):
    calls = []

    def decode(z):
        calls.append(z.shape)
        return np.full((len(z), 784), 0.5)

    with pytest.raises(ValueError, match="2-D latent space.*latent_dim=16"):
        plots.plot_manifold(decode, tmp_path / "m.png", latent_dim=16)
    assert calls == []  # refused before decoding anything
    with pytest.raises(ValueError, match=r"decode returned shape \(3, 784\) for 16 codes"):
        plots.plot_manifold(lambda z: np.zeros((3, 784)), tmp_path / "m.png", n=4)
    plots.plot_manifold(lambda z: digits(len(z)), tmp_path / "ok.png", n=4)


# --------------------------------------------------------------------------------------------------
# Training logs
# --------------------------------------------------------------------------------------------------

def test_training_curves_from_jsonl_with_mixed_events(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    lines = [{"event": "config", "lr": 1e-3, "train_loss": 1e9}]
    for rec in _epoch_records(5):
        lines += [{"event": "step", "step": s, "train_loss": 1e9} for s in range(3)]
        lines.append({"event": "epoch", **rec})
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert_real_png(plots.plot_training_curves(log, tmp_path / "curves.png"))
    # only non-epoch lines: nothing to plot, and the error says so
    log.write_text("\n".join(json.dumps(x) for x in lines if x["event"] != "epoch"))
    with pytest.raises(ValueError, match="0 epoch records"):
        plots.plot_training_curves(str(log), tmp_path / "none.png")


def test_training_curves_skip_missing_and_null_values(tmp_path):
    records = [{"epoch": 1, "train_loss": 150.0, "val_loss": None},
               {"epoch": 2, "train_loss": 120.0, "train_kl": 10.0},
               {"train_loss": 110.0, "train_kl": 11.0, "val_loss": float("nan")}]
    assert_real_png(plots.plot_training_curves(records, tmp_path / "c.png", logy=True))


def test_training_curves_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1, "train_loss": 3}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        plots.plot_training_curves(bad, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plots.plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    with pytest.raises(TypeError, match="list of dicts"):
        plots.plot_training_curves({"epoch": 1, "train_loss": 2.0}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no epoch record holds any of"):
        plots.plot_training_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "x.png")


def test_grad_norms_errors_and_event_filter(tmp_path):
    with pytest.raises(ValueError, match="no layer norms"):
        plots.plot_grad_norms([{"step": 1}, {"step": 2, "note": "x"}], tmp_path / "g.png")
    recs = [{"event": "epoch", "epoch": 1, "train_loss": 5.0}] + [
        {"event": "grad_norms", "step": s, "fc.W": 2.0 ** -s, "fc.b": 0.0} for s in range(10)]
    assert_real_png(plots.plot_grad_norms(recs, tmp_path / "g.png"))


# --------------------------------------------------------------------------------------------------
# KL per dimension
# --------------------------------------------------------------------------------------------------

def test_kl_per_dim_errors_and_title(tmp_path):
    with pytest.raises(ValueError, match=r"kl_per_dim of shape \(Z,\)"):
        plots.plot_kl_per_dim(np.zeros((4, 3)), tmp_path / "k.png")
    with pytest.raises(ValueError, match="non-negative"):
        plots.plot_kl_per_dim([1.0, -0.5], tmp_path / "k.png")
    with pytest.raises(ValueError, match="threshold"):
        plots.plot_kl_per_dim([1.0, 0.5], tmp_path / "k.png", threshold=0.0)
    many = np.r_[np.linspace(0.5, 3, 9), np.full(55, 1e-4)]  # Z = 64: rotated, thinned labels
    assert_real_png(plots.plot_kl_per_dim(many, tmp_path / "k.png", title="beta = 4"))


# --------------------------------------------------------------------------------------------------
# Estimator comparison and constants
# --------------------------------------------------------------------------------------------------

def test_estimator_comparison_errors_and_table_n_draws(tmp_path):
    base = {"reparam_mean": [0.1, 0.2], "reparam_var": [0.0, 0.01],  # exact-zero variance is fine
            "score_mean": [0.1, 0.3], "score_var": [1.0, 2.0], "n_draws": 50}
    assert_real_png(plots.plot_estimator_comparison(base, tmp_path / "e.png"))
    with pytest.raises(ValueError, match="missing.*score_var"):
        plots.plot_estimator_comparison({k: v for k, v in base.items() if k != "score_var"},
                                        tmp_path / "x.png")
    with pytest.raises(ValueError, match="same non-zero length"):
        plots.plot_estimator_comparison({**base, "score_mean": [1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="negative variance"):
        plots.plot_estimator_comparison({**base, "score_var": [1.0, -1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="n_draws"):
        plots.plot_estimator_comparison(base, tmp_path / "x.png", n_draws=0)


def test_the_pictures_name_classes_as_the_dataset_spec_does():
    fashion = DATASETS["fashion-mnist"].class_names
    assert len(fashion) == 10 and len(set(fashion)) == 10
    assert fashion[0] == "T-shirt/top" and fashion[9] == "Ankle boot"
    assert figures.class_names("fashion-mnist", 10) == list(fashion)
    assert figures.class_names("mnist", 10) == [str(d) for d in range(10)] == list(DATASETS["mnist"].class_names)
    assert figures.class_names(None, 3) == figures.class_names("fashion-mnist", 3) == ["0", "1", "2"]


def _snr_rows(names, ks=(1, 10, 100)):
    return [{"estimator": n, "k": k, "group": g, "snr": (1.0 + i) * k ** (0.5 if g == "decoder" else -0.5)}
            for i, n in enumerate(names) for k in ks for g in ("encoder", "decoder")]


def test_snr_guides_come_from_the_estimators_published_rates(tmp_path, monkeypatch):
    legends = []

    def keep(fig, path):
        legends.append([[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes])
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_snr(_snr_rows(["reparam", "stl", "dreg"]), tmp_path / "s.png")
    encoder, decoder = legends[-1]
    assert "∝ 1/√k (reparam)" in encoder and "∝ √k (dreg)" in encoder and not any("(stl)" in t for t in encoder)
    assert "∝ √k" in decoder
    plots.plot_snr(_snr_rows(["a", "b"]), tmp_path / "s.png", rates={"b": 0.25})
    assert "∝ k^0.25 (b)" in legends[-1][0]
    monkeypatch.undo()
    assert_real_png(plots.plot_snr(_snr_rows(["reparam", "dreg"]), tmp_path / "s.png"))
