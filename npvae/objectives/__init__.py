"""What training minimises and how its gradient is estimated: ``npvae train --objective --k --estimator``.

- :mod:`npvae.objectives.estimators`: the gradient estimators as one registry, :data:`ESTIMATORS`.
  Each entry is one function of the draws (:class:`Draws`) and says which objectives it estimates,
  for which it is unbiased, and which bounds it trains (``trains``); :data:`TRAINING_OBJECTIVES`,
  :class:`Objective`'s checks and the command line's ``--estimator`` choices and help derive from it.
- :mod:`npvae.objectives.k_sample`: the k-sample ELBO and IWAE bound. :func:`k_sample_draws` runs a
  VAE's encoder once and its decoder on k samples per example, and :class:`Objective` turns one
  estimator's output into the gradients the trainer steps on.

Both sit below the study tools (:mod:`npvae.study` reads them to measure the estimators) and above
the models, whose public methods they call.
"""

# Not estimators.estimators (the selection by name): it would shadow the submodule npvae.objectives.estimators.
from .estimators import (BOUNDS, ESTIMATORS, OBJECTIVES, TRAINING_OBJECTIVES, Draws, Estimator, bound_and_weights,
                         reduce_draws, trainable)
from .k_sample import Objective, check_k_sample_model, encoder_backward, estimator_help, k_sample_draws

__all__ = [
    "BOUNDS", "ESTIMATORS", "OBJECTIVES", "TRAINING_OBJECTIVES", "Draws", "Estimator", "Objective", "bound_and_weights",
    "check_k_sample_model", "encoder_backward", "estimator_help", "k_sample_draws", "reduce_draws", "trainable",
]
