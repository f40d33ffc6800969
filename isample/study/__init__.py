"""The optimizer study (issue 15): does the sampler-quality metric predict the speed-up?

* :mod:`isample.study.analysis`: pure functions (rank correlation with a bootstrap interval,
  curve matching, time to reach a loss level, the largest stable learning rate).
* :mod:`isample.study.experiments`: experiments A (effective batch), B (predicted vs realized
  speed-up) and C (stability), each a set of :func:`isample.bench.harness.train_run` runs.
* :func:`run_study` / :class:`StudyConfig` / :func:`quick_study_config`: the API behind
  ``isample study`` (see ``docs/study.md``).
"""

from __future__ import annotations

from .analysis import (
    CurveMatch,
    SpearmanResult,
    StabilitySearch,
    common_levels,
    curve_match,
    is_stable,
    largest_stable_lr,
    reach_ratio,
    spearman,
    time_to_reach,
)
from .experiments import (
    FAMILIES,
    checkpoint_points,
    effective_batch_verdict,
    family_spearman,
    optimizer_family,
    run_kappa,
)
from .runner import (
    StudyConfig,
    default_study_optimizers,
    quick_study_config,
    run_study,
    validate_study_config,
)

__all__ = [
    "FAMILIES",
    "StudyConfig",
    "checkpoint_points",
    "default_study_optimizers",
    "effective_batch_verdict",
    "family_spearman",
    "optimizer_family",
    "quick_study_config",
    "run_kappa",
    "run_study",
    "validate_study_config",
    "CurveMatch",
    "SpearmanResult",
    "StabilitySearch",
    "common_levels",
    "curve_match",
    "is_stable",
    "largest_stable_lr",
    "reach_ratio",
    "spearman",
    "time_to_reach",
]
