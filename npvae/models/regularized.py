"""Autoencoders regularised by a penalty on the code: the sparse autoencoder and the contractive autoencoder.

Both are :class:`~npvae.models.autoencoders.Autoencoder` s (squared error summed over pixels) with a
second loss term, ``loss = recon + weight * penalty`` per example, mean over the batch; the math of
each penalty and of its gradient is in :mod:`npvae.penalties`. Default architecture of both: one
sigmoid code layer 784 -> 196 (a 14 x 14 sheet of filters) and a sigmoid decoder 196 -> 784, data in
[0, 1] (Ng's sparse autoencoder notes; Rifai et al. 2011 use one sigmoid layer too). The Keras write-up's
sparse autoencoder is overcomplete, its code larger than the input: ``--latent-dim 1024`` (recipe ``sparse-ae``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import penalties
from ..layers import Dense, Flatten, Sequential
from .autoencoders import Autoencoder, AutoencoderConfig
from ..registry import option
from .base import LossNames

SPARSITY_PENALTIES = ("kl", "l1")
# Per example, against a squared error summed over 784 pixels (~10-30 on MNIST). KL: beta = 3 as in Ng's
# notes; L1: 0.1 / unit activation is Keras' l1(1e-4) per pixel of a mean squared error, times 784 pixels
# (rounded).
DEFAULT_SPARSITY_WEIGHT = {"kl": 3.0, "l1": 0.1}
DEFAULT_SPARSITY_TARGET = 0.05  # rho, the target mean activation (KL penalty)
DEFAULT_CONTRACTION_WEIGHT = 0.1  # lambda, Rifai et al.'s order of magnitude


def _nonnegative(value, name: str) -> float:
    value = float(value)
    if not value >= 0 or not np.isfinite(value):
        raise ValueError(f"expected {name} a finite number >= 0, got {value}")
    return value


@dataclass
class _SigmoidCodeConfig(AutoencoderConfig):
    """The 784-196-784 sigmoid autoencoder of Ng's notes, the network both penalties regularise. No write-up
    gives this size: the Keras write-up's sparse autoencoder has a code larger than its input (recipe
    ``sparse-ae``: ``latent_dim=1024``) and its contractive one no size at all."""

    hidden: tuple[int, ...] | None = ()
    latent_dim: int = 196  # code units
    activation: str = "sigmoid"
    output_activation: str = "sigmoid"
    value_range: tuple[float, float] = (0.0, 1.0)
    code_activation: str = "sigmoid"


@dataclass
class SparseAutoencoderConfig(_SigmoidCodeConfig):
    sparsity_penalty: str = option(
        "kl", "kl (each code unit's mean activation over the batch pulled to --sparsity-target; sigmoid codes) or "
        "l1 (sum of |code| per image, Keras' activity_regularizer=l1)", choices=SPARSITY_PENALTIES)
    sparsity_weight: float = option(DEFAULT_SPARSITY_WEIGHT["kl"], "the penalty's weight (default: "
                                    f"{DEFAULT_SPARSITY_WEIGHT['kl']:g} for kl, as beta in Ng's notes; "
                                    f"{DEFAULT_SPARSITY_WEIGHT['l1']:g} for l1)")
    sparsity_target: float = option(DEFAULT_SPARSITY_TARGET, "kl: the target mean activation rho of each code unit")


class SparseAutoencoder(Autoencoder):
    """Autoencoder with a sparsity penalty on its code h (B, Z):

    - ``sparsity_penalty="kl"`` (default): ``beta * sum_j KL(rho || rho_hat_j)``, rho_hat_j the batch's
      mean activation of unit j; needs codes in [0, 1] (sigmoid). A statistic of the batch: each
      example's penalty term is the batch's value (so the batch mean is that value), and
      :meth:`evaluate` averages it over batches of ``batch_size``.
    - ``sparsity_penalty="l1"``: ``w * sum_j |h_j|`` per example (Keras ``activity_regularizer=l1(w)``).

    ``sparsity_weight`` defaults to 3 for kl, 0.1 for l1 (:data:`DEFAULT_SPARSITY_WEIGHT`).
    """

    kind = "sparse-ae"
    help = "sparse autoencoder: a KL or L1 penalty keeps the sigmoid code mostly near 0"
    config_class = SparseAutoencoderConfig
    loss_names = LossNames("squared error + sparsity penalty", "squared error", "sparsity")

    def __init__(self, input_dim=784, hidden=(), latent_dim=196, activation="sigmoid", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, dtype=np.float32, seed=0, *, code_activation="sigmoid",
                 sparsity_penalty="kl", sparsity_weight=None, sparsity_target=DEFAULT_SPARSITY_TARGET, **kwargs):
        if sparsity_penalty not in SPARSITY_PENALTIES:
            raise ValueError(f"unknown sparsity penalty {sparsity_penalty!r}: expected one of "
                             f"{', '.join(SPARSITY_PENALTIES)}")
        if sparsity_weight is None:
            sparsity_weight = DEFAULT_SPARSITY_WEIGHT[sparsity_penalty]
        target = float(sparsity_target)
        if not 0 < target < 1:
            raise ValueError(f"expected the sparsity target rho in (0, 1), got {sparsity_target}")
        if sparsity_penalty == "kl" and code_activation != "sigmoid":
            raise ValueError(f"the KL sparsity penalty needs codes in [0, 1]: code_activation 'sigmoid', got "
                             f"{code_activation!r} (or use sparsity_penalty 'l1')")
        self._sparsity = (sparsity_penalty, _nonnegative(sparsity_weight, "sparsity_weight"), target)
        super().__init__(input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha, dtype, seed,
                         code_activation=code_activation, **kwargs)
        self.reg_weight = self.eval_weight = self.config.sparsity_weight
        # the weight in the name, so that a line's parts add up: 207.20 = 123.27 + 3 x 27.98
        self.loss_names = LossNames(f"squared error + {self.reg_weight:g} x sparsity", "squared error", "sparsity")

    def _make_config(self, *args):
        base = super()._make_config(*args)
        penalty, weight, target = self._sparsity
        return SparseAutoencoderConfig(**dataclasses.asdict(base), sparsity_penalty=penalty, sparsity_weight=weight,
                                       sparsity_target=target)

    def _regulariser(self, code):
        batch = code.shape[0]
        if self.config.sparsity_penalty == "l1":
            rows, self._penalty_cache = penalties.l1_activity_forward(code, "none")
            return rows
        value, self._penalty_cache = penalties.kl_sparsity_forward(code, self.config.sparsity_target)
        rows = self.workspace.get(batch, "reg", (batch,))
        rows.fill(value)
        return rows

    def _add_regulariser_grad(self, dreg, dcode) -> None:
        batch = dcode.shape[0]
        dh = self.workspace.get(batch, "dpenalty", dcode.shape)
        if self.config.sparsity_penalty == "l1":
            penalties.l1_activity_backward(dreg, self._penalty_cache, out=dh)
        else:  # every row's term is the batch's value: d/dh of sum_i dreg_i * Omega
            penalties.kl_sparsity_backward(dreg.sum(dtype=np.float64), self._penalty_cache, out=dh)
        dcode += dh


@dataclass
class ContractiveAutoencoderConfig(_SigmoidCodeConfig):
    contraction_weight: float = option(DEFAULT_CONTRACTION_WEIGHT,
                                       "lambda, the weight of ||d code / d x||_F^2 per image")


def dense_layers(encoder) -> list[Dense]:
    """The Dense layers of an encoder made of Dense layers (an optional Flatten first); otherwise a
    ValueError: the contractive penalty is derived for dense stacks."""
    layers = list(encoder.named_layers("encoder")) if isinstance(encoder, Sequential) else []
    dense = [layer for _, layer in layers if isinstance(layer, Dense)]
    others = [f"{path} {layer!r}" for i, (path, layer) in enumerate(layers)
              if not isinstance(layer, Dense) and not (i == 0 and isinstance(layer, Flatten))]
    if not dense or others:
        raise ValueError("the Jacobian penalty needs an encoder of Dense layers (a Flatten first allowed); "
                         + (f"this one has {', '.join(others)}" if others else "this one has none"))
    return dense


class ContractiveAutoencoder(Autoencoder):
    """Autoencoder penalising the encoder's Jacobian (Rifai et al. 2011):
    ``loss = recon + lambda * ||dh/dx||_F^2`` per example, mean over the batch.

    The encoder must be Dense layers (any depth and activations; the default is one sigmoid layer, where
    the penalty has the closed form ``sum_j (h_j (1 - h_j))^2 ||W_j||^2``).
    """

    kind = "contractive-ae"
    help = "contractive autoencoder: penalises the encoder's Jacobian"
    config_class = ContractiveAutoencoderConfig
    loss_names = LossNames("squared error + contraction penalty", "squared error", "contraction")

    def __init__(self, input_dim=784, hidden=(), latent_dim=196, activation="sigmoid", output_activation="sigmoid",
                 value_range=(0.0, 1.0), alpha=0.01, dtype=np.float32, seed=0, *, code_activation="sigmoid",
                 contraction_weight=DEFAULT_CONTRACTION_WEIGHT, **kwargs):
        self._contraction_weight = _nonnegative(contraction_weight, "contraction_weight")
        super().__init__(input_dim, hidden, latent_dim, activation, output_activation, value_range, alpha, dtype, seed,
                         code_activation=code_activation, **kwargs)
        self._dense = dense_layers(self.encoder)
        self.reg_weight = self.eval_weight = self.config.contraction_weight
        self.loss_names = LossNames(f"squared error + {self.reg_weight:g} x contraction", "squared error",
                                    "contraction")

    def _make_config(self, *args):
        base = super()._make_config(*args)
        return ContractiveAutoencoderConfig(**dataclasses.asdict(base), contraction_weight=self._contraction_weight)

    def _regulariser(self, code):
        rows, self._penalty_cache = penalties.contractive_penalty_forward([layer.cache for layer in self._dense])
        return rows

    def backward(self, drecon: np.ndarray, dreg: np.ndarray) -> None:
        """Fill ``params.grad`` with d/dtheta of sum_i drecon[i] recon_i + dreg[i] reg_i: the reconstruction
        through decoder and encoder, then the penalty's gradient added to the encoder's weights and biases."""
        super().backward(drecon, dreg)
        _, dws, dbs = penalties.contractive_penalty_backward(dreg, self._penalty_cache, need_dx=False)
        for layer, dw, db in zip(self._dense, dws, dbs):
            layer.dweight += dw
            layer.dbias += db
