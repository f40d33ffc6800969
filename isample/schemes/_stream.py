"""Reading rows of a dataset in chunks, in a given or a seeded random order (private helpers).

The schemes that run their own candidate loop (uniform, Selective Backprop, RHO-LOSS,
InfoBatch) read rows through one ``DataLoader`` built once per scheme, whose sampler is
re-pointed at the next index source before each epoch's iteration: either an explicit
index tensor or a stream of consecutive random permutations seeded by
``(seed, epoch, block, stream)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._fetch import IndexedCollate, IndexedDataset, can_gather
from .._options import check_loader_options
from .._random import permutation

__all__ = ["epoch_permutation", "RowReader", "cat_rows"]


def epoch_permutation(
    num_samples: int, seed: int, epoch: int, block: int = 0, stream: int = 0
) -> torch.Tensor:
    """A random permutation of ``range(num_samples)``, a pure function of its arguments (LongTensor)."""
    return permutation(num_samples, seed, epoch, block, stream)


class _Source(Sampler[int]):
    """Index source of :class:`RowReader`: an explicit tensor, or a (maybe unbounded) permutation stream."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.items: torch.Tensor | None = None
        self.seed = 0
        self.epoch = 0
        self.stream = 0
        self.start = 0
        self.length: int | None = None

    def __iter__(self) -> Iterator[int]:
        if self.items is not None:
            yield from self.items[self.start :].tolist()
            return
        n = self.num_samples
        block = self.start // n
        offset = self.start - block * n
        emitted = self.start
        while self.length is None or emitted < self.length:
            perm = epoch_permutation(n, self.seed, self.epoch, block, self.stream)
            stop = n if self.length is None else min(n, offset + self.length - emitted)
            chunk = perm[offset:stop].tolist()
            emitted += len(chunk)
            yield from chunk
            block += 1
            offset = 0


class RowReader:
    """Reads ``(indices, collated rows)`` chunks of a dataset through one DataLoader.

    Args:
        dataset: a map-style dataset.
        chunk_size: rows per chunk.
        **loader_options: torch DataLoader options (``num_workers``, ``pin_memory``,
            ``collate_fn``, ``persistent_workers``, ``prefetch_factor``, ``worker_init_fn``,
            ``multiprocessing_context``, ``timeout``), validated by
            :func:`isample._options.check_loader_options`.
    """

    def __init__(self, dataset: Dataset, chunk_size: int, **loader_options: Any) -> None:
        options = check_loader_options(loader_options, "RowReader")
        collate_fn = options.pop("collate_fn")
        self.dataset = dataset
        self.collate = collate_fn or torch.utils.data.default_collate
        self.source = _Source(len(dataset))  # type: ignore[arg-type]
        self.loader = DataLoader(
            IndexedDataset(dataset, gather=can_gather(dataset, collate_fn)),
            batch_size=chunk_size,
            sampler=self.source,
            collate_fn=IndexedCollate(collate_fn),
            **options,
        )

    def from_indices(self, indices: torch.Tensor, start: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """Chunks of ``indices[start:]`` in order."""
        self.source.items = indices
        self.source.start = start
        return iter(self.loader)

    def from_stream(
        self, seed: int, epoch: int, stream: int, start: int = 0, length: int | None = None
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """Chunks of the permutation stream of ``(seed, epoch, stream)`` from position ``start``.

        The stream concatenates permutations ``block = 0, 1, ...``; ``length`` bounds the
        total stream length (None = unbounded).
        """
        src = self.source
        src.items = None
        src.seed, src.epoch, src.stream, src.start, src.length = seed, epoch, stream, start, length
        return iter(self.loader)

    def fetch(self, indices: torch.Tensor) -> Any:
        """Read and collate the given rows directly (used to rebuild a queue on resume)."""
        return self.collate([self.dataset[i] for i in indices.tolist()])


def cat_rows(parts: list[Any]) -> Any:
    """Concatenate collated batches along dim 0 (tensors, dicts, tuples, lists of per-row values)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat([p.to(first.device) for p in parts])
    if isinstance(first, Mapping):
        return type(first)({k: cat_rows([p[k] for p in parts]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(cat_rows([p[i] for p in parts]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        structured = any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for p in parts for v in p[:1])
        if structured:
            return type(first)(cat_rows([p[i] for p in parts]) for i in range(len(first)))
        out: list[Any] = []
        for p in parts:
            out.extend(p)
        return type(first)(out)
    return first
