"""Pure functions on training curves: interpolation, time-to-target, summaries, lr choice.

A *curve* is a pair of 1-D arrays ``(x, y)``: ``x`` a non-decreasing resource axis
(optimizer steps, training seconds, or compute in forward-equivalent examples) and ``y``
a positive loss measured at those points. Every function here is deterministic and
independent of torch, so it can be unit-tested on synthetic curves with known answers.

Loss is interpolated *log-linearly*: ``log y`` is piecewise linear in ``x`` between
measured points, so a loss that decays exponentially between two evaluations is
interpolated exactly:

.. math::

    \\log y(x) = (1 - t) \\log y_j + t \\log y_{j+1}, \\qquad t = \\frac{x - x_j}{x_{j+1} - x_j},
    \\quad x_j \\le x \\le x_{j+1}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "interpolate",
    "time_to_target",
    "spread",
    "select_learning_rate",
    "compute_units",
    "BACKWARD_COST",
    "smooth",
    "smoothed_final",
    "time_to_accuracy",
    "extend_grid",
    "SCHEDULES",
    "schedule_factor",
]

#: Learning-rate schedules: the factor applied to the base learning rate at progress t in [0, 1].
SCHEDULES = ("constant", "cosine", "linear")

#: Cost of back-propagating one example, in forward passes (the usual 2x rule).
BACKWARD_COST = 2.0


def compute_units(
    forward_examples: float, backward_examples: float, backward_cost: float = BACKWARD_COST
) -> float:
    """Compute in forward-equivalent examples.

    .. math::

        C = F + r B

    where ``F`` counts examples forwarded (training batches plus the scheme's scoring
    passes), ``B`` examples back-propagated and ``r`` the cost of a backward in forwards:
    the benchmark measures ``r`` on its own model once per sweep
    (:func:`isample.bench.harness.measure_step_costs`); 2 is the textbook rule.

    Returns:
        float, forward-equivalent examples.
    """
    return float(forward_examples) + float(backward_cost) * float(backward_examples)


def smooth(y: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean of the last ``window`` values at every point (fewer at the start).

    .. math::

        \bar y_j = \frac{1}{j - \\max(0, j - w + 1) + 1} \\sum_{i = \\max(0, j - w + 1)}^{j} y_i

    A non-finite value makes every mean that contains it ``inf`` (a diverged run stays
    diverged). Causal: ``\bar y_j`` uses no value after ``j``, so a time-to-target read on
    the smoothed curve is never earlier than the evaluations that support it.

    Returns:
        float64 array of the same length as ``y``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"The 'window' parameter of smooth must be an int >= 1. Got {window!r}.")
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(ya)
    clean = np.where(bad, 0.0, ya)
    c = np.concatenate([[0.0], np.cumsum(clean)])
    nb = np.concatenate([[0], np.cumsum(bad)])
    j = np.arange(ya.size)
    lo = np.maximum(0, j - window + 1)
    out = (c[j + 1] - c[lo]) / (j + 1 - lo)
    out[(nb[j + 1] - nb[lo]) > 0] = np.inf
    return out


def smoothed_final(y: Sequence[float], window: int) -> float:
    """Mean of the last ``window`` values (``inf`` if any is non-finite): a robust final value."""
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if ya.size == 0:
        return math.nan
    return float(smooth(ya, window)[-1])


def time_to_accuracy(x: Sequence[float], accuracy: Sequence[float], target: float) -> float:
    """First ``x`` at which an accuracy curve reaches ``accuracy >= target`` (linear interpolant).

    The curve of errors ``1 - accuracy`` is read with :func:`time_to_target` (``log=False``).

    Returns:
        float: the crossing point; ``inf`` if never reached (non-finite accuracies never reach).
    """
    acc = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    err = np.where(np.isfinite(acc), 1.0 - acc, np.inf)
    return time_to_target(x, err, 1.0 - float(target), log=False)


def extend_grid(grid: Sequence[float], index: int, limit: int | None = None) -> float | None:
    """The next learning rate to try when the choice sits at an edge of the grid.

    The grid (sorted ascending) is extended geometrically by the ratio of its two outer
    points on that side: below ``grid[0]`` by ``grid[0]^2 / grid[1]``, above ``grid[-1]`` by
    ``grid[-1]^2 / grid[-2]``.

    Args:
        grid: learning rates tried so far, ascending, at least two.
        index: the chosen one.
        limit: None, or the number of points the grid may reach (no extension beyond).

    Returns:
        The new learning rate, or None when the choice is inside the grid (or the limit is reached).
    """
    g = [float(v) for v in grid]
    if len(g) < 2 or any(b <= a for a, b in zip(g, g[1:], strict=False)):
        raise ValueError(f"extend_grid: 'grid' must be ascending with at least two points. Got {g!r}.")
    if limit is not None and len(g) >= limit:
        return None
    if index == 0:
        return g[0] * g[0] / g[1]
    if index == len(g) - 1:
        return g[-1] * g[-1] / g[-2]
    return None


def schedule_factor(schedule: str, progress: float) -> float:
    """Learning-rate factor of a schedule at training progress ``t`` in [0, 1].

    .. math::

        \text{constant}: 1, \\qquad \text{cosine}: \tfrac12 (1 + \\cos \\pi t), \\qquad
        \text{linear}: 1 - t

    ``t`` is the step divided by the step budget (or elapsed training seconds divided by
    the seconds budget), clipped to [0, 1].

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}. Valid schedules: {', '.join(SCHEDULES)}.")
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    return 1.0


