"""What every command shares: the user-facing error, the limits, the argparse value types, and a
checkpoint's model read with its run's metadata checked."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MAX_PICTURE_IMAGES = 10_000  # images in one picture: a 100 x 100 grid, a few MB of PNG
MAX_SAMPLES_PER_PASS = 2**18  # k samples x images decoded at once (x 784 floats: ~0.8 GB in float32)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def count(lo: int, hi: int):
    """An argparse type: a whole number in [lo, hi], so that a typo cannot ask for a negative count
    (which slicing would quietly turn into "all but the last few") or exhaust memory."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo:,} to {hi:,}, got {value:,}")
        return value

    return whole


def number(text: str) -> float:
    """An argparse type: a finite float (NaN and infinities are refused with the flag's name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers from 1 to 10,000."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,5,50, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 10_000:
        raise argparse.ArgumentTypeError(f"expected integers from 1 to 10,000 like 1,5,50, got {text!r}")
    return values


def load_model(path):
    """A saved model and its run's metadata, the metadata's types checked (one CheckpointError if not)."""
    from .. import memory
    from ..models import load_model as load
    from ..train import check_run_meta

    with memory.asked_by(f"checkpoint {path}"):
        model, meta = load(path)
    return model, check_run_meta(meta, path, training=False)


def output_path(args, name: str) -> Path:
    """Where a command's picture (or folder) goes: ``--out`` when given (a folder: FOLDER/name), else
    beside the checkpoint it read, named after it (``runs/fm/best.npz`` -> ``runs/fm/best_samples.png``),
    as a PyTorch or scikit-learn run keeps its outputs in its run folder: never the working directory,
    never over the pictures training writes there."""
    from ..rundir import picture_path

    if args.out is not None:
        return picture_path(args.out, name)
    checkpoint = Path(args.checkpoint)
    return checkpoint.parent / f"{checkpoint.stem}_{name}"


def and_list(names) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def conditional_presets() -> str:
    """The presets that model p(x | y), named in messages and help."""
    from ..models import MODELS, Conditional

    return ", ".join(MODELS.where(lambda cls: issubclass(cls, Conditional)))


def near_zero(args) -> float:
    from ..study.regularity import NEAR_ZERO

    value = NEAR_ZERO if args.near_zero is None else args.near_zero
    if not value >= 0:
        raise CLIError(f"--near-zero must be >= 0, got {value}")
    return value
