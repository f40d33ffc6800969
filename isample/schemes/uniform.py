"""The uniform baseline: one random permutation per epoch, weights 1, the same batch type and protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._fetch import can_read_directly, read_directly
from .._random import UNIFORM_STREAM
from .._validation import check_int
from ..batch import WeightedBatch
from ._stream import RowReader, epoch_permutation
from .base import SchemeLoader

__all__ = ["Uniform"]

_STREAM = UNIFORM_STREAM


class Uniform(SchemeLoader):
    """Uniform sampling without replacement: a permutation per epoch seeded by ``(seed, epoch)``.

    .. math::

        p_i = \\frac{1}{N}, \\qquad w_i = 1

    Batches are consecutive chunks of the epoch's permutation (``ceil(N / b)`` of them, the
    last one smaller unless ``drop_last``). No scoring, no feedback (``update`` validates
    and ignores its arguments). The baseline every scheme is compared against.

    The epoch cursor belongs to the iterator, as in torch: the loader's ``(epoch,
    position)`` is only the resume point (what :meth:`state_dict` saves). The first live
    iterator continues from it and advances it; an iterator made while another one is
    live yields the whole current epoch and leaves the resume point alone; and
    :meth:`set_epoch` with another epoch detaches a live iterator (it finishes its own
    epoch), so neither truncates the next epoch.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme; ``model`` and ``loss_fn``
            may be None (the model only fixes the device batches are moved to; a
            ``loss_fn`` is checked for ``reduction="none"``).
        seed: randomness source.
        epochs, optimizer: unused.
        drop_last: drop the last incomplete batch.
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).
    """

    name = "uniform"
    kind = "uniform"
    unbiased = True
    requires_model = False

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module | None,
        loss_fn: Callable | None,
        batch_size: int,
        *,
        seed: int | None = 0,
        epochs: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        self.drop_last = bool(drop_last)
        n, b = self.num_samples, self.batch_size
        self.num_batches = max(n // b if self.drop_last else math.ceil(n / b), 1)
        self.reader = RowReader(
            dataset,
            b,
            **self.loader_options,
        )
        #: no workers, no pinning, a TensorDataset: gather each batch here, without the DataLoader's
        #: per-batch bookkeeping (the same tensors; the pool schemes' off steps read the same way)
        self._direct = can_read_directly(dataset, self.loader_options.get("collate_fn"), self.loader_options)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position, another starts at its first batch."""
        epoch = check_int(epoch, "epoch", "Uniform.set_epoch", minimum=0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._detach_iterators()

    def _batches(self) -> Iterator[WeightedBatch]:
        token, owner = self._claim_cursor()
        epoch, position = self.epoch, (self.position if owner else 0)
        b = self.batch_size
        order = epoch_permutation(self.num_samples, self.seed, epoch, 0, _STREAM)[: self.num_batches * b]
        try:
            chunks = (
                read_directly(self.dataset, (order[i : i + b] for i in range(position * b, len(order), b)))  # type: ignore[arg-type]
                if self._direct
                else self.reader.from_indices(order, start=position * b)
            )
            for indices, data in chunks:
                position += 1
                if self._owns_cursor(token):
                    done = position >= self.num_batches
                    self.epoch, self.position = (epoch + 1, 0) if done else (epoch, position)
                weights = torch.ones(len(indices), dtype=torch.float32)
                yield WeightedBatch.from_collated(data, indices, weights)
        finally:
            self._release_cursor(token)

    def update(self, indices: Any, scores: Any) -> None:
        """Validated (same length) and ignored."""
        if len(indices) != len(scores):
            raise ValueError(
                f"Uniform.update got {len(indices)} indices and {len(scores)} scores; lengths must match."
            )

    def _state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