def _curve(x: Sequence[float], y: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float64).reshape(-1)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if xa.shape != ya.shape:
        raise ValueError(f"{name}: 'x' and 'y' must have the same length. Got {xa.size} and {ya.size}.")
    if xa.size == 0:
        raise ValueError(f"{name}: the curve is empty.")
    if np.isnan(xa).any() or (np.diff(xa) < 0).any():
        raise ValueError(f"{name}: 'x' must be non-decreasing and free of NaN.")
    return xa, ya


def interpolate(x: Sequence[float], y: Sequence[float], at: float, log: bool = True) -> float:
    """Value of the curve ``y(x)`` at ``x = at``.

    Args:
        x: non-decreasing resource axis, shape (n,).
        y: values at ``x``, shape (n,); must be > 0 when ``log`` is True. Non-finite values
            (a diverged run) make the result ``inf`` at and after them.
        at: where to read the curve.
        log: interpolate ``log y`` linearly (default) instead of ``y``.

    Returns:
        float: the interpolated value; ``nan`` when ``at`` lies outside ``[x[0], x[-1]]``.
        When several points share ``x == at``, the last one is used.

    .. math::

        y(a) = \\exp\\big((1 - t) \\log y_j + t \\log y_{j+1}\\big), \\qquad
        t = \\frac{a - x_j}{x_{j+1} - x_j}
    """
    xa, ya = _curve(x, y, "interpolate")
    a = float(at)
    if math.isnan(a) or a < xa[0] or a > xa[-1]:
        return math.nan
    ya = np.where(np.isfinite(ya), ya, np.inf)
    if log and (ya <= 0).any():
        raise ValueError("interpolate: 'y' must be > 0 for log-linear interpolation.")
    hits = np.nonzero(xa == a)[0]
    if hits.size:
        return float(ya[hits[-1]])
    j = int(np.searchsorted(xa, a, side="right")) - 1
    lo, hi = ya[j], ya[j + 1]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return math.inf
    t = (a - xa[j]) / (xa[j + 1] - xa[j])
    if log:
        return float(math.exp((1.0 - t) * math.log(lo) + t * math.log(hi)))
    return float((1.0 - t) * lo + t * hi)


