"""scripts/document_cleaning.py: tiles cut from the pages exactly, a run on tiles, the held-out numbers
(``npvae evaluate --split all`` on the held-out tiles, and the whole held-out pages through the trained
weights at the page's size) and the noisy / cleaned / clean picture. Tiny pages, one epoch."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from npvae.data import read_png  # noqa: E402
from npvae.models import ConvDocumentDAE, load_model  # noqa: E402
from tests.helpers import load_script  # noqa: E402

pytestmark = pytest.mark.slow
document_cleaning = load_script("document_cleaning")

H, W, TILE = 16, 32, 8


def test_the_script_trains_on_tiles_and_cleans_whole_held_out_pages(tmp_path, capsys):
    work, picture = tmp_path / "work", tmp_path / "cleaning.png"
    assert document_cleaning.main(["--work", str(work), "--out", str(picture), "--pages", "6", "--held", "3",
                                   "--height", str(H), "--width", str(W), "--tile", str(TILE), "--epochs", "1",
                                   "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "$ npvae train --model conv-doc-dae --data " in out and "--split all" in out
    # every tile is its page's pixels, noisy and clean alike: 2 x 4 tiles a page
    for kind in ("noisy", "clean"):
        tiles = sorted((work / "train_tiles" / kind).glob("*.png"))
        assert len(tiles) == 6 * (H // TILE) * (W // TILE)
        page = read_png(work / "train" / kind / "page_0005.png")
        np.testing.assert_array_equal(read_png(work / "train_tiles" / kind / "page_0005_0008_0016.png"),
                                      page[8:16, 16:24])
    assert f"held-out tiles ({3 * 8} of {TILE}x{TILE})" in out
    before, after = map(float, re.search(r"held-out pages \(3 of 16x32, whole\): RMSE per pixel ([\d.]+) before, "
                                         r"([\d.]+) after", out).groups())
    noisy = np.stack([read_png(f) for f in sorted((work / "held" / "noisy").glob("*.png"))]) / 255.0
    clean = np.stack([read_png(f) for f in sorted((work / "held" / "clean").glob("*.png"))]) / 255.0
    trained, _ = load_model(work / "run" / "best.npz")
    model = ConvDocumentDAE(input_shape=(H, W))
    model.load_state_dict(trained.state_dict())
    cleaned = model.reconstruct(noisy.astype(np.float32)).astype(np.float64)
    assert before == pytest.approx(np.sqrt(((noisy - clean) ** 2).mean()), abs=1e-4)
    assert after == pytest.approx(np.sqrt(((cleaned - clean) ** 2).mean()), abs=1e-4)
    pixels = read_png(picture)
    assert pixels.shape[:2] == (2 * H + 6 + 22, 3 * W + 2 * 6)


@pytest.mark.parametrize("argv, message", [
    (["--tile", "7"], "--tile must be even"),
    (["--height", "15"], "even height and width"),
    (["--tile", "20"], "does not fit"),
    (["--show", "9", "--held", "3"], "exceeds the 3 held-out pages"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        document_cleaning.main(["--work", str(tmp_path / "w"), "--height", "16", "--width", "32", "--tile", "8", *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
