"""Batched reads: fetch a whole batch of rows with one indexing operation when possible.

``torch.utils.data`` calls ``dataset.__getitems__(indices)`` for a batch when the dataset
defines it, and hands the result to the collate function. For a ``TensorDataset`` with
the default collate, indexing every tensor once with the batch's indices gives exactly
what ``default_collate`` would build from the rows one by one, without the per-row
Python overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["Gathered", "can_gather", "gather_rows"]


class Gathered:
    """Rows read in one go: ``keys`` (what the sampler asked for) and the collated ``data``."""

    __slots__ = ("keys", "data")

    def __init__(self, keys: Sequence[Any], data: Any) -> None:
        self.keys = keys
        self.data = data


def can_gather(dataset: Dataset, collate_fn: Callable | None) -> bool:
    """True when a batch of ``dataset`` can be read by indexing (TensorDataset, default collate)."""
    return collate_fn is None and type(dataset) is TensorDataset


def gather_rows(dataset: TensorDataset, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``default_collate([dataset[i] for i in indices])``, computed by indexing each tensor once."""
    rows = torch.as_tensor(indices, dtype=torch.long)
    return tuple(t[rows] for t in dataset.tensors)
