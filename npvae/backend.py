"""Backend switch: Numba-compiled kernels when Numba is installed, their NumPy twins otherwise.

Every hot loop in :mod:`npvae._kernels` is written once as a plain Python loop and paired with a
vectorised NumPy twin that computes the same numbers. The active backend decides which runs:

- ``"numba"``: the loop, compiled by ``numba.njit(cache=True)`` on its first call (never on import).
- ``"numpy"``: the NumPy twin. No Numba needed.
- ``"auto"`` (default): ``"numba"`` when Numba imports, else ``"numpy"``.

Select it with :func:`set_backend`, the :func:`use_backend` context manager, or the environment
variable ``NPVAE_BACKEND`` (read once, on import).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

_CHOICES = ("auto", "numba", "numpy")
_numba_available: bool | None = None
_active: str = "numpy"
_setup_hooks: list[Callable[[], None]] = []  # run once, before the first kernel compiles


def numba_available() -> bool:
    """True when Numba is installed (found without importing it: importing waits for a first kernel)."""
    global _numba_available
    if _numba_available is None:
        import importlib.util

        _numba_available = importlib.util.find_spec("numba") is not None
    return _numba_available


def set_backend(name: str) -> str:
    """Select the kernel backend: ``"auto"``, ``"numba"`` or ``"numpy"``. Returns the active one.

    Raises
    ------
    ValueError
        For an unknown name.
    ImportError
        For ``"numba"`` when Numba is not installed.
    """
    global _active
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(_CHOICES)}")
    if name == "numba" and not numba_available():
        raise ImportError("backend 'numba' needs numba: pip install 'npvae[fast]'")
    if name == "auto":
        name = "numba" if numba_available() else "numpy"
    _active = name
    return _active


def get_backend() -> str:
    """The active backend, ``"numba"`` or ``"numpy"``."""
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager that runs its block with backend ``name`` and restores the previous one."""
    previous = _active
    try:
        yield set_backend(name)
    finally:
        set_backend(previous)


class Kernel:
    """A loop kernel and its NumPy twin; calling it runs whichever the active backend selects.

    Parameters
    ----------
    loop : callable
        Plain-Python loop over arrays, Numba-compilable (no global data, no Python objects; it may call
        helpers registered by a :func:`before_first_compile` hook).
    twin : callable
        Vectorised NumPy function with the same signature and the same results.
    """

    def __init__(self, loop: Callable, twin: Callable):
        self.loop = loop
        self.twin = twin
        self.__name__ = loop.__name__
        self.__doc__ = loop.__doc__
        self._compiled: Callable | None = None

    def compiled(self) -> Callable:
        """The Numba-compiled loop (compiled lazily, cached on disk by Numba)."""
        if self._compiled is None:
            import numba

            while _setup_hooks:
                _setup_hooks[0]()
                _setup_hooks.pop(0)
            # error_model="numpy": division by zero gives inf/nan as in the NumPy twin (no Python
            # ZeroDivisionError check per division, which also keeps LLVM free to vectorise the loop).
            self._compiled = numba.njit(cache=True, nogil=True, error_model="numpy")(self.loop)
        return self._compiled

    def __call__(self, *args):
        if _active == "numba":
            return self.compiled()(*args)
        return self.twin(*args)

    def __repr__(self) -> str:
        return f"Kernel({self.__name__}, backend={_active!r})"


def before_first_compile(hook: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run ``hook`` once, just before the first kernel compiles (with Numba imported).

    The place to register with Numba what the loops call besides Numba's own functions
    (overloads, intrinsics), without importing Numba when npvae is imported.
    """
    _setup_hooks.append(hook)
    return hook


def kernel(twin: Callable) -> Callable[[Callable], Kernel]:
    """Decorator pairing a loop function with its NumPy ``twin`` as one :class:`Kernel`."""

    def wrap(loop: Callable) -> Kernel:
        return Kernel(loop, twin)

    return wrap


def request_backend(name: str, asked_by: str) -> str:
    """Select the backend a user asked for by ``asked_by`` (``NPVAE_BACKEND=numba``, ``--backend numba``).

    One rule for every such request: ``numba`` without Numba installed warns (a RuntimeWarning naming
    ``asked_by``) and runs the NumPy twins, which compute the same numbers, only slower. An unknown
    name is a ValueError. :func:`set_backend` itself, the Python API, still raises ImportError.
    """
    if name not in _CHOICES:
        raise ValueError(f"{asked_by} is not a backend: expected one of {', '.join(_CHOICES)}")
    if name == "numba" and not numba_available():
        import warnings

        warnings.warn(f"{asked_by}, but Numba is not installed: npvae runs its NumPy kernels (same numbers, "
                      "slower). pip install 'npvae[fast]' for the compiled ones, or ask for numpy to silence this.",
                      RuntimeWarning, stacklevel=3)
        name = "numpy"
    return set_backend(name)


_env = os.environ.get("NPVAE_BACKEND", "auto").strip().lower() or "auto"
request_backend(_env, f"NPVAE_BACKEND={_env}" if _env in _CHOICES else f"NPVAE_BACKEND={_env!r}")
