"""Checkpoint files: round trips, no pickle, every kind of damage gives CheckpointError, atomic saves."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npvae import checkpoint
from npvae.checkpoint import FORMAT_VERSION, CheckpointError, check_arrays, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "model/encoder.0.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "model/encoder.0.bias": rng.standard_normal(4),
        "optim/exp_avg": rng.standard_normal(30),
        "optim/step": np.asarray(7),
        "labels": rng.integers(0, 10, size=5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "empty": np.zeros((0, 3), dtype=np.float32),
        # names np.savez(file, **arrays) cannot take, and a pair np.load's lookup would confuse
        "file": np.arange(3, dtype=np.int32),
        "allow_pickle": np.ones(2),
        "x": np.eye(2),
        "x.npy": np.full(2, 5.0),
    }


META = {
    "epoch": 3,
    "loss": float("nan"),
    "config": {"hidden": [400, 200], "latent_dim": 20, "name": "vae", "beta": 1.0, "warmup": None},
    "rng": {"bit_generator": "PCG64", "state": {"state": 2**100 + 1, "inc": 12345}},
    "flags": [True, False],
}


def assert_same(arrays, expected):
    assert set(arrays) == set(expected)
    for name, a in expected.items():
        got = arrays[name]
        assert got.dtype == a.dtype and got.shape == a.shape, name
        np.testing.assert_array_equal(got, a, err_msg=name)


def assert_meta(meta, expected):
    assert meta.pop("format_version") == FORMAT_VERSION
    # NaN != NaN: compare through JSON text, which writes it as NaN
    assert json.dumps(meta, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_round_trip(tmp_path):
    arrays = sample_arrays()
    path = save_checkpoint(tmp_path / "ckpt.npz", arrays, META)
    assert path == tmp_path / "ckpt.npz"
    loaded, meta = load_checkpoint(path)
    assert_same(loaded, arrays)
    assert_meta(meta, META)
    assert all(a.flags.writeable for a in loaded.values())
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_overwrite_and_meta_from_a_loaded_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(3)}, {"step": 1, "loss": np.float32(0.5), "n": np.int64(3)})
    arrays, meta = load_checkpoint(path)
    assert meta == {"step": 1, "loss": 0.5, "n": 3, "format_version": FORMAT_VERSION}
    meta["step"] = 2  # a loaded meta (with its format_version) can be saved again
    save_checkpoint(str(path), {"w": arrays["w"] + 1}, meta)
    arrays, meta = load_checkpoint(str(path))
    assert meta["step"] == 2 and (arrays["w"] == 1).all()


def test_plain_npz_without_pickle(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", {"model/w": np.arange(6.0).reshape(2, 3)}, {"epoch": 1})
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["__meta__", "model/w"]
        np.testing.assert_array_equal(f["model/w"], np.arange(6.0).reshape(2, 3))
        meta = json.loads(f["__meta__"].tobytes().decode("utf-8"))
    assert meta == {"epoch": 1, "format_version": FORMAT_VERSION}


@pytest.mark.parametrize(
    "arrays, meta, match",
    [
        ({"w": np.array([1, "a", None], dtype=object)}, {}, "object arrays would need pickle"),
        ({"w": [1, [2, 3]]}, {}, "cannot be made an array"),
        ({"w": np.array([{"a": 1}])}, {}, "dtype object"),
        ({"__meta__": np.zeros(1)}, {}, "reserved"),
        ({1: np.zeros(1)}, {}, "non-empty strings"),
        ({"": np.zeros(1)}, {}, "non-empty strings"),
        ([np.zeros(1)], {}, "dict of name -> array"),
        ({"w": np.zeros(1)}, {"w": np.zeros(3)}, "belongs in `arrays`"),
        ({"w": np.zeros(1)}, {"s": {1, 2}}, "set is not JSON-serialisable"),
        ({"w": np.zeros(1)}, {(1, 2): 3}, "not JSON-serialisable"),
        ({"w": np.zeros(1)}, {"format_version": 2}, "format_version"),
        ({"w": np.zeros(1)}, [("epoch", 1)], "meta to be a dict"),
    ],
)
def test_save_rejects_before_writing(tmp_path, arrays, meta, match):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(2)}, {"v": 1})
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(path, arrays, meta)
    assert os.listdir(tmp_path) == ["c.npz"]
    assert load_checkpoint(path)[1]["v"] == 1


def test_failed_save_keeps_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(2)}, {"v": 1})
    calls = []

    def failing_write(fp, array, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_array(fp, array, **kw)

    write_array = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": np.zeros(2), "b": np.zeros(3)}, {"v": 2})
    assert os.listdir(tmp_path) == ["c.npz"]
    arrays, meta = load_checkpoint(path)
    assert meta["v"] == 1 and (arrays["w"] == 1).all()


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.npz", {"w": np.ones(1)}, {})


# ----------------------------------------------------------------------------- damaged files


SAVED = {"w": np.arange(12.0).reshape(3, 4), "n": np.arange(5), "big": np.arange(1500.0).reshape(300, 5)}


def valid_bytes() -> bytes:
    buf = io.BytesIO()
    checkpoint._write_npz(buf, {**SAVED, checkpoint.META_KEY: checkpoint._meta_bytes({"epoch": 2})})
    return buf.getvalue()


def npz_bytes(allow_pickle=False, **arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=allow_pickle, **arrays)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    return buf.getvalue()


def meta_array(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


GOOD = valid_bytes()
BAD_FILES = {
    "empty": (b"", "not a readable .npz"),
    "garbage": (bytes(range(256)) * 4, "not a readable .npz"),
    "text": (b"hello, I am not a checkpoint\n", "not a readable .npz"),
    "pickle": (pickle.dumps({"w": [1, 2]}), "not a readable .npz"),
    "npy": (npy_bytes(np.zeros(3)), "not a readable .npz"),
    "truncated-half": (GOOD[: len(GOOD) // 2], "not a readable .npz"),
    "truncated-tail": (GOOD[:-1], "not a readable .npz"),
    "truncated-head": (GOOD[:30], "not a readable .npz"),
    "no-meta": (npz_bytes(w=np.zeros(3)), "no '__meta__' entry"),
    "bad-json": (npz_bytes(__meta__=np.frombuffer(b'{"epoch": 1', dtype=np.uint8)), "not valid UTF-8 JSON"),
    "bad-utf8": (npz_bytes(__meta__=np.frombuffer(b"\xff\xfe", dtype=np.uint8)), "not valid UTF-8 JSON"),
    "json-list": (npz_bytes(__meta__=meta_array([1, 2])), "must hold a JSON object"),
    "meta-dtype": (npz_bytes(__meta__=np.zeros(3)), "must be a 1-D uint8 array"),
    "no-version": (npz_bytes(__meta__=meta_array({"epoch": 1})), "no integer format_version"),
    "bool-version": (npz_bytes(__meta__=meta_array({"format_version": True})), "no integer format_version"),
    "newer-version": (npz_bytes(__meta__=meta_array({"format_version": 2})), "newer npvae"),
    "older-version": (npz_bytes(__meta__=meta_array({"format_version": 0})), "format_version 0"),
    "object-array": (npz_bytes(allow_pickle=True, w=np.array([1, None])), r"object array \(dtype=object\)"),
}


@pytest.mark.parametrize("content, match", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_damaged_files_raise_checkpoint_error(tmp_path, content, match):
    path = tmp_path / "c.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_header_that_does_not_match_its_data(tmp_path):
    # np.load returns the first 200 rows of the 300-row array here: the header is inside the CRC, but
    # np.load stops reading at the end of the array data and so never checks it.
    damaged = GOOD.replace(b"'shape': (300, 5)", b"'shape': (200, 5)", 1)
    assert damaged != GOOD
    path = tmp_path / "c.npz"
    path.write_bytes(damaged)
    with np.load(path, allow_pickle=False) as f:
        assert f["big"].shape == (200, 5)
    # caught before the CRC: the header's size disagrees with the zip's, so nothing is allocated for it
    with pytest.raises(CheckpointError, match=r"'big': header says shape \(200, 5\) of float64 \(8000 bytes\), "
                                              "the file holds 12000"):
        load_checkpoint(path)

    # the same inconsistency with a valid CRC, as a buggy writer would make it
    member = io.BytesIO()
    np.lib.format.write_array(member, np.zeros((300, 5)))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("big.npy", member.getvalue().replace(b"(300, 5)", b"(200, 5)", 1))
        zf.writestr("__meta__.npy", npy_bytes(checkpoint._meta_bytes({})))
    expected = r"'big': header says shape \(200, 5\) of float64 \(8000 bytes\), the file holds 12000"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, ValueError)


def test_foreign_member_and_duplicate_member(tmp_path):
    path = tmp_path / "c.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="unexpected member 'readme.txt'"):
        load_checkpoint(path)
    member = io.BytesIO()
    np.lib.format.write_array(member, np.zeros(2))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "w") as zf:
        zf.writestr("w.npy", member.getvalue())
        zf.writestr("w.npy", member.getvalue())
    with pytest.raises(CheckpointError, match="array 'w' appears twice"):
        load_checkpoint(path)


def mutate(data: bytes, kind: str, pos: int, value: int) -> bytes:
    b = bytearray(data)
    i = pos % len(b)
    if kind == "flip":
        b[i] ^= value or 1
    elif kind == "truncate":
        del b[i:]
    elif kind == "insert":
        b[i:i] = bytes([value]) * (1 + pos % 7)
    elif kind == "delete":
        del b[i : i + 1 + value % 8]
    return bytes(b)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["flip", "truncate", "insert", "delete"]),
    pos=st.integers(0, len(GOOD) - 1),
    value=st.integers(0, 255),
)
def test_mutated_checkpoint_loads_intact_or_raises_checkpoint_error(tmp_path, kind, pos, value):
    # One mutation per example: a zip member's name is outside its CRC, so two matching flips (in
    # the local and the central header) could rename an array and still load. Run offline, every
    # single-byte flip, truncation, insertion and deletion of this file behaves as asserted here.
    path = tmp_path / "mutated.npz"
    path.write_bytes(mutate(GOOD, kind, pos, value))
    try:
        arrays, meta = load_checkpoint(path)
    except CheckpointError:
        return
    # whatever loads must be exactly what was saved (damage to bytes nothing reads is harmless)
    assert_same(arrays, SAVED)
    assert meta == {"epoch": 2, "format_version": FORMAT_VERSION}


# ----------------------------------------------------------------------------- atomicity under SIGKILL

WRITER = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("ckpt", sys.argv[1])
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    path = sys.argv[2]
    version = int(sys.argv[3])
    while True:
        version += 1
        ckpt.save_checkpoint(path, {"a": np.full(300_000, version, dtype=np.float64),
                                    "b": np.full((50, 40), version, dtype=np.int32)}, {"version": version})
        if version == int(sys.argv[3]) + 1:
            print("saved", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    # SIGKILL stops the writer at arbitrary points (inside a save most of the time: one save is a few
    # ms of writing and fsync). The page cache survives a killed process, so this checks the
    # write-then-rename protocol, not fsync (which needs a power cut to test).
    path = tmp_path / "ckpt.npz"
    rng = random.Random(0)
    version = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ROOT / "npvae" / "checkpoint.py"), str(path), str(version)],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout.readline() == b"saved\n"
            proc.stdout.close()
            try:
                proc.wait(timeout=rng.uniform(0.0, 0.15))
            except subprocess.TimeoutExpired:
                pass
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        arrays, meta = load_checkpoint(path)
        v = meta["version"]
        assert v > version
        assert arrays["a"].shape == (300_000,) and (arrays["a"] == v).all()
        assert arrays["b"].shape == (50, 40) and (arrays["b"] == v).all()
        version = v
    strays = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.npz"]
    assert all(name.startswith(".ckpt.npz.") and name.endswith(".tmp") for name in strays)
    save_checkpoint(path, {"a": np.zeros(1)}, {"version": -1})  # stray temp files do not get in the way
    assert load_checkpoint(path)[1]["version"] == -1


# ----------------------------------------------------------------------------- check_arrays


def test_check_arrays_names_every_problem():
    arrays = {
        "encoder.0.weight": np.zeros((256, 784), np.float32),
        "encoder.0.bias": np.zeros(400, np.float64),
        "decoder.extra": np.zeros(3),
    }
    expected = {
        "encoder.0.weight": ((400, 784), np.float32),
        "encoder.0.bias": ((400,), np.float32),
        "decoder.0.weight": ((784, 400), None),
        "decoder.0.bias": ((784,), None),
    }
    with pytest.raises(CheckpointError) as info:
        check_arrays(arrays, expected, what="model checkpoint")
    msg = str(info.value)
    assert msg.startswith("model checkpoint does not match:")
    assert "missing: decoder.0.weight, decoder.0.bias" in msg
    assert "unexpected: decoder.extra" in msg
    assert "encoder.0.weight: expected (400, 784), got (256, 784)" in msg
    assert "encoder.0.bias: expected dtype float32, got float64" in msg
    check_arrays({"w": np.zeros((2, 3))}, {"w": ((2, 3), None)})
    check_arrays({"w": np.zeros((2, 3))}, {"w": ([2, 3], "float64")})
