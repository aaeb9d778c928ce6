"""Tests for npvae.data.png, the standard-library PNG decoder: files written here with every
colour type, bit depth and row filter decode to the pixels written, match Pillow's decoding when
Pillow is installed, and corrupt files fail with one line naming the file.

:func:`png_bytes` (a small PNG encoder that filters each row with a chosen filter type) is also
used by test_data_files.py."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae.data import files, png
from npvae.data.png import PNGFormatError, decode_png, read_png

# colour type -> (samples per pixel, bit depths)
COLOR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}
CASES = [(color, depth) for color, (_, depths) in COLOR_TYPES.items() for depth in depths]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filter_row(row: np.ndarray, prior: np.ndarray, kind: int, bpp: int) -> np.ndarray:
    """The encoder's side of PNG filtering (spec section 9), on one row of bytes."""
    x, b = row.astype(np.int32), prior.astype(np.int32)
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    predictor = [np.zeros_like(x), a, b, (a + b) // 2, paeth][kind]
    return ((x - predictor) % 256).astype(np.uint8)


def png_bytes(samples: np.ndarray, color: int, depth: int, *, palette: np.ndarray | None = None,
              filters=None, interlace: int = 0, idat_pieces: int = 2, trns: bool = False) -> bytes:
    """Encode ``samples`` (H, W, channels), values below ``2**depth``, as a PNG.

    ``filters``: one filter type per row (default all 0), or an int for every row.
    """
    h, w, channels = samples.shape
    if depth == 16:
        rows = samples.astype(">u2").reshape(h, w * channels).view(np.uint8)
    elif depth == 8:
        rows = samples.astype(np.uint8).reshape(h, w * channels)
    else:
        shifts = np.arange(depth - 1, -1, -1)
        bits = ((samples.reshape(h, w, 1).astype(np.uint8) >> shifts) & 1).reshape(h, w * depth)
        rows = np.packbits(bits, axis=1)
    bpp = max(1, channels * depth // 8)
    kinds = np.broadcast_to(np.asarray(0 if filters is None else filters), (h,))
    prior, body = np.zeros(rows.shape[1], np.uint8), b""
    for r in range(h):
        body += bytes([int(kinds[r])]) + _filter_row(rows[r], prior, int(kinds[r]), bpp).tobytes()
        prior = rows[r]
    data = zlib.compress(body)
    cut = np.linspace(0, len(data), idat_pieces + 1).astype(int)
    out = png.PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace))
    if palette is not None:
        out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        if trns:
            out += _chunk(b"tRNS", bytes(range(len(palette)))[:len(palette)])
    out += _chunk(b"tEXt", b"Comment\x00written by npvae's tests")  # an ancillary chunk to skip
    for i in range(idat_pieces):
        out += _chunk(b"IDAT", data[cut[i]:cut[i + 1]])
    return out + _chunk(b"IEND", b"")


def random_image(rng: np.random.Generator, h: int, w: int, color: int, depth: int):
    """Samples, palette (or None) and the pixels the decoder must return."""
    channels = COLOR_TYPES[color][0]
    samples = rng.integers(0, 2**depth, (h, w, channels), dtype=np.uint16 if depth == 16 else np.uint8)
    palette = None
    if color == 3:
        palette = rng.integers(0, 256, (min(2**depth, 200), 3), dtype=np.uint8)
        samples %= len(palette)
    return samples, palette, expected_pixels(samples, color, depth, palette)


def expected_pixels(samples, color, depth, palette=None) -> np.ndarray:
    s = (samples >> 8).astype(np.uint8) if depth == 16 else samples.astype(np.uint8)
    if color == 0:
        return s[..., 0] * np.uint8(255 // (2**depth - 1)) if depth < 8 else s[..., 0]
    if color == 3:
        return palette[s[..., 0]]
    return s[..., 0] if color == 4 else s[..., :3]


def pillow_decode(tmp_path, blob: bytes) -> np.ndarray:
    """What load_path reads from ``blob`` when Pillow is installed."""
    image_module = pytest.importorskip("PIL.Image")
    path = tmp_path / "pillow.png"
    path.write_bytes(blob)
    return files._read_image(path, image_module)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("color, depth", CASES)
def test_every_colour_type_and_depth_with_all_filters(tmp_path, color, depth):
    rng = np.random.default_rng(color * 100 + depth)
    samples, palette, want = random_image(rng, 9, 13, color, depth)
    blob = png_bytes(samples, color, depth, palette=palette, filters=np.arange(9) % 5, trns=color == 3)
    got = decode_png(blob)
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pillow_decode(tmp_path, blob), want)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       filters=st.lists(st.integers(0, 4), min_size=12, max_size=12), pieces=st.integers(1, 3))
def test_random_images_decode_exactly(case, h, w, seed, filters, pieces):
    color, depth = case
    samples, palette, want = random_image(np.random.default_rng(seed), h, w, color, depth)
    blob = png_bytes(samples, color, depth, palette=palette, filters=filters[:h], idat_pieces=pieces)
    np.testing.assert_array_equal(decode_png(blob), want)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "1"])
