"""The ``npvae`` command line: train, evaluate, sample, reconstruct, plot, grads and info.

Run ``npvae COMMAND --help`` for each command's options. The parser is built from the registries
(:mod:`~npvae.cli.parser`, :mod:`~npvae.cli.options`); one module per group of commands:
:mod:`~npvae.cli.train` (train, resume), :mod:`~npvae.cli.evaluate` (evaluate, info),
:mod:`~npvae.cli.pictures` (sample, reconstruct, plot), :mod:`~npvae.cli.grads`; the input they share
is loaded by :mod:`~npvae.cli.inputs`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from .common import CLIError
from .evaluate import checkpoint_info
from .parser import build_parser, explicit_dests
from .train import build_model_from_args, read_train_settings

__all__ = ["main", "build_parser", "CLIError", "checkpoint_info", "build_model_from_args", "read_train_settings"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a first try: the commands, not an error
        build_parser().print_help()
        return 0
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    args.explicit = explicit_dests(argv)
    from ..checkpoint import CheckpointError
    from ..data import DownloadError, IDXFormatError
    from ..rundir import RunLocked
    from ..train import Terminated, TrainingDiverged, raise_on_sigterm

    restore = None
    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, raise_on_sigterm)  # unwind: partial downloads are removed
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside training (which saves and returns 130 itself)
        print(f"npvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"npvae {args.command}: terminated (signal {exc.signum})", file=sys.stderr)
        return 128 + exc.signum
    except (CLIError, CheckpointError, DownloadError, IDXFormatError, TrainingDiverged, OSError,
            RunLocked, ValueError, TypeError, ImportError) as exc:
        if os.environ.get("NPVAE_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"npvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
