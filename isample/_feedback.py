"""One conversion for every feedback path: ``update(indices, scores)`` -> validated NumPy arrays.

Every loader and scheme that takes per-example scores back from the training loop
(:class:`isample.TableSampler`, the scheme loaders through
:func:`isample.schemes.base.feedback_arrays`) converts its arguments here, so one set of
rules holds everywhere:

- ``indices``: an integer tensor, array or list (any integer dtype). A bool or float
  index tensor is a ``TypeError``: a boolean mask is never cast to indices 0 and 1, and
  a float index is never truncated.
- ``scores``: a real tensor, array or list of any float or integer dtype, bfloat16 and
  float16 included, converted to float64 (bool and complex are a ``TypeError``).
- Both are flattened; their lengths must match (``ValueError``).
- Indices must lie in ``[0, N)`` (``IndexError``).
- NaN and ``+inf`` scores are dropped with a ``RuntimeWarning`` (their examples keep
  their previous scores); a negative score (``-inf`` included) is a ``ValueError``, as
  is a score above ``max_score``.

The returned arrays never share memory with the caller's tensors, so a queued update
cannot be changed afterwards by an in-place operation on the loss tensor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["feedback_arrays", "drop_nonfinite"]


def feedback_arrays(
    indices: Any,
    scores: Any,
    num_samples: int,
    owner: str,
    *,
    max_score: float = math.inf,
    keep_nonfinite: bool = False,
    stacklevel: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert the arguments of ``owner.update(indices, scores)``.

    Args:
        indices: integer Tensor / array / list, any shape (flattened), values in [0, N).
        scores: real Tensor / array / list of the same number of elements, >= 0.
        num_samples: N.
        owner: the class whose ``update`` is called (for messages), e.g. ``"TableSampler"``.
        max_score: largest accepted finite score (a ``ValueError`` above it).
        keep_nonfinite: keep NaN and ``+inf`` entries (no warning) for a caller that drops
            them later, e.g. after gathering the updates of every rank.
        stacklevel: ``stacklevel`` of the NaN / inf warning, counted from this function's
            caller (default 3: the caller of ``owner.update``).

    Returns:
        ``(indices, scores)``: a fresh int64 array of shape (k,) and a fresh float64 array
        of shape (k,), NaN and ``+inf`` entries removed from both.

    Raises:
        TypeError: ``indices`` is not integer (bool and float included), or ``scores`` is
            not real, or either is not a tensor, array or list.
        ValueError: the lengths differ, a score is negative, or a score exceeds
            ``max_score``.
        IndexError: an index lies outside ``[0, num_samples)``.
    """
    where = f"{owner}.update"
    idx = _indices(indices, where)
    val = _scores(scores, where)
    if idx.shape[0] != val.shape[0]:
        raise ValueError(f"{where} got {idx.shape[0]} indices and {val.shape[0]} scores; lengths must match.")
    if idx.shape[0] == 0:
        return idx, val
    if not idx.view(np.uint64).max() < num_samples:  # negatives wrap to huge unsigned values
        bad = idx[(idx < 0) | (idx >= num_samples)][0]
        raise IndexError(f"{where} got index {int(bad)} outside [0, {num_samples}).")
    lo, hi = val.min(), val.max()  # NaN propagates into both
    if lo >= 0 and hi <= max_score and hi < math.inf:  # the common case: one pass each, nothing to drop
        return idx, val
    if (val < 0).any():  # NaN compares False; -inf is negative
        raise ValueError(
            f"{where} got negative scores (min {float(val[val < 0].min()):.4g}); scores must be >= 0."
        )
    if keep_nonfinite:
        finite = val[np.isfinite(val)]
    else:
        idx, val = drop_nonfinite(idx, val, where, stacklevel)
        finite = val
    if finite.size and finite.max() > max_score:
        raise ValueError(
            f"{where} got scores up to {float(finite.max()):.4g}; scores above {max_score:.3g} "
            "would overflow the table's float64 sum."
        )
    return idx, val


def drop_nonfinite(
    idx: np.ndarray, val: np.ndarray, where: str, stacklevel: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, val)`` without the entries whose score is NaN or infinite, with a warning
    naming ``where`` when there are any (``stacklevel`` counted from this function's caller)."""
    keep = np.isfinite(val)
    if keep.all():
        return idx, val
    warnings.warn(
        f"{where} skipped {int((~keep).sum())} NaN or infinite score(s); "
        "those examples keep their previous scores.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    return idx[keep], val[keep]


def _indices(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            hint = " (a boolean mask: pass mask.nonzero().flatten())" if value.dtype == torch.bool else ""
            raise TypeError(
                f"The 'indices' parameter of {where} must be an integer tensor. "
                f"Got dtype {value.dtype}{hint}."
            )
        value = value.detach().cpu()
        if value.dtype != torch.int64:
            value = value.to(torch.int64)
        return value.numpy().reshape(-1).copy()  # a copy: never aliases the caller's tensor
    arr = _as_array(value, "indices", where)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        hint = " (a boolean mask: pass np.flatnonzero(mask))" if arr.dtype == np.bool_ else ""
        raise TypeError(
            f"The 'indices' parameter of {where} must be an integer array. Got dtype {arr.dtype}{hint}."
        )
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise IndexError(f"{where} got index {int(arr.max())} outside the int64 range.")
    return np.array(arr, dtype=np.int64, copy=True).reshape(-1)


def _scores(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"The 'scores' parameter of {where} must be a real tensor. Got dtype {value.dtype}."
            )
        value = value.detach().cpu()
        if value.dtype in (torch.float32, torch.float64):
            return value.numpy().reshape(-1).astype(np.float64)  # astype copies
        return value.to(torch.float64).numpy().reshape(-1)  # bfloat16, float16, integers: a new tensor
    arr = _as_array(value, "scores", where)
    if arr.size == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"The 'scores' parameter of {where} must be a real array. Got dtype {arr.dtype}.")
    return np.array(arr, dtype=np.float64, copy=True).reshape(-1)


def _as_array(value: Any, name: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except (ValueError, TypeError) as err:  # ragged or mixed
            raise TypeError(
                f"The '{name}' parameter of {where} must be a flat list of numbers. Got {value!r}."
            ) from err
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return np.asarray([value])
    raise TypeError(f"The '{name}' parameter of {where} must be a Tensor, array or list. Got {value!r}.")