def test_files_written_by_pillow(tmp_path, mode):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    # Smooth images, so that Pillow's encoder picks a mix of filters (Paeth and Average included).
    ramp = (np.add.outer(np.arange(40), np.arange(50)) * 3 + rng.integers(0, 8, (40, 50))).astype(np.uint8)
    rgb = np.stack([ramp, ramp[::-1], 255 - ramp], axis=-1)
    img = {"L": lambda: image_module.fromarray(ramp),
           "RGB": lambda: image_module.fromarray(rgb),
           "RGBA": lambda: image_module.fromarray(np.dstack([rgb, ramp])),
           "P": lambda: image_module.fromarray(rgb).quantize(colors=32),
           "I;16": lambda: image_module.fromarray(ramp.astype(np.uint16) * 257 + 5),
           "LA": lambda: image_module.fromarray(np.dstack([ramp, ramp[::-1]])),
           "1": lambda: image_module.fromarray(ramp > 120)}[mode]()
    path = tmp_path / "img.png"
    img.save(path)
    got = read_png(path)
    np.testing.assert_array_equal(got, pillow_decode(tmp_path, path.read_bytes()))
    if mode in ("L", "RGB"):
        np.testing.assert_array_equal(got, ramp if mode == "L" else rgb)
    assert got.shape == ((40, 50, 3) if mode in ("RGB", "RGBA", "P") else (40, 50))


def test_wavefront_matches_rows_for_the_simple_filters():
    rng = np.random.default_rng(3)
    for bpp, stride in ((1, 7), (3, 12), (4, 4), (8, 16)):
        data = rng.integers(0, 256, (6, stride), dtype=np.uint8)
        kinds = rng.integers(0, 3, 6).astype(np.uint8)
        np.testing.assert_array_equal(png._unfilter_wavefront(data, kinds, bpp), png._unfilter_rows(data, kinds, bpp))


def test_a_single_pixel_and_a_single_column():
    for h, w in ((1, 1), (7, 1), (1, 7)):
        samples = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
        blob = png_bytes(samples, 2, 8, filters=4)
        np.testing.assert_array_equal(decode_png(blob), samples)


# ----------------------------------------------------------------------------- refusals

GOOD = png_bytes(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), 2, 8, filters=[0, 1, 3, 4], idat_pieces=1)
IHDR_END = 8 + 8 + 13 + 4


def _with_ihdr(**fields) -> bytes:
    values = dict(zip(("w", "h", "depth", "color", "compression", "filtering", "interlace"),
                      struct.unpack(">IIBBBBB", GOOD[16:29])))
    values.update(fields)
    return GOOD[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", *values.values())) + GOOD[IHDR_END:]


def _without(kind: bytes, blob: bytes = GOOD) -> bytes:
    pos, out = 8, blob[:8]
    while pos < len(blob):
        length = struct.unpack(">I", blob[pos:pos + 4])[0]
        if blob[pos + 4:pos + 8] != kind:
            out += blob[pos:pos + 12 + length]
        pos += 12 + length
    return out


def _flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1:]


def _refilter(kind: int) -> bytes:
    """GOOD with the first row's filter-type byte replaced."""
    raw = bytearray(zlib.decompress(_idat(GOOD)))
    raw[0] = kind
    return _without(b"IEND", _without(b"IDAT")) + _chunk(b"IDAT", zlib.compress(bytes(raw))) + _chunk(b"IEND", b"")


def _idat(blob: bytes) -> bytes:
    pos, data = 8, b""
    while pos < len(blob):
        length = struct.unpack(">I", blob[pos:pos + 4])[0]
        if blob[pos + 4:pos + 8] == b"IDAT":
            data += blob[pos + 8:pos + 8 + length]
        pos += 12 + length
    return data


