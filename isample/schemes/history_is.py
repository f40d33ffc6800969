"""History importance sampling: a score table fed by the training forward pass, with staleness control."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_choice
from ..batch import WeightedBatch
from ..scorers import LossScorer, UpperBoundScorer, output_gradient_norms, upper_bound_closed_form
from ._wrappers import TableScheme

__all__ = ["HistoryIS", "training_upper_bound"]

SCORES = ("loss", "upper_bound")


def training_upper_bound(loss_fn: Callable, outputs: Any, targets: Any) -> torch.Tensor:
    """``||d l_i / d z_i||`` from the training step's detached outputs: no extra forward pass.

    Closed form for cross-entropy / MSE (:func:`isample.scorers.upper_bound_closed_form`),
    otherwise one backward of the loss alone with respect to the outputs.

    Returns:
        float32 Tensor of shape (b,).
    """
    outputs = outputs.detach()
    scores = None
    if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        scores = upper_bound_closed_form(loss_fn, outputs, targets)
    if scores is None:
        scores = output_gradient_norms(loss_fn, outputs, targets, "HistoryIS")
    return scores.detach().to(torch.float32)


class HistoryIS(TableScheme):
    """Importance sampling from a table of stale scores, fed for free by the training step.

    Every draw takes ``b`` examples from the whole dataset with replacement (O(b log N) sum
    tree) with probabilities from the table ``s`` (uniform mixing ``lambda``):

    .. math::

        p_i = \\frac{\\lambda}{N} + (1 - \\lambda)\\frac{s_i}{\\sum_j s_j}, \\qquad
        w_i = \\frac{1}{N p_i}

    The table is updated by :meth:`feedback` with the training losses, or with the
    upper bound ``||d l_i / d z_i||`` computed from the training outputs (no extra forward),
    and optionally re-scored for the whole dataset every ``rescore_every`` epochs
    (``score_dataset``, N forwards) to bound staleness. Never-seen examples count with the
    running mean score.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs, optimizer: unused.
        score: ``"loss"`` (default) or ``"upper_bound"``.
        mixing: uniform mixing lambda, or ``"auto"`` (default): lambda tuned from the
            measured staleness of the table (:class:`isample.staleness.AdaptiveMixing`),
            between 1 (uniform) and 0.1 (weights <= 10).
        rescore_every: re-score everything at epochs 0, k, 2k, ... (None = never; default).
        power, additive, relative, bias_exponent, max_weight, initial_score: see
            :class:`isample.TableSampler`.
        scoring_batch_size, num_batches, drop_last: loader options.
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).

    References:
        Loshchilov and Hutter 2015 (arXiv:1511.06343) and Katharopoulos and Fleuret 2018
        (arXiv:1803.00942) for loss / gradient-norm histories.
    """

    name = "history-is"
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
        score: str = "loss",
        mixing: float | str = "auto",
        rescore_every: int | None = None,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        bias_exponent: float = 1.0,
        max_weight: float | None = None,
        initial_score: float | None = None,
        scoring_batch_size: int = 1024,
        num_batches: int | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        self.score = check_choice(score, "score", type(self).__name__, SCORES)
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
            mixing=mixing,
            power=power,
            additive=additive,
            relative=relative,
            bias_exponent=bias_exponent,
            max_weight=max_weight,
            initial_score=initial_score,
        )
        self.unbiased = bias_exponent == 1.0 and max_weight is None

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: torch.Tensor) -> None:
        """Update the table with the step's losses or its output-gradient upper bound."""
        if self.score == "loss":
            self.update(batch.indices, losses)
        elif outputs is None:
            raise ValueError(
                "HistoryIS(score='upper_bound') scores from the step's model outputs: pass them, "
                "loader.update(losses, outputs=out.detach())."
            )
        else:
            self.update(batch.indices, training_upper_bound(self.loss_fn, outputs, batch.targets))

    def _rescore_scorer(self) -> Callable:
        return LossScorer(self.loss_fn) if self.score == "loss" else UpperBoundScorer(self.loss_fn)
