"""``isample.DataLoader``: one loader for every scheme, a drop-in for ``torch.utils.data.DataLoader``.

A loop written for a torch DataLoader changes by the loader line and one call::

    loader = isample.DataLoader(train_set, batch_size=64, scheme="history-is",
                                model=model, loss_fn=loss_fn,      # what the scheme needs
                                num_workers=2, pin_memory=True)    # DataLoader options, once
    for x, y, w in loader:
        losses = loss_fn(model(x), y)                              # reduction="none"
        (w * losses).mean().backward()
        optimizer.step(); optimizer.zero_grad()
        loader.update(losses.detach())                             # the last batch's scores
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ._options import check_loader_options
from ._validation import check_seed, param_error
from .batch import WeightedBatch
from .schemes.base import SchemeLoader, check_dataset
from .schemes.objects import Scheme, scheme_object
from .schemes.registry import available, scheme_class

__all__ = ["DataLoader"]

_OWNER = "isample.DataLoader"


def _resolve_scheme(scheme: Any) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str):
        return scheme_object(scheme)
    if isinstance(scheme, type) and issubclass(scheme, Scheme):
        raise TypeError(
            f"The 'scheme' parameter of {_OWNER} must be a scheme object or name. Got the class "
            f"{scheme.__name__}; call it: scheme={scheme.__name__}()."
        )
    expected = "a registry name (" + ", ".join(available()) + ") or a scheme object"
    raise param_error("scheme", _OWNER, expected, scheme, TypeError)


class DataLoader:
    """Importance-weighted batches of a dataset with any scheme; torch DataLoader options pass through.

    Batches are :class:`isample.WeightedBatch`: they unpack as ``inputs, targets, weights``
    (``for x, y, w in loader``) and keep the named fields ``.inputs``, ``.targets``,
    ``.indices``, ``.weights`` and ``.extras`` (the fields after the second one when the
    dataset yields longer tuples; unpacking never includes them). With a model, batches
    are on the model's device.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) of ``(input, target)``
            pairs, longer tuples or dicts.
        batch_size: b, examples per batch (64).
        scheme: a registry name (:func:`isample.schemes.available`; ``"uniform"`` is a
            shuffled loader with weights 1) or a scheme object such as
            ``isample.schemes.HistoryIS(mixing=0.2)`` ("history-is").
        model: the model being trained (scoring schemes use it; batches go to its device).
            Optional for ``"uniform"``.
        loss_fn: per-example loss ``(outputs, targets) -> Tensor (b,)`` (``reduction="none"``).
            Optional for ``"uniform"``.
        optimizer: the optimizer, for schemes that score in its geometry (gradient norms).
        epochs: total training epochs (needed by ``infobatch``, used by ``obs``).
        seed: int >= 0; batches are a pure function of the seed, the epoch and the scores.
            None draws a fresh seed (global RNG state is never touched).
        drop_last: drop the last incomplete batch of an epoch (schemes that always yield
            full batches ignore it).
        num_batches: batches per epoch, for schemes that take it (default: about N / b).
        scoring_batch_size: rows per scoring forward, for schemes that score.
        **dataloader_options: torch DataLoader options passed through unchanged
            (``num_workers``, ``pin_memory``, ``collate_fn``, ``persistent_workers``,
            ``prefetch_factor``, ``worker_init_fn``, ``multiprocessing_context``,
            ``timeout``), validated here once. ``shuffle``, ``sampler``, ``batch_sampler``
            and ``generator`` are refused: the scheme chooses the examples.

    Attributes:
        scheme: the scheme object.
        loader: the scheme's loader (:class:`isample.schemes.SchemeLoader`), for
            scheme-specific state (``loader.switch``, ``loader.probabilities()``, ...).
        last_batch: the last batch yielded (None before the first).

    Raises:
        TypeError: a wrong type, an unknown or sampling option, an ``IterableDataset``,
            or a scoring scheme without ``model`` / ``loss_fn``.
        ValueError: a value out of range (``prefetch_factor=0``, ``batch_size=0``, ...).

    Example:
        >>> loader = isample.DataLoader(train_set, batch_size=32, scheme="history-is",
        ...                             model=model, loss_fn=loss_fn, seed=0)
        >>> for x, y, w in loader:
        ...     losses = loss_fn(model(x), y)
        ...     (w * losses).mean().backward()
        ...     optimizer.step(); optimizer.zero_grad()
        ...     loader.update(losses.detach())
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 64,
        scheme: str | Scheme = "history-is",
        *,
        model: nn.Module | None = None,
        loss_fn: Callable | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        epochs: int | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        num_batches: int | None = None,
        scoring_batch_size: int | None = None,
        **dataloader_options: Any,
    ) -> None:
        check_dataset(dataset, _OWNER)
        self.scheme = _resolve_scheme(scheme)
        options = check_loader_options(dataloader_options, _OWNER)
        if not isinstance(drop_last, bool):
            raise param_error("drop_last", _OWNER, "a bool", drop_last, TypeError)
        cls = scheme_class(self.scheme.name)
        if cls.requires_model and (model is None or loss_fn is None):
            missing = " and ".join(n for n, v in (("model", model), ("loss_fn", loss_fn)) if v is None)
            raise TypeError(
                f"{_OWNER} with scheme {self.scheme.name!r} needs {missing}: the scheme scores examples "
                "with the model and the per-example loss. scheme='uniform' needs neither."
            )
        extra = _loader_level(
            cls, drop_last=drop_last, num_batches=num_batches, scoring_batch_size=scoring_batch_size
        )
        self.seed = check_seed(seed, None, _OWNER)
        self.loader: SchemeLoader = self.scheme.build(
            dataset,
            model,
            loss_fn,
            batch_size,
            seed=self.seed,
            epochs=epochs,
            optimizer=optimizer,
            **extra,
            **options,
        )
        self.dataset = dataset
        self.batch_size = self.loader.batch_size
        self.last_batch: WeightedBatch | None = None
        #: open the scheme's step context when a batch is yielded and close it at ``update``, so a
        #: plain loop needs no ``with loader.step_context(batch):`` (history-gradnorm). An
        #: integration that wraps each step itself (e.g. the Lightning callback, whose framework
        #: may fetch ahead) sets it to False.
        self.auto_step_context = type(self.loader).step_context is not SchemeLoader.step_context
        self._step: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[WeightedBatch]:
        return self._iterate()

    def _iterate(self) -> Iterator[WeightedBatch]:
        try:
            for batch in self.loader:
                self._close_step(abandoned=True)  # a batch the loop skipped (no update) records nothing
                if self.auto_step_context:  # e.g. history-gradnorm records the step's backward
                    stack = contextlib.ExitStack()
                    stack.enter_context(self.loader.step_context(batch))
                    self._step = stack
                self.last_batch = batch
                yield batch
        finally:
            self._close_step(abandoned=True)

    def _close_step(self, abandoned: bool = False) -> None:
        """Close the scheme's step context of the last batch (``abandoned``: the loop stopped early)."""
        if self._step is not None:
            step, self._step = self._step, None
            if not abandoned:
                step.close()
                return
            with contextlib.suppress(RuntimeError):  # a step left before its backward records nothing
                step.close()

    # ------------------------------------------------------------------ feedback
    def update(self, *args: Any, outputs: Any = None) -> None:
        """Feed back per-example scores: ``update(losses)`` or ``update(indices, scores)``.

        Args:
            *args: ``losses`` alone (Tensor of shape (b,)), for the last yielded batch; or
                ``indices, scores`` (shape (k,) each), for any examples.
            outputs: the step's detached model outputs, for schemes scored from them
                (``HistoryIS(score="upper_bound")``); ignored otherwise.

        Raises:
            RuntimeError: ``update(losses)`` before any batch was yielded.
            ValueError: ``losses`` is not of shape (b,) for the last batch's b.
            TypeError: no or more than two positional arguments.
        """
        if len(args) == 2:
            self.loader.update(*args)
            return
        if len(args) != 1:
            raise TypeError(
                f"{_OWNER}.update takes losses (for the last batch) or indices and scores; got {len(args)} "
                "positional arguments."
            )
        losses = args[0]
        batch = self.last_batch
        if batch is None:
            raise RuntimeError(
                f"{_OWNER}.update(losses) feeds back the last yielded batch, but no batch has been yielded "
                "yet. Call it inside the loop, after the batch's forward pass."
            )
        shape = tuple(losses.shape) if hasattr(losses, "shape") else (len(losses),)
        if shape != (len(batch),):
            raise ValueError(
                f"{_OWNER}.update(losses) needs one loss per example of the last batch, shape "
                f"({len(batch)},); got shape {shape}. Use a loss with reduction='none'."
            )
        self.feedback(batch, outputs, losses)

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: Any) -> None:
        """The scheme's feedback for ``batch`` (see :meth:`isample.schemes.SchemeLoader.feedback`)."""
        if batch is self.last_batch:
            self._close_step()
        self.loader.feedback(batch, outputs, losses)

    def step_context(self, batch: WeightedBatch) -> contextlib.AbstractContextManager:
        """The scheme's context around forward + backward (already open for the current batch)."""
        if self.auto_step_context and batch is self.last_batch and self._step is not None:
            return contextlib.nullcontext()
        return self.loader.step_context(batch)

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position (Lightning calls it on resume)."""
        self.loader.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration continues (or starts)."""
        return int(self.loader.epoch)  # type: ignore[attr-defined]

    def describe(self) -> dict[str, Any]:
        """What the scheme does now (importance sampling on or off and why).

        Returns:
            dict with at least ``scheme`` and ``is_on``: for pool schemes the switch's
            state (``tau``, ``tau_ema``, ``threshold``, ``on_share``, ...; see
            :meth:`isample.PoolLoader.describe`), for table schemes the mixing level and
            the staleness estimate; for other schemes ``is_on`` is None (not switched).
        """
        describe = getattr(self.loader, "describe", None)
        if callable(describe):
            return describe()
        return {"scheme": self.loader.name, "is_on": None}

    def status(self) -> str:
        """A one-line summary for a progress bar (``bar.set_postfix_str(loader.status())``) or a log."""
        status = getattr(self.loader, "status", None)
        return status() if callable(status) else f"{self.loader.name}: not switched"

    def cost(self) -> dict[str, int]:
        """Cumulative ``scored_examples`` and ``trained_examples`` (see :meth:`SchemeLoader.cost`)."""
        return self.loader.cost()

    def state_dict(self) -> dict[str, Any]:
        """The scheme loader's state (exact at the last batch handed out)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the next iteration continues where the saved one stopped)."""
        self.loader.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"isample.DataLoader(N={self.loader.num_samples}, batch_size={self.batch_size}, "
            f"scheme={self.scheme!r}, seed={self.seed})"
        )


def _loader_level(cls: type[SchemeLoader], **given: Any) -> dict[str, Any]:
    """The loader-level options the scheme's loader takes; a clear error for one it cannot honour."""
    params = inspect.signature(cls.__init__).parameters
    out = {}
    for key, value in given.items():
        if value is None or value is False:  # the default: the scheme's own
            continue
        if key in params:
            out[key] = value
        elif key != "drop_last":  # schemes without drop_last always yield full batches
            raise TypeError(f"The scheme {cls.name!r} does not take the '{key}' option of {_OWNER}.")
    return out

