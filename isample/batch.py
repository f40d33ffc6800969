"""``WeightedBatch``: what every isample loader yields, and helpers for collated batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "WeightedBatch",
    "split_batch",
    "extras_of",
    "index_rows",
    "slice_rows",
    "move_to",
    "TARGET_KEYS",
]

#: Keys recognised as the target entry when a dataset yields dicts.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


@dataclass
class WeightedBatch:
    """A minibatch with its dataset indices and importance weights.

    Attributes:
        inputs: the model inputs (a tensor, or whatever the collate function produced).
        targets: the targets (a tensor, or ``None`` when the batch carries none).
        indices: LongTensor of shape (b,), the dataset index of every row.
        weights: float32 Tensor of shape (b,), the importance weight of every row.
            Multiply the per-example losses by it: ``(batch.weights * losses).mean()``.
        extras: the fields after the first two when the dataset yields longer tuples
            (``(x, y, mask)`` gives ``extras == (mask,)``, collated like ``x`` and ``y``);
            ``None`` for pairs, dicts and single values.

    It unpacks as ``inputs, targets, weights`` whatever the dataset yields (extras are
    never unpacked: read them as ``batch.extras``)::

        for inputs, targets, weights in loader: ...
    """

    inputs: Any
    targets: Any
    indices: torch.Tensor
    weights: torch.Tensor
    extras: tuple[Any, ...] | None = None

    @classmethod
    def from_collated(cls, data: Any, indices: torch.Tensor, weights: torch.Tensor) -> WeightedBatch:
        """A batch from a collated dataset batch: inputs, targets and extras (see :func:`split_batch`)."""
        if (
            type(data) is tuple and len(data) == 2
        ):  # the common (inputs, targets) pair, without the ABC checks
            return cls(data[0], data[1], indices, weights, None)
        inputs, targets = split_batch(data)
        return cls(inputs, targets, indices, weights, extras_of(data))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.inputs, self.targets, self.weights))

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WeightedBatch:
        """Return a copy with inputs, targets and weights on ``device`` (indices stay on CPU)."""
        return WeightedBatch(
            move_to(self.inputs, device, non_blocking),
            move_to(self.targets, device, non_blocking),
            self.indices,
            self.weights.to(device, non_blocking=non_blocking),
            move_to(self.extras, device, non_blocking),
        )

    def pin_memory(self) -> WeightedBatch:
        """Pinned-memory copy, called by ``DataLoader(pin_memory=True)``."""
        return WeightedBatch(
            _pin(self.inputs),
            _pin(self.targets),
            self.indices.pin_memory(),
            self.weights.pin_memory(),
            _pin(self.extras),
        )


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Split a collated batch into ``(inputs, targets)``.

    A sequence ``(inputs, targets, ...)`` gives its first two entries; a mapping gives
    ``(the mapping without the target key, mapping[target key])`` for the first key of
    :data:`TARGET_KEYS` present; anything else is ``(batch, None)``.
    """
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    return batch, None


def extras_of(batch: Any) -> tuple[Any, ...] | None:
    """The fields after ``(inputs, targets)`` of a collated sequence batch, as a tuple; else ``None``."""
    if isinstance(batch, Mapping) or isinstance(batch, (str, bytes)):
        return None
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return tuple(batch[2:]) if len(batch) > 2 else None
    if isinstance(batch, Sequence) and len(batch) > 2:
        return tuple(batch[2:])
    return None


def index_rows(data: Any, rows: torch.Tensor) -> Any:
    """Select ``rows`` (dim 0) of every tensor inside nested tuples, lists and dicts."""
    if isinstance(data, torch.Tensor):
        return data.index_select(0, rows.to(data.device))
    if isinstance(data, Mapping):
        return type(data)({k: index_rows(v, rows) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(index_rows(v, rows) for v in data))
    if isinstance(data, (list, tuple)):
        if len(data) and not isinstance(data[0], (torch.Tensor, Mapping, list, tuple)):
            picked = rows.tolist()
            return type(data)(data[i] for i in picked)
        return type(data)(index_rows(v, rows) for v in data)
    return data


def slice_rows(data: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` (dim 0) of every tensor inside nested tuples, lists and dicts (views, no copy)."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, Mapping):
        return type(data)({k: slice_rows(v, start, stop) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(slice_rows(v, start, stop) for v in data))
    if isinstance(data, (list, tuple)):
        if len(data) and not isinstance(data[0], (torch.Tensor, Mapping, list, tuple)):
            return type(data)(data[start:stop])
        return type(data)(slice_rows(v, start, stop) for v in data)
    return data


def move_to(data: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        return type(data)({k: move_to(v, device, non_blocking) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(move_to(v, device, non_blocking) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move_to(v, device, non_blocking) for v in data)
    return data


def batch_size_of(data: Any) -> int:
    """Number of rows of the first tensor found in ``data``."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0]) if data.dim() else 1
    if isinstance(data, Mapping):
        for v in data.values():
            return batch_size_of(v)
    if isinstance(data, (list, tuple)) and data:
        if isinstance(data[0], (torch.Tensor, Mapping, list, tuple)):
            return batch_size_of(data[0])
        return len(data)
    raise TypeError(f"Cannot find the batch size of a {type(data).__name__}.")


def _pin(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, Mapping):
        return type(data)({k: _pin(v) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)) and not hasattr(data, "_fields"):
        return type(data)(_pin(v) for v in data)
    return data
