"""A run directory's housekeeping: one run at a time, writable before the first epoch, a log never ahead
of the checkpoint.

A training run owns its ``--out`` folder: ``checkpoint.npz``, ``best.npz``, ``log.jsonl`` and the pictures.
:class:`RunLock` makes that ownership explicit with an advisory ``flock`` on ``.npvae.lock`` (POSIX): a
second run on the same folder is refused with the holder's pid, host and command, and a lock left by a
killed process needs no cleanup, because the kernel releases a dead process's locks. Where ``flock`` is
missing (Windows), an exclusive-create file with the holder's pid stands in, and a holder that is no longer
running is recovered.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
from pathlib import Path

from .checkpoint import atomic_write, read_bytes, read_text

LOCK = ".npvae.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunLocked(RuntimeError):
    """Another live process trains in this run directory."""


class OutputError(OSError):
    """The run directory cannot be written (read-only, permission denied, disk full)."""


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


class RunLock:
    """Exclusive ownership of a run directory for one process.

    Parameters
    ----------
    directory : path
        The run directory; must exist.

    Raises
    ------
    RunLocked
        From :meth:`acquire`, when a live process holds the directory; the message names it.
    OutputError
        When the lock file cannot be created (the directory is not writable).
    """

    def __init__(self, directory):
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    def _identity(self) -> str:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command or "python"})

    def acquire(self) -> "RunLock":
        try:
            if fcntl is not None:
                self._acquire_flock()
            else:
                self._acquire_exclusive()
        except OSError as exc:
            if isinstance(exc, RunLocked):
                raise
            raise OutputError(exc.errno, f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
        return self

    def _acquire_flock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise RunLocked(f"{self.path.parent} is in use by {_describe_holder(holder)}: wait for that run "
                                "to finish or stop it, or choose another --out") from None
            if _same_file(fd, self.path):
                break
            # The holder unlinked the file between our open and our flock (it releases by unlinking): we
            # locked a dead inode another process can no longer see. Open the path again.
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._identity().encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_exclusive(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = self.path.read_text(errors="replace") if self.path.exists() else ""
                try:
                    pid = int(json.loads(text)["pid"])
                except (ValueError, KeyError, TypeError):
                    pid = None
                if pid is not None and _pid_alive(pid):
                    raise RunLocked(f"{self.path.parent} is in use by {_describe_holder(text)}: wait for that "
                                    "run to finish or stop it, or choose another --out") from None
                self.path.unlink(missing_ok=True)  # left by a process that is gone
                continue
            os.write(fd, self._identity().encode())
            self._fd = fd
            return
        raise RunLocked(f"{self.path.parent}: could not take the run lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fcntl is None:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        # Unlink while still holding the lock, so a waiting run never locks a file about to vanish.
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(directory) -> Path:
    """Create ``directory`` (and parents) and prove a file can be written and renamed in it.

    Raises
    ------
    OutputError
        Naming the directory and the reason (read-only file system, permission denied, no space, a file
        where a directory belongs).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = atomic_write(directory / f".npvae-write-test-{os.getpid()}", lambda f: f.write(b"npvae"))
        probe.unlink()
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot write to {directory}: {exc.strerror or exc}") from None
    return directory


# ----------------------------------------------------------------------------- the log


def append_log(path, record: dict) -> None:
    """Append one JSON line to the run's log, flushed to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class LogError(ValueError):
    """A run's ``log.jsonl`` cannot be read: the message names the file and the line."""


def _parse_line(line: str):
    """One log line as JSON, or None when it is no JSON a log could hold (too deeply nested included)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


# Log keys renamed when the loss's second term stopped being called kl (every model has a regulariser;
# a VAE's is its KL): records written before read under today's names.
RENAMED_LOG_KEYS = {"train_kl": "train_reg", "val_kl": "val_reg", "kl_weight": "reg_weight"}


def upgrade_record(record: dict) -> dict:
    """A log or history record under today's key names (:data:`RENAMED_LOG_KEYS`); values unchanged."""
    if not any(key in record for key in RENAMED_LOG_KEYS):
        return record
    return {RENAMED_LOG_KEYS.get(key, key): value for key, value in record.items()}


def read_log(path) -> list[dict]:
    """The records of a run's ``log.jsonl``: a regular file, read no further than its size.

    Raises
    ------
    LogError
        One line naming the file and the first line that is not a JSON object (or the file, when it is a
        FIFO, a device or a folder).
    """
    rows = []
    for lineno, line in enumerate(read_text(path, LogError, "log").splitlines(), 1):
        if not line.strip():
            continue
        row = _parse_line(line)
        if not isinstance(row, dict):
            raise LogError(f"{path}, line {lineno}: not valid JSON (or nested too deeply to read)"
                           if row is None else f"{path}, line {lineno}: expected a JSON object, got "
                           f"{type(row).__name__}")
        rows.append(upgrade_record(row))
    return rows


