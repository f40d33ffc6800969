"""Batched reads: fetch a whole batch of rows with one indexing operation when possible.

``torch.utils.data`` calls ``dataset.__getitems__(indices)`` for a batch when the dataset
defines it, and hands the result to the collate function. For a ``TensorDataset`` with
the default collate, indexing every tensor once with the batch's indices gives exactly
what ``default_collate`` would build from the rows one by one, without the per-row
Python overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "Gathered",
    "IndexedCollate",
    "IndexedDataset",
    "can_gather",
    "can_read_directly",
    "gather_rows",
    "read_directly",
]


class Gathered:
    """Rows read in one go: ``keys`` (what the sampler asked for) and the collated ``data``."""

    __slots__ = ("keys", "data")

    def __init__(self, keys: Sequence[Any], data: Any) -> None:
        self.keys = keys
        self.data = data


def can_gather(dataset: Dataset, collate_fn: Callable | None) -> bool:
    """True when a batch of ``dataset`` can be read by indexing (TensorDataset, default collate)."""
    return collate_fn is None and type(dataset) is TensorDataset


def can_read_directly(dataset: Dataset, collate_fn: Callable | None, options: dict[str, Any]) -> bool:
    """True when batches can be gathered in the loop's process without a torch DataLoader.

    With no worker processes and no pinned memory a DataLoader over a gatherable dataset
    (:func:`can_gather`) does exactly ``gather_rows(dataset, indices)`` per batch, plus its
    own per-batch bookkeeping (about 10-20 us of Python); reading directly skips the latter
    and returns the same tensors.
    """
    return (
        can_gather(dataset, collate_fn) and not options.get("num_workers") and not options.get("pin_memory")
    )


def read_directly(
    dataset: TensorDataset, chunks: Iterator[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(indices, gather_rows(dataset, indices))`` for each LongTensor of ``chunks``: what a
    ``DataLoader(IndexedDataset(dataset, gather=True), batch_sampler=chunks,
    collate_fn=IndexedCollate(None))`` yields with ``num_workers=0`` (see :func:`can_read_directly`)."""
    tensors = dataset.tensors
    if all(t.device.type == "cpu" for t in tensors):
        for rows in chunks:
            yield rows, tuple([t.index_select(0, rows) for t in tensors])
        return
    for rows in chunks:
        yield rows, gather_rows(dataset, rows)


def gather_rows(dataset: TensorDataset, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``default_collate([dataset[i] for i in indices])``, computed with one ``index_select`` per tensor.

    ``index_select`` along dimension 0 is 1.6-2.6x faster than advanced indexing
    ``t[rows]`` for 64-256 rows; the result is the same.

    Args:
        dataset: a ``TensorDataset``.
        indices: LongTensor of shape (b,) (used as is) or a sequence of ints.

    Returns:
        One tensor of shape (b, ...) per tensor of the dataset.
    """
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.long and indices.device.type == "cpu":
        rows = indices
    else:
        rows = torch.as_tensor(indices, dtype=torch.long)
    return tuple(t.index_select(0, rows.to(t.device)) for t in dataset.tensors)


class IndexedDataset(Dataset):
    """Wraps a dataset so items come back with their index: ``(index, item)``.

    With ``gather=True`` (see :func:`can_gather`) a whole batch is read by indexing each
    tensor once.
    """

    def __init__(self, dataset: Dataset, gather: bool = False) -> None:
        self.dataset = dataset
        self.gather = gather

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def __getitems__(self, indices: list[int] | torch.Tensor) -> Any:
        if self.gather:
            return Gathered(indices, gather_rows(self.dataset, indices))  # type: ignore[arg-type]
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return [self[i] for i in indices]


class IndexedCollate:
    """Collate ``[(index, item), ...]`` into ``(LongTensor indices, collated items)`` (picklable)."""

    def __init__(self, base: Callable | None) -> None:
        self.base = base or torch.utils.data.default_collate

    def __call__(self, items: Any) -> tuple[torch.Tensor, Any]:
        if isinstance(items, Gathered):
            return torch.as_tensor(items.keys, dtype=torch.long), items.data
        return torch.tensor([i for i, _ in items], dtype=torch.long), self.base([item for _, item in items])
