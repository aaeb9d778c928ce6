"""Gradient estimators of a variational objective with respect to q's parameters (mu, logvar), as a registry.

Every estimator is one function of the same draws (:class:`Draws`): n independent draws, each of k
samples ``z_j = mu + std * eps_j`` from q(z|x) for one example (or, in training, one draw per example
of a batch). The trainer's k-sample objectives (:mod:`npvae.objectives.k_sample`), the command line's
``--estimator`` choices and help, the table and picture of :func:`npvae.study.gradflow.compare_estimators`
and the signal-to-noise study :func:`npvae.study.gradflow.estimator_snr` all iterate
:data:`ESTIMATORS`. Adding an estimator is one function and one entry here; the entry says which
bounds it trains (``trains``) and for which it is unbiased (``unbiased``).

The objectives (each a function of the per-sample log weights ``log w_j``)
--------------------------------------------------------------------------
``recon``  f = E_q[log p(x|z)], k = 1: ``log w = log p(x|z)``, which does not depend on q's parameters
           except through z. The object of the original reparameterization-vs-score comparison.
``elbo``   the k-sample ELBO with a Monte-Carlo KL: :math:`\\hat{\\mathcal L} = \\frac1k \\sum_j \\log w_j`,
           :math:`\\log w_j = \\log p(x|z_j) + \\log p(z_j) - \\log q(z_j|x)`.
``iwae``   the importance-weighted bound: :math:`\\hat{\\mathcal L}_k = \\log \\frac1k \\sum_j w_j`.

For both bounds :math:`\\partial \\hat{\\mathcal L} / \\partial \\log w_j = \\tilde w_j`, with
:math:`\\tilde w_j = 1/k` (ELBO) or :math:`\\tilde w_j = w_j / \\sum_l w_l` (IWAE, normalized weights).
With :math:`\\phi = (\\mu, \\log\\sigma^2)`, write the total derivative of a sample's log weight as a
path part and a direct part,

.. math:: \\frac{d \\log w_j}{d\\phi} = \\underbrace{\\frac{\\partial \\ell_j}{\\partial z_j}
          \\frac{\\partial z_j}{\\partial \\phi}}_{\\text{path, } P_j}
          + \\underbrace{\\frac{\\partial \\log w_j}{\\partial \\phi}\\Big|_{z_j}}_{\\text{direct}\\; = -s_j},
          \\qquad \\ell_j(z) = \\log p(x|z) + \\log p(z) - \\log q(z \\mid \\bot\\phi),

where :math:`\\bot\\phi` holds q's parameters fixed (a stop-gradient) and
:math:`s_j = \\partial_\\phi \\log q(z_j|\\phi)` is the score (zero mean under q). Per latent dimension,
:math:`\\partial z/\\partial\\mu = 1`, :math:`\\partial z / \\partial \\log\\sigma^2 = \\epsilon\\sigma/2`,
:math:`s = (\\epsilon/\\sigma,\\; (\\epsilon^2 - 1)/2)`.

==========  ======================================================================  ===============================  ==========
estimator   estimate of :math:`\\nabla_\\phi \\mathcal L` from one draw             objectives                       trains
==========  ======================================================================  ===============================  ==========
reparam     :math:`\\sum_j \\tilde w_j (P_j - s_j)`                                 all (the plain gradient)         elbo, iwae
score       :math:`\\hat{\\mathcal L} \\sum_j s_j - \\sum_j \\tilde w_j s_j`        all (REINFORCE)                  no
baseline    :math:`(\\hat{\\mathcal L} - b) \\sum_j s_j - \\sum_j \\tilde w_j s_j`  all, b = leave-one-out mean      no
stl         :math:`\\sum_j \\tilde w_j\\, P_j`                                      elbo, iwae (Roeder et al. 2017)  elbo, iwae
dreg        :math:`\\sum_j \\tilde w_j^2\\, P_j`                                    iwae (Tucker et al. 2019)        iwae
==========  ======================================================================  ===============================  ==========

(for ``recon`` the direct part is zero, so stl would be reparam there; score reads ``f(z) s``.)
STL drops the score term, whose mean is zero: unbiased for the ELBO, biased for IWAE (Tucker et al.
2019), and of zero variance once q is the exact posterior (then every l_j is constant in z). DReG
is IWAE's unbiased path-only encoder gradient: the reparameterization identity
:math:`E_q[f(z_j)\\, s_j] = E_\\epsilon[\\partial_{z_j} f\\, \\partial_\\phi z_j]` applied to
:math:`f = \\tilde w_j`, whose z_j-derivative is :math:`\\tilde w_j (1 - \\tilde w_j)\\, \\partial_{z_j} \\ell_j`,
gives :math:`E[\\tilde w_j s_j] = E[(\\tilde w_j - \\tilde w_j^2)\\, P_j]` with P_j the unweighted path term, so
:math:`E[\\sum_j \\tilde w_j (P_j - s_j)] = E[\\sum_j \\tilde w_j^2 P_j]`. The decoder's gradient is
:math:`\\sum_j \\tilde w_j \\nabla_\\theta \\log p(x|z_j)` for every estimator here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..registry import Registry

OBJECTIVES = ("recon", "elbo", "iwae")
BOUNDS = {"elbo": "ELBO", "iwae": "IWAE bound"}  # the objectives a model trains on, and how text names them


@dataclass(frozen=True)
class Draws:
    """What n draws of k samples z_j ~ q(z|x) give every estimator (float64 arrays).

    objective : str
        ``recon``, ``elbo`` or ``iwae`` (see the module docstring).
    log_w : (n, k) array
        log w_j: ``log p(x|z_j)`` (recon), or ``log p(x|z_j) + log p(z_j) - log q(z_j|x)``.
    weights : (n, k) array
        d bound / d log w_j: 1/k (recon, elbo) or the normalized importance weights (iwae).
    bound : (n,) array
        The objective's value per draw: the mean of log w (recon, elbo), log mean exp of log w (iwae).
    path : (n, k, 2Z) array
        ``weights_j * d l_j/dz_j * dz_j/d[mu, logvar]``, l_j = log w_j with q's parameters held fixed:
        the path term already weighted, as one backward pass through the decoder with upstream
        weights produces it (no division by a weight that may underflow).
    score : (n, k, 2Z) array
        d log q(z_j | mu, logvar) / d[mu, logvar] at fixed z_j: ``[eps / std, (eps^2 - 1) / 2]``.
    direct : (n, k, 2Z) array
        d log w_j / d[mu, logvar] at fixed z_j: ``-score`` (elbo, iwae), zero (recon).
    """

    objective: str
    log_w: np.ndarray
    weights: np.ndarray
    bound: np.ndarray
    path: np.ndarray
    score: np.ndarray
    direct: np.ndarray


@dataclass(frozen=True)
class Estimator:
    """One gradient estimator: everything the trainer, the command line and the study tools know of it.

    ``estimate`` maps :class:`Draws` to one estimate of d bound / d[mu, logvar] per draw, (n, 2Z).
    """

    name: str  # the table's column prefix and the --estimator choice, e.g. "reparam"
    label: str  # how pictures and text name it
    estimate: Callable[[Draws], np.ndarray]  # Draws -> (n, 2Z)
    objectives: tuple[str, ...] = OBJECTIVES  # the objectives it estimates the gradient of (stl: biased for iwae)
    pools_draws: bool = False  # reads the other rows of Draws (a baseline): the rows must be draws of one example
    unbiased: tuple[str, ...] = OBJECTIVES  # the objectives whose gradient is its expectation
    trains: tuple[str, ...] = ()  # the bounds (keys of BOUNDS) training may minimise with it; () = study only
    help: str = ""  # one line for --help: what it does and when it is unbiased
    snr_rate: float | None = None  # published large-k rate of its encoder gradient's IWAE SNR: SNR ~ k^rate

    def __post_init__(self):
        for field, values, allowed in (("objectives", self.objectives, OBJECTIVES),
                                       ("unbiased", self.unbiased, OBJECTIVES), ("trains", self.trains, BOUNDS)):
            wrong = [v for v in values if v not in allowed]
            if wrong:
                raise ValueError(f"estimator {self.name!r}: {field} {wrong} are not among {', '.join(allowed)}")
        untrained = [b for b in self.trains if b not in self.objectives]
        if untrained:
            raise ValueError(f"estimator {self.name!r} trains {untrained} but does not estimate their gradient")
        if self.trains and self.pools_draws:
            raise ValueError(f"estimator {self.name!r} pools draws of one example; training draws one per example")

    def is_unbiased(self, objective: str) -> bool:
        """Whether this estimator's expectation is the gradient of ``objective`` (then every such
        estimator has the same mean, the gradient itself)."""
        return objective in self.objectives and objective in self.unbiased


def _direct(d: Draws) -> np.ndarray:
    """sum_j weights_j * direct_j (n, 2Z): the gradient's part that does not flow through z."""
    return np.einsum("nk,nkp->np", d.weights, d.direct)


