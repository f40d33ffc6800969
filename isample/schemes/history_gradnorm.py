"""History importance sampling fed by per-example gradient norms recorded in the training backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..batch import WeightedBatch
from ._wrappers import TableScheme

__all__ = ["HistoryGradNorm"]


class HistoryGradNorm(TableScheme):
    """A score table of per-example gradient norms recorded by the training step's own backward.

    :meth:`step_context` wraps the loop's forward + backward in
    ``isample.recorder.GradNormRecorder.record(batch.weights)``; :meth:`feedback` writes the
    recorded unweighted norms ``||D g_i||`` (``D = I`` without an optimizer) into the table.
    Draws and weights as in :class:`HistoryIS`:

    .. math::

        s_i = \\|D g_i\\|_2, \\qquad p_i = \\frac{\\lambda}{N} + (1 - \\lambda)\\frac{s_i}{\\sum_j s_j},
        \\qquad w_i = \\frac{1}{N p_i}

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs: unused.
        optimizer: None / SGD (plain norm) or Adam / AdamW / RMSprop / Adagrad (preconditioned).
        layers: the ``nn.Linear`` layers covered (default all).
        mixing: uniform mixing lambda, or "auto" (default): tuned from the staleness of the scores.
        rescore_every: re-score everything every k epochs with ``LinearGradNormScorer``
            (forward + backward of N examples; None = never, default).
        power, additive, relative, bias_exponent, max_weight, initial_score and loader
            options: see :class:`HistoryIS`.

    Raises:
        RuntimeError: in :meth:`feedback`, when the step did not run inside
            :meth:`step_context`.

    References:
        Goodfellow, arXiv:1510.01799 (per-example norms); Katharopoulos and Fleuret 2018.
    """

    name = "history-gradnorm"
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
        from ..recorder import GradNormRecorder  # written in parallel: imported lazily

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
        self.layers = layers
        self.optimizer = optimizer
        self.recorder = GradNormRecorder(model, layers=layers, optimizer=optimizer)
        self.unbiased = bias_exponent == 1.0 and max_weight is None
        self._recorded = False

    def step_context(self, batch: WeightedBatch) -> contextlib.AbstractContextManager:
        """Record the step's per-example gradient norms (wrap forward + backward in it)."""
        return _StepRecord(self, batch.weights)

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: torch.Tensor) -> None:
        """Write the norms recorded inside :meth:`step_context` into the table."""
        if not self._recorded:
            raise RuntimeError(
                "HistoryGradNorm.feedback found no recorded norms for this batch: run the step's forward "
                "and backward before update() (isample.DataLoader records them between yielding the "
                "batch and update), or inside `with loader.step_context(batch):` with the scheme's loader."
            )
        self._recorded = False
        self.update(batch.indices, self.recorder.norms())

    def _rescore_scorer(self) -> Callable:
        from ..linear_scorer import LinearGradNormScorer

        return LinearGradNormScorer(self.loss_fn, layers=self.layers, optimizer=self.optimizer)


class _StepRecord(contextlib.AbstractContextManager):
    """``HistoryGradNorm.step_context``: the recorder's block, marking the batch recorded on success.

    A small class (not ``contextlib.contextmanager``): it is entered and left every step.
    """

    __slots__ = ("scheme", "recording")

    def __init__(self, scheme: HistoryGradNorm, weights: torch.Tensor | None) -> None:
        self.scheme = scheme
        self.recording = scheme.recorder.record(weights)

    def __enter__(self) -> None:
        self.scheme._recorded = False
        self.recording.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.recording.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.scheme._recorded = True
