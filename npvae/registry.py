"""Registries: one entry per named thing, and config fields that describe themselves.

Every extensible kind in npvae (model presets, layer types, activations, estimators, figures,
datasets, optimizers) is one :class:`Registry`. An entry carries everything about its thing: its
name, a one-line help, and what it needs. The command line, the pictures, the torch bridge and the
spec code *iterate* registries; no other place lists the names.

A registry is a read-only mapping ``name -> entry`` (``REG[name]``, ``name in REG``, ``list(REG)``,
``REG.items()``), filled by :meth:`Registry.register`. Looking up an unknown name raises
:class:`UnknownName`, a ``KeyError`` and a ``ValueError`` whose message names the kind and the
choices: ``unknown activation 'foo': expected one of relu, leaky_relu, ...``.

:func:`option` is ``dataclasses.field`` with the metadata a command line needs (help, flag, which
presets take it), so that a config dataclass defines each knob once (nanoGPT's pattern) and the
parser is derived from it. This module imports nothing of npvae: everything may import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name that is not in a registry; the message names the kind and the choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping, Generic[T]):
    """Entries of one kind by name, in registration order.

    Parameters
    ----------
    kind : str
        What the entries are, for messages ("activation", "model preset", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T | None = None, *, name: str | None = None, replace: bool = False):
        """Add ``entry`` under ``name`` (default: ``entry.name``); returns the entry, so it can decorate
        a class or function. A name registered twice is an error: one entry per thing (``replace=True``
        lets a redefinition of the same thing, e.g. a class defined again, take its place)."""
        def add(item: T) -> T:
            key = name if name is not None else getattr(item, "name", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.kind} needs a name (a non-empty string), got {key!r}")
            if key in self._entries and self._entries[key] is not item and not replace:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = item
            return item

        return add if entry is None else add(entry)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}: expected one of {', '.join(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable name is in no registry
            return False

    def check(self, name, what: str | None = None) -> str:
        """``name`` if registered, else :class:`UnknownName` (``what`` replaces the kind in the message,
        e.g. "--activation")."""
        if name not in self:
            label = what or self.kind
            raise UnknownName(f"unknown {label} {name!r}: expected one of {', '.join(self._entries)}")
        return name

    def where(self, predicate: Callable[[T], bool]) -> tuple[str, ...]:
        """The names of the entries for which ``predicate(entry)`` holds, in registration order."""
        return tuple(k for k, v in self._entries.items() if predicate(v))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           presets: tuple[str, ...] | None = None, cli: bool = True, default_factory: Any = dataclasses.MISSING,
           **metadata) -> Any:
    """A dataclass field that says what it is: its help, and for the command line its flag.

    Parameters
    ----------
    default, default_factory
        As for :func:`dataclasses.field`.
    help : str
        One line for ``--help`` and the docs.
    flag : str, optional
        The command-line option (default: ``--`` + the field name with ``_`` -> ``-``).
    presets : tuple of str, optional
        The model presets that take this option (None: every one whose config has the field).
    cli : bool
        False for fields that are not set from the command line.
    **metadata
        Anything else a reader needs (``choices``, ``metavar``, ``nargs``, ``type``).
    """
    meta = {"help": help, "flag": flag, "presets": presets, "cli": cli, **metadata}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(field: dataclasses.Field) -> str:
    """The help an :func:`option` field carries ('' for a plain field)."""
    return field.metadata.get("help", "") if field.metadata else ""


def field_flag(field: dataclasses.Field) -> str:
    """The command-line flag of a config field: its ``flag`` metadata, else ``--name-with-dashes``."""
    flag = field.metadata.get("flag") if field.metadata else None
    return flag or "--" + field.name.replace("_", "-")