def reparameterization(d: Draws) -> np.ndarray:
    """The plain reparameterized gradient: differentiate the bound through z = mu + std * eps and
    through q's parameters inside log q, ``sum_j w_j (path_j + direct_j)``."""
    return d.path.sum(axis=1) + _direct(d)


def score_function(d: Draws) -> np.ndarray:
    """REINFORCE: ``bound * sum_j s_j + sum_j w_j direct_j``, with no derivative of the bound through z
    (the second term is the bound's own dependence on q's parameters at fixed z)."""
    return d.bound[:, None] * d.score.sum(axis=1) + _direct(d)


def score_function_loo(d: Draws) -> np.ndarray:
    """REINFORCE centred on the leave-one-out mean of the bound over the other draws (still unbiased:
    a draw's baseline does not depend on it). Needs n >= 2."""
    n = len(d.bound)
    baseline = (d.bound.sum() - d.bound) / (n - 1)
    return (d.bound - baseline)[:, None] * d.score.sum(axis=1) + _direct(d)


def sticking_the_landing(d: Draws) -> np.ndarray:
    """Path derivative (Roeder, Wu & Duvenaud 2017): ``sum_j w_j path_j``, the reparameterized
    gradient without the score term ``-sum_j w_j s_j`` (zero mean, and all noise when q is the exact
    posterior). Unbiased for the ELBO; biased for IWAE (Tucker et al. 2019)."""
    return d.path.sum(axis=1)


