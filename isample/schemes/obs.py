"""Online batch selection (Loshchilov and Hutter 2015): rank-based selection with annealed pressure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_float, check_int
from ..rank_policies import annealed_selection_pressure, rank_exponential_probabilities
from ..scorers import LossScorer
from ._wrappers import TableScheme
from .base import feedback_arrays

__all__ = ["OnlineBatchSelection"]


class OnlineBatchSelection(TableScheme):
    """Rank-based online batch selection with an annealed selection pressure.

    Every example keeps its latest loss (training losses fed back by the loop, plus a full
    re-scoring pass every ``rescore_every`` epochs). At the start of each epoch the
    examples are ranked by decreasing loss (rank 0 = largest; never-seen examples first)
    and the epoch's draws use

    .. math::

        p_i \\propto \\exp\\!\\big(-\\log(s_e)\\, r_i / N\\big), \\qquad
        s_e = s_{e,0} \\Big(\\frac{s_{e,\\text{end}}}{s_{e,0}}\\Big)^{e / (E - 1)}

    (ratio of largest to smallest probability about ``s_e``), drawn with replacement in
    O(b log N) by a :class:`isample.TableSampler` holding ``p``. Weights are 1 (biased, as
    in the paper); ``unbiased=True`` uses ``w_i = 1 / (N p_i)`` instead.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs: E, total number of epochs, for the annealing (None: constant ``s_e0``).
        optimizer: unused.
        selection_pressure: s_e0 >= 1 at epoch 0 (1e2; constants unconfirmed against the paper).
        final_selection_pressure: s_e at the last epoch (>= 1; default 1, i.e. uniform).
        rescore_every: re-score the whole dataset with ``LossScorer`` at epochs 0, k, 2k, ...
            (default 2; None = never, training losses only; unconfirmed).
        unbiased: weights ``1 / (N p_i)`` instead of 1.
        scoring_batch_size, num_batches, drop_last: loader options.
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).

    References:
        Loshchilov and Hutter, "Online Batch Selection for Faster Training of Neural
        Networks", arXiv:1511.06343 (2015).
    """

    name = "obs"
    unbiased = False

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
        selection_pressure: float = 100.0,
        final_selection_pressure: float = 1.0,
        rescore_every: int | None = 2,
        unbiased: bool = False,
        scoring_batch_size: int = 1024,
        num_batches: int | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        owner = type(self).__name__
        self.selection_pressure = check_float(selection_pressure, "selection_pressure", owner, minimum=1.0)
        self.final_selection_pressure = check_float(
            final_selection_pressure, "final_selection_pressure", owner, minimum=1.0
        )
        if epochs is not None:
            epochs = check_int(epochs, "epochs", owner, minimum=1)
        self.epochs = epochs
        self.unbiased = bool(unbiased)
        super().__init__(
            dataset,
            model,
            loss_fn,
            batch_size,
            seed,
            rescore_every=rescore_every,
            scoring_batch_size=scoring_batch_size,
            loader_options=loader_options,
            num_batches=num_batches,
            drop_last=drop_last,
            mixing=0.0,
            bias_exponent=1.0 if self.unbiased else 0.0,
        )
        self.losses = np.full(self.num_samples, np.nan)

    def pressure(self, epoch: int) -> float:
        """The selection pressure s_e of ``epoch``."""
        return annealed_selection_pressure(
            self.selection_pressure, self.final_selection_pressure, epoch, self.epochs
        )

    def _begin_epoch(self, epoch: int) -> None:
        super()._begin_epoch(epoch)  # re-scoring writes self.losses through _rescored
        p = rank_exponential_probabilities(torch.from_numpy(self.losses), self.pressure(epoch))
        self.sampler.update(torch.arange(self.num_samples), p * self.num_samples)
        self.sampler.flush()  # the epoch's ranking applies from its first draw, whatever the prefetch delay

    def _rescore_scorer(self) -> Callable:
        return LossScorer(self.loss_fn)

    def _rescored(self, scores: torch.Tensor) -> None:
        self.losses[:] = scores.to(torch.float64).numpy()

    def update(self, indices: Any, scores: Any) -> None:
        """Record the latest losses (used at the next epoch's ranking); O(k)."""
        idx, val = feedback_arrays(indices, scores, self.num_samples, type(self).__name__)
        self.losses[idx] = val

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        state["losses"] = torch.from_numpy(self.losses.copy())
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.losses = np.asarray(state["losses"], dtype=np.float64).copy()
