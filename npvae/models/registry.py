"""Model classes by name, the CLI presets, and building a model from a spec (as checkpoints store it)."""

from __future__ import annotations

import numpy as np

from ..layers import layer_from_spec
from ..registry import Registry
from .autoencoders import Autoencoder, DenoisingAutoencoder, PoorMansVAE
from .base import Model
from .convnets import CONV_MODELS
from .cvae import CVAE
from .regularized import ContractiveAutoencoder, SparseAutoencoder
from .vae import VAE

# Every model class a spec may name, in the order ``npvae train --model`` lists the presets.
MODEL_CLASSES = {cls.__name__: cls for cls in (VAE, Autoencoder, DenoisingAutoencoder, PoorMansVAE, CVAE,
                                               SparseAutoencoder, ContractiveAutoencoder, *CONV_MODELS)}
# The presets by name (``kind``): each class says its ``help``, its ``config_class`` (whose option() fields
# are the command line's model flags) and its ``train_defaults``.
MODELS: Registry = Registry("model preset")
for _cls in MODEL_CLASSES.values():
    MODELS.register(_cls, name=_cls.kind)
del _cls
DEFAULT_PRESET = VAE.kind  # what ``npvae train`` trains without --model


def _config_kwargs(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def build_model(kind: str, config: dict, dtype=np.float32, seed: int = 0, input_shape=None) -> Model:
    """A model of preset ``kind`` (one of :data:`MODELS`) from a config dict (as saved in checkpoints)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(MODELS)}")
    if not isinstance(config, dict):
        raise ValueError(f"expected the model config as a dict, got {type(config).__name__}")
    extra = {} if input_shape is None else {"input_shape": tuple(input_shape)}
    try:
        return MODELS[kind](**_config_kwargs(config), dtype=dtype, seed=seed, **extra)
    except TypeError as exc:
        raise ValueError(f"config does not fit model {kind!r}: {exc}") from None


def from_spec(spec: dict, dtype=None, seed: int = 0) -> Model:
    """Rebuild a model from :meth:`Model.spec` (parameters initialised from ``seed``; load a state
    dict to restore them). Only the classes in :data:`MODEL_CLASSES` and the layer types in
    :data:`npvae.layers.LAYER_TYPES` are built: a spec is data, never code."""
    if not isinstance(spec, dict):
        raise ValueError(f"expected a model spec (a dict), got {type(spec).__name__}")
    name = spec.get("class")
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}: expected one of {', '.join(MODEL_CLASSES)}")
    config, parts = spec.get("config"), spec.get("parts")
    if not isinstance(config, dict) or not isinstance(parts, dict):
        raise ValueError(f"a {name} spec needs a 'config' dict and a 'parts' dict")
    kwargs = _config_kwargs(config)
    shape = spec.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(type(s) is int for s in shape):
            raise ValueError(f"expected input_shape a list of integers, got {shape!r}")
        kwargs["input_shape"] = tuple(shape)
    if kwargs.get("hidden", ()) is None:  # built from the user's own stacks
        del kwargs["hidden"]
        for part in ("encoder", "decoder"):
            if part not in parts:
                raise ValueError(f"a {name} spec with its own layers needs parts['{part}']")
            kwargs[part] = layer_from_spec(parts[part])
    dtype = np.dtype(spec.get("dtype", "float32") if dtype is None else dtype)
    try:
        return MODEL_CLASSES[name](**kwargs, dtype=dtype, seed=seed)
    except TypeError as exc:
        raise ValueError(f"spec does not fit {name}: {exc}") from None
