"""``ImportanceDataLoader``: a DataLoader driven by a :class:`TableSampler`.

The sampler yields ``(index, weight)`` pairs; a dataset wrapper unpacks them inside the
worker, so each row travels with its own weight and index through prefetching,
workers and pinned memory. Batches come out as :class:`WeightedBatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ._fetch import Gathered, can_gather, gather_rows
from ._validation import check_int, param_error
from .batch import WeightedBatch
from .table_sampler import TableSampler

__all__ = ["ImportanceDataLoader"]


class _WeightedItems(Dataset):
    """``dataset[(index, weight)] -> (index, weight, dataset[index])``."""

    def __init__(self, dataset: Dataset, gather: bool = False) -> None:
        self.dataset = dataset
        self.gather = gather

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, float]) -> tuple[int, float, Any]:
        index, weight = key
        return index, weight, self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, float]]) -> Any:
        if self.gather:  # one indexing per tensor instead of one __getitem__ per row
            return Gathered(keys, gather_rows(self.dataset, [i for i, _ in keys]))  # type: ignore[arg-type]
        return [self[key] for key in keys]


class _WeightedCollate:
    """Collate ``(index, weight, item)`` triples into a :class:`WeightedBatch` (picklable)."""

    def __init__(self, base: Callable | None) -> None:
        self.base = base or torch.utils.data.default_collate

    def __call__(self, items: Any) -> WeightedBatch:
        if isinstance(items, Gathered):
            indices = torch.tensor([i for i, _ in items.keys], dtype=torch.long)
            weights = torch.tensor([w for _, w in items.keys], dtype=torch.float32)
            return WeightedBatch.from_collated(items.data, indices, weights)
        indices = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        weights = torch.tensor([w for _, w, _ in items], dtype=torch.float32)
        return WeightedBatch.from_collated(self.base([item for _, _, item in items]), indices, weights)


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
    (pass ``delay=`` to override).

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
    ) -> None:
        owner = "ImportanceDataLoader"
        if not isinstance(sampler, TableSampler):
            raise param_error("sampler", owner, "a TableSampler", sampler, TypeError)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise param_error("dataset", owner, "a map-style Dataset", dataset, TypeError)
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("The 'dataset' parameter of ImportanceDataLoader is empty (len 0).")
        if len(dataset) != sampler.num_samples:  # type: ignore[arg-type]
            raise ValueError(
                f"The 'sampler' of ImportanceDataLoader has num_samples={sampler.num_samples}, "
                f"but the dataset has {len(dataset)} examples."  # type: ignore[arg-type]
            )
        num_workers = check_int(num_workers, "num_workers", owner, minimum=0)
        depth = num_workers * (prefetch_factor if prefetch_factor is not None else 2)
        given = check_int(delay, "delay", owner, minimum=0, allow_none=True)
        sampler.delay = depth if given is None else given
        sampler.advance(0)  # the loop's consumption, not the draws, moves the sampler's position
        self.dataset = dataset
        self.sampler = sampler
        self._loader = DataLoader(
            _WeightedItems(dataset, gather=can_gather(dataset, collate_fn)),
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=bool(pin_memory),
            collate_fn=_WeightedCollate(collate_fn),
            persistent_workers=bool(persistent_workers) and num_workers > 0,
            prefetch_factor=prefetch_factor,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[WeightedBatch]:
        return self._iterate()

    def _iterate(self) -> Iterator[WeightedBatch]:
        for batch in self._loader:
            self.sampler.advance(1)
            yield batch

    def update(self, indices: Any, scores: Any) -> None:
        """Feed back per-example scores (e.g. ``losses.detach()``); see :meth:`TableSampler.update`."""
        self.sampler.update(indices, scores)

    def set_epoch(self, epoch: int) -> None:
        """Set the sampler's epoch."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the last batch handed out (prefetched batches are redrawn on load)."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "sampler" not in state:
            raise KeyError("ImportanceDataLoader state is missing 'sampler'.")
        self.sampler.load_state_dict(state["sampler"])
