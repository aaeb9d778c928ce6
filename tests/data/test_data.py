"""Tests for npvae.data (idx, sources, datasets, preprocess): IDX reading, lookup, download
(against a loopback server), the demo digits, preprocessing and batching. Synthetic files
throughout, plus the real files in shared/data when that folder sits beside the repository.
Dataset.from_arrays, to_model_range and load_path are tested in test_data_arrays.py and
test_data_files.py."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npvae import data
from npvae.data import sources
from npvae.data import (DATASETS, Dataset, DatasetSpec, DownloadError, IDXFile, IDXFormatError, batch_indices,
                        binarize_dynamic, binarize_static, download, epoch_permutation, find_dataset_dir,
                        load_dataset, load_demo, load_mnist_like, read_idx, to_float)

REPO = Path(__file__).resolve().parents[2]

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
         np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """Encode ``a`` as an IDX file (big-endian payload)."""
    a = np.asarray(a)
    header = bytes([0, 0, CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test sees the user's cache, $NPVAE_DATA_DIR, system folders or an HTTP proxy."""
    monkeypatch.delenv("NPVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", {})
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 28, 28), (2, 3, 4, 5)])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        a = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    blob = idx_bytes(a)
    path = tmp_path / "file.idx"
    path.write_bytes(gzip.compress(blob) if compress else blob)
    out = read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative
    assert out.shape == shape
    np.testing.assert_array_equal(out, a)


def test_gzip_detected_by_magic_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "raw.gz").write_bytes(idx_bytes(a))
    (tmp_path / "compressed.idx").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "compressed.idx")), a)


def test_big_endian_values_are_converted(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2]) + b"\x01\x02\xff\xfe")
    np.testing.assert_array_equal(read_idx(path), np.array([258, -2], dtype=np.int16))


GOOD = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))  # 16-byte header, 60-byte payload


@pytest.mark.parametrize("blob, message", [
    (b"", "too short for an IDX header"),
    (b"\x00\x00", "too short for an IDX header"),
    (b"PK\x03\x04" + b"\x00" * 40, "neither a gzip file nor an IDX file.*50 4b 03 04"),
    (b"\x01" + GOOD[1:], "neither a gzip file nor an IDX file"),
    (bytes([0, 0, 0x07, 3]) + GOOD[4:], "unknown IDX dtype code 0x07"),
    (bytes([0, 0, 0x08, 0]) + GOOD[4:], "declares 0 dimensions, expected 1 to 4"),
    (bytes([0, 0, 0x08, 5]) + GOOD[4:], "declares 5 dimensions, expected 1 to 4"),
    (GOOD[:10], "truncated IDX header: 3 dimensions need 12 bytes after the magic, file holds 6"),
    (GOOD[:4] + struct.pack(">3I", 3, 0, 5) + GOOD[16:], r"shape \(3, 0, 5\).*must be positive"),
    (GOOD[:-1], r"truncated IDX payload: header declares 60 bytes \(3x4x5 uint8\), file holds 59"),
    (GOOD + b"\x00\x00", r"trailing bytes after the IDX payload: header declares 60 bytes \(3x4x5 uint8\), "
                         r"file holds 2 more"),
    (GOOD[:4] + struct.pack(">3I", 3, 4, 6) + GOOD[16:], r"declares 72 bytes \(3x4x6 uint8\), file holds 60"),
    (bytes([0, 0, 0x0E, 4]) + struct.pack(">4I", *[0xFFFFFFFF] * 4), r"over the 2147483648-byte limit"),
])
def test_malformed_raw_files(tmp_path, blob, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(blob)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("blob, message", [
    (gzip.compress(GOOD[:-5]), "truncated IDX payload: header declares 60 bytes.*decompressed data holds 55"),
    (gzip.compress(GOOD + b"\x07"), "trailing bytes.*decompressed data holds at least 1 more"),
    (gzip.compress(b"hello world, not idx"), "decompressed data is not IDX"),
    (gzip.compress(GOOD)[:-12], "corrupt gzip data"),                          # stream cut short
    (b"\x1f\x8b" + b"\x00" * 30, "corrupt gzip data"),                           # bad gzip header
    (gzip.compress(GOOD)[:-8] + b"\x00" * 8, "corrupt gzip data.*CRC"),         # wrong CRC and size
])
def test_malformed_gzip_files(tmp_path, blob, message):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(blob)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_bomb_stops_at_declared_size(tmp_path):
    # The header declares 10 bytes; 2,000 more gzip members of 1 MiB of zeros follow (2 GiB
    # decompressed, a few MB on disk). Reading all of it would take seconds and the memory.
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10)
    member = gzip.compress(bytes(1024**2), mtime=0)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(header + bytes(1024**2), mtime=0) + member * 2000)
    assert path.stat().st_size < 5 * 1024**2
    start = time.perf_counter()
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx(path)
    assert time.perf_counter() - start < 0.5


