"""``npvae train``'s model and training options, derived from the registries.

A model option is a field of some preset's config dataclass (:data:`npvae.models.MODELS`, each
class's ``config_class``) declared with :func:`npvae.registry.option`; it applies to the presets
whose config has it (or to those its ``presets`` metadata names). A training option is a field of
:class:`npvae.train.TrainConfig` declared the same way. A field added with ``option()`` metadata
gets its flag, its help and its checks here without a change to the command line's code.

Every option's argparse default is None ("not given"), so that a given value, a preset's own
default and a ``--config`` file's setting can be told apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from functools import lru_cache

from .common import count, number

_UNSET = object()  # an option without a flag value that means None
_SIZE = (1, 65_536)  # whole-number model options (widths, latent sizes): a typo cannot ask for 10^9 units


@dataclass(frozen=True)
class Knob:
    """One command-line option that sets one config field.

    ``presets`` are the model presets that take it (every one for a training option), ``refusals``
    the presets whose config says why it does not apply to them, ``defaults`` each taker's default.
    """

    field: str  # the config field, also the argparse dest
    flag: str
    help: str
    kwargs: dict  # add_argument's keywords besides help, dest and default
    presets: tuple[str, ...] = ()
    refusals: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    none_as: object = _UNSET  # the flag value that means None (patience 0: never stop)
    resumable: bool = False  # a resumed run may change it

    def value(self, given):
        """The field value of a flag value."""
        if self.none_as is not _UNSET and given == self.none_as:
            return None
        return tuple(given) if isinstance(given, list) else given

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.flag, dest=self.field, default=None, help=self.help, **self.kwargs)


def _option_fields(config_class) -> list[tuple[dataclasses.Field, dict, object]]:
    """``(field, metadata, type)`` of each field; a subclass that only changes a field's default keeps
    the metadata of the base class's ``option()``."""
    hints = typing.get_type_hints(config_class)
    out = []
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        for base in config_class.__mro__[1:]:
            if meta or not dataclasses.is_dataclass(base):
                break
            inherited = base.__dataclass_fields__.get(f.name)
            meta = inherited.metadata if inherited is not None else meta
        out.append((f, dict(meta), hints[f.name]))
    return out


def _base_type(hint):
    """``int`` for ``int | None``, ``(tuple, float)`` for ``tuple[float, float] | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def _argparse_kwargs(meta: dict, hint) -> dict:
    kind, item = _base_type(hint)
    if "const" in meta or kind is bool:  # a switch: the flag sets const (default True), no value follows
        return {"action": "store_const", "const": meta.get("const", True)}
    kw = {k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta}
    scalar = item if kind is tuple else kind
    if scalar is int:
        kw["type"] = count(*meta.get("bounds", _SIZE))
    elif scalar is float:
        kw["type"] = number
    return kw


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _defaults_text(defaults: dict) -> str:
    """"(default: X)" when the takers agree, else the value of each group of presets."""
    groups: dict[str, list[str]] = {}
    for preset, value in defaults.items():
        if value is not None:
            groups.setdefault(_shown(value), []).append(preset)
    if not groups:
        return ""
    if len(groups) == 1:
        return f" (default: {next(iter(groups))})"
    return " (default: " + "; ".join(f"{', '.join(p)} {v}" for v, p in groups.items()) + ")"


def _applies(meta: dict, preset: str) -> bool:
    return meta.get("cli", True) and meta.get("help") is not None and (
        meta.get("presets") is None or preset in meta["presets"])


@lru_cache(maxsize=None)
def model_knobs() -> dict[str, Knob]:
    """The model options by field name, in the order the presets' configs declare them."""
    from ..models import MODELS

    found: dict[str, dict] = {}
    for preset, cls in MODELS.items():
        for f, meta, hint in _option_fields(cls.config_class):
            if not meta:
                continue
            entry = found.setdefault(f.name, {"meta": None, "hint": hint, "presets": [], "refusals": {},
                                              "defaults": {}})
            if _applies(meta, preset):
                entry["meta"] = entry["meta"] or meta
                entry["presets"].append(preset)
                entry["defaults"][preset] = f.default if f.default is not dataclasses.MISSING else None
            elif meta.get("refusal"):
                entry["refusals"][preset] = meta["refusal"]
    knobs = {}
    for name, e in found.items():
        meta = e["meta"]
        if meta is None:
            continue
        takers = tuple(e["presets"])
        everyone = len(takers) == len(MODELS)
        text = meta["help"] if everyone else f"{', '.join(takers)}: {meta['help']}"
        if "default" not in text and "const" not in meta:
            text += _defaults_text(e["defaults"]) or ""
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        knobs[name] = Knob(name, flag, text, _argparse_kwargs(meta, e["hint"]), takers, e["refusals"], e["defaults"])
    return knobs


@lru_cache(maxsize=None)
def train_knobs() -> dict[str, Knob]:
    """The training options by TrainConfig field, with each preset's own default in the help."""
    from ..models import MODELS
    from ..train import TrainConfig

    knobs = {}
    for f, meta, hint in _option_fields(TrainConfig):
        if not meta.get("cli", True):
            continue
        text = meta.get("help", "")
        if "default" not in text and "const" not in meta and f.default is not None:
            own = [f"{preset} {cls.train_defaults[f.name]}" for preset, cls in MODELS.items()
                   if cls.train_defaults.get(f.name, f.default) != f.default]
            text += f" (default: {f.default}" + (f"; {', '.join(own)}" if own else "") + ")"
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        knobs[f.name] = Knob(f.name, flag, text, _argparse_kwargs(meta, hint), none_as=meta.get("none_as", _UNSET),
                             resumable=meta.get("resumable", False))
    return knobs


def given(args, knobs: dict[str, Knob]) -> dict:
    """The field values of the options given on the command line."""
    return {name: knob.value(getattr(args, name)) for name, knob in knobs.items()
            if getattr(args, name, None) is not None}
