"""How sparse and how contractive an autoencoder's code is: the numbers ``npvae evaluate`` reports for the
autoencoders (plain, denoising, sparse, contractive) and the arrays behind the filters picture.

- :func:`code_sparsity`: mean activation, mean |h| and the fraction of activations near zero;
- :func:`contraction`: ``||dh/dx||_F`` per image, the encoder's Jacobian norm (what a contractive
  autoencoder penalises, squared), exact, for encoders of Dense layers (:mod:`npvae.penalties`);
- :func:`first_layer_filters`: the first layer's weights, one row per unit, for 28 x 28 tiles.
"""

from __future__ import annotations

import numpy as np

from .. import penalties
from ..models.autoencoders import Autoencoder
from ..models.regularized import dense_layers

NEAR_ZERO = 0.05  # |h| at most this counts as "near zero" (a sigmoid unit's target rho is 0.05 by default)
FILTER_SIDE = 28


def code_sparsity(codes, threshold: float = NEAR_ZERO) -> dict:
    """Summary of codes (N, Z): ``mean_activation`` (mean of h), ``mean_abs`` (mean of |h|),
    ``near_zero`` (fraction of the N * Z activations with |h| <= threshold), ``threshold``, and
    ``unit_means`` (Z,) (each unit's mean activation)."""
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.size == 0:
        raise ValueError(f"expected codes of shape (N, Z) with N, Z >= 1, got {codes.shape}")
    threshold = float(threshold)
    if not threshold >= 0:
        raise ValueError(f"expected a near-zero threshold >= 0, got {threshold}")
    return {"mean_activation": float(codes.mean()), "mean_abs": float(np.abs(codes).mean()),
            "near_zero": float((np.abs(codes) <= threshold).mean()), "threshold": threshold,
            "unit_means": codes.mean(axis=0)}


def contraction(model, x, batch_size: int = 256) -> np.ndarray:
    """``||dh/dx||_F`` per example (N,) of an autoencoder's encoder, h the code, exactly (no finite
    differences): :func:`npvae.penalties.jacobian_frobenius` of the encoder's dense layers.

    Raises ValueError for models that are not autoencoders or whose encoder is not Dense layers.
    """
    if not isinstance(model, Autoencoder):
        raise ValueError(f"contraction measures an autoencoder's encoder; this is a {model.kind}")
    layers = dense_layers(model.encoder)
    x = model.check_input(x)
    out = []
    for i in range(0, len(x), batch_size):
        model.encoder.forward(x[i : i + batch_size])
        out.append(penalties.jacobian_frobenius([layer.cache for layer in layers]).astype(np.float64))
    return np.concatenate(out)


def first_layer_filters(model) -> np.ndarray:
    """The first parameter layer's weights (H, 784), when it is a dense layer over 28 x 28 = 784 inputs;
    otherwise a ValueError saying what the first layer is."""
    key, weight = next(iter(model.parameters().items()))
    if weight.ndim != 2 or weight.shape[1] != FILTER_SIDE * FILTER_SIDE:
        raise ValueError(f"filters draws the first layer's weights as {FILTER_SIDE}x{FILTER_SIDE} tiles, which needs "
                         f"a first dense layer over {FILTER_SIDE * FILTER_SIDE} inputs; this {model.kind}'s first "
                         f"parameter is {key} of shape {tuple(weight.shape)}")
    return np.array(weight, dtype=np.float64)
