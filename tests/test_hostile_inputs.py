"""Issue 24's hostile and careless inputs, each reproduced: non-regular files, deep JSON, crafted zip members,
PNG bombs, a run folder taken over, sparse labels, and the smaller items. Each must be one line (or an exact
result), never a hang, a traceback or an allocation beyond what the input holds."""

from __future__ import annotations

import json
import os
import signal
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from npvae import rundir
from npvae.checkpoint import CheckpointError, load_checkpoint, npvae_member, save_checkpoint
from npvae.cli import main
from npvae.data import DataFileError, Dataset, load_path
from npvae.data import png
from npvae.data.png import PNGFormatError, PNG_SIGNATURE, write_png
from tests.conftest import DEMO

RUN = ["--hidden", "8", "--latent-dim", "2", "--no-progress", "--no-pictures"]


@pytest.fixture(autouse=True)
def never_hang():
    """A reader that blocks (a FIFO) fails the test instead of hanging the suite."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)



@pytest.fixture(scope="module")
def run(small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--data", str(small), *RUN, "--epochs", "1", "--out", str(out)]) == 0
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs mkfifo")
    os.mkfifo(path)
    return path


def crafted(path: Path, arrays: dict, meta_edit) -> Path:
    """A copy of a checkpoint with its metadata edited."""
    _, meta = load_checkpoint(path)
    meta_edit(meta)
    meta.pop("format_version")
    return arrays, meta


# ----------------------------------------------------------------------------- non-regular files


def test_a_fifo_as_data_checkpoint_config_or_log_is_refused_without_blocking(run, tmp_path, capsys):
    # on main: each blocks forever
    assert main(["train", "--data", str(fifo(tmp_path / "f.npy")), *RUN, "--out", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert "FIFO" in err and err.count("f.npy") == 1
    assert main(["info", str(fifo(tmp_path / "c.npz"))]) == 2
    assert "FIFO" in one_line(capsys)
    assert main(["train", "--data", str(tmp_path / "f.npy"), "--config", str(fifo(tmp_path / "c.json")),
                 "--out", str(tmp_path / "o")]) == 2
    assert "FIFO" in one_line(capsys)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes())
    fifo(copy / "log.jsonl")
    capsys.readouterr()
    assert main(["plot", str(copy / "checkpoint.npz"), "curves", "--out", str(tmp_path / "c.png")]) == 2
    assert "log.jsonl" in one_line(capsys)
    with pytest.raises(rundir.LogError, match="FIFO"):
        rundir.reconcile_log(copy / "log.jsonl", [], 0)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_as_a_checkpoint_is_refused_at_once(capsys):
    # on main: reads until MemoryError, ignoring SIGTERM
    assert main(["info", "/dev/zero"]) == 2
    assert "character device" in one_line(capsys)


def test_a_runs_recorded_data_path_turned_fifo_is_refused(small, tmp_path, capsys):
    data = tmp_path / "d.npz"
    data.write_bytes(small.read_bytes())
    out = tmp_path / "r"
    assert main(["train", "--data", str(data), *RUN, "--epochs", "1", "--out", str(out)]) == 0
    data.unlink()
    fifo(data)
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.npz")]) == 2
    assert "FIFO" in one_line(capsys)


# ----------------------------------------------------------------------------- exceptions of hostile input


def test_deeply_nested_config_and_log_lines_are_one_line(run, tmp_path, capsys):
    # on main: RecursionError tracebacks
    config = tmp_path / "c.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["train", "--dataset", "demo", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "nested too deeply" in one_line(capsys)
    log = tmp_path / "log.jsonl"
    log.write_text('{"event": "epoch", "epoch": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(rundir.LogError, match="line 2: not valid JSON"):
        rundir.read_log(log)
    assert rundir.reconcile_log(log, [], 0) >= 1  # a resume drops the line instead of failing
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes())
    (copy / "log.jsonl").write_text((run / "log.jsonl").read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    capsys.readouterr()
    assert main(["plot", str(copy / "checkpoint.npz"), "curves", "--out", str(tmp_path / "c.png")]) == 2
    assert "not valid JSON" in one_line(capsys)


def _zip_patched(path: Path, flag_bits: int | None = None, method: int | None = None) -> Path:
    """``path``'s first member flagged encrypted and/or given another compression method, in the central
    directory (what zipfile's infolist reads)."""
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    if flag_bits is not None:
        data[central + 8:central + 10] = struct.pack("<H", flag_bits)
    if method is not None:
        data[central + 10:central + 12] = struct.pack("<H", method)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("flag_bits, method, message", [(1, None, "encrypted"), (None, 9, "method 9"),
                                                         (None, 99, "method 99")])
def test_encrypted_and_unknown_method_members_are_one_line(small, tmp_path, capsys, flag_bits, method, message):
    # on main: RuntimeError / NotImplementedError tracebacks
    data = tmp_path / "d.npz"
    data.write_bytes(small.read_bytes())
    _zip_patched(data, flag_bits, method)
    with pytest.raises(DataFileError, match=message):
        load_path(data)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(data)


def test_unknown_checkpoint_members_are_refused_before_they_are_read(run, tmp_path, capsys):
    # on main: a 5.7 MB file of junk deflated members made `npvae info` allocate 3.2 GB
    import tracemalloc

    path = tmp_path / "junk.npz"
    path.write_bytes((run / "best.npz").read_bytes())
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"junk{i}.npy", _npy_header((8_000_000,)) + bytes(64_000_000))
    tracemalloc.start()
    assert main(["info", str(path)]) == 2
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "unexpected member 'junk0'" in one_line(capsys)
    assert peak < 20_000_000
    with pytest.raises(CheckpointError, match="unexpected member"):
        load_checkpoint(path, npvae_member)


