"""The uniform baseline: one random permutation per epoch, weights 1, the same batch type and protocol."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_int
from ..batch import WeightedBatch, split_batch
from ._stream import RowReader, epoch_permutation
from .base import SchemeLoader

__all__ = ["Uniform"]

_STREAM = 11


class Uniform(SchemeLoader):
    """Uniform sampling without replacement: a permutation per epoch seeded by ``(seed, epoch)``.

    .. math::

        p_i = \\frac{1}{N}, \\qquad w_i = 1

    Batches are consecutive chunks of the epoch's permutation (``ceil(N / b)`` of them, the
    last one smaller unless ``drop_last``). No scoring, no feedback (``update`` validates
    and ignores its arguments). The baseline every scheme is compared against.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme (the model only fixes the
            device batches are moved to; ``loss_fn`` is checked for ``reduction="none"``).
        seed: randomness source.
        epochs, optimizer: unused.
        drop_last: drop the last incomplete batch.
        num_workers, pin_memory, collate_fn: passed to the DataLoader.
    """

    name = "uniform"
    kind = "uniform"
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
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed)
        self.drop_last = bool(drop_last)
        n, b = self.num_samples, self.batch_size
        self.num_batches = max(n // b if self.drop_last else math.ceil(n / b), 1)
        self.reader = RowReader(
            dataset,
            b,
            num_workers=check_int(num_workers, "num_workers", "Uniform", minimum=0),
            pin_memory=bool(pin_memory),
            collate_fn=collate_fn,
        )
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, "epoch", "Uniform.set_epoch", minimum=0)
        self.position = 0

    def _batches(self) -> Iterator[WeightedBatch]:
        epoch = self.epoch
        b = self.batch_size
        order = epoch_permutation(self.num_samples, self.seed, epoch, 0, _STREAM)[: self.num_batches * b]
        for indices, data in self.reader.from_indices(order, start=self.position * b):
            inputs, targets = split_batch(data)
            self.position += 1
            if self.position >= self.num_batches:
                self.epoch, self.position = epoch + 1, 0
            yield WeightedBatch(inputs, targets, indices, torch.ones(len(indices), dtype=torch.float32))
            if self.epoch != epoch:
                return

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