def _with_idat(data: bytes) -> bytes:
    return _without(b"IEND", _without(b"IDAT")) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("blob, message", [
    (b"", "not a PNG file.*an empty file"),
    (b"GIF89a" + GOOD[6:], "not a PNG file.*47 49 46 38"),
    (GOOD[:-20], "truncated PNG"),
    (GOOD[:45], "truncated PNG: chunk tEXt"),
    (_flip(GOOD, 20), "CRC mismatch in chunk IHDR"),
    (_flip(GOOD, IHDR_END + 40), "CRC mismatch"),
    (_with_ihdr(interlace=1), "Adam7-interlaced PNGs need Pillow"),
    (_with_ihdr(depth=3), "bit depth 3 is not allowed for RGB"),
    (_with_ihdr(color=5), "unknown colour type 5"),
    (_with_ihdr(w=0), "header declares 0x4 pixels"),
    (_with_ihdr(w=1 << 20, h=1 << 20), "over the 89,478,485-pixel limit"),
    (_with_ihdr(color=3), "palette image without a PLTE chunk"),
    (_with_ihdr(h=5), "the image data holds 52 bytes, not the 65"),
    (_with_ihdr(h=3), "image data holds more than the 39 bytes"),
    (_without(b"IDAT"), "no IDAT chunk"),
    (GOOD[:8] + GOOD[IHDR_END:], "the first chunk is tEXt, expected IHDR"),
    (_without(b"IEND", GOOD) + _chunk(b"ZZZZ", b"") + _chunk(b"IEND", b""), "unknown critical PNG chunk ZZZZ"),
    (_refilter(7), "row 0 has filter type 7"),
    (_with_idat(b"not zlib at all"), "corrupt PNG image data \\(zlib"),
])
def test_corrupt_files_are_named_and_refused(tmp_path, blob, message):
    path = tmp_path / "scan-007.png"
    path.write_bytes(blob)
    with pytest.raises(PNGFormatError, match=message) as info:
        read_png(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_palette_index_past_the_palette():
    samples = np.array([[[0], [1], [5]]], dtype=np.uint8)
    blob = png_bytes(samples, 3, 8, palette=np.zeros((3, 3), np.uint8))
    with pytest.raises(PNGFormatError, match="palette entry 5 but the palette has 3 entries"):
        decode_png(blob, "p.png")


def test_ancillary_chunks_are_skipped_and_trailing_bytes_ignored():
    blob = GOOD + b"trailing garbage after IEND"
    np.testing.assert_array_equal(decode_png(blob), np.arange(48, dtype=np.uint8).reshape(4, 4, 3))


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "cut", "add"]), st.integers(0, 10**6), st.integers(1, 255)),
                    min_size=1, max_size=3))
def test_mutated_files_decode_or_raise_png_format_error(ops):
    blob = bytearray(GOOD)
    for op, where, value in ops:
        i = where % max(len(blob), 1)
        if op == "flip" and blob:
            blob[i] ^= value
        elif op == "cut":
            del blob[i:]
        else:
            blob[i:i] = bytes([value])
    try:
        out = decode_png(bytes(blob))
    except PNGFormatError:
        return
    assert out.dtype == np.uint8 and out.ndim in (2, 3)


# ----------------------------------------------------------------------------- writing


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), rgb=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_written_pngs_decode_to_the_pixels_written(h, w, rgb, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    assert np.array_equal(decode_png(png.encode_png(pixels)), pixels)


@pytest.mark.parametrize("rgb", [False, True])
def test_matplotlib_reads_written_pngs(rgb, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (17, 23, 3) if rgb else (17, 23), dtype=np.uint8)
    pixels[0] = 0  # extremes, and a row equal to the next: the Up filter's zero and wrap-around
    pixels[1] = 255
    pixels[2] = pixels[3]
    path = png.write_png(tmp_path / "sub" / "x.png", pixels)
    read = np.rint(mpimg.imread(path) * 255).astype(np.uint8)  # matplotlib scales 8-bit PNGs to [0, 1]
    assert np.array_equal(read, pixels) and np.array_equal(read_png(path), pixels)


def test_bad_pixels_leave_the_old_picture(tmp_path):
    path = tmp_path / "x.png"
    old = np.full((4, 4), 7, np.uint8)
    png.write_png(path, old)
    with pytest.raises(TypeError, match="uint8"):
        png.write_png(path, np.zeros((4, 4)))
    assert np.array_equal(read_png(path), old) and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from npvae.checkpoint import atomic_write

    path = tmp_path / "x.png"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"half of the new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, fails)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("pixels, error, match", [
    (np.zeros((3, 3), np.float32), TypeError, "uint8"),
    (np.zeros((3, 3, 4), np.uint8), ValueError, r"\(H, W\) \(grayscale\) or \(H, W, 3\)"),
    (np.zeros(9, np.uint8), ValueError, "shape"),
    (np.zeros((0, 3), np.uint8), ValueError, "at least 1x1"),
])
def test_bad_pixels_are_named(pixels, error, match):
    with pytest.raises(error, match=match):
        png.encode_png(pixels)
