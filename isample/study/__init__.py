"""The optimizer study (issue 15): does the sampler-quality metric predict the speed-up?

Built so far: the pure analysis functions of :mod:`isample.study.analysis` (rank
correlation with a bootstrap interval, curve matching, time to reach a loss level, the
largest stable learning rate). Not built yet: the ``isample study`` command and the
experiments A-C that use them (see ``docs/study.md``).
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

__all__ = [
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
