"""The k-sample training objectives: a sampler shared by every estimator, and :class:`Objective`.

The trainer calls one public method, :meth:`Objective.loss_and_grads`, and knows nothing else. The
default, ``Objective()`` (the ELBO, k = 1, reparam), is the model's own
:meth:`~npvae.models.base.Model.loss_and_grads` (one sample, analytic KL), unchanged. Every other
choice runs the k-sample sampler of :func:`k_sample_draws` and one estimator of
:data:`npvae.objectives.estimators.ESTIMATORS` on its draws. The loss per example (nats) is

- ``elbo``: :math:`-\\frac1k \\sum_j \\log w_j` (k = 1 reparam: the analytic KL instead),
- ``iwae``: :math:`-\\log \\frac1k \\sum_j w_j`,

with :math:`\\log w_j = \\log p(x|z_j) + \\log p(z_j) - \\log q(z_j|x)` (a Monte-Carlo KL). Which
estimators train which bound is each registry entry's ``trains`` (collected in
:data:`~npvae.objectives.estimators.TRAINING_OBJECTIVES`). The decoder's gradient is
:math:`-\\sum_j \\tilde w_j \\nabla_\\theta \\log p(x|z_j)` for every estimator; the estimators differ
in the encoder's. They need a VAE with the prior N(0, I) and beta = 1 (the bounds have no
beta-weighted form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..models.base import GaussianLatent, LossTerms, StandardNormalPrior, check_generator
from .estimators import BOUNDS, ESTIMATORS, bound_and_weights, reduce_draws, trainable


def check_k_sample_model(model, what: str) -> None:
    """One clear line when ``model`` cannot run the k-sample objectives."""
    if not (isinstance(model, GaussianLatent) and isinstance(model, StandardNormalPrior)):
        raise ValueError(f"{what} needs a VAE with the prior N(0, I); got a "
                         f"{getattr(model, 'kind', type(model).__name__)} model")
    if model.config.beta != 1:
        raise ValueError(f"{what} weights log p(z) and log q(z|x) equally; this model has beta = "
                         f"{model.config.beta}, which has no counterpart there (use beta = 1)")


def k_sample_draws(model, x: np.ndarray, eps: np.ndarray, objective: str, decoder_scale: float):
    """Run the sampler on k samples per example and backpropagate through the decoder once.

    .. math:: z_{ij} = \\mu_i + \\sigma_i \\epsilon_{ij}, \\quad
              \\log w_{ij} = \\log p(x_i|z_{ij}) + \\log p(z_{ij}) - \\log q(z_{ij}|x_i)

    The decoder's backward runs with upstream ``decoder_scale * weights`` on each row's
    ``-log p(x|z)``, which leaves ``decoder_scale * sum_ij w_ij grad_theta(-log p(x_i|z_ij))`` in
    the decoder's gradients (the gradient of the loss ``-decoder_scale * sum_i bound_i``) and gives
    ``w_ij d log p(x_i|z_ij) / dz`` for the path terms. The encoder's gradients are left to the
    caller (:func:`encoder_backward`), so several estimators can share one decoder pass.

    Parameters
    ----------
    model : VAE with the prior N(0, I)
    x : (B, *input_shape) array, checked
    eps : (B, k, Z) array of the model's dtype
    objective : "recon", "elbo" or "iwae" (recon: log w = log p(x|z), as in
        :mod:`npvae.objectives.estimators`)
    decoder_scale : float, not zero

    Returns
    -------
    draws : Draws with n = B rows (float64)
    nll : (B, k) array, -log p(x_i | z_ij)
    """
    batch, k, zdim = eps.shape
    mu, logvar = model.posterior_forward(x)  # (B, Z) views of the heads' buffer
    mu_r, logvar_r = np.repeat(mu, k, axis=0), np.repeat(logvar, k, axis=0)  # (B k, Z)
    eps_r = eps.reshape(batch * k, zdim)
    z, _ = ops.reparameterize_forward(mu_r, logvar_r, eps_r)
    nll = model.nll_forward(z, np.repeat(x, k, axis=0))  # (B k,)
    log_pz, _ = ops.standard_normal_log_prob_forward(z, "none")
    log_q, _ = ops.reparameterized_log_prob_forward(eps_r, logvar_r, "none")  # exact for tiny std
    log_w = -nll.astype(np.float64)
    if objective != "recon":
        log_w += log_pz.astype(np.float64) - log_q
    log_w = log_w.reshape(batch, k)
    weights, bound = bound_and_weights(objective, log_w)
    dz = model.nll_backward((decoder_scale * weights).reshape(-1).astype(model.dtype))  # (B k, Z)
    g = dz.astype(np.float64) * (-1.0 / decoder_scale)  # w d log p(x|z) / dz
    if objective != "recon":  # l = log p(x|z) + log p(z) - log q(z | fixed mu, logvar): -z from the
        std = np.exp(0.5 * logvar_r.astype(np.float64))  # prior, +(z - mu) / std^2 = eps / std from log q
        g += weights.reshape(-1, 1) * (eps_r.astype(np.float64) / std - z.astype(np.float64))
    draws = reduce_draws(objective, log_w, g.reshape(batch, k, zdim), eps.astype(np.float64),
                         np.asarray(logvar, np.float64), weights, bound)
    return draws, nll.reshape(batch, k)


def encoder_backward(model, x: np.ndarray, dphi: np.ndarray) -> None:
    """The encoder's and heads' gradients for upstream ``dphi`` = dL/d[mu, logvar] (B, 2Z), into
    ``params.grad`` (the decoder's are left as they are)."""
    batch, zdim = len(dphi), model.config.latent_dim
    dmu, dlogvar = model.latent_grads(batch)  # views of the buffer posterior_backward reads
    dmu[...] = dphi[:, :zdim]
    dlogvar[...] = dphi[:, zdim:]
    model.posterior_backward(dmu, dlogvar)


@dataclass(frozen=True)
class Objective:
    """What training minimises and how its gradient is estimated.

    Parameters
    ----------
    name : a key of :data:`~npvae.objectives.estimators.BOUNDS` ("elbo" or "iwae")
    k : int >= 1, samples of z per example
    estimator : the name of an estimator whose entry ``trains`` this bound
    """

    name: str = "elbo"
    k: int = 1
    estimator: str = "reparam"

    def __post_init__(self):
        if self.name not in BOUNDS:
            raise ValueError(f"unknown objective {self.name!r}: expected one of {', '.join(BOUNDS)}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"expected k >= 1 samples per example (an integer), got {self.k!r}")
        allowed = trainable(self.name)
        if self.estimator not in allowed:
            trains = ESTIMATORS[self.estimator].trains if self.estimator in ESTIMATORS else ()
            hint = f" ({self.estimator} is {'/'.join(b.upper() for b in trains)}'s estimator)" if trains else ""
            raise ValueError(f"estimator {self.estimator!r} does not train objective {self.name!r}: expected one of "
                             f"{', '.join(allowed)}{hint}")

    @classmethod
    def from_config(cls, config) -> "Objective":
        """The objective a training config (a mapping, e.g. a checkpoint's ``train_config``) names; the
        defaults fill what it lacks (runs from before the k-sample objectives)."""
        default = cls()
        return cls(config.get("objective", default.name), config.get("k", default.k),
                   config.get("estimator", default.estimator))

    @property
    def is_default(self) -> bool:
        """The model's own one-sample loss with the analytic KL."""
        return self == Objective()

    def describe(self) -> str:
        if self.is_default:
            return "negative ELBO (one sample, analytic KL), reparameterization gradient"
        return f"negative {BOUNDS[self.name]}, k = {self.k}, {ESTIMATORS[self.estimator].label} gradient"

    def check(self, model, paired: bool = False, kl_warmup: float = 0.0) -> None:
        """One clear line when this objective cannot train ``model`` (as the trainer is set up)."""
        if self.is_default:
            return
        what = f"--objective {self.name} --k {self.k} --estimator {self.estimator}"
        check_k_sample_model(model, what)
        if paired:
            raise ValueError(f"{what} reconstructs its own input; paired targets train with the default objective")
        if kl_warmup:
            raise ValueError(f"{what} has no KL weight to warm up (KL warm-up is for the default objective)")

    def loss_and_grads(self, model, x, y=None, eps=None, rng=None, *, target=None, check: bool = True):
        """Batch-mean loss and its estimated gradients, like :meth:`Model.loss_and_grads`.

        For the k-sample objectives ``eps`` is (B, k, Z), and the returned terms are
        ``total = -mean_i bound_i``, ``recon = mean_i sum_j w_ij (-log p(x_i|z_ij))`` (the weighted
        reconstruction), ``kl = total - recon``.
        """
        if self.is_default:
            return model.loss_and_grads(x, y, eps=eps, rng=rng, target=target, check=check)
        if target is not None:
            raise ValueError(f"objective {self.name} reconstructs its own input; it takes no target")
        if check:
            self.check(model)
            x = model.check_input(x)
        batch, zdim = x.shape[0], model.config.latent_dim
        batch_shape = (batch, self.k, zdim)
        if eps is None:
            if rng is None:
                raise ValueError(f"pass eps {batch_shape} or rng (an np.random.Generator) to draw it")
            eps = check_generator(rng).standard_normal(batch_shape, dtype=model.dtype)
        elif check:
            eps = model.check_noise(x, eps, shape=batch_shape)
        draws, nll = k_sample_draws(model, x, eps, self.name, 1.0 / batch)
        dphi = ESTIMATORS[self.estimator].estimate(draws) * (-1.0 / batch)  # (B, 2Z) of the loss
        encoder_backward(model, x, dphi.astype(model.dtype))
        total = -float(draws.bound.mean())
        recon = float((draws.weights * nll).sum(axis=1).mean())
        return LossTerms(total, recon, total - recon), model.gradients()


def estimator_help() -> str:
    """The ``--estimator`` help: each training estimator's one line, from the registry."""
    default = Objective()
    choices = ", ".join(f"{name} ({ESTIMATORS[name].help})" for name in trainable())
    return (f"the encoder's gradient estimator: {choices}. Not the default {default.name}/{default.k}/"
            f"{default.estimator}: a Monte-Carlo KL, beta = 1, no KL warm-up")
