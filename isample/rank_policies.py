"""Rank-based, CDF-power, top-k and pruning rules: pure functions from scores to selections.

These complement :mod:`isample.policies` (proportional rules) with the selection rules of
the published biased schemes. Every function is pure: tensors in, tensors out, no state,
no global random state (randomness, where any, comes from an explicit ``torch.Generator``).

* :func:`rank_exponential_probabilities`: Loshchilov and Hutter's online batch selection,
  ``p ∝ exp(-log(s_e) rank / M)``.
* :func:`annealed_selection_pressure`: geometric annealing of ``s_e`` over epochs.
* :func:`cdf_power_probabilities`: Selective Backprop's ``max(s_min, CDF_R(loss)^beta)``.
* :func:`top_k_rows`: RHO-LOSS style deterministic top-k.
* :func:`infobatch_plan`: InfoBatch's random pruning of below-mean examples with rescaling.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._validation import check_float, check_int

__all__ = [
    "rank_exponential_probabilities",
    "annealed_selection_pressure",
    "cdf_power_probabilities",
    "top_k_rows",
    "infobatch_plan",
    "infobatch_kept_count",
]


def _as_float64(values: torch.Tensor | np.ndarray, name: str, owner: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"The '{name}' parameter of {owner} must be a Tensor. Got {type(values).__name__}.")
    if values.dim() != 1:
        raise ValueError(
            f"The '{name}' parameter of {owner} must have shape (M,). Got {tuple(values.shape)}."
        )
    if values.numel() == 0:
        raise ValueError(f"The '{name}' parameter of {owner} is empty.")
    return values.detach().to("cpu", torch.float64)


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry, 0 = largest score; ties broken by position (stable), NaN ranks first.

    Returns:
        LongTensor of shape (M,): a permutation of ``0 .. M-1``.
    """
    s = _as_float64(scores, "scores", "descending_ranks")
    key = torch.where(torch.isnan(s), torch.full_like(s, math.inf), s)
    order = torch.sort(-key, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def rank_exponential_probabilities(scores: torch.Tensor, selection_pressure: float) -> torch.Tensor:
    """Online batch selection: probability decaying exponentially with the loss rank.

    .. math::

        p_i = \\frac{\\exp(-\\log(s_e)\\, r_i / M)}{\\sum_{r=0}^{M-1} \\exp(-\\log(s_e)\\, r / M)}

    with ``r_i`` the rank of example i by decreasing score (0 = largest loss; ties broken
    by position, NaN = never seen ranks first). The ratio of the largest to the smallest
    probability is ``s_e ** ((M - 1) / M)``, i.e. about ``s_e``; ``s_e = 1`` is uniform.

    Args:
        scores: Tensor of shape (M,), the latest losses (NaN for never-seen examples).
        selection_pressure: s_e >= 1.

    Returns:
        float64 Tensor of shape (M,), summing to 1.

    References:
        Loshchilov and Hutter, "Online Batch Selection for Faster Training of Neural
        Networks", ICLR workshop 2016 (arXiv:1511.06343).
    """
    owner = "rank_exponential_probabilities"
    s_e = check_float(selection_pressure, "selection_pressure", owner, minimum=1.0)
    ranks = descending_ranks(_as_float64(scores, "scores", owner))
    m = ranks.numel()
    logits = -math.log(s_e) * ranks.to(torch.float64) / m
    p = torch.exp(logits - logits.max())
    return p / p.sum()


def annealed_selection_pressure(initial: float, final: float, epoch: int, epochs: int | None) -> float:
    """Geometric annealing of the selection pressure from ``initial`` (epoch 0) to ``final`` (last epoch).

    .. math::

        s_e = s_0 \\Big(\\frac{s_{\\text{end}}}{s_0}\\Big)^{e / (E - 1)}

    Returns ``initial`` when ``epochs`` is None or 1, and ``final`` for ``epoch >= E - 1``.
    """
    owner = "annealed_selection_pressure"
    s0 = check_float(initial, "initial", owner, minimum=1.0)
    s1 = check_float(final, "final", owner, minimum=1.0)
    e = check_int(epoch, "epoch", owner, minimum=0)
    total = check_int(epochs, "epochs", owner, minimum=1, allow_none=True)
    if total is None or total == 1:
        return s0
    frac = min(e / (total - 1), 1.0)
    return float(s0 * (s1 / s0) ** frac)


def cdf_power_probabilities(
    losses: torch.Tensor, history: torch.Tensor, beta: float = 3.0, s_min: float = 0.0
) -> torch.Tensor:
    """Selective Backprop keep probabilities from the empirical CDF of recent losses.

    .. math::

        P_i = \\max\\big(s_{\\min},\\; \\mathrm{CDF}_R(\\ell_i)^{\\beta}\\big), \\qquad
        \\mathrm{CDF}_R(x) = \\frac{|\\{h \\in H : h \\le x\\}|}{|H|}

    where ``H`` is the history of the last R losses (the caller pushes the current
    candidates' losses into it first, as the reference implementation does, so the largest
    loss seen recently is kept with probability 1).

    Args:
        losses: Tensor of shape (c,), the candidates' losses.
        history: Tensor of shape (R,), recent losses (non-empty).
        beta: selectivity exponent > 0 (3 in the paper; larger = more selective).
        s_min: floor on the probability, in [0, 1] (0 in the paper).

    Returns:
        float64 Tensor of shape (c,) with entries in [s_min, 1].

    References:
        Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers",
        arXiv:1910.00762 (2019).
    """
    owner = "cdf_power_probabilities"
    b = check_float(beta, "beta", owner, minimum=0.0, min_inclusive=False)
    floor = check_float(s_min, "s_min", owner, minimum=0.0, maximum=1.0)
    x = _as_float64(losses, "losses", owner).numpy()
    h = np.sort(_as_float64(history, "history", owner).numpy())
    cdf = np.searchsorted(h, x, side="right") / h.size
    return torch.from_numpy(np.maximum(floor, cdf**b))


def top_k_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The rows of the ``k`` largest scores, in decreasing score order (ties: lower row first).

    Returns:
        LongTensor of shape (min(k, M),).
    """
    owner = "top_k_rows"
    s = _as_float64(scores, "scores", owner)
    k = check_int(k, "k", owner, minimum=1)
    if bool(torch.isnan(s).any()):
        raise ValueError(f"The 'scores' parameter of {owner} has NaN entries.")
    order = torch.sort(-s, stable=True).indices
    return order[: min(k, s.numel())]


def infobatch_plan(
    scores: torch.Tensor,
    prune_ratio: float,
    generator: torch.Generator,
    min_keep: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of InfoBatch: prune a random fraction of the below-mean examples, rescale the rest.

    With ``W = {i : s_i < mean(s)}`` ("well learned"), keep a uniformly random subset of
    ``K = max(1, round((1 - r) |W|))`` of them (without replacement) and every example
    outside W:

    .. math::

        w_i = \\begin{cases} |W| / K \\;(\\approx 1 / (1 - r)) & i \\in W \\text{ kept} \\\\
                             1 & i \\notin W \\end{cases}

    so every example's inclusion probability times its weight is exactly 1: the epoch's
    summed gradient is unbiased. ``K`` is raised when needed so that at least
    ``ceil(min_keep * M)`` examples are kept.

    Args:
        scores: Tensor of shape (M,), the latest loss of every example.
        prune_ratio: r in [0, 1).
        generator: the randomness of the subset and of the shuffle.
        min_keep: floor on the kept fraction of all M examples, in [0, 1].

    Returns:
        ``(indices, weights)``: LongTensor (M_e,) in random order and float32 Tensor (M_e,).

    References:
        Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
        Pruning", ICLR 2024 (arXiv:2303.04947).
    """
    owner = "infobatch_plan"
    s = _as_float64(scores, "scores", owner)
    r = check_float(prune_ratio, "prune_ratio", owner, minimum=0.0, maximum=1.0, max_inclusive=False)
    floor = check_float(min_keep, "min_keep", owner, minimum=0.0, maximum=1.0)
    m = s.numel()
    well = s < s.mean()
    well_idx = torch.nonzero(well).flatten()
    rest = torch.nonzero(~well).flatten()
    n_well = well_idx.numel()
    keep = infobatch_kept_count(n_well, m, r, floor)
    chosen = well_idx[torch.randperm(n_well, generator=generator)[:keep]] if n_well else well_idx
    indices = torch.cat([rest, chosen])
    weights = torch.ones(indices.numel(), dtype=torch.float64)
    if keep:
        weights[rest.numel() :] = n_well / keep
    order = torch.randperm(indices.numel(), generator=generator)
    return indices[order], weights[order].to(torch.float32)


def infobatch_kept_count(num_well: int, num_samples: int, prune_ratio: float, min_keep: float = 0.0) -> int:
    """How many of the ``num_well`` below-mean examples InfoBatch keeps (K in :func:`infobatch_plan`).

    ``K = max(1, round((1 - r) |W|))`` (0 when ``|W| = 0``), raised so that at least
    ``ceil(min_keep * M)`` examples are kept in total. Never 0 for a non-empty W: an
    inclusion probability of 0 would bias the epoch's sum.
    """
    if num_well <= 0:
        return 0
    keep = int(round((1.0 - prune_ratio) * num_well))
    keep = max(keep, min(num_well, math.ceil(min_keep * num_samples) - (num_samples - num_well)))
    return max(keep, 1)
