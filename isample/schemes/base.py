"""The protocol every scheme loader follows, and a thin shared base class.

A scheme loader is an iterable of :class:`isample.WeightedBatch` with the training-loop
hooks the benchmark relies on::

    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader:
            with loader.step_context(batch):
                out = model(batch.inputs)
                losses = loss_fn(out, batch.targets)           # reduction="none"
                (batch.weights * losses).mean().backward()
            opt.step(); opt.zero_grad()
            loader.feedback(batch, out.detach(), losses.detach())

and cost counters (:meth:`SchemeLoader.cost`) so that comparisons count the scoring work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._feedback import feedback_arrays as _feedback_arrays
from .._options import check_dataset, check_loader_options
from .._validation import check_int, check_seed, param_error
from ..batch import WeightedBatch
from ..scorers import _check_reduction, model_device

__all__ = ["SchemeLoader", "check_dataset", "feedback_arrays"]


def feedback_arrays(indices: Any, scores: Any, num_samples: int, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``update(indices, scores)`` arguments; returns int64 and float64 arrays.

    The one set of rules of :func:`isample._feedback.feedback_arrays`: integer indices
    in ``[0, num_samples)`` (bool / float indices are a ``TypeError``), any real score
    dtype (bfloat16 included), NaN / inf dropped with a ``RuntimeWarning``, negative
    scores a ``ValueError``, lengths must match.
    """
    return _feedback_arrays(indices, scores, num_samples, owner, stacklevel=4)


class SchemeLoader:
    """Base class of the scheme loaders (see the module docstring for the protocol).

    Subclasses implement :meth:`_batches` (one epoch from the current position, updating
    their own position and rolling the epoch over after its last batch), ``__len__``,
    :meth:`set_epoch`, :meth:`update` and ``_state`` / ``_load_state``; this class counts
    costs, moves batches to the model's device and wraps the state.

    The torch DataLoader options (``num_workers``, ``pin_memory``, ``collate_fn``,
    ``persistent_workers``, ``prefetch_factor``, ``worker_init_fn``,
    ``multiprocessing_context``, ``timeout``) arrive as ``**loader_options`` in every
    scheme's constructor and are validated here, once (:func:`isample._options.check_loader_options`);
    ``self.loader_options`` holds all of them, defaults filled in.

    Attributes:
        name: the registry name.
        kind: ``"pool"``, ``"table"`` or ``"uniform"``.
        unbiased: whether the weighted batch gradient is unbiased for the full gradient.
        requires_model: whether the scheme needs ``model`` and ``loss_fn`` (False only for
            the uniform baseline).
    """

    name = "scheme"
    kind = "uniform"
    unbiased = False
    requires_model = True
    STATE_VERSION = 1

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module | None,
        loss_fn: Callable | None,
        batch_size: int,
        seed: int | None,
        loader_options: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        self.num_samples = check_dataset(dataset, owner)
        if model is not None or self.requires_model:
            if not isinstance(model, nn.Module):
                raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
        if loss_fn is not None or self.requires_model:
            if not callable(loss_fn):
                expected = "a callable (outputs, targets) -> per-example losses"
                raise param_error("loss_fn", owner, expected, loss_fn, TypeError)
            _check_reduction(loss_fn, owner)
        self.dataset = dataset
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
        self.seed = check_seed(seed, None, owner)
        self.loader_options = check_loader_options(loader_options, owner)
        self._scored = 0
        self._trained = 0
        self._cursor_owner: object | None = None

    # ------------------------------------------------------------------ protocol
    def __iter__(self) -> Iterator[WeightedBatch]:
        for batch in self._batches():
            self._trained += len(batch)
            yield self._to_device(batch)

    def _batches(self) -> Iterator[WeightedBatch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:  # pragma: no cover - abstract
        """Set the epoch (its batches are a pure function of the seed, the epoch and the scheme state).

        Setting the epoch the loader is already in keeps its position (Lightning calls
        ``set_epoch(current)`` on resume); another epoch starts at its first batch.
        """
        raise NotImplementedError

    def update(self, indices: Any, scores: Any) -> None:  # pragma: no cover - abstract
        """Feed back per-example scores of ``indices`` (shape (k,) each)."""
        raise NotImplementedError

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: torch.Tensor) -> None:
        """Called by the loop after the backward with detached outputs and per-example losses.

        Default: ``update(batch.indices, losses)``.
        """
        self.update(batch.indices, losses)

    def step_context(self, batch: WeightedBatch) -> contextlib.AbstractContextManager:
        """A context manager the loop wraps around forward + backward (default: does nothing)."""
        return contextlib.nullcontext()

    def cost(self) -> dict[str, int]:
        """Cumulative work: ``scored_examples`` (forwarded for scoring outside the training step)
        and ``trained_examples`` (handed to the training step)."""
        return {"scored_examples": int(self._scored), "trained_examples": int(self._trained)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (the model's state is the caller's)."""
        return {
            "scheme": self.name,
            "version": self.STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "cost": self.cost(),
            "inner": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ValueError when it belongs to another scheme or dataset size."""
        for key in ("scheme", "num_samples", "batch_size", "seed", "cost", "inner"):
            if key not in state:
                raise KeyError(f"{type(self).__name__} state is missing '{key}'.")
        if state["scheme"] != self.name:
            raise ValueError(
                f"The state was saved by scheme {state['scheme']!r}; this loader is {self.name!r}."
            )
        for key in ("num_samples", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"{type(self).__name__} state was saved with {key}={state[key]}, "
                    f"but this loader has {key}={getattr(self, key)}."
                )
        self.seed = int(state["seed"])
        self._scored = int(state["cost"]["scored_examples"])
        self._trained = int(state["cost"]["trained_examples"])
        self._load_state(state["inner"])

    def _state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_state(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ epoch cursor
    # The loader's (epoch, position) is the resume point. The first live iterator owns it
    # (reads it at its start and advances it); an iterator made while another is live
    # runs the whole current epoch on its own cursor; set_epoch(another epoch) detaches
    # the owner. So no iterator ever truncates another's epoch, as with torch.
    def _claim_cursor(self) -> tuple[object, bool]:
        """A token for a new iterator and whether it owns the loader's cursor."""
        token = object()
        if self._cursor_owner is None:
            self._cursor_owner = token
            return token, True
        return token, False

    def _owns_cursor(self, token: object) -> bool:
        return self._cursor_owner is token

    def _release_cursor(self, token: object) -> None:
        if self._cursor_owner is token:
            self._cursor_owner = None

    def _detach_iterators(self) -> None:
        """Called when the epoch is set: live iterators finish their own epoch without moving the cursor."""
        self._cursor_owner = None

    # ------------------------------------------------------------------ helpers
    def _to_device(self, batch: WeightedBatch) -> WeightedBatch:
        if self.model is None:
            return batch
        device = model_device(self.model)
        if batch.weights.device == device:
            return batch
        return batch.to(device, non_blocking=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.num_samples}, batch_size={self.batch_size}, seed={self.seed})"
