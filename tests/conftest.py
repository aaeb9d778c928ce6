"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).resolve().parents[1] / "npvae" / "_resources" / "mnist_demo.npz"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """300 demo digits with their labels, as a user's ``--data`` file (``small.npz``)."""
    with np.load(DEMO) as d:
        x, y = d["images"][::16][:300], d["labels"][::16][:300]
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x, y=y)
    return path
