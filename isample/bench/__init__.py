"""``isample.bench``: benchmark sampling schemes x optimizers on real data.

Run it from the command line (``isample bench --help``) or from Python::

    from isample.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(schemes=("uniform", "kf"), seeds=(0, 1)), "out/")

Modules: :mod:`.datasets` (built-in and user datasets; :mod:`.mnist1d` generates MNIST-1D
locally), :mod:`.models`, :mod:`.harness`
(one training run, the configuration), :mod:`.tuning` (learning rate per scheme and
optimizer), :mod:`.curves` (interpolation, time-to-target, learning-rate choice: pure
functions), :mod:`.report` (summary, Markdown, JSON, CSV), :mod:`.plots` (PNG) and
:mod:`.sweep` (:func:`run_bench`). See ``docs/bench.md``.
"""

from __future__ import annotations

from .curves import (
    compute_units,
    extend_grid,
    interpolate,
    schedule_factor,
    select_learning_rate,
    smooth,
    spread,
    time_to_accuracy,
    time_to_target,
)
from .datasets import BenchData, available_datasets, load_dataset
from .harness import (
    BenchConfig,
    available_optimizers,
    measure_step_costs,
    parse_budget,
    quick_config,
    run_plan,
    train_run,
)
from .mnist1d import make_mnist1d
from .models import available_models, build_model
from .report import SCHEMA_VERSION, summarize, verdicts
from .sweep import run_bench, validate_config
from .tuning import tune_learning_rate

__all__ = [
    "BenchConfig",
    "BenchData",
    "SCHEMA_VERSION",
    "available_datasets",
    "available_models",
    "available_optimizers",
    "build_model",
    "compute_units",
    "extend_grid",
    "interpolate",
    "load_dataset",
    "make_mnist1d",
    "measure_step_costs",
    "parse_budget",
    "quick_config",
    "run_bench",
    "run_plan",
    "schedule_factor",
    "select_learning_rate",
    "smooth",
    "spread",
    "summarize",
    "time_to_accuracy",
    "time_to_target",
    "train_run",
    "tune_learning_rate",
    "validate_config",
    "verdicts",
]
