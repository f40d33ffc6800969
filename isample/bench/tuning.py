"""Learning-rate tuning per (scheme, optimizer) on the validation split.

For every (scheme, optimizer) pair, one short run per learning rate of the optimizer's
grid (``tune_fraction`` of the measured budget, seed ``10000 + first seed`` so no
measured run is reused) is trained and its final *validation* loss recorded. The choice
follows :func:`isample.bench.curves.select_learning_rate`: lowest validation loss;
losses within ``tie_rtol`` (relative) of the best tie, and the smallest tied learning
rate wins; diverged runs (non-finite loss) are excluded; if all diverge, the smallest
learning rate is used and the report says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .curves import select_learning_rate
from .datasets import BenchData
from .harness import TUNING_SEED_OFFSET, BenchConfig, train_run

__all__ = ["tune_learning_rate"]


def tune_learning_rate(
    data: BenchData,
    config: BenchConfig,
    scheme: str,
    optimizer: str,
    *,
    registry: Any = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tune the learning rate of ``scheme`` with ``optimizer`` on the validation split.

    Returns:
        dict with ``grid`` (list of float), ``val_loss`` (final validation loss of each,
        ``None`` if diverged), ``val_accuracy``, ``diverged`` (list of bool), ``chosen``
        (float), ``index`` (int, into ``grid``), ``all_diverged`` (bool), ``seed`` and
        ``steps`` (of each tuning run), ``seconds`` (training seconds of each).
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
            "tuned": False,
            "seed": seed,
            "steps": [0] * len(grid),
            "seconds": [0.0] * len(grid),
        }
    losses, accs, diverged, steps, seconds = [], [], [], [], []
    for lr in grid:
        with warnings.catch_warnings():
            # a diverging grid point makes schemes warn about NaN scores; divergence is recorded
            warnings.simplefilter("ignore", RuntimeWarning)
            run = train_run(
                data, config, scheme, optimizer, lr, seed, tuning=True, registry=registry, on_step=on_step
            )
        last = run["curve"][-1]
        bad = run["diverged"]
        losses.append(None if bad else float(last["val_loss"]))
        accs.append(None if bad else float(last["val_accuracy"]))
        diverged.append(bool(bad))
        steps.append(run["steps"])
        seconds.append(run["train_seconds"])
    chosen, index = select_learning_rate(
        grid, [float("inf") if v is None else v for v in losses], rtol=config.tie_rtol
    )
    return {
        "grid": grid,
        "val_loss": losses,
        "val_accuracy": accs,
        "diverged": diverged,
        "chosen": chosen,
        "index": index,
        "all_diverged": all(diverged),
        "tuned": True,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
    }
