"""LaBER (Lahire, Geist, Rachelson 2022): large-batch experience replay, "mean" weights, always on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..pool_loader import check_presample
from ..scorers import UpperBoundScorer
from ._wrappers import PoolScheme

__all__ = ["LaBER"]


class LaBER(PoolScheme):
    """Large Batch Experience Replay with the "mean" weight normalisation (always on).

    A uniform pool of ``B = m x b`` examples (``m = presample = 4``) is scored with the
    surrogate priority ``p~_i = ||d l_i / d z_i||`` (the norm of the loss gradient with
    respect to the network output) and ``b`` rows are drawn with replacement from
    ``p_i = p~_i / sum_j p~_j``. Weights are normalised by the pool mean of the priorities:

    .. math::

        w_i = \\frac{\\operatorname{mean}_{j \\in \\text{pool}} \\tilde p_j}{\\tilde p_i}
            = \\frac{1}{B\\, p_i},

    which makes the batch unbiased for the pool mean, hence for the full gradient. It is
    :class:`KatharopoulosFleuret`'s two-stage draw with ``presample=4`` and no switch.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs, optimizer: accepted for the common protocol; unused.
        presample: m = B / b (4, the paper's default).
        power, additive, relative, mixing, closed_form, and the pool options: see
            :class:`KatharopoulosFleuret`.

    References:
        Lahire, Geist and Rachelson, "Large Batch Experience Replay", ICML 2022
        (arXiv:2110.01528).
    """

    name = "laber"
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
        presample: float = 4.0,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        closed_form: bool = True,
        scoring_batch_size: int | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        presample = check_presample(presample, type(self).__name__)
        options: dict[str, Any] = dict(
            presample=presample,
            always=True,
            power=power,
            additive=additive,
            relative=relative,
            mixing=mixing,
            scoring_batch_size=scoring_batch_size,
            num_batches=num_batches,
            drop_last=drop_last,
            loader_options=loader_options,
            normalize="none",
        )
        super().__init__(
            dataset, model, loss_fn, batch_size, seed, UpperBoundScorer(loss_fn, closed_form), **options
        )
