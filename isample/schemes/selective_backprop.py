"""Selective Backprop (Jiang et al. 2019): keep candidates with probability CDF(loss)^beta, queue them."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._random import step_generator
from .._validation import check_float, check_int
from ..batch import WeightedBatch, index_rows, move_to, split_batch
from ..rank_policies import cdf_power_probabilities
from ..scorers import LossScorer, model_device
from ._stream import RowReader, cat_rows
from .base import SchemeLoader, feedback_arrays

__all__ = ["SelectiveBackprop"]

_STREAM = 21
_NEVER = -(2**62)


class SelectiveBackprop(SchemeLoader):
    """Selective Backprop: forward candidates, backpropagate only the ones with high loss percentile.

    Candidates stream in chunks (consecutive random permutations of the dataset seeded by
    ``(seed, epoch)``), are scored by :class:`isample.LossScorer` in no-grad passes, and
    each is kept independently with probability

    .. math::

        P_i = \\max\\big(s_{\\min},\\ \\mathrm{CDF}_R(\\ell_i)^{\\beta}\\big)

    where ``CDF_R`` is the empirical CDF of the last ``R`` candidate losses (the chunk's
    losses are pushed first; :func:`isample.rank_policies.cdf_power_probabilities`). Kept
    examples queue until ``b`` are ready; the queue yields batches of exactly ``b`` with
    weights 1 (biased towards high losses by design). An epoch is ``num_batches`` training
    batches (default ``ceil(N / b)``, the same number of optimizer steps as uniform), so
    the candidate stream covers the data about ``1 / E[P]`` times per epoch; leftover
    queued examples are dropped at the epoch's end.

    The first ``uniform_epochs`` epochs keep every candidate without scoring (the
    training losses fed back by the loop fill the history). With ``staleness = k`` a
    per-example loss table (fed by re-scoring and by the training losses) is reused for
    ``k`` epochs instead of forwarding the candidate again (Stale-SB).

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs, optimizer: unused.
        beta: selectivity exponent in (0, 100] (3). With i.i.d. losses a candidate is kept
            with probability about ``1 / (beta + 1)`` (``s_min = 0``), so a batch reads about
            ``(beta + 1) b`` candidates; a batch that needs more than ``history_size + chunk_size
            + 100 (beta + 1) b`` raises a RuntimeError instead of looping on.
        s_min: probability floor in [0, 1] (0).
        history_size: R, losses in the CDF history (1024).
        uniform_epochs: leading epochs trained uniformly (1).
        chunk_size: candidates per scoring pass (default b).
        staleness: reuse a candidate's loss for this many epochs (None: always forward).
        num_batches: batches per epoch (default ceil(N / b)).
        **loader_options: torch DataLoader options for reading candidates (see :class:`isample.DataLoader`).

    Attributes:
        last_selection: dict with the last scored chunk's ``indices``, ``losses``,
            ``probabilities`` and ``kept`` mask (for inspection).

    References:
        Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers",
        arXiv:1910.00762 (2019).
    """

    name = "selective-backprop"
    kind = "pool"
    unbiased = False
    #: largest selectivity exponent: a kept fraction of about 1 / (beta + 1) = 1 %
    MAX_BETA = 100.0

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
        beta: float = 3.0,
        s_min: float = 0.0,
        history_size: int = 1024,
        uniform_epochs: int = 1,
        chunk_size: int | None = None,
        staleness: int | None = None,
        num_batches: int | None = None,
        **loader_options: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        owner = type(self).__name__
        self.beta = check_float(beta, "beta", owner, minimum=0.0, maximum=self.MAX_BETA, min_inclusive=False)
        self.s_min = check_float(s_min, "s_min", owner, minimum=0.0, maximum=1.0)
        self.history_size = check_int(history_size, "history_size", owner, minimum=1)
        self.uniform_epochs = check_int(uniform_epochs, "uniform_epochs", owner, minimum=0)
        self.chunk_size = (
            check_int(chunk_size, "chunk_size", owner, minimum=1, allow_none=True) or self.batch_size
        )
        self.staleness = check_int(staleness, "staleness", owner, minimum=1, allow_none=True)
        self.num_batches = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True) or max(
            math.ceil(self.num_samples / self.batch_size), 1
        )
        self.scorer = LossScorer(loss_fn)
        self.reader = RowReader(
            dataset,
            self.chunk_size,
            **self.loader_options,
        )
        self.epoch = 0
        self.position = 0
        self._consumed = 0  # candidates read in this epoch
        self._chunks = 0  # chunks read in this epoch
        self._batch_epoch = 0  # epoch of the last yielded batch (for feedback)
        self._history: collections.deque[float] = collections.deque(maxlen=self.history_size)
        self._queue_idx = torch.empty(0, dtype=torch.long)
        self._queue_data: Any = None
        self._table = np.full(self.num_samples, np.nan) if self.staleness else None
        self._table_epoch = np.full(self.num_samples, _NEVER, dtype=np.int64) if self.staleness else None
        self.last_selection: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position and queue, another starts afresh.

        The selection queue is shared, so one iterator at a time: a live iterator detached
        by setting another epoch raises ``RuntimeError`` at its next batch.
        """
        epoch = check_int(epoch, "epoch", "SelectiveBackprop.set_epoch", minimum=0)
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_epoch()
            self._detach_iterators()

    def _reset_epoch(self) -> None:
        self.position = 0
        self._consumed = 0
        self._chunks = 0
        self._queue_idx = torch.empty(0, dtype=torch.long)
        self._queue_data = None

    def history(self) -> torch.Tensor:
        """The CDF history (last R losses, oldest first): float64 Tensor of shape (<= R,)."""
        return torch.tensor(list(self._history), dtype=torch.float64)

    def _batches(self) -> Iterator[WeightedBatch]:
        token, owner = self._claim_cursor()
        if not owner:
            raise RuntimeError(
                "SelectiveBackprop supports one live iterator at a time (its selection queue is shared); "
                "finish or close the other iterator first."
            )
        try:
            yield from self._owned_batches(token)
        finally:
            self._release_cursor(token)

    def _owned_batches(self, token: object) -> Iterator[WeightedBatch]:
        epoch = self.epoch
        b = self.batch_size
        device = model_device(self.model)
        if self._queue_idx.numel() and self._queue_data is None:  # resumed from a state
            self._queue_data = move_to(self.reader.fetch(self._queue_idx), device)
        chunks = None
        # candidates a batch may read before the loop gives up (about 100x the expected number)
        limit = self.history_size + self.chunk_size + 100 * math.ceil((self.beta + 1.0) * b)
        read = 0  # candidates read since the last yielded batch
        while True:
            while self._queue_idx.numel() >= b:
                indices, data = self._pop(b)
                self.position += 1
                self._batch_epoch = epoch
                if self.position >= self.num_batches:
                    self.epoch = epoch + 1
                    self._reset_epoch()
                read = 0
                yield WeightedBatch.from_collated(data, indices, torch.ones(b, dtype=torch.float32))
                if not self._owns_cursor(token):
                    raise RuntimeError(
                        "This SelectiveBackprop iterator was detached by set_epoch() to another epoch; "
                        "start a new iteration (for batch in loader) for the new epoch."
                    )
                if self.epoch != epoch:
                    return
            if chunks is None:
                chunks = self.reader.from_stream(self.seed, epoch, _STREAM, start=self._consumed)
            if read >= limit:
                raise RuntimeError(
                    f"SelectiveBackprop read {read} candidates without filling a batch of {b} "
                    f"(beta={self.beta:g}, s_min={self.s_min:g}, {self._queue_idx.numel()} kept); the "
                    "keep probabilities are too small: lower 'beta' or set 's_min' > 0."
                )
            indices, data = next(chunks)
            read += len(indices)
            chunk_no = self._chunks
            self._consumed += len(indices)
            self._chunks += 1
            data = move_to(data, device, non_blocking=True)
            kept = torch.nonzero(self._select(indices, data, epoch, chunk_no)).flatten()
            if kept.numel():
                self._push(indices[kept], index_rows(data, kept))

    def _pop(self, b: int) -> tuple[torch.Tensor, Any]:
        n = self._queue_idx.numel()
        indices = self._queue_idx[:b]
        data = index_rows(self._queue_data, torch.arange(b))
        if n > b:
            self._queue_data = index_rows(self._queue_data, torch.arange(b, n))
            self._queue_idx = self._queue_idx[b:]
        else:
            self._queue_data, self._queue_idx = None, torch.empty(0, dtype=torch.long)
        return indices, data

    def _push(self, indices: torch.Tensor, data: Any) -> None:
        if self._queue_data is None:
            self._queue_idx, self._queue_data = indices, data
        else:
            self._queue_idx = torch.cat([self._queue_idx, indices])
            self._queue_data = cat_rows([self._queue_data, data])

    # ------------------------------------------------------------------ the rule
    def _select(self, indices: torch.Tensor, data: Any, epoch: int, chunk_no: int) -> torch.Tensor:
        c = indices.numel()
        if epoch < self.uniform_epochs:
            return torch.ones(c, dtype=torch.bool)
        losses = self._candidate_losses(indices, data, epoch)
        finite = torch.isfinite(losses)
        self._history.extend(losses[finite].tolist())
        prob = torch.ones(c, dtype=torch.float64)
        if bool(finite.any()) and self._history:
            prob[finite] = cdf_power_probabilities(losses[finite], self.history(), self.beta, self.s_min)
        u = torch.rand(
            c, generator=step_generator(self.seed, epoch, chunk_no, _STREAM + 1), dtype=torch.float64
        )
        kept = u < prob
        self.last_selection = {"indices": indices, "losses": losses, "probabilities": prob, "kept": kept}
        return kept

    def _candidate_losses(self, indices: torch.Tensor, data: Any, epoch: int) -> torch.Tensor:
        inputs, targets = split_batch(data)
        if self._table is None:
            self._scored += indices.numel()
            return self.scorer(self.model, inputs, targets).to("cpu", torch.float64)
        idx = indices.numpy()
        fresh = (epoch - self._table_epoch[idx] < self.staleness) & np.isfinite(self._table[idx])
        values = self._table[idx].copy()
        need = np.nonzero(~fresh)[0]
        if need.size:
            rows = torch.from_numpy(need)
            scores = (
                self.scorer(
                    self.model,
                    index_rows(inputs, rows),
                    index_rows(targets, rows) if targets is not None else None,
                )
                .to("cpu", torch.float64)
                .numpy()
            )
            values[need] = scores
            self._table[idx[need]] = scores
            self._table_epoch[idx[need]] = epoch
            self._scored += int(need.size)
        return torch.from_numpy(values)

    def update(self, indices: Any, scores: Any) -> None:
        """Training losses: fill the CDF history during the uniform epochs, and the stale table."""
        idx, val = feedback_arrays(indices, scores, self.num_samples, type(self).__name__)
        if self._batch_epoch < self.uniform_epochs:
            self._history.extend(val.tolist())
        if self._table is not None:
            self._table[idx] = val
            self._table_epoch[idx] = self._batch_epoch

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self._consumed,
            "chunks": self._chunks,
            "batch_epoch": self._batch_epoch,
            "history": self.history(),
            "queue": self._queue_idx.clone(),
            "table": None if self._table is None else torch.from_numpy(self._table.copy()),
            "table_epoch": None if self._table_epoch is None else torch.from_numpy(self._table_epoch.copy()),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._consumed = int(state["consumed"])
        self._chunks = int(state["chunks"])
        self._batch_epoch = int(state["batch_epoch"])
        self._history = collections.deque(
            torch.as_tensor(state["history"]).tolist(), maxlen=self.history_size
        )
        self._queue_idx = torch.as_tensor(state["queue"], dtype=torch.long).clone()
        self._queue_data = None  # re-read from the dataset on the next iteration
        if self._table is not None:
            if state["table"] is None:
                raise ValueError("SelectiveBackprop state has no loss table but this loader uses staleness.")
            self._table = np.asarray(state["table"], dtype=np.float64).copy()
            self._table_epoch = np.asarray(state["table_epoch"], dtype=np.int64).copy()