def test_declared_size_cap_is_a_parameter(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(GOOD)
    with pytest.raises(IDXFormatError, match="over the 59-byte limit"):
        read_idx(path, max_bytes=59)
    assert read_idx(path, max_bytes=60).shape == (3, 4, 5)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def _decompressed(blob: bytes) -> bytes:
    return gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob


@st.composite
def idx_files(draw):
    """Random bytes, or a valid IDX file (maybe gzipped) that may be mutated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    dtype = draw(st.sampled_from(list(CODES)))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    a = np.frombuffer(draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                                     max_size=int(np.prod(shape)) * dtype.itemsize)), dtype=dtype)
    blob = idx_bytes(a.reshape(shape))
    if draw(st.booleans()):
        blob = gzip.compress(blob, mtime=0)
    blob = bytearray(blob)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "append"]))
        if op == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        else:
            blob += draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=idx_files())
def test_reader_never_fails_unexpectedly(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "fuzz.idx"
    path.write_bytes(blob)
    start = time.perf_counter()
    try:
        out = read_idx(path)
    except IDXFormatError:
        return
    finally:
        assert time.perf_counter() - start < 5.0
    # Accepted: the array must be exactly what the (decompressed) header and payload say.
    raw = _decompressed(blob)
    code, ndim = raw[2], raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = {v: k for k, v in CODES.items()}[code]
    assert out.shape == shape and out.dtype == dtype
    assert out.astype(dtype.newbyteorder(">")).tobytes() == raw[4 + 4 * ndim:]


# ----------------------------------------------------------------------------- real files


def shared_has(name: str, *roles: str) -> bool:
    """Whether shared/data holds these files of ``name`` (a skip guard checks the files, not the folder:
    an empty folder left by a failed download once made these tests fail)."""
    return all((SHARED_DATA / name / DATASETS[name].files[role].filename).is_file() for role in roles)


@pytest.mark.skipif(not shared_has("fashion-mnist", "test-images", "test-labels"),
                    reason=f"no Fashion-MNIST test files in {SHARED_DATA}")
def test_real_fashion_mnist_test_split():
    x, y = load_mnist_like("fashion-mnist", "test", data_dir=SHARED_DATA, download=False)
    assert x.shape == (10000, 784) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    assert x.min() == 0 and x.max() == 255
    # shared/data holds re-compressed copies: check the contents, which load also verified.
    folder = SHARED_DATA / "fashion-mnist"
    for role in ("test-images", "test-labels"):
        spec_file = DATASETS["fashion-mnist"].files[role]
        assert md5(gzip.decompress((folder / spec_file.filename).read_bytes())) == spec_file.raw_md5


@pytest.mark.skipif(not shared_has("mnist", "test-images", "test-labels") or shared_has("mnist", "train-images"),
                    reason=f"{SHARED_DATA}/mnist is not the partial copy (test files, no training images)")
def test_real_files_raw_md5s_and_partial_mnist():
    for name in ("mnist", "fashion-mnist"):
        for spec_file in DATASETS[name].files.values():
            path = SHARED_DATA / name / spec_file.filename
            if path.exists():
                assert md5(gzip.decompress(path.read_bytes())) == spec_file.raw_md5, path
    # shared/data/mnist lacks the training images: fine for the test split, not for train.
    assert find_dataset_dir("mnist", SHARED_DATA, "test") == SHARED_DATA / "mnist"
    assert find_dataset_dir("mnist", SHARED_DATA, "train") is None
    assert find_dataset_dir("mnist", SHARED_DATA) is None
    with pytest.raises(FileNotFoundError, match="MNIST train files.*not found"):
        load_mnist_like("mnist", "train", data_dir=SHARED_DATA, download=False)


# ----------------------------------------------------------------------------- synthetic datasets


@dataclasses.dataclass
class Synthetic:
    spec: DatasetSpec
    blobs: dict[str, bytes]        # served file name -> .gz bytes
    arrays: dict[str, np.ndarray]  # role -> array

    def write(self, folder: Path, roles=None, raw: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for role in roles or self.spec.files:
            f = self.spec.files[role]
            blob = self.blobs[f.filename]
            if raw:
                (folder / f.raw_filename).write_bytes(gzip.decompress(blob))
            else:
                (folder / f.filename).write_bytes(blob)
        return folder


def make_synthetic(name: str, seed: int, mirrors=("http://127.0.0.1:9/",)) -> Synthetic:
    rng = np.random.default_rng(seed)
    files, blobs, arrays = {}, {}, {}
    for split, prefix, n in (("train", "train", 20), ("test", "t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            raw = idx_bytes(arr)
            blob = gzip.compress(raw, mtime=0)
            filename = f"{prefix}-{kind}-idx{nd}-ubyte.gz"
            files[f"{split}-{kind}"] = IDXFile(filename, md5(blob), md5(raw), arr.shape)
            blobs[filename] = blob
            arrays[f"{split}-{kind}"] = arr
    spec = DatasetSpec(name=name, title=name.upper(), mirrors=tuple(mirrors), files=files)
    return Synthetic(spec, blobs, arrays)


@pytest.fixture
def synth(monkeypatch):
    """Small synthetic 'mnist' and 'fashion-mnist' (same file names, different contents)."""
    sets = {"mnist": make_synthetic("mnist", 1), "fashion-mnist": make_synthetic("fashion-mnist", 2)}
    monkeypatch.setattr(sources, "DATASETS", {k: v.spec for k, v in sets.items()})
    return sets


def test_lookup_order(tmp_path, monkeypatch, synth):
    s = synth["mnist"]
    explicit, env, cache, system = (tmp_path / d for d in ("explicit", "env", "xdg", "system"))
    s.write(explicit / "mnist")          # sub-folder layout
    s.write(env)                         # files directly in the root
    s.write(cache / "npvae" / "mnist")   # $XDG_CACHE_HOME/npvae/mnist
    s.write(system)
    monkeypatch.setenv("NPVAE_DATA_DIR", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", {"mnist": (system,)})
    assert find_dataset_dir("mnist", explicit) == explicit / "mnist"
    assert find_dataset_dir("mnist") == env
    monkeypatch.delenv("NPVAE_DATA_DIR")
    assert find_dataset_dir("mnist", tmp_path / "empty") == cache / "npvae" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nothing"))
    assert find_dataset_dir("mnist") == system
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", {})
    assert find_dataset_dir("mnist") is None


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "npvae"


def test_lookup_needs_the_requested_split_and_right_labels(tmp_path, synth):
    synth["mnist"].write(tmp_path / "mnist", roles=["test-images", "test-labels", "train-labels"])
    assert find_dataset_dir("mnist", tmp_path, "test") == tmp_path / "mnist"
    assert find_dataset_dir("mnist", tmp_path, ["train"]) is None
    assert find_dataset_dir("mnist", tmp_path) is None
    # Fashion files directly in a root share MNIST's names but are not MNIST.
    synth["fashion-mnist"].write(tmp_path / "fashion-only")
    assert find_dataset_dir("mnist", tmp_path / "fashion-only") is None
    assert find_dataset_dir("fashion-mnist", tmp_path / "fashion-only") == tmp_path / "fashion-only"
    assert find_dataset_dir("mnist", tmp_path / "fashion-only", verify=False) == tmp_path / "fashion-only"
    with pytest.raises(FileNotFoundError, match="fashion-only has files of these names, but their labels"):
        load_mnist_like("mnist", "train", data_dir=tmp_path / "fashion-only", download=False)
    with pytest.raises(ValueError, match="unknown dataset 'kmnist'"):
        find_dataset_dir("kmnist")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        find_dataset_dir("mnist", tmp_path, "val")


def test_load_uncompressed_files_and_verify(tmp_path, synth):
    s = synth["mnist"]
    s.write(tmp_path, raw=True)
    x, y = load_mnist_like("mnist", "train", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(x, s.arrays["train-images"].reshape(20, 784))
    np.testing.assert_array_equal(y, s.arrays["train-labels"])
    # Same shape, other pixels: caught by the content checksum unless verify=False.
    other = make_synthetic("mnist", 99)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.decompress(other.blobs["train-images-idx3-ubyte.gz"]))
    with pytest.raises(IDXFormatError, match="contents differ from the official train-images-idx3-ubyte"):
        load_mnist_like("mnist", "train", data_dir=tmp_path, download=False)
    x, _ = load_mnist_like("mnist", "train", data_dir=tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(x, other.arrays["train-images"].reshape(20, 784))


def test_load_rejects_mismatched_counts_and_sizes(tmp_path, synth):
    s = synth["mnist"]
    s.write(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(IDXFormatError, match="9 labels for the 10 images"):
        load_mnist_like("mnist", "test", data_dir=tmp_path, download=False, verify=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((9, 14, 14), np.uint8))))
    with pytest.raises(IDXFormatError, match=r"expected uint8 images of shape \(N, 28, 28\)"):
        load_mnist_like("mnist", "test", data_dir=tmp_path, download=False, verify=False)


# ----------------------------------------------------------------------------- download


@pytest.fixture
def server(synth):
    """Loopback HTTP server. URL paths are /MODE/FILENAME with MODE one of good, corrupt
    (one byte changed), truncated (Content-Length says n bytes, n/2 are sent), missing (404)."""
    blobs = {**synth["fashion-mnist"].blobs, **synth["mnist"].blobs}
    log: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            log.append(self.path)
            _, mode, filename = self.path.split("/", 2)
            body = blobs.get(filename)
            if body is None or mode == "missing":
                self.send_error(404)
                return
            if mode == "corrupt":
                body = body[:40] + bytes([body[40] ^ 1]) + body[41:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if mode == "truncated" else body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", log
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/"


def test_download_good_files(tmp_path, server, synth):
    base, log = server
    dest = tmp_path / "cache" / "mnist"
    paths = download("mnist", dest, mirrors=[f"{base}/good/"], timeout=5)
    spec = synth["mnist"].spec
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.filename for f in spec.files.values())
    assert [p.name for p in paths] == [spec.files[r].filename for r in
                                       ("train-images", "train-labels", "test-images", "test-labels")]
    for f in spec.files.values():
        assert md5((dest / f.filename).read_bytes()) == f.md5
    # Present and valid: not fetched again.
    n_requests = len(log)
    download("mnist", dest, mirrors=[f"{base}/good/"], timeout=5)
    assert len(log) == n_requests


@pytest.mark.parametrize("mode, message", [("corrupt", "md5 mismatch"), ("truncated", "transfer cut short")])
def test_bad_transfers_leave_nothing(tmp_path, server, mode, message):
    base, log = server
    dest = tmp_path / "mnist"
    dest.mkdir()
    with pytest.raises(DownloadError, match=message) as info:
        download("mnist", dest, mirrors=[f"{base}/{mode}/"], retries=2, timeout=5, backoff=0, splits="test")
    assert "did not deliver a valid copy" in str(info.value)
    assert list(dest.iterdir()) == []
    # A checksum mismatch is not retried; a short transfer is.
    assert len(log) == (1 if mode == "corrupt" else 2)


def test_failed_download_removes_the_folder_it_created(tmp_path, server):
    base, _ = server
    with pytest.raises(DownloadError):
        download("mnist", tmp_path / "new" / "mnist", mirrors=[f"{base}/corrupt/"], timeout=5, backoff=0)
    assert list(tmp_path.iterdir()) == []  # new/ too: --data-dir ~/data leaves no empty ~/data (issue 25)


def test_an_interrupted_download_removes_the_folders_it_created_and_keeps_the_users(tmp_path, monkeypatch):
    from npvae.data import sources

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_download_file", interrupted)
    (tmp_path / "mine").mkdir()
    with pytest.raises(KeyboardInterrupt):
        download("mnist", tmp_path / "mine" / "data" / "mnist")
    assert list(tmp_path.iterdir()) == [tmp_path / "mine"] and list((tmp_path / "mine").iterdir()) == []


def test_mirror_fallback(tmp_path, server):
    base, log = server
    download("mnist", tmp_path, mirrors=[f"{base}/missing/", f"{base}/good"], timeout=5, backoff=0,
             splits="test")
    assert log == ["/missing/t10k-images-idx3-ubyte.gz", "/good/t10k-images-idx3-ubyte.gz",
                   "/missing/t10k-labels-idx1-ubyte.gz", "/good/t10k-labels-idx1-ubyte.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_all_mirrors_down(tmp_path):
    with pytest.raises(DownloadError, match="seems to be offline") as info:
        download("mnist", tmp_path, mirrors=[closed_port_url(), closed_port_url()], retries=2, timeout=2,
                 backoff=0)
    message = str(info.value)
    assert "attempt 2/2" in message and "NPVAE_DATA_DIR" in message and "--data-dir" in message
    assert list(tmp_path.iterdir()) == []


def test_all_mirrors_404(tmp_path, server):
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("mnist", tmp_path, mirrors=[f"{base}/missing/"], timeout=5, backoff=0)


def test_load_downloads_missing_files_into_data_dir(tmp_path, monkeypatch, server, synth):
    base, _ = server
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(synth["mnist"].spec, mirrors=(f"{base}/good/",)))
    x, y = load_mnist_like("mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(y, synth["mnist"].arrays["test-labels"])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                                       "t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(FileNotFoundError, match="MNIST train files"):
        load_mnist_like("mnist", "train", data_dir=tmp_path / "elsewhere", download=False)


def test_default_dataset_downloads_when_online(tmp_path, monkeypatch, server, synth):
    base, _ = server
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(synth["mnist"].spec, mirrors=(f"{base}/good/",)))
    ds = load_dataset(None, val_size=5)
    assert not ds.is_demo and ds.name == "mnist"
    assert (ds.train_x.shape, ds.val_x.shape, ds.test_x.shape) == ((15, 784), (5, 784), (10, 784))
    assert (Path(data.cache_dir()) / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_default_dataset_falls_back_to_demo_when_offline(monkeypatch, synth):
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(synth["mnist"].spec, mirrors=(closed_port_url(),)))
    start = time.perf_counter()
    ds = load_dataset()
    assert time.perf_counter() - start < 5
    assert ds.is_demo and ds.name == "demo"
    assert "seems to be offline" in ds.description and "not the full dataset" in ds.description
    ds = load_dataset(download=False)
    assert ds.is_demo and "downloads are disabled" in ds.description


def test_load_dataset_full_split(tmp_path, synth):
    s = synth["fashion-mnist"]
    s.write(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, val_size=4, seed=3, download=False)
    assert ds.name == "fashion-mnist" and not ds.is_demo and ds.num_classes == 10
    assert "16 train / 4 validation / 10 test" in ds.description and str(tmp_path) in ds.description
    # Validation and training partition the official training split; test is the official test split.
    train = s.arrays["train-images"].reshape(20, 784)
    rows = {r.tobytes() for r in np.concatenate([ds.train_x, ds.val_x])}
    assert rows == {r.tobytes() for r in train} and len(ds.train_x) + len(ds.val_x) == 20
    np.testing.assert_array_equal(ds.test_x, s.arrays["test-images"].reshape(10, 784))
    again = load_dataset("fashion-mnist", data_dir=tmp_path, val_size=4, seed=3, download=False)
    np.testing.assert_array_equal(again.val_x, ds.val_x)
    with pytest.raises(ValueError, match=r"val_size an integer in \[0, 20\)"):
        load_dataset("fashion-mnist", data_dir=tmp_path, val_size=20, download=False)


def test_load_dataset_test_split_alone_needs_only_the_t10k_files(tmp_path, synth):
    s = synth["mnist"]
    s.write(tmp_path / "mnist", roles=["test-images", "test-labels"])
    ds = load_dataset("mnist", data_dir=tmp_path, download=False, splits="test")
    np.testing.assert_array_equal(ds.test_x, s.arrays["test-images"].reshape(10, 784))
    assert len(ds.train_x) == len(ds.val_x) == 0 and "test split (10 images)" in ds.description
    with pytest.raises(FileNotFoundError, match="MNIST train files"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# ----------------------------------------------------------------------------- demo digits


def test_demo_digits():
    ds = load_demo()
    assert ds.is_demo and ds.name == "demo" and "not the full dataset" in ds.description
    assert ds.train_x.shape == (4500, 784) and ds.val_x.shape == (500, 784)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 450))
    np.testing.assert_array_equal(np.bincount(ds.val_y), np.full(10, 50))
    assert ds.test_x is ds.val_x and "test = validation" in ds.description
    all_rows = np.concatenate([ds.train_x, ds.val_x])
    assert len(np.unique(all_rows, axis=0)) == 5000   # a partition of the 5,000 distinct digits
    assert all_rows.max() == 255 and all_rows[:, 0].max() == 0
    assert len(set(ds.val_y[:20].tolist())) > 3      # shuffled: a prefix mixes the classes


def test_demo_split_is_deterministic():
    a, b, c = load_demo(seed=0), load_demo(seed=0), load_demo(seed=1)
    np.testing.assert_array_equal(a.val_x, b.val_x)
    np.testing.assert_array_equal(a.train_y, b.train_y)
    assert not np.array_equal(a.val_x, c.val_x)
    d = load_dataset("demo", val_size=1000)
    np.testing.assert_array_equal(np.bincount(d.val_y), np.full(10, 100))
    with pytest.raises(ValueError, match=r"val_fraction in \(0, 1\)"):
        load_demo(val_fraction=1.0)


def test_dataset_checks_shapes_and_has_short_repr():
    x, y = np.zeros((3, 784), np.uint8), np.zeros(3, np.uint8)
    ds = Dataset("demo", x, y, x, y, x, y, num_classes=10, description="d", is_demo=True)
    assert repr(ds) == "Dataset(name='demo', train=(3, 784), val=(3, 784), test=(3, 784), is_demo=True)"
    with pytest.raises(ValueError, match=r"expected val_y of shape \(3,\)"):
        Dataset("demo", x, y, x, y[:2], x, y, num_classes=10, description="d", is_demo=True)


# ----------------------------------------------------------------------------- preprocessing


def test_to_float_ranges():
    images = np.array([[0, 51, 255]], dtype=np.uint8)
    x = to_float(images)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.array([[0.0, 0.2, 1.0]], np.float32))
    y = to_float(images, value_range=(-1, 1), dtype=np.float64)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, [[-1.0, -0.6, 1.0]], rtol=0, atol=1e-15)
    assert y[0, 0] == -1 and y[0, 2] == 1
    np.testing.assert_array_equal(to_float(np.array([[0.0, 0.5, 1.0]])), [[0.0, 0.5, 1.0]])


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((28, 28, 1), np.uint8), ValueError, r"expected images of shape \(N, D\)"),
    (np.zeros(784, np.uint8), ValueError, r"expected images of shape \(N, D\).*got shape \(784,\)"),
    (np.array([[0.5, np.nan]]), ValueError, "found NaN"),
    (np.array([[0.5, np.inf]]), ValueError, r"values in \[0, 1\].*inf"),
    (np.array([[1.5, 0.0]]), ValueError, r"values in \[0, 1\]"),
    (np.zeros((2, 3), np.int32), TypeError, "uint8"),
])
def test_to_float_rejects(images, error, message):
    with pytest.raises(error, match=message):
        to_float(images)


def test_to_float_rejects_bad_arguments():
    with pytest.raises(ValueError, match="finite lo < hi"):
        to_float(np.zeros((1, 2), np.uint8), value_range=(1, 0))
    with pytest.raises(TypeError, match="float32 or float64"):
        to_float(np.zeros((1, 2), np.uint8), dtype=np.int64)


def test_binarize_static_is_fixed():
    x = to_float(load_demo().val_x)
    a = binarize_static(x, np.random.default_rng(5))
    b = binarize_static(x, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == x.dtype and set(np.unique(a)) <= {0.0, 1.0}
    t = binarize_static(x)
    np.testing.assert_array_equal(t, (x > 0.5).astype(np.float32))
    np.testing.assert_array_equal(t, binarize_static(x))


def test_binarize_dynamic_draws_fresh_samples():
    rng = np.random.default_rng(0)
    x = np.full((200, 784), 0.3, dtype=np.float32)
    out = np.empty_like(x)
    first = binarize_dynamic(x, rng, out=out).copy()
    second = binarize_dynamic(x, rng, out=out)
    assert second is out
    assert not np.array_equal(first, second)
    assert set(np.unique(second)) <= {0.0, 1.0}
    assert abs(first.mean() - 0.3) < 0.01            # Bernoulli(0.3): std of the mean ~0.001
    np.testing.assert_array_equal(binarize_dynamic(np.array([[0.0, 1.0]]), rng), [[0.0, 1.0]])
    fresh = binarize_dynamic(x.astype(np.float64), rng)
    assert fresh.dtype == np.float64 and fresh.shape == x.shape


@pytest.mark.parametrize("kwargs, error, message", [
    ({"x": np.array([[np.nan]])}, ValueError, "NaN"),
    ({"x": np.array([[-0.1]])}, ValueError, r"\[0, 1\]"),
    ({"x": np.zeros((2, 2), np.uint8)}, TypeError, "float32 or float64"),
    ({"out": np.empty((2, 3), np.float32)}, ValueError, r"expected out of shape \(2, 2\)"),
    ({"out": np.empty((2, 4), np.float32)[:, :2]}, ValueError, "C-contiguous"),
    ({"rng": 0}, TypeError, "np.random.Generator"),
])
def test_binarize_dynamic_rejects(kwargs, error, message):
    args = {"x": np.full((2, 2), 0.5, np.float32), "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(error, match=message):
        binarize_dynamic(**args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binarize_dynamic_in_place_matches_separate_buffer(dtype):
    x = to_float(load_demo().val_x[:64], dtype=dtype)
    separate = binarize_dynamic(x, np.random.default_rng(3), out=np.empty_like(x))
    in_place = x.copy()
    assert binarize_dynamic(in_place, np.random.default_rng(3), out=in_place) is in_place
    np.testing.assert_array_equal(in_place, separate)
    np.testing.assert_array_equal(binarize_dynamic(x, np.random.default_rng(3)), separate)


# ----------------------------------------------------------------------------- batching


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
    p = epoch_permutation(7, 3, 1000)
    assert p.dtype == np.int64 and p.shape == (1000,)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, epoch_permutation(7, 3, 1000))
    assert not np.array_equal(p, epoch_permutation(7, 4, 1000))
    assert not np.array_equal(p, epoch_permutation(8, 3, 1000))
    # A run resumed at epoch 3 sees what an uninterrupted run sees, whatever ran before.
    uninterrupted = [epoch_permutation(7, e, 1000) for e in range(5)]
    np.testing.assert_array_equal(uninterrupted[3], p)
    assert epoch_permutation(0, 0, 0).shape == (0,)
    with pytest.raises(ValueError, match="expected epoch a non-negative integer"):
        epoch_permutation(0, -1, 10)
    with pytest.raises(ValueError, match="expected n a non-negative integer"):
        epoch_permutation(0, 0, 2.5)


@pytest.mark.parametrize("n, batch_size, drop_last, sizes", [
    (10, 3, False, [3, 3, 3, 1]), (10, 3, True, [3, 3, 3]), (9, 3, True, [3, 3, 3]),
    (2, 5, False, [2]), (2, 5, True, []), (0, 4, False, []),
])
def test_batch_indices_cover_every_index_once(n, batch_size, drop_last, sizes):
    perm = epoch_permutation(1, 0, n)
    batches = list(batch_indices(n, batch_size, perm, drop_last=drop_last))
    assert [len(b) for b in batches] == sizes
    joined = np.concatenate(batches) if batches else np.empty(0, np.int64)
    np.testing.assert_array_equal(joined, perm[:len(joined)])
    if not drop_last:
        np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert [len(b) for b in batch_indices(n, batch_size, drop_last=drop_last)] == sizes


def test_batch_indices_validate_eagerly():
    with pytest.raises(ValueError, match="expected batch_size a positive integer"):
        batch_indices(10, 0)
    with pytest.raises(ValueError, match=r"expected perm an integer array of shape \(10,\)"):
        batch_indices(10, 2, np.arange(9))


# ----------------------------------------------------------------------------- slow servers, partial folders


@pytest.fixture
def trickle_server():
    """A server that announces a file and sends it one byte every 0.2 s (each read within any timeout)."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.is_set():
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def test_a_trickling_server_meets_the_overall_deadline(tmp_path, trickle_server):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="gave up after 1.5 s"):
        download("mnist", tmp_path, mirrors=[trickle_server], retries=3, timeout=5, backoff=0, splits="test",
                 deadline=1.5)
    assert time.monotonic() - start < 10  # one attempt (slowness is not retried), bounded by the deadline
    assert list(tmp_path.iterdir()) == []