def reconcile_log(path, history: list[dict], step: int) -> int:
    """Make ``log.jsonl`` agree with a checkpoint before a resumed run appends to it.

    The trainer writes the checkpoint first and the log line after it, so a run killed between the two
    (or a full disk) leaves a log that lacks the checkpoint's last epoch, or ends in a partial line. This
    keeps the log's records up to the checkpoint (epoch records the checkpoint's ``history`` holds, other
    records up to its ``step``), restores epoch records the log lost from ``history``, drops unreadable
    lines, and rewrites the file atomically.

    Returns
    -------
    int
        How many lines were dropped or restored (0 when the log already agreed).
    """
    path = Path(path)
    exists = path.exists() or path.is_symlink()
    lines = read_bytes(path, LogError, "log").decode("utf-8", "replace").splitlines() if exists else []
    epochs = {int(r["epoch"]) for r in history if isinstance(r, dict) and "epoch" in r}
    last_epoch = max(epochs, default=0)
    kept, seen, changes = [], set(), 0
    for line in lines:
        record = _parse_line(line)
        if not isinstance(record, dict):
            changes += 1
            continue
        event = record.get("event")
        if event == "epoch":
            ok = record.get("epoch") in epochs and record.get("epoch") not in seen
            if ok:
                seen.add(record["epoch"])
        else:
            rec_step = record.get("step")
            ok = not isinstance(rec_step, int) or rec_step <= step
            if event == "end" and isinstance(record.get("epoch"), int):
                ok = ok and record["epoch"] <= last_epoch
        if ok:
            kept.append(record)
        else:
            changes += 1
    for r in history:
        if isinstance(r, dict) and r.get("epoch") not in seen:
            kept.append(r)
            changes += 1
    if changes:
        kept.sort(key=lambda r: (r.get("step") if isinstance(r.get("step"), int) else 0))
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        atomic_write(path, lambda f: f.write(text))
    return changes


def picture_path(out, name: str) -> Path:
    """Where a picture asked for with ``--out OUT`` goes: ``OUT/name`` when OUT is a folder (never a
    ``OUT.png`` beside it), else OUT itself."""
    out = Path(out)
    return out / name if out.is_dir() else out


# ----------------------------------------------------------------------------- whose folder


# What a training run writes into its --out: the files, the latest pictures, and pictures/NAME_eNNN.png.
RUN_FILES = ("checkpoint.npz", "best.npz", "log.jsonl")
LATEST_PICTURES = ("reconstructions.png", "samples.png", "classes.png")
_EPOCH_PICTURE = re.compile(r"[a-z_]+_e\d{3,}\.png")


def run_outputs(directory) -> list[Path]:
    """The files in ``directory`` that a training run wrote (none for a new or an unrelated folder)."""
    directory = Path(directory)
    found = [directory / name for name in (*RUN_FILES, *LATEST_PICTURES)
             if os.path.lexists(directory / name)]
    pictures = directory / "pictures"
    if pictures.is_dir():
        found += sorted(p for p in pictures.iterdir() if _EPOCH_PICTURE.fullmatch(p.name))
    return found


def _listing(paths: list[Path], directory: Path) -> str:
    names = [str(p.relative_to(directory)) for p in paths]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def claim_outputs(directory, overwrite: bool = False) -> list[Path]:
    """Make sure a new run does not mix its files with another run's in ``directory``.

    Parameters
    ----------
    directory : path
        The new run's ``--out``.
    overwrite : bool
        Remove the other run's outputs instead of refusing.

    Returns
    -------
    list of Path
        What was removed (empty unless ``overwrite``).

    Raises
    ------
    FileExistsError
        Naming the outputs found: continue that run with ``--resume``, remove them with ``--overwrite``,
        or choose another ``--out``.
    """
    directory = Path(directory)
    found = run_outputs(directory)
    if found and not overwrite:
        raise FileExistsError(f"{directory} holds another run's outputs ({_listing(found, directory)}): choose "
                              "another --out for a new run (or --resume to continue that one, --overwrite to "
                              "remove it)")
    for path in found:
        path.unlink(missing_ok=True)
    return found


def describe_removed(removed: list[Path], directory) -> str:
    """The line ``--overwrite`` prints: what it removed."""
    return f"--overwrite: removed {len(removed)} file{'s' * (len(removed) != 1)} of an earlier run from " \
           f"{directory}: {_listing(removed, Path(directory))}"
