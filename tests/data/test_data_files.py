"""Tests for npvae.data.load_path: .npy and .npz files, folders of PNG (and JPEG) images,
paired target folders, and one clear DataFileError line for each way a user's data can be wrong.
Folders are read twice where it matters: with Pillow and with the standard-library decoder."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from npvae.data import DataFileError, Dataset, files, load_path
from tests.data.test_data_png import png_bytes


@pytest.fixture(params=["pillow", "stdlib"])
def decoder(request, monkeypatch):
    """Run the test with Pillow decoding (skipped if missing) and with npvae.data.png."""
    if request.param == "pillow":
        pytest.importorskip("PIL.Image")
    else:
        monkeypatch.setattr(files, "_pillow", lambda: None)
    return request.param


def write_png(path: Path, pixels: np.ndarray, *, depth: int = 8, alpha: bool = False, filters=4) -> Path:
    """Gray (H, W) or RGB (H, W, 3) uint8 pixels (uint16 for depth 16), optionally with an alpha channel."""
    samples = pixels[..., None] if pixels.ndim == 2 else pixels
    color = {1: 0, 3: 2}[samples.shape[2]]
    if alpha:
        samples = np.concatenate([samples, np.full_like(samples[..., :1], 7)], axis=2)
        color += 4
    path.write_bytes(png_bytes(samples, color, depth, filters=filters))
    return path


def images(n: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def folder_of(tmp_path: Path, name: str, pixels: np.ndarray, names=None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, img in enumerate(pixels):
        write_png(folder / (names[i] if names else f"img{i:03d}.png"), img)
    return folder


def all_rows(ds: Dataset, part: str = "x") -> list[bytes]:
    a = np.concatenate([getattr(ds, f"train_{part}"), getattr(ds, f"val_{part}")])
    return sorted(r.tobytes() for r in a)


# ----------------------------------------------------------------------------- NumPy files


def test_npy_file(tmp_path):
    x = images(30, (20, 20))
    np.save(tmp_path / "digits.npy", x)
    ds = load_path(tmp_path / "digits.npy", seed=2)
    assert ds.name == "digits" and ds.sample_shape == (20, 20) and not ds.has_labels and not ds.is_paired
    assert (len(ds.train_x), len(ds.val_x)) == (27, 3) and ds.test_x is ds.val_x
    assert all_rows(ds) == sorted(r.tobytes() for r in x)
    assert ds.source == {"kind": "path", "path": str((tmp_path / "digits.npy").resolve()), "target": None}
    json.dumps(ds.source)
    assert "x (30, 20, 20) uint8" in ds.description and "27 train / 3 validation" in ds.description
    np.testing.assert_array_equal(load_path(str(tmp_path / "digits.npy"), seed=2).val_x, ds.val_x)


def test_npy_with_a_target_npy(tmp_path):
    x = np.random.default_rng(0).random((10, 8), dtype=np.float32)
    np.save(tmp_path / "noisy.npy", x)
    np.save(tmp_path / "clean.npy", x * 0.5)
    ds = load_path(tmp_path / "noisy.npy", tmp_path / "clean.npy")
    assert ds.is_paired and ds.target_shape == (8,)
    np.testing.assert_array_equal(ds.train_target, ds.train_x * 0.5)
    np.testing.assert_array_equal(ds.val_target, ds.val_x * 0.5)
    assert ds.source["target"] == str((tmp_path / "clean.npy").resolve())


def test_npz_with_labels_and_targets(tmp_path):
    x = images(40, (6, 6, 3))
    y = np.repeat([0, 1, 2, 3], 10)
    with open(tmp_path / "set.NPZ", "wb") as f:   # np.savez would append ".npz" to the name
        np.savez(f, x=x, y=y, target=255 - x)
    ds = load_path(tmp_path / "set.NPZ", val_fraction=0.2)
    assert ds.name == "set" and ds.num_classes == 4 and ds.is_paired and ds.sample_shape == (6, 6, 3)
    np.testing.assert_array_equal(np.bincount(ds.val_y), [2, 2, 2, 2])
    np.testing.assert_array_equal(ds.train_target, 255 - ds.train_x)
    assert "y (40,) int64" in ds.description and "stratified" in ds.description


def test_npz_with_x_only(tmp_path):
    np.savez_compressed(tmp_path / "only.npz", x=np.zeros((4, 3)))
    ds = load_path(tmp_path / "only.npz")
    assert not ds.has_labels and not ds.is_paired and ds.train_x.dtype == np.float64


# ----------------------------------------------------------------------------- image folders


def test_folder_of_gray_pngs(tmp_path, decoder):
    x = images(12, (20, 20))
    names = [f"scan{i:02d}.png" for i in range(12)][::-1]   # written in reverse, read sorted by name
    folder = folder_of(tmp_path, "scans", x, names)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write_png(folder / "sub" / "ignored.png", images(1, (5, 5))[0])
    ds = load_path(folder, val_fraction=0.25, seed=1)
    assert ds.name == "scans" and ds.train_x.dtype == np.uint8 and ds.sample_shape == (20, 20)
    assert (len(ds.train_x), len(ds.val_x)) == (9, 3)
    assert all_rows(ds) == sorted(r.tobytes() for r in x)
    # file order kept within each split: scan00.png is x[11], scan01.png is x[10], ...
    by_name = x[::-1]
    order = [int(np.flatnonzero((by_name == img).all(axis=(1, 2)))[0]) for img in ds.train_x]
    assert order == sorted(order)
    assert ds.source == {"kind": "path", "path": str(folder.resolve()), "target": None}
    assert "12 images of 20x20 gray" in ds.description


def test_folder_of_rgb_rgba_and_16_bit(tmp_path, decoder):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb, gray = images(2, (7, 9, 3)), images(1, (7, 9), seed=1)[0]
    deep = np.random.default_rng(2).integers(0, 65536, (7, 9), dtype=np.uint16)
    write_png(folder / "a.png", rgb[0])
    write_png(folder / "b.png", rgb[1], alpha=True)                  # RGBA: alpha dropped
    write_png(folder / "c.png", gray, alpha=True)                    # gray + alpha: alpha dropped
    write_png(folder / "d.png", deep, depth=16)                      # 16-bit: high byte
    ds = load_path(folder, val_fraction=0.5, seed=0)
    assert ds.sample_shape == (7, 9, 3) and ds.train_x.dtype == np.uint8
    want = [rgb[0], rgb[1], np.repeat(gray[..., None], 3, 2), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2)]
    assert all_rows(ds) == sorted(w.tobytes() for w in want)        # gray promoted to RGB
    assert "4 images of 7x9 RGB" in ds.description


def test_both_decoders_read_the_same_pixels(tmp_path, monkeypatch):
    pytest.importorskip("PIL.Image")
    folder = folder_of(tmp_path, "f", images(5, (11, 13, 3)))
    with_pillow = load_path(folder)
    monkeypatch.setattr(files, "_pillow", lambda: None)
    without = load_path(folder)
    np.testing.assert_array_equal(with_pillow.train_x, without.train_x)
    np.testing.assert_array_equal(with_pillow.val_x, without.val_x)


def test_jpeg_needs_pillow(tmp_path, monkeypatch):
    image_module = pytest.importorskip("PIL.Image")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        image_module.fromarray(np.full((8, 10, 3), 60 * i, np.uint8)).save(folder / f"p{i}.JPG", quality=95)
    ds = load_path(folder)
    assert ds.sample_shape == (8, 10, 3)
    assert np.abs(np.sort(np.concatenate([ds.train_x, ds.val_x])[:, 0, 0, 0].astype(int)) - [0, 60, 120]).max() <= 3
    monkeypatch.setattr(files, "_pillow", lambda: None)
    with pytest.raises(ImportError, match=r"p0.JPG: reading JPEG files needs Pillow: pip install pillow"):
        load_path(folder)


def test_paired_target_folders(tmp_path, decoder):
    x = images(6, (10, 10))
    noisy = folder_of(tmp_path, "noisy", x)
    clean = folder_of(tmp_path, "clean", 255 - x)
    write_png(clean / "extra.png", images(1, (3, 3))[0])             # targets without an input are ignored
    ds = load_path(noisy, clean, val_fraction=0.5)
    assert ds.is_paired and ds.target_shape == (10, 10)
    np.testing.assert_array_equal(ds.train_target, 255 - ds.train_x)
    np.testing.assert_array_equal(ds.val_target, 255 - ds.val_x)
    assert ds.source == {"kind": "path", "path": str(noisy.resolve()), "target": str(clean.resolve())}
    assert "paired with 10x10 gray targets" in ds.description


def test_paired_target_folder_errors(tmp_path):
    noisy = folder_of(tmp_path, "noisy", images(3, (10, 10)))
    clean = folder_of(tmp_path, "clean", images(3, (10, 10)), names=["img000.png", "img002.png", "zz.png"])
    with pytest.raises(DataFileError, match=r"clean has no image named img001.png \(the target of .*noisy/img001.png\)"):
        load_path(noisy, clean)
    small = folder_of(tmp_path, "small", images(3, (10, 8)))
    with pytest.raises(DataFileError, match=r"small/img000.png is 10x8 but its input .*img000.png is 10x10 "
                                            r"\(height x width\)"):
        load_path(noisy, small)
    with pytest.raises(DataFileError, match="is not a folder"):
        np.save(tmp_path / "t.npy", np.zeros((3, 2)))
        load_path(noisy, tmp_path / "t.npy")


# ----------------------------------------------------------------------------- errors


def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif callable(content):
        content(path)
    else:
        path.mkdir()
    return path


def _mixed_sizes(folder: Path):
    folder.mkdir()
    write_png(folder / "a.png", images(1, (28, 28))[0])
    write_png(folder / "b.png", images(1, (32, 28))[0])


def _corrupt_second(folder: Path):
    folder.mkdir()
    write_png(folder / "a.png", images(1, (4, 4))[0])
    data = bytearray(write_png(folder / "b.png", images(1, (4, 4))[0]).read_bytes())
    data[60] ^= 0xFF
    (folder / "b.png").write_bytes(bytes(data))


@pytest.mark.parametrize("name, content, message", [
    ("missing.npy", None, r"path .*missing.npy: no such file or folder"),
    ("data.csv", b"1,2\n3,4\n", r"data.csv: unknown suffix '.csv': expected a .npy or .npz file, or a folder"),
    ("empty", "dir", r"empty: no .png, .jpg or .jpeg images in this folder"),
    ("sizes", _mixed_sizes, r"images differ in size: .*a.png is 28x28 but .*b.png is 32x28 \(height x width\)"),
    ("broken", _corrupt_second, r"broken/b.png"),
    ("nan.npy", lambda p: np.save(p, np.array([[0.1], [np.nan], [0.2]])), r"nan.npy: x contains nan at index \(1, 0\)"),
    ("inf.npz", lambda p: np.savez(p, x=np.zeros((3, 2)), target=np.full((3, 2), -np.inf)),
     r"inf.npz: target contains -inf at index \(0, 0\)"),
    ("words.npy", lambda p: np.save(p, np.array([["a"], ["b"]])), r"words.npy: expected x a numeric array.*<U1"),
    ("one.npy", lambda p: np.save(p, np.zeros((1, 5))), r"one.npy: expected x with at least 2 examples"),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
     r"objects.npy: cannot read this .npy file: array 'x' is an object array \(dtype=object\), which npvae never "
     r"loads"),
    ("objects.npz", lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([1, "a", None], dtype=object)),
     r"objects.npz: cannot read this .npz: array 'y' is an object array"),
    ("extra.npz", lambda p: np.savez(p, x=np.zeros((3, 2)), labels=np.zeros(3)),
     r"extra.npz: unexpected array 'labels' in the .npz \(it holds x, labels\); allowed names are x \(required\), "
     r"y .*and target"),
    ("nox.npz", lambda p: np.savez(p, images=np.zeros((3, 2))), r"nox.npz: .*unexpected array 'images'"),
    ("empty.npz", lambda p: np.savez(p), r"empty.npz: no array 'x' in the .npz \(it holds nothing\)"),
    ("floaty.npz", lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([0.0, 1.0, 1.0])),
     r"floaty.npz: expected y integer class labels"),
    ("text.npy", b"just some text, not numpy", r"text.npy: not a NumPy .npy file \(it starts with 6a 75"),
    ("short.npy", lambda p: p.write_bytes(_npy_bytes(np.zeros((100, 3)))[:-50]), r"short.npy: cannot read this .npy"),
    ("zip.npz", b"PK\x03\x04 broken zip", r"zip.npz: cannot read this .npz file"),
])
def test_each_problem_is_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(DataFileError, match=message) as info:
        load_path(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_corrupt_png_is_named_with_either_decoder(tmp_path, decoder):
    folder = tmp_path / "imgs"
    _corrupt_second(folder)
    with pytest.raises(DataFileError, match=str(folder / "b.png")):
        load_path(folder)


def test_target_must_match_the_kind_of_path(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 2)))
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    with pytest.raises(DataFileError, match="carries its targets as the array 'target'"):
        load_path(tmp_path / "a.npz", tmp_path / "a.npy")
    with pytest.raises(DataFileError, match="target .* is not a .npy file"):
        load_path(tmp_path / "a.npy", tmp_path)
    with pytest.raises(DataFileError, match=r"target .*nowhere: no such file or folder"):
        load_path(tmp_path / "a.npy", tmp_path / "nowhere")
    np.save(tmp_path / "short.npy", np.zeros((2, 2)))
    with pytest.raises(DataFileError, match=r"expected target with 3 rows, one per example, got shape \(2, 2\)"):
        load_path(tmp_path / "a.npy", tmp_path / "short.npy")


def test_a_header_that_claims_gigabytes_allocates_nothing(tmp_path):
    """A 1.7 KB .npy (and .npz) whose header claims 7 GB of images: refused from the sizes alone."""
    import io
    import tracemalloc

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros((2, 28, 28), np.uint8))
    liar = buffer.getvalue().replace(b"(2, 28, 28)", b"(9000000, 28, 28)", 1)
    (tmp_path / "liar.npy").write_bytes(liar)
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as zf:
        zf.writestr("x.npy", liar)
    tracemalloc.start()
    for name in ("liar.npy", "liar.npz"):
        with pytest.raises(DataFileError, match=r"header says shape \(9000000, 28, 28\) of uint8 \(7056000000 bytes\)"):
            load_path(tmp_path / name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000_000
