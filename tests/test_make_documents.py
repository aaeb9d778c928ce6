"""scripts/make_documents.py: deterministic (noisy, clean) page pairs that npvae's data path reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from npvae.data import load_path  # noqa: E402
from npvae.data.png import PNG_SIGNATURE, read_png  # noqa: E402
from tests.helpers import load_script  # noqa: E402

make_documents = load_script("make_documents")

H, W, N = 40, 96, 4


def _make(out: Path, seed: int = 3, n: int = N, *extra: str) -> int:
    return make_documents.main(["--out", str(out), "--n", str(n), "--height", str(H), "--width", str(W),
                                "--seed", str(seed), *extra])


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("documents")
    assert _make(out) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pairs_match_by_name_and_shape_as_8_bit_gray_pngs(pages):
    noisy, clean = _files(pages / "noisy"), _files(pages / "clean")
    assert list(noisy) == list(clean) == [f"page_{i:04d}.png" for i in range(N)]
    for blob in (*noisy.values(), *clean.values()):
        assert blob[:8] == PNG_SIGNATURE
        assert blob[24] == 8 and blob[25] == 0  # IHDR bit depth 8, colour type 0 (grayscale)
    for name in noisy:
        a, b = read_png(pages / "noisy" / name), read_png(pages / "clean" / name)
        assert a.shape == b.shape == (H, W) and a.dtype == b.dtype == np.uint8


def test_clean_pages_hold_text_on_white_and_noisy_ones_differ_plausibly(pages):
    rmses = []
    for name in _files(pages / "clean"):
        clean = read_png(pages / "clean" / name).astype(np.float64) / 255
        noisy = read_png(pages / "noisy" / name).astype(np.float64) / 255
        assert np.median(clean) == 1.0  # white paper
        assert (clean < 0.5).mean() > 0.01  # and ink on it
        rmses.append(np.sqrt(np.mean((noisy - clean) ** 2)))
    # dirty but legible: the write-up's scans sit near 0.2 against their clean versions
    assert all(0.05 < r < 0.4 for r in rmses), rmses


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_pages(pages, tmp_path):
    assert _make(tmp_path / "again", 3, 2) == 0  # fewer pages: the first ones are the same
    assert _make(tmp_path / "other", 4, 2) == 0
    for kind in ("noisy", "clean"):
        ours = _files(pages / kind)
        again, other = _files(tmp_path / "again" / kind), _files(tmp_path / "other" / kind)
        assert again == {k: ours[k] for k in again}
        assert all(other[k] != ours[k] for k in other)


def test_load_path_reads_the_pairs_with_each_target_its_own_clean_page(pages):
    dataset = load_path(pages / "noisy", pages / "clean", val_fraction=0.25, seed=0)
    assert dataset.is_paired
    assert dataset.train_x.shape[1:] == dataset.train_target.shape[1:] == (H, W)
    assert dataset.train_x.dtype == dataset.train_target.dtype == np.uint8
    assert len(dataset.train_x) + len(dataset.val_x) == N
    clean = {read_png(p).tobytes(): read_png(pages / "noisy" / p.name).tobytes()
             for p in (pages / "clean").iterdir()}
    for x, t in zip(np.concatenate([dataset.train_x, dataset.val_x]),
                    np.concatenate([dataset.train_target, dataset.val_target])):
        assert clean[t.tobytes()] == x.tobytes()


def test_refuses_to_mix_with_old_pages_unless_forced(pages, tmp_path, capsys):
    out = tmp_path / "docs"
    assert _make(out, 3, 3) == 0
    (out / "noisy" / "stale.png").write_bytes((pages / "noisy" / "page_0000.png").read_bytes())
    assert _make(out, 3, 2) == 2
    assert "already holds 4 PNG files" in capsys.readouterr().err
    assert _make(out, 3, 2, "--force") == 0
    assert sorted(p.name for p in (out / "noisy").iterdir()) == ["page_0000.png", "page_0001.png"]
    assert sorted(p.name for p in (out / "clean").iterdir()) == ["page_0000.png", "page_0001.png"]


def test_an_out_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert make_documents.main(["--out", str(tmp_path / "file"), "--n", "1"]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--height", "8"], "at least 16 x 32"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_bad_options_give_one_clear_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        make_documents.main(["--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
