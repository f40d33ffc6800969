"""``ImportanceDataLoader``: a DataLoader driven by a :class:`TableSampler`, and the public parts it uses.

The sampler yields one :class:`WeightedIndices` per batch (int64 indices and float32
weights); :class:`WeightedDataset` reads the batch's rows inside the worker and
:func:`weighted_collate` turns them into a :class:`WeightedBatch`, so each row travels
with its own weight and index through prefetching, workers and pinned memory. The
same two pieces make the sampler the ``batch_sampler`` of a plain
``torch.utils.data.DataLoader`` or of ``torchdata``'s ``StatefulDataLoader``::

    loader = DataLoader(isample.WeightedDataset(ds), batch_sampler=sampler,
                        collate_fn=isample.weighted_collate)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._fetch import can_gather, gather_rows
from ._options import check_dataset, check_loader_options
from ._validation import check_int, param_error
from .batch import WeightedBatch
from .table_sampler import TableSampler, WeightedIndices

__all__ = ["ImportanceDataLoader", "WeightedCollate", "WeightedDataset", "weighted_collate"]


class _Rows:
    """The rows of one batch as read by :class:`WeightedDataset` (picklable, crosses worker queues)."""

    __slots__ = ("indices", "weights", "items", "collated")

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor, items: Any, collated: bool) -> None:
        self.indices = indices
        self.weights = weights
        self.items = items  # collated tensors (gathered) or a list of dataset items
        self.collated = collated

    def __getstate__(self) -> tuple[Any, ...]:
        return self.indices, self.weights, self.items, self.collated

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.indices, self.weights, self.items, self.collated = state


class WeightedDataset(Dataset):
    """Wrap a map-style dataset so that a weighted batch sampler's batches can be read from it.

    ``dataset.__getitems__(batch)`` takes one :class:`WeightedIndices` (what
    :class:`TableSampler` yields; a list of ``(index, weight)`` pairs works too) and
    reads its rows: for a ``TensorDataset`` with one ``index_select`` per tensor
    (``gather=True``, the default for ``TensorDataset``), otherwise with
    ``dataset[i]`` per row. Pair it with :func:`weighted_collate`.

    Args:
        dataset: the map-style dataset.
        gather: read a ``TensorDataset`` by indexing its tensors (default: True exactly
            for a ``TensorDataset``).

    Example:
        >>> loader = torch.utils.data.DataLoader(
        ...     WeightedDataset(ds), batch_sampler=sampler, collate_fn=weighted_collate)
    """

    def __init__(self, dataset: Dataset, gather: bool | None = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise param_error("dataset", "WeightedDataset", "a map-style Dataset", dataset, TypeError)
        self.dataset = dataset
        self.gather = isinstance(dataset, TensorDataset) if gather is None else bool(gather)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, float]) -> tuple[int, float, Any]:
        """One ``(index, weight)`` pair -> ``(index, weight, dataset[index])``."""
        index, weight = key
        return index, weight, self.dataset[index]

    def __getitems__(self, batch: WeightedIndices | Sequence[tuple[int, float]]) -> _Rows:
        """All rows of one batch."""
        if isinstance(batch, WeightedIndices):
            indices, weights = batch.indices, batch.weights
        else:
            pairs = list(batch)
            indices = torch.tensor([int(i) for i, _ in pairs], dtype=torch.long)
            weights = torch.tensor([float(w) for _, w in pairs], dtype=torch.float32)
        if self.gather:
            return _Rows(indices, weights, gather_rows(self.dataset, indices), True)  # type: ignore[arg-type]
        return _Rows(indices, weights, [self.dataset[i] for i in indices.tolist()], False)


class WeightedCollate:
    """Collate what :class:`WeightedDataset` read into a :class:`WeightedBatch` (picklable).

    Args:
        collate_fn: how to collate the dataset items (default ``default_collate``).
    """

    def __init__(self, collate_fn: Callable | None = None) -> None:
        if collate_fn is not None and not callable(collate_fn):
            raise param_error("collate_fn", "WeightedCollate", "a callable or None", collate_fn, TypeError)
        self.collate_fn = collate_fn

    def __call__(self, rows: Any) -> WeightedBatch:
        if isinstance(rows, _Rows):
            indices, weights = rows.indices, rows.weights
            if rows.collated and self.collate_fn is None:
                data = rows.items
            elif rows.collated:  # gathered tensors but a custom collate: give it the rows one by one
                data = self.collate_fn([tuple(t[k] for t in rows.items) for k in range(len(indices))])
            else:
                data = (self.collate_fn or torch.utils.data.default_collate)(rows.items)
        else:  # a list of (index, weight, item) triples from WeightedDataset.__getitem__
            triples = list(rows)
            indices = torch.tensor([i for i, _, _ in triples], dtype=torch.long)
            weights = torch.tensor([w for _, w, _ in triples], dtype=torch.float32)
            data = (self.collate_fn or torch.utils.data.default_collate)([item for _, _, item in triples])
        return WeightedBatch.from_collated(data, indices, weights)


def weighted_collate(rows: Any) -> WeightedBatch:
    """Collate one batch read by :class:`WeightedDataset` into a :class:`WeightedBatch`.

    Uses ``default_collate`` for the items; for another collate function use
    ``WeightedCollate(collate_fn)``.

    Returns:
        :class:`WeightedBatch` with ``indices`` (LongTensor (b,)) and ``weights``
        (float32 Tensor (b,)) from the sampler.
    """
    return _DEFAULT_COLLATE(rows)


_DEFAULT_COLLATE = WeightedCollate(None)

# The former private names, kept for code that imported them.
_WeightedItems = WeightedDataset
_WeightedCollate = WeightedCollate


class ImportanceDataLoader:
    """Iterate a dataset in importance-weighted batches drawn by a :class:`TableSampler`.

    Args:
        dataset: a map-style dataset of ``(input, target)`` pairs or dicts.
        sampler: the :class:`TableSampler` (its ``num_samples`` must equal ``len(dataset)``).
        num_workers, pin_memory, collate_fn, persistent_workers, prefetch_factor,
            worker_init_fn, multiprocessing_context, timeout: as in ``DataLoader``.

    The loader sets ``sampler.delay`` to its prefetch depth (``num_workers x
    prefetch_factor``; 0 without workers), so a score update reaches the draws a fixed
    number of steps later whatever the worker count: batches are identical for
    ``num_workers`` 0 and 2 when the loader is built with the same ``delay``
    (pass ``delay=`` to override). ``draw_ahead=True`` draws the next batch in a
    background thread while the training step runs (one more step of delay; see
    :class:`TableSampler`). The delay is saved in :meth:`state_dict` and restored
    on load.

    Every ``iter(loader)`` is an independent pass over one epoch with its own cursor
    (as in torch); the loader and its sampler hold only what :meth:`state_dict` saves.
    A change of ``len(dataset)`` is detected when an epoch starts: new examples join as
    unvisited (they take the unvisited prior), a shrink drops the scores of the removed
    tail, and the epoch length follows (see :meth:`TableSampler.resize`). Persistent
    workers keep the dataset copy they started with, so there a change of length is a
    ``ValueError``.

    Under DDP (``torch.distributed`` initialised, one loader per rank) the sampler draws
    one global batch per step and this loader yields the rank's shard; :meth:`update`
    is then a collective (see :class:`TableSampler`). :meth:`state_dict` is exact at
    the last batch handed out, prefetched batches included (they are redrawn on load).

    Example:
        >>> sampler = TableSampler(len(ds), batch_size=64, seed=0)
        >>> loader = ImportanceDataLoader(ds, sampler)
        >>> for batch in loader:
        ...     losses = loss_fn(model(batch.inputs), batch.targets)
        ...     (batch.weights * losses).mean().backward()
        ...     loader.update(batch.indices, losses.detach())
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: TableSampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable | None = None,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        delay: int | None = None,
        draw_ahead: bool = False,
    ) -> None:
        owner = "ImportanceDataLoader"
        if not isinstance(sampler, TableSampler):
            raise param_error("sampler", owner, "a TableSampler", sampler, TypeError)
        check_dataset(dataset, owner)
        options = check_loader_options(
            dict(
                num_workers=num_workers,
                pin_memory=pin_memory,
                collate_fn=collate_fn,
                persistent_workers=persistent_workers,
                prefetch_factor=prefetch_factor,
                worker_init_fn=worker_init_fn,
                multiprocessing_context=multiprocessing_context,
                timeout=timeout,
            ),
            owner,
        )
        if len(dataset) != sampler.num_samples:  # type: ignore[arg-type]
            raise ValueError(
                f"The 'sampler' of ImportanceDataLoader has num_samples={sampler.num_samples}, "
                f"but the dataset has {len(dataset)} examples."  # type: ignore[arg-type]
            )
        num_workers, prefetch_factor = options["num_workers"], options["prefetch_factor"]
        self._depth = (
            num_workers * (prefetch_factor if prefetch_factor is not None else 2) if num_workers else 0
        )
        given = check_int(delay, "delay", owner, minimum=0, allow_none=True)
        if not isinstance(draw_ahead, bool):
            raise param_error("draw_ahead", owner, "a bool", draw_ahead, TypeError)
        if draw_ahead:
            self._depth += 1  # one more batch in flight: the one drawn ahead
        if draw_ahead and given is not None and given < self._depth:
            raise param_error("delay", owner, f"an int >= {self._depth} with draw_ahead=True", given)
        sampler.delay = self._depth if given is None else given
        sampler.draw_ahead = draw_ahead
        sampler.advance(0)  # the loop's consumption, not the draws, moves the sampler's position
        self.dataset = dataset
        self.sampler = sampler
        self._workers_started = False
        self._live = 0  # live iterators that own the resume point (0 or 1)
        self._loader = DataLoader(
            WeightedDataset(dataset, gather=can_gather(dataset, collate_fn)),
            batch_sampler=sampler,
            **{**options, "collate_fn": WeightedCollate(collate_fn)},
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[WeightedBatch]:
        self._check_size()
        # As for isample.DataLoader: with no other live iterator this one continues from the
        # resume point (where the last one stopped, or a loaded state) and moves it; one made
        # while another is live yields a whole epoch of its own and leaves the resume point alone.
        owner = self._live == 0
        self.sampler._resume = self.sampler._resume or owner
        self.sampler._next_owner = owner
        loader_iter = iter(self._loader)  # creates the sampler's iterator (and prefetches) right here
        self._workers_started = True
        cursor = self.sampler._latest
        return self._iterate(loader_iter, cursor, owner)

    def _iterate(
        self, loader_iter: Iterator[WeightedBatch], cursor: Any, owner: bool
    ) -> Iterator[WeightedBatch]:
        self._live += int(owner)
        try:
            for batch in loader_iter:
                if cursor is not None:
                    cursor.advance(1)  # this iterator's batch: another live iterator keeps its own cursor
                yield batch
        finally:
            self._live -= int(owner)

    def _check_size(self) -> None:
        """Adapt the sampler when ``len(dataset)`` changed (see :meth:`TableSampler.resize`)."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if size == self.sampler.num_samples:
            return
        if size == 0:
            raise ValueError("The dataset of ImportanceDataLoader became empty (len 0).")
        if self._loader.persistent_workers and self._workers_started:
            raise ValueError(
                f"The dataset of ImportanceDataLoader changed length ({self.sampler.num_samples} -> {size}), "
                "but its persistent workers hold a copy made when they started. Build a new "
                "ImportanceDataLoader (sampler.resize() keeps the scores), or use persistent_workers=False."
            )
        self.sampler.resize(size)

    def update(self, indices: Any, scores: Any) -> None:
        """Feed back per-example scores (e.g. ``losses.detach()``); see :meth:`TableSampler.update`."""
        self.sampler.update(indices, scores)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration (see :meth:`TableSampler.set_epoch`)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the last batch handed out (prefetched batches are redrawn on load)."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, validated (see :meth:`TableSampler.load_state_dict`).

        The saved update delay is restored, so the batches continue identically whatever
        ``num_workers`` this loader has, provided it does not prefetch further ahead
        than that delay.

        Raises:
            KeyError: the ``'sampler'`` entry is missing.
            ValueError: the sampler state does not fit (see
                :meth:`TableSampler.load_state_dict`), or this loader prefetches more
                batches (``num_workers x prefetch_factor``) than the saved delay allows.
        """
        if not isinstance(state, dict) or "sampler" not in state:
            raise KeyError("ImportanceDataLoader state is missing 'sampler'.")
        saved = state["sampler"]
        delay = saved.get("delay") if isinstance(saved, dict) else None
        if isinstance(delay, int) and not isinstance(delay, bool) and 0 <= delay < self._depth:
            raise ValueError(
                f"ImportanceDataLoader state was saved with an update delay of {delay} batches, but this "
                f"loader prefetches up to {self._depth} batches (num_workers x prefetch_factor): updates "
                "would reach the draws later than in the saved run. Build the loader with "
                f"num_workers x prefetch_factor <= {delay}, or save from a loader built with a larger delay=."
            )
        self.sampler.load_state_dict(saved)
