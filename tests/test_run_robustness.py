"""A run directory under attack: two runs on one --out, SIGTERM, unwritable and full disks, kills between
the writes of an epoch, and resumes that must continue the run exactly as it was set up."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from npvae import checkpoint as ckpt_module
from npvae.checkpoint import load_checkpoint
from npvae.cli import main
from npvae.models import load_model
from npvae.rundir import LOCK, RunLock, RunLocked, reconcile_log

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SMALL = ["--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--batch-size", "500", "--no-progress",
         "--seed", "3"]


def train(*args, out, pictures=False) -> int:
    return main(["train", *SMALL, *args, "--out", str(out), *([] if pictures else ["--no-pictures"])])


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, timeout=120.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- one run per directory


HOLDER = textwrap.dedent("""
    import sys, time
    from npvae.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_recovered(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert train("--epochs", "1", out=out) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and "another --out" in err and "Traceback" not in err
        assert not (out / "checkpoint.npz").exists()
        with pytest.raises(RunLocked, match=str(holder.pid)):
            RunLock(out).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops its lock
        holder.wait()
    assert train("--epochs", "1", out=out) == 0
    assert (out / "checkpoint.npz").exists() and not (out / LOCK).exists()


def test_the_lock_is_released_after_errors(tmp_path):
    out = tmp_path / "run"
    assert train("--epochs", "1", out=out) == 0
    assert train("--epochs", "1", out=out) == 2  # checkpoint exists: refused, and the lock goes with it
    with RunLock(out):
        pass


# ----------------------------------------------------------------------------- SIGTERM


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs SIGTERM")
def test_sigterm_saves_says_where_and_exits_143_then_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "npvae.cli", "train", *SMALL[:-2], "--seed", "3", "--hidden", "64",
            "--batch-size", "50", "--epochs", "30", "--no-pictures", "--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoint.npz").exists(), proc, what="the first checkpoint")
        # while it runs, a second run on the same --out is refused
        assert train("--epochs", "1", out=out) == 2
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stdout and "--resume" in stdout
    _, meta = load_checkpoint(out / "checkpoint.npz")
    assert 1 <= meta["epoch"] < 30
    records = log_records(out)
    assert records[-1] == {"event": "end", "stopped": "interrupted", "step": meta["step"], "epoch": meta["epoch"]}
    assert main(["train", "--out", str(out), "--resume", "--epochs", str(meta["epoch"] + 1), "--no-progress"]) == 0
    assert load_checkpoint(out / "checkpoint.npz")[1]["epoch"] == meta["epoch"] + 1


# ----------------------------------------------------------------------------- unwritable and full disks