def doubly_reparameterized(d: Draws) -> np.ndarray:
    """DReG (Tucker, Lawson, Gu & Maddison 2019), IWAE's encoder gradient: ``sum_j w_j^2 P_j``.

    P_j is the unweighted path term; ``path`` already carries one factor w_j, so this is
    ``sum_j w_j path_j``. Unbiased: ``E[w_j s_j] = E[(w_j - w_j^2) P_j]`` (the module docstring).
    For k = 1 it is stl.
    """
    return np.einsum("nk,nkp->np", d.weights, d.path)


ESTIMATORS: Registry[Estimator] = Registry("estimator")
ESTIMATORS.register(Estimator("reparam", "reparameterization", reparameterization, trains=("elbo", "iwae"),
                              help="the plain reparameterization gradient",
                              snr_rate=-0.5))  # Rainforth et al. 2018
ESTIMATORS.register(Estimator("score", "score function", score_function, help="REINFORCE: no derivative through z"))
ESTIMATORS.register(Estimator("baseline", "score function, leave-one-out baseline", score_function_loo,
                              pools_draws=True, help="REINFORCE centred on the other draws' mean bound"))
ESTIMATORS.register(Estimator("stl", "sticking the landing (path derivative)", sticking_the_landing,
                              objectives=("elbo", "iwae"), unbiased=("elbo",), trains=("elbo", "iwae"),
                              help="sticking the landing: no score term; unbiased for the ELBO, biased for IWAE"))
ESTIMATORS.register(Estimator("dreg", "doubly reparameterized (DReG)", doubly_reparameterized, objectives=("iwae",),
                              unbiased=("iwae",), trains=("iwae",), help="doubly reparameterized, iwae only",
                              snr_rate=0.5))  # Tucker et al. 2019


def trainable(bound: str | None = None) -> tuple[str, ...]:
    """The estimators that train ``bound`` (a key of :data:`BOUNDS`), or any bound (None), in registry order."""
    return ESTIMATORS.where(lambda e: bool(e.trains) if bound is None else bound in e.trains)


#: bound -> the estimators that train it: what :class:`~npvae.objectives.Objective` accepts.
TRAINING_OBJECTIVES = {bound: trainable(bound) for bound in BOUNDS}


def estimators(names=None) -> list[Estimator]:
    """The registered estimators called ``names`` (default: all, in registry order)."""
    if names is None:
        return list(ESTIMATORS.values())
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise ValueError(f"unknown estimators {unknown or names}: expected some of {', '.join(ESTIMATORS)}")
    return [ESTIMATORS[n] for n in names]


def reduce_draws(objective: str, log_w: np.ndarray, dlog_w_dz_weighted: np.ndarray, eps: np.ndarray,
                 logvar: np.ndarray, weights: np.ndarray | None = None, bound: np.ndarray | None = None) -> Draws:
    """Assemble :class:`Draws` from a sampler's pieces (float64).

    Parameters
    ----------
    objective : "recon", "elbo" or "iwae"
    log_w : (n, k) array
    dlog_w_dz_weighted : (n, k, Z) array
        ``weights_j * d l_j / dz_j`` (l_j: log w_j with q's parameters fixed).
    eps : (n, k, Z) array, the noise of each sample
    logvar : (n, Z) array, q's log-variance per row
    weights, bound : optional, as computed by the caller (default: from log_w)
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    log_w = np.asarray(log_w, np.float64)
    n, k = log_w.shape
    if weights is None or bound is None:
        weights, bound = bound_and_weights(objective, log_w)
    eps = np.asarray(eps, np.float64)
    std = np.exp(0.5 * np.asarray(logvar, np.float64))[:, None, :]  # (n, 1, Z)
    g = np.asarray(dlog_w_dz_weighted, np.float64)
    path = np.concatenate([g, g * eps * std * 0.5], axis=2)  # (n, k, 2Z): dz/dmu = 1, dz/dlogvar = eps std / 2
    score = np.concatenate([eps / std, 0.5 * (eps * eps - 1.0)], axis=2)
    direct = np.zeros_like(score) if objective == "recon" else -score
    return Draws(objective, log_w, np.asarray(weights, np.float64), np.asarray(bound, np.float64), path, score, direct)


def bound_and_weights(objective: str, log_w: np.ndarray):
    """(weights (n, k), bound (n,)) of ``objective`` for log weights (n, k), in log_w's dtype."""
    k = log_w.shape[1]
    if objective == "iwae":
        m = log_w.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(log_w - m)
        total = e.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            bound = np.log(total[:, 0]) + m[:, 0] - np.log(k)
        weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
        return weights, bound
    return np.full_like(log_w, 1.0 / k), log_w.mean(axis=1)
