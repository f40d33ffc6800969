"""Katharopoulos-Fleuret 2018: upper-bound importance sampling from presampled pools, with the tau switch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..pool_loader import ALGORITHM1_TAU_EVERY, check_presample
from ..scorers import UpperBoundScorer
from ..switch import check_tau_momentum, check_tau_threshold
from ._wrappers import PoolScheme

__all__ = ["KatharopoulosFleuret"]


class KatharopoulosFleuret(PoolScheme):
    """Upper-bound importance sampling (Katharopoulos and Fleuret, ICML 2018).

    The paper's Algorithm 1. While the tau switch is off, a step reads a uniform batch of
    ``b`` (weights 1; no presampling and no scoring pass: the cost of a uniform step) and
    the loop's :meth:`feedback` hands back the training outputs, from which the upper bound
    ``s_i = ||d l_i / d z_i||`` of the batch is computed in closed form (no extra forward).
    Once on, a step reads a uniform pool of ``B = presample x b`` examples, scores it (one
    no-grad forward of the pool) and draws ``b`` rows with replacement:

    .. math::

        p_i = \\frac{s_i}{\\sum_{j \\in \\text{pool}} s_j}, \\qquad w_i = \\frac{1}{B p_i},
        \\qquad \\text{on while } \\mathrm{EMA}_{0.9}(\\tau) > \\tau_{th} = \\frac{B + 3b}{3b},
        \\quad \\tau = \\sqrt{B \\textstyle\\sum_i q_i^2},\\ q = s / \\textstyle\\sum s .

    tau is always computed over the B most recent scores (the last pool, or the last B / b
    training batches), so the estimate means the same in both regimes (see
    :class:`isample.PoolLoader`). Both regimes are unbiased: uniform batches with weights 1,
    or the two-stage draw with weights ``1 / (B p_i)``. ``describe()`` and ``status()``
    report the switch. A composition of :class:`isample.PoolLoader` (``score_when_off=False``)
    and :class:`isample.UpperBoundScorer`.

    Args:
        dataset, model, loss_fn, batch_size: the data, the model being trained, the
            per-example loss (``reduction="none"``) and b.
        seed: randomness source (int >= 0).
        epochs, optimizer: accepted for the common protocol; unused.
        presample: B / b (3.0 as in the paper; their MNIST example uses 5).
        tau_threshold: default ``(B + 3b) / (3b)``.
        tau_momentum: EMA momentum of tau (0.9).
        always: importance sampling from the first step (skips the switch).
        score_when_off: False (default) = Algorithm 1 as above; True = read and score a
            pool at every step, also while the switch is off (tau from the pool itself).
        power, additive, relative, mixing: score smoothing (:class:`isample.policies.ScorePolicy`).
        closed_form: closed-form upper bound for cross-entropy / MSE (default True).
        scoring_batch_size, num_batches, drop_last, max_weight, replacement:
            :class:`isample.PoolLoader` options.
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).

    References:
        Katharopoulos and Fleuret, "Not All Samples Are Created Equal: Deep Learning with
        Importance Sampling", ICML 2018 (arXiv:1803.00942).
    """

    name = "kf"
    unbiased = True
    #: ``tau_every`` of its pool loader (see :data:`isample.pool_loader.ALGORITHM1_TAU_EVERY`)
    TAU_EVERY = ALGORITHM1_TAU_EVERY

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module,
        loss_fn: Callable,
        batch_size: int,
        *,
        seed: int | None = 0,
        epochs: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        presample: float = 3.0,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        always: bool = False,
        score_when_off: bool = False,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        closed_form: bool = True,
        scoring_batch_size: int | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        max_weight: float | None = None,
        replacement: bool = True,
        **loader_options: Any,
    ) -> None:
        owner = type(self).__name__
        presample = check_presample(presample, owner)
        tau_threshold = check_tau_threshold(tau_threshold, owner)
        tau_momentum = check_tau_momentum(tau_momentum, owner)
        options: dict[str, Any] = dict(
            presample=presample,
            score_when_off=score_when_off,
            tau_threshold=tau_threshold,
            tau_momentum=tau_momentum,
            always=always,
            power=power,
            additive=additive,
            relative=relative,
            mixing=mixing,
            tau_every=self.TAU_EVERY,
            scoring_batch_size=scoring_batch_size,
            num_batches=num_batches,
            drop_last=drop_last,
            loader_options=loader_options,
            max_weight=max_weight,
            replacement=replacement,
        )
        super().__init__(
            dataset, model, loss_fn, batch_size, seed, UpperBoundScorer(loss_fn, closed_form), **options
        )

    @property
    def switch(self) -> Any:
        """The tau switch (``threshold``, ``ema``, ``on``)."""
        return self.pool.switch
