"""The torch ``DataLoader`` options every isample loader passes through, validated in one place.

:func:`check_loader_options` is the only place that checks them: :class:`isample.DataLoader`
and every scheme loader call it, and the core loaders (:class:`isample.PoolLoader`,
:class:`isample.ImportanceDataLoader`, the schemes' row readers) receive the checked dict
with every key present, so ``DataLoader(**options)`` never fails on them later (for
example ``prefetch_factor=0``, which torch itself reports with a bare ``AssertionError``).
"""

from __future__ import annotations

import multiprocessing
import numbers
from collections.abc import Mapping
from typing import Any

from torch.utils.data import IterableDataset

from ._validation import check_float, check_int, param_error

__all__ = ["LOADER_OPTIONS", "SAMPLING_OPTIONS", "check_dataset", "check_loader_options"]

#: The torch DataLoader options passed through unchanged, with torch's defaults.
LOADER_OPTIONS: dict[str, Any] = {
    "num_workers": 0,
    "pin_memory": False,
    "collate_fn": None,
    "persistent_workers": False,
    "prefetch_factor": None,
    "worker_init_fn": None,
    "multiprocessing_context": None,
    "timeout": 0,
}

#: torch DataLoader options that choose the examples: the scheme does that, so they are refused.
SAMPLING_OPTIONS: dict[str, str] = {
    "shuffle": "the scheme decides the order (scheme='uniform' is a shuffled loader with weights 1)",
    "sampler": "the scheme draws the examples; pass scheme=... instead",
    "batch_sampler": (
        "the scheme draws the batches; to use an isample.TableSampler as the batch_sampler of "
        "your own DataLoader, see docs/distributed.md"
    ),
    "generator": "pass seed=<int> instead (draws are a pure function of the seed and the epoch)",
}

_UNSUPPORTED = ("pin_memory_device", "in_order")


def check_loader_options(options: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """Validate torch DataLoader options; return all of :data:`LOADER_OPTIONS` with defaults filled in.

    Args:
        options: the options given by the user (a subset of :data:`LOADER_OPTIONS`).
        owner: the class named in error messages.

    Returns:
        A new dict with every key of :data:`LOADER_OPTIONS`.

    Raises:
        TypeError: an unknown option, an option that chooses the examples (``shuffle``,
            ``sampler``, ``batch_sampler``, ``generator``), or a value of the wrong type.
        ValueError: a value out of range, or an option that needs worker processes
            (``prefetch_factor``, ``persistent_workers``) with ``num_workers=0``.
    """
    given = dict(options or {})
    for key in given:
        if key in SAMPLING_OPTIONS:
            raise TypeError(f"{owner} does not take the DataLoader option {key!r}: {SAMPLING_OPTIONS[key]}.")
        if key in _UNSUPPORTED:
            raise TypeError(f"{owner} does not support the DataLoader option {key!r} (not passed through).")
        if key not in LOADER_OPTIONS:
            raise TypeError(
                f"{owner} got an unknown option {key!r}. DataLoader options passed through: "
                f"{', '.join(LOADER_OPTIONS)}."
            )
    out = {**LOADER_OPTIONS, **given}
    workers = check_int(out["num_workers"], "num_workers", owner, minimum=0)
    out["num_workers"] = workers
    for flag in ("pin_memory", "persistent_workers"):
        if not isinstance(out[flag], bool):
            raise param_error(flag, owner, "a bool", out[flag], TypeError)
    for fn in ("collate_fn", "worker_init_fn"):
        if out[fn] is not None and not callable(out[fn]):
            raise param_error(fn, owner, "a callable or None", out[fn], TypeError)
    prefetch = check_int(out["prefetch_factor"], "prefetch_factor", owner, minimum=1, allow_none=True)
    out["prefetch_factor"] = prefetch
    timeout = out["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise param_error("timeout", owner, "a float >= 0", timeout, TypeError)
    out["timeout"] = check_float(timeout, "timeout", owner, minimum=0.0)
    if workers == 0:
        if out["prefetch_factor"] is not None:
            raise ValueError(
                f"The 'prefetch_factor' parameter of {owner} needs worker processes (num_workers > 0). "
                f"Got prefetch_factor={out['prefetch_factor']} with num_workers=0."
            )
        if out["persistent_workers"]:
            raise ValueError(
                f"The 'persistent_workers' parameter of {owner} needs worker processes (num_workers > 0). "
                "Got persistent_workers=True with num_workers=0."
            )
        if out["multiprocessing_context"] is not None:
            raise ValueError(
                f"The 'multiprocessing_context' parameter of {owner} needs worker processes "
                f"(num_workers > 0). Got {out['multiprocessing_context']!r} with num_workers=0."
            )
    context = out["multiprocessing_context"]
    if context is not None:
        if isinstance(context, str):
            methods = multiprocessing.get_all_start_methods()
            if context not in methods:
                expected = "None, a context or one of " + ", ".join(methods)
                raise param_error("multiprocessing_context", owner, expected, context)
        elif not isinstance(context, multiprocessing.context.BaseContext):
            raise param_error(
                "multiprocessing_context", owner, "None, a start-method name or a context", context, TypeError
            )
    return out


def check_dataset(dataset: Any, owner: str) -> int:
    """Check that ``dataset`` is a non-empty map-style dataset; returns its length.

    Raises:
        TypeError: an ``IterableDataset`` (even one with ``__len__``) or an object without
            ``__getitem__`` / ``__len__``: importance sampling draws examples by index.
        ValueError: an empty dataset.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"The 'dataset' parameter of {owner} must be a map-style Dataset (random access by index, "
            f"with __len__ and __getitem__). Got an IterableDataset ({type(dataset).__name__}): "
            "importance sampling draws examples by index, so a stream cannot be sampled."
        )
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise param_error(
            "dataset", owner, "a map-style Dataset (with __len__ and __getitem__)", dataset, TypeError
        )
    size = len(dataset)
    if size == 0:
        raise ValueError(f"The 'dataset' parameter of {owner} is empty (len 0).")
    return size
