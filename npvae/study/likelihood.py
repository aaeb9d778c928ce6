"""Honest likelihoods: importance-weighted estimates of log p(x), and the IWAE training objective.

The ELBO is a lower bound on log p(x); how loose it is depends on the encoder. Importance sampling
with the encoder as proposal (Burda, Grosse & Salakhutdinov, 2016) tightens it:

.. math:: \\mathcal{L}_k(x) = \\mathbb{E}_{z_{1..k} \\sim q(z|x)}
          \\log \\frac1k \\sum_{j=1}^{k} w_j, \\qquad
          w_j = \\frac{p(x \\mid z_j)\\, p(z_j)}{q(z_j \\mid x)}

:math:`\\mathcal{L}_1` is the ELBO (with a Monte-Carlo KL), :math:`\\mathcal{L}_k \\le \\mathcal{L}_{k+1}`
on average, and :math:`\\mathcal{L}_k \\to \\log p(x)` as k grows, so a large-k estimate is the
number papers report as "negative log-likelihood" (in nats per image, here too).

Both functions work on :class:`npvae.models.VAE` through its public sampler pieces (the training
objective through :class:`npvae.objectives.Objective`) and are pure NumPy, so they run under either kernel backend. Conditional models
(CVAE) are refused: their bound needs the learned prior p(z | y).

Samples are laid out example-major: row ``i * k + j`` of a tiled batch holds example i, sample j.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..models import GaussianLatent, StandardNormalPrior
from ..objectives import Objective

DEFAULT_ROWS = 8192  # (example, sample) rows per decoder pass in evaluation


def _check_vae(model, what: str) -> None:
    if not isinstance(model, GaussianLatent):
        raise ValueError(f"{what} needs a VAE (an encoder q(z|x) and a decoder p(x|z)), got a "
                         f"{getattr(model, 'kind', type(model).__name__)} model")
    if not isinstance(model, StandardNormalPrior):
        raise ValueError(f"{what} is for VAEs with the prior N(0, I); {type(model).__name__} has a prior of its "
                         "own (a conditional model's p(z | y))")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"expected k >= 1 importance samples (an integer), got {k!r}")
    return int(k)


def _log_weights(model, x_rows, mu_rows, logvar_rows, eps_rows):
    """log w = log p(x|z) + log p(z) - log q(z|x) for each row of a tiled batch.

    Parameters
    ----------
    x_rows : (R, D) array; mu_rows, logvar_rows, eps_rows : (R, Z) arrays

    Returns
    -------
    log_w : (R,) array
    """
    z, _ = ops.reparameterize_forward(mu_rows, logvar_rows, eps_rows)  # (R, Z)
    nll = model.nll_forward(z, x_rows)  # (R,) = -log p(x|z)
    log_pz, _ = ops.standard_normal_log_prob_forward(z, "none")
    log_qz, _ = ops.reparameterized_log_prob_forward(eps_rows, logvar_rows, "none")  # exact for tiny std
    return log_pz - nll - log_qz


# ----------------------------------------------------------------------------- evaluation


def iwae_log_likelihood(model, x, k: int, rng: np.random.Generator, batch_size: int | None = None) -> np.ndarray:
    """Importance-weighted estimate of log p(x) per example, with k samples from q(z|x).

    .. math:: \\log \\hat p(x) = \\log \\frac1k \\textstyle\\sum_{j=1}^k
              \\exp(\\log p(x|z_j) + \\log p(z_j) - \\log q(z_j|x)), \\quad z_j \\sim q(z|x)

    A stochastic lower bound on log p(x) in expectation (Jensen), tighter as k grows; k = 1 is a
    one-sample ELBO with a Monte-Carlo KL. The samples are processed in chunks with a running
    log-sum-exp, so memory does not grow with k (k = 5000 is fine).

    Parameters
    ----------
    model : npvae.models.VAE
    x : (N, D) array in the model's value range
    k : int
        Importance samples per example.
    rng : np.random.Generator
        Source of the noise, drawn chunk by chunk (so the draws, not the expectation, depend on
        ``batch_size``).
    batch_size : int, optional
        (example, sample) rows per decoder pass, default 8192; memory is about
        ``batch_size * (hidden + 3 D)`` floats.

    Returns
    -------
    log_px : (N,) float64 array
        Nats per example; ``-log_px.mean()`` is the negative log-likelihood papers report.
    """
    _check_vae(model, "IWAE evaluation")
    k = _check_k(k)
    x = model.check_input(x)
    rows = DEFAULT_ROWS if batch_size is None else int(batch_size)
    if rows < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    per_chunk = max(1, rows // k)  # examples per chunk
    samples = min(k, max(1, rows // per_chunk))  # samples per pass
    zdim = model.config.latent_dim
    log_px = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), per_chunk):
        xb = x[start : start + per_chunk]
        b = len(xb)
        mu, logvar = (np.array(a) for a in model.posterior_forward(xb))  # (b, Z) copies of the heads' buffer
        acc = np.full(b, -np.inf)  # running log sum_j w_j, float64
        for done in range(0, k, samples):
            s = min(samples, k - done)
            eps = rng.standard_normal((b * s, zdim), dtype=model.dtype)
            log_w = _log_weights(model, np.repeat(xb, s, axis=0), np.repeat(mu, s, axis=0),
                                    np.repeat(logvar, s, axis=0), eps)
            chunk, _ = ops.logsumexp_forward(log_w.astype(np.float64).reshape(b, s))
            acc = np.logaddexp(acc, chunk)
        log_px[start : start + b] = acc - math.log(k)
    return log_px


# ----------------------------------------------------------------------------- training objective


def iwae_loss_and_grads(model, x, k: int, eps=None, rng=None):
    """The IWAE objective (negative k-sample bound, batch mean) and its gradients.

    .. math:: L = -\\frac1B \\textstyle\\sum_i \\log \\frac1k \\sum_j w_{ij}, \\qquad
              \\nabla L = -\\frac1B \\sum_{i,j} \\tilde w_{ij} \\nabla \\log w_{ij},
              \\quad \\tilde w_{i\\cdot} = \\operatorname{softmax}_j \\log w_{i\\cdot}

    ``Objective("iwae", k)`` (the reparameterization gradient) of :mod:`npvae.objectives`: the
    encoder runs once per example; its mu and logvar are tiled k times, and their gradients are
    summed over the k copies before the heads' backward. With k = 1 this is the ELBO with a
    Monte-Carlo KL (log q(z|x) - log p(z) at the sampled z): its reconstruction part and its
    gradient equal :meth:`VAE.loss_and_grads`'s for the same eps; its KL part agrees in expectation.

    Parameters
    ----------
    model : npvae.models.VAE with beta = 1 (the bound has no beta-weighted form)
    x : (B, D) array in the model's value range
    k : int
        Importance samples per example.
    eps : (B, k, Z) array, optional
        The noise; drawn from ``rng`` when not given.
    rng : np.random.Generator, optional

    Returns
    -------
    loss : float
        Nats per example, ``>= -log p(x)`` on average.
    grads : dict of name -> array
        Gradients of ``loss``, keyed like :meth:`VAE.state_dict` (views of ``model.params.grad``;
        overwritten by the next call).
    """
    terms, grads = Objective("iwae", _check_k(k)).loss_and_grads(model, x, eps=eps, rng=rng)
    return terms.total, grads
