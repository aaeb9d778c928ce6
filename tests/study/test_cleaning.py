"""npvae.study.cleaning: the per-pixel RMSE of paired runs, in [0, 1] units whatever the model's range."""

from __future__ import annotations

import numpy as np
import pytest

import npvae
from npvae.study.cleaning import cleaning_rmse, pixel_rmse


def test_pixel_rmse_is_the_root_of_the_mean_square_over_every_pixel_in_units_of_the_range():
    a = np.array([[[0.0, 1.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])
    t = np.zeros_like(a)
    assert pixel_rmse(a, t) == pytest.approx(np.sqrt((1 + 0.25 + 0.25) / 8))
    assert pixel_rmse(2 * a - 1, 2 * t - 1, (-1.0, 1.0)) == pytest.approx(pixel_rmse(a, t))  # same pictures
    assert pixel_rmse(np.ones((3, 4)), np.zeros((3, 4))) == 1.0 and pixel_rmse(t, t) == 0.0


@pytest.mark.parametrize("args, message", [
    ((np.zeros((2, 3)), np.zeros((2, 4))), "same shape"),
    ((np.zeros((0, 3)), np.zeros((0, 3))), "at least one pixel"),
    ((np.zeros((2, 3)), np.zeros((2, 3)), (1.0, 1.0)), "hi > lo"),
])
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError, match=message):
        pixel_rmse(*args)


def test_cleaning_rmse_compares_the_inputs_and_the_outputs_with_the_targets():
    model = npvae.Autoencoder(6, (5,), 2, output_activation="sigmoid", value_range=(0.0, 1.0), dtype=np.float64)
    rng = np.random.default_rng(0)
    x, target = rng.random((7, 6)), rng.random((7, 6))
    out = model.reconstruct(x)
    got = cleaning_rmse(model, x, target)
    assert got["before"] == pytest.approx(np.sqrt(((x - target) ** 2).mean()), rel=1e-12)
    assert got["after"] == pytest.approx(np.sqrt(((out - target) ** 2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="paired targets"):
        cleaning_rmse(model, x, None)
    with pytest.raises(ValueError, match="one row per input"):
        cleaning_rmse(model, x, target[:3])
