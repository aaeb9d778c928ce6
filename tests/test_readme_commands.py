"""Every ``npvae ...`` command shown in README.md's code blocks runs, as written, in the order shown.

The commands run in-process (``npvae.cli.main``) in one empty working directory with ``HOME`` pointed
there (``~/data`` is a folder of it), so each finds the runs the lines above it made. Where a README
command would train for long or on data this machine may not have, small settings are appended to
it: argparse keeps an option's last value, so ``npvae train --dataset fashion-mnist --epochs 10``
runs as ``... --dataset demo --epochs 1 --limit 300``; everything else on the line is used as
written. The appended flags are in :data:`SMALL`; a ``--resume`` line gets none (it continues the run
as it was set up). A shell redirection ``> FILE`` writes the command's output to FILE, as the shell
would. A README command that fails, or that the CLI no longer accepts, fails this test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from npvae.cli import main

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"

# Appended to each command (argparse: the last value wins): the demo digits and small settings.
SMALL = {
    "train": ["--dataset", "demo", "--epochs", "1", "--limit", "300", "--no-progress", "--no-pictures"],
    "evaluate": ["--n", "50"],
    "grads": ["--n", "8", "--draws", "20", "--examples", "1", "--snr-draws", "4"],
    "plot": ["--n", "100"],
}


def readme_commands() -> list[str]:
    """The ``npvae`` commands in README.md's shell code blocks, in order (``a && npvae ...`` too)."""
    commands, language = [], None  # the open block's language; None outside blocks
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            language = line.strip()[3:] or "text" if language is None else None
            continue
        if language not in ("bash", "sh", "shell", "console"):
            continue
        code = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
        for part in code.split("&&"):
            if re.match(r"npvae(\s|$)", part.strip()):
                commands.append(part.strip())
    return commands


def as_run(command: str) -> tuple[list[str], str | None]:
    """The argv of a README command with the small settings appended, and the file it redirects to."""
    words = shlex.split(command)
    redirect = None
    if ">" in words:
        at = words.index(">")
        words, redirect = words[:at], words[at + 1]
    argv = [os.path.expanduser(w) if w.startswith("~") else w for w in words[1:]]
    if argv and argv[0] in SMALL and "--resume" not in argv:
        argv += SMALL[argv[0]]
    return argv, redirect


def test_the_readme_shows_commands_of_every_kind():
    kinds = {as_run(c)[0][0] for c in readme_commands() if as_run(c)[0]}
    assert {"train", "evaluate", "sample", "reconstruct", "plot", "grads", "info"} <= kinds


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NPVAE_DATA_DIR", raising=False)
    (tmp_path / "data").mkdir()
    for command in readme_commands():
        argv, redirect = as_run(command)
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if redirect else contextlib.nullcontext():
            try:
                status = main(argv)
            except SystemExit as exc:  # --version exits as argparse does
                status = exc.code
        if redirect:
            (tmp_path / redirect).write_text(out.getvalue())
        err = capsys.readouterr().err
        assert status == 0, f"README command failed: {command}\n  ran: npvae {' '.join(argv)}\n{err}"