def time_to_target(x: Sequence[float], y: Sequence[float], target: float, log: bool = True) -> float:
    """First ``x`` at which the curve reaches ``y <= target``.

    Between the last measured point above the target and the first at or below it, the
    crossing is found on the log-linear interpolant:

    .. math::

        x^* = x_j + (x_{j+1} - x_j) \\frac{\\log y_j - \\log T}{\\log y_j - \\log y_{j+1}}

    Args:
        x: non-decreasing resource axis, shape (n,).
        y: loss values, shape (n,), > 0 (non-finite values never reach the target).
        target: the target loss T (> 0 when ``log``).
        log: use the log-linear interpolant (default) or the linear one.

    Returns:
        float: the crossing point; ``x[0]`` if the curve starts at or below the target;
        ``inf`` if it never gets there.
    """
    xa, ya = _curve(x, y, "time_to_target")
    t = float(target)
    if math.isnan(t):
        raise ValueError("time_to_target: 'target' must not be NaN.")
    if log and t <= 0:
        raise ValueError(f"time_to_target: 'target' must be > 0 for log interpolation. Got {t!r}.")
    ya = np.where(np.isfinite(ya), ya, np.inf)
    below = np.nonzero(ya <= t)[0]
    if below.size == 0:
        return math.inf
    k = int(below[0])
    if k == 0:
        return float(xa[0])
    lo, hi = ya[k - 1], ya[k]
    if not math.isfinite(lo):
        return float(xa[k])
    if log:
        frac = (math.log(lo) - math.log(t)) / (math.log(lo) - math.log(hi))
    else:
        frac = (lo - t) / (lo - hi)
    return float(xa[k - 1] + frac * (xa[k] - xa[k - 1]))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum over seeds.

    NaN entries (not measured) are dropped; ``inf`` (never reached, diverged) is kept, so a
    median can be ``inf``.

    Returns:
        ``{"median": float, "min": float, "max": float, "n": int}`` (all ``nan``, n = 0, if
        nothing is left).
    """
    v = np.asarray([float(u) for u in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def select_learning_rate(
    learning_rates: Sequence[float], val_losses: Sequence[float], rtol: float = 1e-3
) -> tuple[float, int]:
    """Choose the learning rate with the lowest validation loss.

    Rules: non-finite losses (diverged runs) are out. Among the rest, every learning rate
    whose loss is within a relative tolerance of the best,

    .. math::

        L(\\eta) \\le L_{min} (1 + \\mathrm{rtol}),

    counts as tied, and the tie goes to the *smallest* such learning rate (the
    conservative choice: the measured runs are longer than the tuning runs). If every
    run diverged, the smallest learning rate of the grid is returned.

    Args:
        learning_rates: the grid, shape (k,), > 0 (any order).
        val_losses: final validation loss of each, shape (k,).
        rtol: relative tie tolerance (>= 0, default 1e-3).

    Returns:
        ``(learning_rate, index)`` of the choice in the given grid.
    """
    lrs = np.asarray(learning_rates, dtype=np.float64).reshape(-1)
    losses = np.asarray(val_losses, dtype=np.float64).reshape(-1)
    if lrs.size == 0 or lrs.shape != losses.shape:
        raise ValueError(
            "select_learning_rate: 'learning_rates' and 'val_losses' must be non-empty and of equal "
            f"length. Got {lrs.size} and {losses.size}."
        )
    if isinstance(rtol, bool) or not math.isfinite(float(rtol)) or rtol < 0:
        raise ValueError(f"The 'rtol' parameter of select_learning_rate must be a float >= 0. Got {rtol!r}.")
    finite = np.isfinite(losses)
    if not finite.any():
        idx = int(np.argmin(lrs))
        return float(lrs[idx]), idx
    best = float(losses[finite].min())
    tied = finite & (losses <= best + abs(best) * float(rtol))
    candidates = np.nonzero(tied)[0]
    idx = int(candidates[np.argmin(lrs[candidates])])
    return float(lrs[idx]), idx