TRICKLE_CLIENT = """
import sys
from npvae.data import download
from npvae.train import raise_on_sigterm
import signal
signal.signal(signal.SIGTERM, raise_on_sigterm)
print("start", flush=True)
download("mnist", sys.argv[1], mirrors=[sys.argv[2]], timeout=5, splits="test")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_download_leaves_no_partial_file(tmp_path, trickle_server, signum):
    proc = subprocess.Popen([sys.executable, "-c", TRICKLE_CLIENT, str(tmp_path), trickle_server],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == b"start\n"
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".part") for p in tmp_path.iterdir()):  # mid-transfer
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_data_dir_is_named_not_called_offline(tmp_path, monkeypatch, synth):
    s = synth["mnist"]
    s.write(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setitem(sources.DATASETS, "mnist", dataclasses.replace(s.spec, mirrors=(closed_port_url(),)))
    with pytest.raises(DownloadError) as info:
        load_mnist_like("mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert f"{tmp_path / 'mnist'} lacks train-images-idx3-ubyte.gz" in message
    # labels of another dataset under the right names are named as such
    f = synth["fashion-mnist"]
    f.write(tmp_path / "other" / "mnist")
    with pytest.raises(DownloadError, match="do not hold MNIST's labels|does not hold MNIST's labels"):
        load_mnist_like("mnist", "test", data_dir=tmp_path / "other")