def _npy_header(shape) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the PNG decoder


def _png(width, height, depth, color, idat: bytes) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_bombs_are_refused_from_the_header(tmp_path):
    import time

    # on main: an 11000x11000 16-bit RGBA (962 KB) -> MemoryError traceback; a 143 KB gray bomb -> 55 s of CPU
    rgba = tmp_path / "rgba.png"
    rgba.write_bytes(_png(11000, 11000, 16, 6, zlib.compress(bytes(1_000_000))))
    gray = tmp_path / "gray.png"
    gray.write_bytes(_png(12000, 12000, 8, 0, os.urandom(143_000)))
    liar = tmp_path / "liar.png"  # more pixels than its bytes can inflate to
    liar.write_bytes(_png(9000, 9000, 8, 0, zlib.compress(bytes(10_000))))
    start = time.perf_counter()
    for bomb in (rgba, gray):
        with pytest.raises(PNGFormatError, match="over the 89,478,485-pixel limit"):
            png.read_png(bomb)
    with pytest.raises(PNGFormatError, match="less than deflate needs"):
        png.read_png(liar)
    assert time.perf_counter() - start < 2


def test_a_huge_file_named_png_is_refused_after_its_signature(tmp_path):
    # on main: an 8 GB sparse file named .png was read whole before its signature was checked
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)
    with pytest.raises(PNGFormatError, match="not a PNG file"):
        png.read_png(sparse)
    with open(sparse, "r+b") as f:  # a valid start, then gigabytes of zeros
        f.write(_png(4, 4, 8, 0, zlib.compress(bytes(20)))[:33])
    with pytest.raises(PNGFormatError, match="no valid chunk"):
        png.read_png(sparse)


def test_pillow_decodes_png_and_jpeg_only(tmp_path):
    # on main: an EPS named .png went to Pillow's EPS plugin (Ghostscript)
    pytest.importorskip("PIL")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n")
    with pytest.raises(DataFileError) as info:
        load_path(folder)
    assert "Ghostscript" not in str(info.value) and "a.png" in str(info.value)


def test_broken_links_and_fifos_in_an_image_folder_are_named(tmp_path):
    # on main: skipped without a word
    folder = tmp_path / "images"
    write_png(folder / "a.png", np.zeros((4, 4), np.uint8))
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataFileError, match="b.png: a broken symbolic link"):
        load_path(folder)
    (folder / "b.png").unlink()
    fifo(folder / "c.png")
    with pytest.raises(DataFileError, match="c.png is a FIFO"):
        load_path(folder)


# ----------------------------------------------------------------------------- run folders


