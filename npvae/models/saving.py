"""Saving a model to a plain ``.npz`` (state dict + spec, never pickle) and loading it back without code.

Model format 2 stores the model's :meth:`~npvae.models.base.Model.spec` under ``model_spec``.
Format 1 (npvae before the layer stacks) stored a preset name and its config, and named the
decoder's last layer ``output``; such files are read and their keys renamed.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import CheckpointError, load_checkpoint, npvae_member, save_checkpoint
from .base import Model, parameter_limit
from .registry import MODELS, build_model, from_spec

MODEL_FORMAT = 2

# What building from a crafted description can raise: wrong JSON types (a list where an object belongs,
# a short list, a dict where a number belongs), absurd numbers, deep nesting.
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError)


def model_meta(model: Model) -> dict:
    """The metadata that rebuilds ``model``: its spec, plus the preset name and config for people reading it."""
    spec = model.spec()
    return {"model": model.kind, "model_config": spec["config"], "dtype": model.dtype.name,
            "model_format": MODEL_FORMAT, "model_spec": spec}


def save_model(model: Model, path, extra_meta: dict | None = None):
    """Write the model's state dict and spec to a plain ``.npz`` (no pickle), atomically."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(path, arrays, {**model_meta(model), **(extra_meta or {})})


def _migrate_v1(state: dict) -> dict:
    """Format 1 named the decoder's last layer ``output``: it is ``decoder.{n}`` now."""
    if "output.weight" not in state:
        return state
    n = sum(1 for k in state if k.startswith("decoder.") and k.endswith(".weight"))
    renamed = {}
    for key, value in state.items():
        renamed[f"decoder.{n}.{key[len('output.'):]}" if key.startswith("output.") else key] = value
    return renamed


def model_from_meta(meta: dict, path="checkpoint") -> Model:
    """Build (not load) the model a checkpoint's metadata describes."""
    version = meta.get("model_format", 1)
    if type(version) is not int or not 1 <= version <= MODEL_FORMAT:
        raise CheckpointError(f"{path}: model format {version!r} (written by a newer npvae?): this npvae reads "
                              f"model formats 1 to {MODEL_FORMAT}")
    if version >= 2:
        try:
            return from_spec(meta.get("model_spec"))
        except _MALFORMED as exc:
            raise CheckpointError(f"{path}: malformed model description: {type(exc).__name__}: {exc}") from None
    kind = meta.get("model")
    if kind not in MODELS:
        raise CheckpointError(f"{path}: checkpoint names model {kind!r}, expected one of {', '.join(MODELS)}")
    try:
        return build_model(kind, meta.get("model_config", {}), dtype=np.dtype(meta.get("dtype", "float32")))
    except _MALFORMED as exc:
        raise CheckpointError(f"{path}: malformed model description: {type(exc).__name__}: {exc}") from None


def model_state(arrays: dict, meta: dict) -> dict:
    """The state dict stored in a checkpoint's arrays, in the current key names."""
    state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return _migrate_v1(state) if meta.get("model_format", 1) == 1 else state


def load_model(path) -> tuple[Model, dict]:
    """Rebuild a model from a checkpoint written by :func:`save_model` or training.

    Returns
    -------
    model : Model
    meta : dict
        The checkpoint's metadata (config, epoch, history, ...).
    """
    arrays, meta = load_checkpoint(path, npvae_member)
    return model_from_checkpoint(arrays, meta, path), meta


def model_from_checkpoint(arrays: dict, meta: dict, path="checkpoint") -> Model:
    """The model of a checkpoint already read (:func:`npvae.checkpoint.load_checkpoint`'s arrays and
    metadata), its parameters loaded: a caller that needs the metadata too reads the file once."""
    stored = sum(v.size for k, v in arrays.items() if k.startswith("model/"))
    with parameter_limit(stored):
        model = model_from_meta(meta, path)
    try:
        model.load_state_dict(model_state(arrays, meta))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model
