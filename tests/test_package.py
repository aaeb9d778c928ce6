"""The package surface: a NumPy-only core and the backend switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import npvae
from npvae import backend

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_core_imports_numpy_only():
    heavy = run_python(
        "import sys, npvae, npvae.train, npvae.cli, npvae.data, npvae.checkpoint, npvae.viz.plots, npvae.study.gradflow, "
        "npvae.study.likelihood, npvae.study.regularity, npvae.penalties; print(sorted(m for m in ('numba', 'matplotlib', 'torch', 'tqdm', 'scipy') if m in sys.modules))"
    )
    assert heavy == "[]"


def test_environment_variable_selects_the_backend():
    assert run_python("import npvae; print(npvae.get_backend())", NPVAE_BACKEND="numpy") == "numpy"


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        backend.set_backend("fortran")
    result = subprocess.run([sys.executable, "-c", "import npvae"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "NPVAE_BACKEND": "fortran"})
    assert result.returncode != 0 and "NPVAE_BACKEND='fortran'" in result.stderr


def test_asking_for_numba_without_numba_says_so():
    code = "import sys; sys.modules['numba'] = None; import npvae; print(npvae.get_backend())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "NPVAE_BACKEND": "numba"})
    assert result.returncode == 0 and result.stdout.strip() == "numpy"
    assert "NPVAE_BACKEND=numba, but Numba is not installed" in result.stderr


def test_use_backend_restores_the_previous_one():
    before = npvae.get_backend()
    with npvae.use_backend("numpy"):
        assert npvae.get_backend() == "numpy"
    assert npvae.get_backend() == before


def test_every_public_name_exists():
    for name in npvae.__all__:
        assert hasattr(npvae, name), name
