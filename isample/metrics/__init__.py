"""Sampler-quality metrics: pure functions on per-example gradients, plus thin trackers.

* :mod:`.functional`: variance V(p), kappa, Q_lin / Q_log, ESS, tau, two-stage (pool)
  variance and its kappa bound, bias and MSE of biased schemes.
* :mod:`.optimizer`: the same in the optimizer's preconditioned geometry ``D g``.
* :mod:`.lr_scaling`: hyperparameter scaling for a kappa, weight-normalisation effects.
* :mod:`.per_example`: exact per-example gradients (``torch.func``).
* :mod:`.tracker`: :class:`SamplerQuality`, a time series during training.
* :mod:`.validator`: :func:`validate_sampler`, a Monte Carlo check of a weighted loader.

See ``docs/metrics.md`` for definitions and how to read the numbers.
"""

from __future__ import annotations

from .functional import (
    Quality,
    bias,
    effective_sample_size,
    estimator_moments,
    gradient_variance,
    gradient_variance_from_norms,
    kappa,
    max_weight,
    mse,
    optimal_probabilities,
    optimal_variance,
    quality,
    quality_from_norms,
    tau,
    two_stage_kappa,
    two_stage_kappa_bound,
    two_stage_variance,
    uniform_variance,
)
from .lr_scaling import (
    NormalisationEffect,
    apply_scaled_hyperparameters,
    normalisation_effect,
    scaled_hyperparameters,
)
from .optimizer import (
    flat_preconditioner,
    preconditioned_gradients,
    preconditioned_optimal_probabilities,
    preconditioned_quality,
    preconditioned_variance,
)
from .per_example import per_example_gradients, select_parameters
from .tracker import SamplerQuality
from .validator import ValidationReport, validate_sampler

__all__ = [
    "NormalisationEffect",
    "Quality",
    "SamplerQuality",
    "ValidationReport",
    "apply_scaled_hyperparameters",
    "bias",
    "effective_sample_size",
    "estimator_moments",
    "flat_preconditioner",
    "gradient_variance",
    "gradient_variance_from_norms",
    "kappa",
    "max_weight",
    "mse",
    "normalisation_effect",
    "optimal_probabilities",
    "optimal_variance",
    "per_example_gradients",
    "preconditioned_gradients",
    "preconditioned_optimal_probabilities",
    "preconditioned_quality",
    "preconditioned_variance",
    "quality",
    "quality_from_norms",
    "scaled_hyperparameters",
    "select_parameters",
    "tau",
    "two_stage_kappa",
    "two_stage_kappa_bound",
    "two_stage_variance",
    "uniform_variance",
    "validate_sampler",
]