def test_a_folder_of_another_run_is_not_taken_over(small, tmp_path, capsys):
    # on main: exit 0, the VAE's best.npz replaced and the AE's records appended to its log.jsonl
    out = tmp_path / "r"
    assert main(["train", "--data", str(small), *RUN, "--epochs", "1", "--out", str(out)]) == 0
    (out / "checkpoint.npz").unlink()
    best, log = (out / "best.npz").read_bytes(), (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--model", "ae", "--data", str(small), *RUN, "--epochs", "1", "--out", str(out)]) == 2
    err = one_line(capsys)
    assert "best.npz" in err and "log.jsonl" in err and "--overwrite" in err and "--resume" in err
    assert (out / "best.npz").read_bytes() == best and (out / "log.jsonl").read_text() == log
    assert main(["train", "--model", "ae", "--data", str(small), *RUN, "--epochs", "1", "--out", str(out),
                 "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "--overwrite: removed 2 files of an earlier run" in printed and "best.npz, log.jsonl" in printed
    assert all(json.loads(line).get("event") != "epoch" or "train_loss" in line
               for line in (out / "log.jsonl").read_text().splitlines())
    assert len([line for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line]) >= 1


def test_the_lock_is_not_taken_on_a_file_unlinked_under_it(tmp_path, monkeypatch):
    # on main: a process that opened .npvae.lock just before the holder unlinked it locked the dead inode
    holder = rundir.RunLock(tmp_path).acquire()
    real_flock = rundir.fcntl.flock
    calls = []

    def flock_after_release(fd, op):
        if not calls:
            holder.release()  # between the second process's open and its flock
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", flock_after_release)
    second = rundir.RunLock(tmp_path).acquire()
    assert len(calls) == 2
    assert os.fstat(second._fd).st_ino == os.stat(tmp_path / rundir.LOCK).st_ino
    second.release()


# ----------------------------------------------------------------------------- labels


def test_a_label_far_outside_the_others_is_one_line(tmp_path, capsys):
    # on main: one label 2**40 -> a CVAE asked 3.38 PiB; a VAE's plot spent 44 s building class names
    with np.load(DEMO) as d:
        x, y = d["images"][::50], d["labels"][::50].astype(np.int64)
    y[0] = 2**40
    data = tmp_path / "sparse.npz"
    np.savez(data, x=x, y=y)
    assert main(["train", "--model", "cvae", "--data", str(data), *RUN, "--out", str(tmp_path / "r")]) == 2
    err = one_line(capsys)
    assert f"label {2**40}" in err and "11 distinct labels" in err and "renumber" in err
    assert Dataset.from_arrays(x, np.arange(100) % 3 * 300).num_classes == 601  # gaps within bounds are fine


# ----------------------------------------------------------------------------- the smaller items


def test_a_target_out_of_range_is_named_as_the_target(tmp_path, capsys):
    from npvae import fit
    from npvae.models import VAE

    x = np.random.default_rng(0).random((40, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="expected target values in"):
        fit(VAE(16, (8,), 2), x, target=x * 3, epochs=1)


def test_crafted_history_fields_are_one_checkpoint_error(run, tmp_path, capsys):
    # on main: "Unknown format code 'f' for object of type 'str'" with no file named
    arrays, meta = load_checkpoint(run / "checkpoint.npz")
    meta["history"][0]["val_loss"] = "low"
    meta.pop("format_version")
    path = save_checkpoint(tmp_path / "h.npz", arrays, meta)
    assert main(["info", str(path)]) == 2
    err = one_line(capsys)
    assert str(path) in err and "'val_loss' should be a number" in err


def test_images_per_second_counts_a_short_batch_as_short(small, tmp_path):
    # on main: --batch-size 200000 on 270 images printed 668,781 img/s
    out = tmp_path / "r"
    assert main(["train", "--data", str(small), *RUN, "--epochs", "1", "--batch-size", "200000",
                 "--out", str(out)]) == 0
    record = next(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line)
    seen = record["images_per_second"] * record["seconds"]  # the training part of 300 images, not 200,000
    assert 250 < seen <= 300 and seen == pytest.approx(round(seen))


def test_info_shows_terminal_codes_escaped_and_json_without_nan(run, tmp_path, capsys):
    # on main: ANSI escapes printed raw; --json emitted NaN
    arrays, meta = load_checkpoint(run / "checkpoint.npz")
    meta["dataset_description"] = "digits\x1b[2J\x1b]0;owned\x07"
    meta["best_val_loss"] = float("nan")
    meta["history"] = []
    meta.pop("format_version")
    path = save_checkpoint(tmp_path / "a.npz", arrays, meta)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "digits\\x1b[2J" in out
    assert main(["info", str(path), "--json"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(capsys.readouterr().out, parse_constant=refuse)["best_val_loss"] is None


def test_sample_out_a_folder_writes_into_it(run, tmp_path, capsys):
    # on main: `sample --out DIR` wrote DIR.png beside it
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["sample", str(run / "best.npz"), "--n", "4", "--out", str(folder)]) == 0
    assert (folder / "samples.png").is_file() and not (tmp_path / "pictures.png").exists()


@pytest.mark.parametrize("momentum", ["1", "1.5"])
def test_momentum_of_one_or_more_is_refused(momentum, tmp_path, capsys):
    # on main: accepted
    assert main(["train", "--dataset", "demo", "--optimizer", "sgd", "--momentum", momentum,
                 "--out", str(tmp_path / "r")]) == 2
    assert "momentum" in one_line(capsys)


def test_fit_passes_ctrl_c_on_to_its_caller(monkeypatch):
    # on main: fit() returned as if training had finished
    from npvae import fit, train
    from npvae.models import VAE

    def interrupted(self, resume=False):
        return train.TrainResult([], "interrupted", self.out_dir, float("inf"), signal=signal.SIGINT)

    monkeypatch.setattr(train.Trainer, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(VAE(16, (8,), 2), np.random.default_rng(0).random((40, 16)).astype(np.float32), epochs=1)
