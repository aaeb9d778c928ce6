"""The gradient estimators the study tools compare: :mod:`npvae.objectives.estimators`, under its older name.

The registry lives with the objectives that train with it, one floor below the study tools; this
module re-exports it so that ``npvae.study.estimators.ESTIMATORS`` keeps working.
"""

from ..objectives.estimators import (BOUNDS, ESTIMATORS, OBJECTIVES, TRAINING_OBJECTIVES, Draws, Estimator,
                                     bound_and_weights, doubly_reparameterized, estimators, reduce_draws,
                                     reparameterization, score_function, score_function_loo, sticking_the_landing,
                                     trainable)

__all__ = [
    "BOUNDS", "ESTIMATORS", "OBJECTIVES", "TRAINING_OBJECTIVES", "Draws", "Estimator", "bound_and_weights",
    "doubly_reparameterized", "estimators", "reduce_draws", "reparameterization", "score_function",
    "score_function_loo", "sticking_the_landing", "trainable",
]