def test_an_out_that_cannot_be_created_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train("--epochs", "1", out=blocker / "run") == 2
    captured = capsys.readouterr()
    assert f"cannot write to {blocker / 'run'}" in captured.err and "Traceback" not in captured.err
    assert "epoch 1/1" not in captured.out  # nothing trained


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (root only); yields a function size, options -> mount point."""
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting needs root")
def test_read_only_out_fails_before_training(mount_tmpfs, capsys):
    point = mount_tmpfs("1m", "ro")
    assert train("--epochs", "1", out=point / "run") == 2
    captured = capsys.readouterr()
    assert "cannot write to" in captured.err and "Read-only file system" in captured.err
    assert "epoch 1/1" not in captured.out


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting needs root")
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(mount_tmpfs, capsys):
    point = mount_tmpfs("400k")  # an epoch's checkpoint (~210 KB) and best.npz fit once, not twice
    out = point / "run"
    assert train("--epochs", "5", "--patience", "0", out=out, pictures=True) == 2
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "Traceback" not in captured.err
    assert "last good checkpoint is" in captured.err or "no checkpoint was saved" in captured.err
    if (out / "checkpoint.npz").exists():
        _, meta = load_checkpoint(out / "checkpoint.npz")  # intact
        epochs = [r["epoch"] for r in log_records(out) if r["event"] == "epoch"]
        assert epochs == list(range(1, meta["epoch"] + 1))  # the log is never ahead of the checkpoint
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".part"))]
    assert not leftovers
    for png in out.glob("*.png"):  # pictures are whole or absent
        assert png.read_bytes().endswith(b"IEND\xaeB`\x82"), png


def test_an_injected_enospc_at_the_second_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = ckpt_module._write_npz
    calls = {"n": 0}

    def failing(f, arrays):
        calls["n"] += 1
        if calls["n"] == 4:  # best and checkpoint of epoch 1 went through; best of epoch 2 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, arrays)

    monkeypatch.setattr(ckpt_module, "_write_npz", failing)
    assert train("--epochs", "3", "--patience", "0", out=out) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err
    assert f"the last good checkpoint is {out / 'checkpoint.npz'} (epoch 1)" in err
    assert [r["epoch"] for r in log_records(out) if r["event"] == "epoch"] == [1]
    assert load_checkpoint(out / "checkpoint.npz")[1]["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ckpt_module, "_write_npz", real)
    assert train("--epochs", "3", "--patience", "0", "--resume", out=out) == 0  # and the run goes on


# ----------------------------------------------------------------------------- kills between the writes


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_killed_between_writes_the_files_agree_and_resume_matches(tmp_path, monkeypatch, kill_at):
    reference = tmp_path / "reference"
    assert train("--epochs", "3", "--patience", "0", out=reference) == 0
    out = tmp_path / "run"
    real_save, real_append = ckpt_module.save_checkpoint, None
    import npvae.train as train_module

    real_append = train_module.append_log
    writes = {"n": 0}

    def count():
        writes["n"] += 1
        if writes["n"] == kill_at:
            raise Killed

    def save(*a, **k):
        count()
        return real_save(*a, **k)

    def append(*a, **k):
        count()
        return real_append(*a, **k)

    import npvae.models.saving as saving

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    monkeypatch.setattr(saving, "save_checkpoint", save)
    monkeypatch.setattr(train_module, "append_log", append)
    with pytest.raises(Killed):
        train("--epochs", "3", "--patience", "0", out=out)
    monkeypatch.undo()
    # the invariants at the moment of the kill
    if (out / "checkpoint.npz").exists():
        _, meta = load_checkpoint(out / "checkpoint.npz")
        if meta["best_val_loss"] is not None:
            _, best = load_model(out / "best.npz")
            assert best["epoch"] >= max(r["epoch"] for r in meta["history"] if r["val_loss"] == meta["best_val_loss"])
        if (out / "log.jsonl").exists():
            logged = [r["epoch"] for r in log_records(out) if r["event"] == "epoch"]
            assert max(logged, default=0) <= meta["epoch"]
        assert main(["train", *SMALL, "--epochs", "3", "--patience", "0", "--no-pictures", "--out", str(out),
                     "--resume"]) == 0
    else:  # killed before the first checkpoint: nothing to resume, and a best.npz a new run must not take silently
        (out / "log.jsonl").unlink(missing_ok=True)
        if (out / "best.npz").exists():
            assert train("--epochs", "3", "--patience", "0", out=out) == 2
        assert train("--epochs", "3", "--patience", "0", "--overwrite", out=out) == 0
    # and the finished run is the uninterrupted one, files and log alike
    for name in ("checkpoint.npz", "best.npz"):
        a, ma = load_checkpoint(out / name)
        b, mb = load_checkpoint(reference / name)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        assert ma.get("epoch") == mb.get("epoch")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs
                        if r["event"] == "epoch"]
    assert strip(log_records(out)) == strip(log_records(reference))


def test_reconcile_log_drops_lines_ahead_and_restores_lost_ones(tmp_path):
    log = tmp_path / "log.jsonl"
    history = [{"event": "epoch", "epoch": 1, "step": 10}, {"event": "epoch", "epoch": 2, "step": 20}]
    log.write_text(json.dumps(history[0]) + "\n" + json.dumps({"event": "grad_norms", "step": 25}) + "\n"
                   + '{"event": "epo')  # epoch 2 lost, a record from beyond the checkpoint, a torn line
    assert reconcile_log(log, history, step=20) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == history
    assert reconcile_log(log, history, step=20) == 0


# ----------------------------------------------------------------------------- resume restores the run


def test_resume_restores_every_setting_and_refuses_contradicting_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "demo", "--hidden", "16", "--latent-dim", "2", "--batch-size", "250",
                 "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.5", "--binarize", "dynamic",
                 "--kl-warmup", "2", "--patience", "7", "--seed", "4", "--epochs", "1", "--no-progress",
                 "--no-pictures", "--out", str(out)]) == 0
    saved = load_checkpoint(out / "checkpoint.npz")[1]["train_config"]
    capsys.readouterr()
    # contradicting flags: all listed, nothing trained
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.1", "--optimizer", "adam", "--dataset",
                 "fashion-mnist", "--latent-dim", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    for flag in ("--lr 0.1", "--optimizer adam", "--dataset fashion-mnist", "--latent-dim 5"):
        assert flag in err
    assert "the run used 0.05" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.npz")[1]["epoch"] == 1
    # flags left out take the run's values, not the parser's defaults; --epochs may grow, and is recorded
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress", "--no-pictures"]) == 0
    assert "epochs 1 -> 2" in capsys.readouterr().out
    _, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["epoch"] == 2 and meta["train_config"] == {**saved, "epochs": 2}
    assert meta["optimizer_scalars"]["lr"] == 0.05
    resume = [r for r in log_records(out) if r["event"] == "resume"]
    assert resume == [{"event": "resume", "step": 18, "epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1", "--no-progress"]) == 2
    assert "already trained 2 epochs" in capsys.readouterr().err


def test_resume_without_out_finds_the_default_run_or_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "--dataset", "demo", "--no-progress"]) == 2
    assert "no checkpoint in runs/vae-demo" in capsys.readouterr().err


# ----------------------------------------------------------------------------- settings out of range


@pytest.mark.parametrize("flags, message", [
    (["--kl-warmup", "nan"], "argument --kl-warmup: expected a finite number, got nan"),
    (["--kl-warmup", "-1"], "kl_warmup_epochs a finite number >= 0"),
    (["--lr", "inf"], "argument --lr: expected a finite number"),
    (["--lr", "0"], "lr a positive finite number"),
    (["--weight-decay", "nan"], "--weight-decay: expected a finite number"),
    (["--momentum", "-0.5"], "momentum a finite number in [0, 1)"),
    (["--momentum", "1"], "momentum a finite number in [0, 1)"),
    (["--clip-grad-norm", "-1"], "clip_grad_norm a positive finite number"),
    (["--epochs", "0"], "--epochs: expected a whole number from 1"),
    (["--batch-size", "-3"], "--batch-size: expected a whole number from 1"),
    (["--latent-dim", "1.7"], "--latent-dim: expected a whole number, got '1.7'"),
    (["--hidden", "100000000"], "--hidden: expected a whole number from 1 to 65,536"),
    (["--objective", "iwae", "--k", "5000", "--batch-size", "128"], "decodes 640,000 samples per step"),
])
def test_bad_training_settings_fail_before_loading_data(tmp_path, capsys, flags, message):
    assert main(["train", "--dataset", "demo", *flags, "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "data:" not in captured.out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["reconstruct", "CKPT", "--n", "-3"], "--n: expected a whole number from 1"),
    (["sample", "CKPT", "--n", "100000000"], "--n: expected a whole number from 1 to 10,000"),
    (["plot", "CKPT", "manifold", "--n", "1000"], "manifold with --n 1000 would draw 1,000,000 images"),
    (["plot", "CKPT", "interpolation", "--n", "500", "--steps", "100"], "would draw 50,000 images"),
    (["grads", "CKPT", "--draws", "10000000"], "--draws: expected a whole number from 2 to 100,000"),
    (["grads", "CKPT", "--k", "1,5,1000000"], "--k: expected integers from 1 to 10,000"),
    (["grads", "CKPT", "--k", "1,10000", "--examples", "100"], "decodes 1,000,000 samples per draw"),
    (["evaluate", "CKPT", "--iw-samples", "0"], "--iw-samples: expected a whole number from 1"),
    (["sample", "CKPT", "--seed", "-1"], "--seed: expected a whole number from 0"),
])
def test_counts_from_the_command_line_are_bounded(trained_run, tmp_path, capsys, argv, message):
    argv = [str(trained_run / "best.npz") if a == "CKPT" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "x.png")] if argv[0] in ("sample", "reconstruct", "plot")
                else argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- crafted checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("crafted") / "run"
    assert train("--epochs", "1", out=out) == 0
    return out


BAD_VALUES = [None, -1, 2.5, "x", [], [1], {"a": 1}]


def _meta_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield prefix + (key,)
            yield from _meta_paths(value, prefix + (key,))
    elif isinstance(obj, list) and len(obj) <= 4:
        for i, value in enumerate(obj):
            yield prefix + (i,)
            yield from _meta_paths(value, prefix + (i,))


def test_metadata_of_any_wrong_json_type_is_one_checkpoint_error(trained_run, tmp_path):
    import copy

    from npvae import data
    from npvae.checkpoint import CheckpointError, save_checkpoint
    from npvae.cli import checkpoint_info
    from npvae.train import TrainConfig, Trainer, check_run_meta

    arrays, meta = load_checkpoint(trained_run / "checkpoint.npz")
    dataset = data.load_dataset("demo", seed=3)
    paths = [p for p in _meta_paths(meta) if p[0] != "format_version"
             and not (p[0] in ("history", "rng_state") and len(p) > 2)
             and not (p[0] == "history" and len(p) > 1 and p[1] > 0)]
    crafted = tmp_path / "crafted.npz"
    tried = 0
    for path in paths:
        for value in BAD_VALUES:
            bad = copy.deepcopy(meta)
            target = bad
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            save_checkpoint(crafted, arrays, bad)
            tried += 1
            try:
                checkpoint_info(crafted)
                model, loaded = load_model(crafted)
                check_run_meta(loaded, crafted)
                Trainer(model, dataset, TrainConfig(**loaded.get("train_config", {})), tmp_path / "t").restore(crafted)
            except CheckpointError:
                pass
            except Exception as exc:  # noqa: BLE001 - anything else is the bug this test looks for
                pytest.fail(f"meta{list(path)} = {value!r}: {type(exc).__name__}: {exc}")
    assert tried > 300


def test_deeply_nested_metadata_and_lying_sizes_are_refused_before_allocating(tmp_path):
    import io
    import tracemalloc
    import zipfile

    from npvae.checkpoint import META_KEY, CheckpointError

    def write(path, members):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, payload in members.items():
                zf.writestr(name, payload)

    def npy(array):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array)
        return buffer.getvalue()

    deep = tmp_path / "deep.npz"
    write(deep, {f"{META_KEY}.npy": npy(np.frombuffer(b"[" * 200_000 + b"]" * 200_000, np.uint8))})
    with pytest.raises(CheckpointError, match="nests deeper"):
        load_checkpoint(deep)

    # a header claiming 8 GB over a few bytes, and a deflated member whose zip entry claims as much
    liar = tmp_path / "liar.npz"
    header = npy(np.zeros(1))
    write(liar, {"w.npy": header.replace(b"(1,)", b"(1000000000,)", 1)})
    bomb = tmp_path / "bomb.npz"
    write(bomb, {"w.npy": npy(np.zeros(1_000_000))})  # 8 MB that deflates to ~8 KB
    with zipfile.ZipFile(bomb) as zf:
        assert zf.infolist()[0].compress_size < 8_000_000 / 500
    tracemalloc.start()
    for path, message in ((liar, "header says shape"), (bomb, "no '__meta__' entry")):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000_000  # the honest 8 MB member is read; the 8 GB claim allocates nothing

    data = bytearray(bomb.read_bytes())  # the same member, its declared size raised 400-fold (3.2 GB)
    with zipfile.ZipFile(bomb) as zf:
        info = zf.infolist()[0]
    central = data.rfind(b"PK\x01\x02")
    size_at = central + 24
    data[size_at:size_at + 4] = (info.file_size * 400).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(bomb)


def test_float64_values_beyond_float32_are_refused_not_loaded_as_inf(trained_run, tmp_path):
    from npvae.checkpoint import CheckpointError, save_checkpoint

    arrays, meta = load_checkpoint(trained_run / "best.npz")
    key = next(k for k in arrays if k.endswith("weight"))
    arrays[key] = arrays[key].astype(np.float64)
    arrays[key][0, 0] = 1e300
    save_checkpoint(tmp_path / "huge.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="beyond float32's range"):
        load_model(tmp_path / "huge.npz")


def test_a_picture_path_without_suffix_is_written_and_reported_as_png(trained_run, tmp_path, capsys):
    assert main(["sample", str(trained_run / "best.npz"), "--n", "4", "--out", str(tmp_path / "noext")]) == 0
    assert f"wrote {tmp_path / 'noext.png'}" in capsys.readouterr().out
    assert (tmp_path / "noext.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext.png"]  # no temporary file left
