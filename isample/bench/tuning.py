"""Learning-rate tuning per (scheme, optimizer) on the validation split.

For every (scheme, optimizer) pair, one run per learning rate of the optimizer's grid is
trained with the measured runs' budget and learning-rate schedule (:func:`run_plan`;
``tune_fraction`` 1 by default), seed ``10000 + first seed`` so no measured run is
reused, and its *smoothed* final validation loss recorded: the mean of the last
``config.smooth`` evaluations. The choice follows
:func:`isample.bench.curves.select_learning_rate`: lowest validation loss; losses within
``tie_rtol`` (relative) of the best tie, and the smallest tied learning rate wins;
diverged runs (non-finite loss) are excluded; if all diverge, the smallest learning rate
is used and the report says so. A choice at an edge of the grid extends the grid
geometrically (:func:`isample.bench.curves.extend_grid`) and tries again, until the choice
is inside the grid or the grid has ``config.max_grid`` points (the report notes a choice
still at an edge).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from .curves import extend_grid, select_learning_rate, smoothed_final
from .datasets import BenchData
from .harness import TUNING_SEED_OFFSET, BenchConfig, run_plan, train_run

__all__ = ["tune_learning_rate"]


def tune_learning_rate(
    data: BenchData,
    config: BenchConfig,
    scheme: str,
    optimizer: str,
    *,
    registry: Any = None,
    on_step: Callable[[int], None] | None = None,
    backward_cost: float = 2.0,
) -> dict[str, Any]:
    """Tune the learning rate of ``scheme`` with ``optimizer`` on the validation split.

    Returns:
        dict with ``grid`` (list of float), ``val_loss`` (final validation loss of each,
        ``None`` if diverged), ``val_accuracy``, ``diverged`` (list of bool), ``chosen``
        (float), ``index`` (int, into ``grid``), ``all_diverged`` (bool), ``at_edge``
        (bool: the choice is still at an edge of a grid of > 2 points), ``extended`` (the
        learning rates added), ``seed`` and ``steps`` (of each tuning run), ``seconds``
        (training seconds of each), ``plan`` (the tuning runs' budget and schedule).
    """
    grid = [float(v) for v in config.lr_grids[optimizer]]
    seed = TUNING_SEED_OFFSET + int(config.seeds[0])
    if not config.tune:
        index = len(grid) // 2 if len(grid) > 1 else 0
        index = min(index, len(grid) - 1)
        return {
            "grid": grid,
            "val_loss": [None] * len(grid),
            "val_accuracy": [None] * len(grid),
            "diverged": [False] * len(grid),
            "chosen": grid[index],
            "index": index,
            "all_diverged": False,
            "at_edge": False,
            "extended": [],
            "plan": run_plan(config, tuning=True),
            "tuned": False,
            "seed": seed,
            "steps": [0] * len(grid),
            "seconds": [0.0] * len(grid),
        }
    tried: dict[float, dict[str, Any]] = {}
    plan = run_plan(config, tuning=True)

    def run_one(lr: float) -> None:
        with warnings.catch_warnings():
            # a diverging grid point makes schemes warn about NaN scores; divergence is recorded
            warnings.simplefilter("ignore", RuntimeWarning)
            run = train_run(
                data,
                config,
                scheme,
                optimizer,
                lr,
                seed,
                tuning=True,
                registry=registry,
                on_step=on_step,
                backward_cost=backward_cost,
            )
        bad = run["diverged"]
        val = smoothed_final([p["val_loss"] for p in run["curve"]], config.smooth)
        acc = smoothed_final([p["val_accuracy"] for p in run["curve"]], config.smooth)
        bad = bad or not math.isfinite(val)
        tried[lr] = {
            "val_loss": None if bad else val,
            "val_accuracy": None if bad else acc,
            "diverged": bool(bad),
            "steps": run["steps"],
            "seconds": run["train_seconds"],
        }

    for lr in sorted(set(grid)):
        run_one(lr)
    extended: list[float] = []
    while True:
        grid = sorted(tried)
        losses = [tried[lr]["val_loss"] for lr in grid]
        chosen, index = select_learning_rate(
            grid, [math.inf if v is None else v for v in losses], rtol=config.tie_rtol
        )
        if len(grid) < 2 or all(tried[lr]["diverged"] for lr in grid):
            break
        new = extend_grid(grid, index, limit=max(config.max_grid, len(config.lr_grids[optimizer])))
        if new is None:
            break
        new = float(f"{new:.3g}")
        if new in tried or new <= 0:
            break
        extended.append(new)
        run_one(new)
    all_diverged = all(tried[lr]["diverged"] for lr in grid)
    return {
        "grid": grid,
        "val_loss": losses,
        "val_accuracy": [tried[lr]["val_accuracy"] for lr in grid],
        "diverged": [tried[lr]["diverged"] for lr in grid],
        "chosen": chosen,
        "index": index,
        "all_diverged": all_diverged,
        "at_edge": bool(len(grid) > 2 and index in (0, len(grid) - 1) and not all_diverged),
        "extended": extended,
        "plan": plan,
        "tuned": True,
        "seed": seed,
        "steps": [tried[lr]["steps"] for lr in grid],
        "seconds": [tried[lr]["seconds"] for lr in grid],
    }
