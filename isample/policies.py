"""Score -> probability rules.

The default rule turns non-negative scores ``s`` over a set of M candidates into

.. math::

    t_i = s_i^{\\alpha}, \\qquad c = c_0 + \\rho \\cdot \\overline{t}, \\qquad
    p_i = \\frac{\\lambda}{M} + (1 - \\lambda) \\frac{t_i + c}{\\sum_j t_j + M c}

with power smoothing ``alpha`` (``power``), additive smoothing ``c_0`` (``additive``),
adaptive additive smoothing ``rho`` times the mean transformed score (``relative``;
the Katharopoulos-Fleuret code uses 0.5 x an EMA of the mean), and uniform mixing
``lambda`` (``mixing``), which bounds every importance weight by ``1 / lambda``.
Every smoothing is a mixture of the score distribution with the uniform one, which is
how the table sampler draws from it in O(log N).

References:
    Katharopoulos and Fleuret, ICML 2018 (smoothing); Needell, Srebro and Ward,
    NeurIPS 2014 (uniform mixing with lambda = 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_float

__all__ = ["ScorePolicy", "check_scores", "proportional_probabilities"]


def check_scores(scores: torch.Tensor, owner: str, name: str = "scores") -> torch.Tensor:
    """Validate a 1-D tensor of finite, non-negative scores and return it.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape, NaN / inf, or negative entries (the message names how many).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"The '{name}' parameter of {owner} must be a Tensor. Got {type(scores).__name__}.")
    if scores.dim() != 1:
        raise ValueError(
            f"The '{name}' parameter of {owner} must have shape (M,). Got {tuple(scores.shape)}."
        )
    if scores.numel() == 0:
        raise ValueError(f"The '{name}' parameter of {owner} is empty; need at least one score.")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        raise ValueError(
            f"The '{name}' parameter of {owner} has {int((~finite).sum())} NaN or infinite entries."
        )
    if bool((scores < 0).any()):
        raise ValueError(
            f"The '{name}' parameter of {owner} must be >= 0; {int((scores < 0).sum())} entries are negative "
            f"(min {float(scores.min()):.4g})."
        )
    return scores


@dataclass(frozen=True)
class ScorePolicy:
    """Configuration of the default score -> probability rule (see module docstring).

    Args:
        power: exponent alpha applied to scores (> 0; 1 = proportional, 0.5 = square root).
        additive: constant c_0 >= 0 added to every transformed score.
        relative: rho >= 0; adds rho x mean(transformed scores) to every score.
        mixing: lambda in [0, 1]; share of uniform probability mixed in.
    """

    power: float = 1.0
    additive: float = 0.0
    relative: float = 0.0
    mixing: float = 0.0

    def __post_init__(self) -> None:
        check_float(self.power, "power", "ScorePolicy", minimum=0.0, min_inclusive=False)
        check_float(self.additive, "additive", "ScorePolicy", minimum=0.0)
        check_float(self.relative, "relative", "ScorePolicy", minimum=0.0)
        check_float(self.mixing, "mixing", "ScorePolicy", minimum=0.0, maximum=1.0)

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        """``t = s ** power`` (elementwise)."""
        return scores if self.power == 1.0 else scores.pow(self.power)

    def uniform_share(self, transformed_total: float, count: int) -> float:
        """Probability mass that is uniform over the M = ``count`` candidates.

        Equals ``lambda + (1 - lambda) M c / (T + M c)`` with ``T`` the sum of transformed
        scores; 1.0 when every score is zero and there is no smoothing (the rule degrades
        to uniform, see :meth:`probabilities`). Computed on ``T`` and ``c_0`` divided by
        the larger of the two, so no finite configuration overflows.
        """
        return _uniform_share(self.mixing, self.additive, self.relative, transformed_total, count)

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Probabilities of shape (M,) (float64, sum 1) from scores of shape (M,).

        All-zero scores with no smoothing give the uniform distribution (every weight 1).
        When ``s ** power`` or its sum overflows float64 (or underflows below ``2^-900``),
        the rule is evaluated on ``s / max(s)`` with ``c_0`` rescaled to match (the same
        probabilities, computed without overflow or loss of precision).
        """
        scores = check_scores(scores, "ScorePolicy.probabilities")
        s = scores.to(torch.float64)
        t = self.transform(s)
        total = float(t.sum())
        top = float(s.max())
        if math.isfinite(total) and (total >= 2.0**-900 or top == 0.0):
            return mix_with_uniform(t, self.uniform_share(total, t.numel()))
        # s ** power overflowed, or underflowed towards subnormals: same formula on s / max(s)
        t = self.transform(s / top)
        log_scale = self.power * math.log(top)  # transformed scores were divided by exp(log_scale)
        exponent = math.log(self.additive) - log_scale if self.additive > 0 else -math.inf
        additive = math.exp(exponent) if exponent < 709.0 else math.inf  # inf: c_0 dwarfs every score
        share = _uniform_share(self.mixing, additive, self.relative, float(t.sum()), t.numel())
        return mix_with_uniform(t, share)


def _uniform_share(mixing: float, additive: float, relative: float, total: float, count: int) -> float:
    """``mixing + (1 - mixing) u`` with ``u = (M c_0 + rho T) / ((1 + rho) T + M c_0)``, overflow-free."""
    if math.isinf(additive):  # c_0 dwarfs every score: uniform
        return 1.0
    scale = max(total, additive)
    if scale <= 0:
        return 1.0
    t, a = total / scale, additive / scale  # both in [0, 1]
    denom = (1.0 + relative) * t + count * a
    if denom <= 0:
        return 1.0
    return mixing + (1.0 - mixing) * min((count * a + relative * t) / denom, 1.0)


def mix_with_uniform(transformed: torch.Tensor, uniform_share: float) -> torch.Tensor:
    """``u / M + (1 - u) t / sum(t)``; pure uniform when ``sum(t) == 0``."""
    m = transformed.numel()
    total = float(transformed.sum())
    if total <= 0 or uniform_share >= 1.0:
        return torch.full_like(transformed, 1.0 / m)
    return uniform_share / m + (1.0 - uniform_share) * (transformed / total)  # t / T first: exact for tiny T


def proportional_probabilities(scores: torch.Tensor, mixing: float = 0.0) -> torch.Tensor:
    """``p = mixing / M + (1 - mixing) s / sum(s)`` as float64, shape (M,)."""
    return ScorePolicy(mixing=mixing).probabilities(scores)
