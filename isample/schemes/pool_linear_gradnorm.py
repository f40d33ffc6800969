"""Pool importance sampling by the exact per-example gradient norm of the Linear layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_float
from ._wrappers import PoolScheme

__all__ = ["PoolLinearGradNorm"]


class PoolLinearGradNorm(PoolScheme):
    """Two-stage pool sampling with the exact ``nn.Linear`` per-example gradient norm as score.

    Each pool of ``B = presample x b`` is scored by
    :class:`isample.linear_scorer.LinearGradNormScorer` (one batched forward and one
    backward to the layer outputs), optionally in the optimizer's preconditioned geometry
    ``||D g_i||``; then ``p_i = s_i / sum s``, ``w_i = 1 / (B p_i)`` as in
    :class:`KatharopoulosFleuret`. Scoring costs about ``2B`` forward-equivalents, so
    the default switch threshold is the break-even ``(2B + 3b) / (3b)``.

    .. math::

        s_i = \\|D g_i\\|_2, \\qquad p_i = \\frac{s_i}{\\sum_j s_j}, \\qquad w_i = \\frac{1}{B p_i}

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs: unused.
        optimizer: None (plain norm) or Adam / AdamW / RMSprop / Adagrad / SGD (norm of ``D g_i``).
        layers: the ``nn.Linear`` layers to cover (default all).
        presample: B / b (4.0).
        always: skip the switch (default False).
        tau_threshold: default ``(2B + 3b) / (3b)``.
        power, additive, relative, mixing and pool options: see :class:`KatharopoulosFleuret`.

    References:
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942); ``docs/methods/optimizer-aware.md``.
    """

    name = "pool-linear-gradnorm"
    unbiased = True

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
        layers: Any = None,
        presample: float = 4.0,
        always: bool = False,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        scoring_batch_size: int | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        from ..linear_scorer import LinearGradNormScorer  # written in parallel: imported lazily

        scorer = LinearGradNormScorer(loss_fn, layers=layers, optimizer=optimizer)
        presample = check_float(presample, "presample", type(self).__name__, minimum=1.0)
        if tau_threshold is None:
            b = int(batch_size) if isinstance(batch_size, int) and batch_size > 0 else 1
            big_b = max(b, int(round(presample * b)))
            tau_threshold = (2.0 * big_b + 3.0 * b) / (3.0 * b)
        options: dict[str, Any] = dict(
            presample=presample,
            always=always,
            tau_threshold=tau_threshold,
            tau_momentum=tau_momentum,
            power=power,
            additive=additive,
            relative=relative,
            mixing=mixing,
            scoring_batch_size=scoring_batch_size,
            num_batches=num_batches,
            drop_last=drop_last,
            loader_options=loader_options,
        )
        super().__init__(dataset, model, loss_fn, batch_size, seed, scorer, **options)
