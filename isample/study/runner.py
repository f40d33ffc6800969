"""``run_study``: validate a :class:`StudyConfig`, run experiments A-C and write every output.

Outputs (``out_dir``): ``report.md``, ``results.json`` (schema in ``docs/study.md``),
``results.csv`` (one row per analysed item, columns :data:`CSV_COLUMNS`) and
``plots/*.png`` (with matplotlib).
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..bench.datasets import available_datasets, load_dataset
from ..bench.harness import (
    BenchConfig,
    _registry,
    available_study_optimizers,
    machine_info,
    train_run,
)
from ..bench.models import MODELS, available_models
from ..bench.sweep import check_device
from .experiments import experiment_a, experiment_b, experiment_c, resolve_scheme

__all__ = [
    "SCHEMA_VERSION",
    "StudyConfig",
    "DEFAULT_LRS",
    "EXPERIMENTS",
    "default_study_optimizers",
    "quick_study_config",
    "validate_study_config",
    "run_study",
]

SCHEMA_VERSION = 1
EXPERIMENTS = ("A", "B", "C")

#: Base learning rate per optimizer (constant schedule; near the rates ``isample bench``
#: tunes on MNIST-1D for uniform sampling, a decade lower with momentum 0.9).
DEFAULT_LRS: dict[str, float] = {
    "sgd": 0.3,
    "sgd-momentum": 0.03,
    "nesterov": 0.03,
    "rmsprop": 1e-3,
    "adam": 3e-3,
    "adam-b1-0": 3e-3,
    "adam-b1-0.99": 3e-3,
    "adam-b1=b2": 3e-3,
    "adamw": 3e-3,
    "brmsprop": 1e-3,
    "badam": 3e-3,
}

_GRID = (
    "sgd",
    "sgd-momentum",
    "nesterov",
    "rmsprop",
    "adam",
    "adam-b1-0",
    "adam-b1-0.99",
    "adam-b1=b2",
    "adamw",
    "brmsprop",
    "badam",
)

#: Experiment B's default optimizers: two per family where the family has two.
_B_GRID = ("sgd", "sgd-momentum", "rmsprop", "adam", "adamw", "brmsprop", "badam")


def default_study_optimizers() -> tuple[str, ...]:
    """The optimizer grid; ``brmsprop`` / ``badam`` only when :mod:`isample.optim` provides them."""
    return tuple(o for o in _GRID if o in available_study_optimizers())


@dataclass
class StudyConfig:
    """Everything that defines a study (stored verbatim in ``results.json``).

    Attributes:
        experiments: which of ``"A"``, ``"B"``, ``"C"`` to run.
        workloads: ``"dataset/model"`` pairs of Experiment B.
        a_workload: the workload of Experiment A (None = the last of ``workloads``).
        c_workload: the workload of Experiment C (None = the last of ``workloads``).
        optimizers: names from :func:`isample.bench.harness.available_study_optimizers`.
        b_optimizers: optimizers of Experiment B (None = all ``optimizers``; names not among
            ``optimizers`` are dropped).
        seeds: seeds of A and B (C uses the first).
        steps: optimizer steps per run of A and B (constant learning rate).
        batch_size: b.
        eval_every: training-loss evaluation every k steps (the curves' resolution).
        quality_every: kappa probe every k steps (the checkpoints of B; a multiple of ``eval_every``).
        probe_size: probe examples.
        train_eval_size: training examples of the loss evaluation.
        lrs: base learning rate per optimizer (default :data:`DEFAULT_LRS`).
        a_scheme: the importance-sampling scheme of Experiment A.
        match_threshold: Experiment A's threshold on the median |log loss ratio|.
        b_schemes: the schemes compared with uniform in Experiment B.
        b_uniform_factor: B's uniform runs last this many times ``steps`` (so they can reach
            the losses the IS runs reach; a level uniform never reaches is censored).
        n_boot: bootstrap resamples of the Spearman intervals.
        c_scheme: the importance-sampling scheme of Experiment C.
        c_table_scheme: the table scheme of Experiment C's ``table`` variants (weights up to
            1 / (N p_min), where a pool scheme's are bounded by its pool).
        c_variants: subset of ``uniform``, ``is``, ``is-clip``, ``is-mean`` (``c_scheme``
            with raw, clipped and mean-normalised weights), ``table``, ``table-clip``.
        c_steps: steps per stability run.
        c_lr_factors: the stability grid, multiples of the optimizer's base learning rate.
        c_search: ``"grid"`` (every grid value; reports whether stability was monotone in
            lr) or ``"bisect"`` (assumes it).
        c_max_weight: weight clip of the ``is-clip`` variant.
        divergence_factor: a run is unstable when a loss is non-finite or above this
            multiple of its initial loss.
        data_seed: data split seed.
        device: torch device.
        threads: ``torch.set_num_threads`` during the study (None = unchanged).
        progress: print one line per run group to stderr.
        plots: draw PNG plots (needs matplotlib).
        quick: the ``--quick`` profile (recorded for the report).
    """

    experiments: tuple[str, ...] = EXPERIMENTS
    workloads: tuple[str, ...] = ("mnist1d/cnn1d", "digits/mlp")
    a_workload: str | None = None
    c_workload: str | None = None
    optimizers: tuple[str, ...] = field(default_factory=default_study_optimizers)
    b_optimizers: tuple[str, ...] | None = field(
        default_factory=lambda: tuple(o for o in _B_GRID if o in available_study_optimizers())
    )
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 160
    batch_size: int = 64
    eval_every: int = 20
    quality_every: int = 40
    probe_size: int = 128
    train_eval_size: int | None = 1000
    lrs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LRS))
    a_scheme: str = "kf-always"
    match_threshold: float = 0.05
    b_schemes: tuple[str, ...] = ("kf-always", "history-is", "history-gradnorm", "selective-backprop")
    b_uniform_factor: int = 2
    n_boot: int = 1000
    c_scheme: str = "kf-always"
    c_table_scheme: str = "history-is"
    c_variants: tuple[str, ...] = ("uniform", "is", "is-clip", "is-mean", "table", "table-clip")
    c_steps: int = 100
    c_lr_factors: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    c_search: str = "grid"
    c_max_weight: float = 3.0
    divergence_factor: float = 3.0
    data_seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    progress: bool = True
    plots: bool = True
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d


def quick_study_config(**overrides: Any) -> StudyConfig:
    """The ``--quick`` profile: SGD and Adam, 60 steps, two B schemes, a 3-point stability grid."""
    base = StudyConfig(
        optimizers=("sgd", "adam"),
        b_optimizers=None,
        steps=60,
        eval_every=10,
        quality_every=20,
        probe_size=64,
        train_eval_size=500,
        b_schemes=("kf-always", "history-is"),
        n_boot=200,
        c_variants=("uniform", "is", "is-clip", "table"),
        seeds=(0,),
        c_steps=40,
        c_lr_factors=(1.0, 10.0, 100.0),
        c_search="bisect",
        quick=True,
    )
    for key, value in overrides.items():
        if not hasattr(base, key):
            raise ValueError(f"Unknown StudyConfig setting {key!r}.")
        setattr(base, key, value)
    return base


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"The '{name}' setting of StudyConfig must be an int >= {minimum}. Got {value!r}.")


def validate_study_config(config: StudyConfig, registry: Any = None) -> StudyConfig:
    """Check every name and number before any training; returns the config (normalised in place).

    Raises:
        ValueError: an unknown experiment, workload, dataset, model, optimizer or scheme (the
            message lists the valid ones), or a bad number.
    """
    registry = registry if registry is not None else _registry()
    config.experiments = tuple(e.strip().upper() for e in config.experiments)
    if not config.experiments:
        raise ValueError("The 'experiments' list is empty; choose from A, B, C.")
    for e in config.experiments:
        if e not in EXPERIMENTS:
            raise ValueError(f"Unknown experiment {e!r}. Valid experiments: A, B, C.")
    if not config.workloads:
        raise ValueError("The 'workloads' list is empty.")
    for w in (*config.workloads, config.a_workload, config.c_workload):
        if w is None:
            continue
        if not isinstance(w, str):
            raise ValueError(f"A workload must be a 'dataset/model' string. Got {w!r}.")
        dataset, sep, model = w.partition("/")
        if not sep or not dataset or not model:
            raise ValueError(f"A workload must be 'dataset/model' (e.g. mnist1d/cnn1d). Got {w!r}.")
        if dataset not in available_datasets():
            raise ValueError(
                f"Unknown dataset {dataset!r} in workload {w!r}. Valid datasets: "
                f"{', '.join(available_datasets())}."
            )
        if model not in MODELS:
            raise ValueError(
                f"Unknown model {model!r} in workload {w!r}. Valid models: {', '.join(available_models())}."
            )
    config.a_workload = config.a_workload or config.workloads[-1]
    config.c_workload = config.c_workload or config.workloads[-1]
    if not config.optimizers:
        raise ValueError("The 'optimizers' list is empty.")
    for o in tuple(config.optimizers) + tuple(config.b_optimizers or ()):
        if o not in available_study_optimizers():
            hint = " (brmsprop / badam need isample.optim)" if o in ("brmsprop", "badam") else ""
            raise ValueError(
                f"Unknown optimizer {o!r}{hint}. Valid optimizers: {', '.join(available_study_optimizers())}."
            )
    for o in config.optimizers:
        lr = config.lrs.get(o)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(
                f"No valid learning rate for optimizer {o!r} in 'lrs' (a float > 0). Got {lr!r}."
            )
    if config.b_optimizers is not None:
        config.b_optimizers = tuple(o for o in config.b_optimizers if o in config.optimizers) or None
    if not config.seeds:
        raise ValueError("The 'seeds' list is empty.")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ValueError(f"The 'seeds' must be ints >= 0. Got {list(config.seeds)!r}.")
    config.seeds = tuple(dict.fromkeys(int(s) for s in config.seeds))
    for name, minimum in (
        ("steps", 2),
        ("batch_size", 1),
        ("eval_every", 1),
        ("quality_every", 1),
        ("probe_size", 2),
        ("n_boot", 1),
        ("c_steps", 1),
        ("b_uniform_factor", 1),
    ):
        _check_int(getattr(config, name), name, minimum)
    if config.quality_every % config.eval_every:
        raise ValueError(
            f"The 'quality_every' setting ({config.quality_every}) must be a multiple of "
            f"'eval_every' ({config.eval_every}): B reads the training loss at every probe."
        )
    if config.train_eval_size is not None:
        _check_int(config.train_eval_size, "train_eval_size", 1)
    for label in (config.a_scheme, config.c_scheme, config.c_table_scheme, *config.b_schemes):
        resolve_scheme(label, registry)
    if "B" in config.experiments and not config.b_schemes:
        raise ValueError("The 'b_schemes' list is empty.")
    if config.c_search not in ("grid", "bisect"):
        raise ValueError(f"The 'c_search' setting must be 'grid' or 'bisect'. Got {config.c_search!r}.")
    for v in config.c_variants:
        if v not in ("uniform", "is", "is-clip", "is-mean", "table", "table-clip"):
            raise ValueError(
                f"Unknown stability variant {v!r}. Valid variants: uniform, is, is-clip, is-mean, table, "
                "table-clip."
            )
    factors = tuple(float(f) for f in config.c_lr_factors)
    if (
        not factors
        or any(not f > 0 or not math.isfinite(f) for f in factors)
        or len(set(factors)) != len(factors)
    ):
        raise ValueError(
            f"The 'c_lr_factors' must be distinct finite floats > 0. Got {list(config.c_lr_factors)!r}."
        )
    for name in ("match_threshold", "c_max_weight"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"The '{name}' setting of StudyConfig must be a float > 0. Got {v!r}.")
    if not config.divergence_factor > 1:
        raise ValueError(f"The 'divergence_factor' setting must be > 1. Got {config.divergence_factor!r}.")
    check_device(config.device)
    return config


def _bench_config(study: StudyConfig, workload: str, steps: int, quality_every: int) -> BenchConfig:
    dataset, _, model = workload.partition("/")
    return BenchConfig(
        dataset=dataset,
        model=model,
        schemes=("uniform",),
        optimizers=tuple(study.optimizers),
        seeds=tuple(study.seeds),
        budget=str(steps),
        batch_size=study.batch_size,
        eval_every=study.eval_every if quality_every else max(1, min(study.eval_every, steps // 6 or 1)),
        quality_every=quality_every,
        probe_size=study.probe_size,
        tune=False,
        schedule="constant",
        lr_grids={},
        train_eval_size=study.train_eval_size,
        noise_dataset=None,
        device=study.device,
        data_seed=study.data_seed,
        threads=study.threads,
        progress=False,
        plots=False,
    )


def run_study(
    config: StudyConfig,
    out_dir: str | Path | None = None,
    *,
    registry: Any = None,
    command: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the experiments of ``config`` and (when ``out_dir`` is given) write every output.

    Args:
        config: the study (see :class:`StudyConfig`; :func:`quick_study_config` for ``--quick``).
        out_dir: output folder (created); None = compute and return only.
        registry: the schemes registry (default :mod:`isample.schemes`).
        command: the command line, for the report.

    Returns:
        The results dict written to ``results.json`` (before JSON conversion): ``schema_version``,
        ``config``, ``machine``, ``wall_seconds``, ``cpu_seconds``, ``runs`` (training runs),
        ``A``, ``B``, ``C`` (present for the experiments run) and ``plots``.
    """
    from .report import write_outputs

    registry = registry if registry is not None else _registry()
    config = validate_study_config(config, registry)
    started, cpu_started = time.perf_counter(), time.process_time()
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    n_runs = [0]

    def log(text: str) -> None:
        if config.progress:
            print(f"[study {time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
        n_runs[0] += 1
        return train_run(*args, registry=registry, **kwargs)

    machine = machine_info(config.device)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "isample_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if isinstance(command, str) or command is None else " ".join(command),
        "config": config.to_dict(),
        "machine": machine,
    }
    try:
        datasets = {}
        for w in dict.fromkeys((*config.workloads, config.a_workload, config.c_workload)):
            datasets[w] = load_dataset(w.partition("/")[0], config.data_seed)
            if config.batch_size > int(datasets[w].x_train.shape[0]):
                raise ValueError(
                    f"The 'batch_size' ({config.batch_size}) is larger than the training set of {w!r}."
                )
        main = {w: _bench_config(config, w, config.steps, config.quality_every) for w in datasets}
        long = {
            w: _bench_config(config, w, config.steps * config.b_uniform_factor, config.quality_every)
            for w in datasets
        }
        phase: dict[str, float] = {}
        if "A" in config.experiments:
            t0 = time.perf_counter()
            w = config.a_workload
            results["A"] = experiment_a(datasets[w], main[w], config, train, registry, w, log)
            phase["A"] = time.perf_counter() - t0
        if "B" in config.experiments:
            t0 = time.perf_counter()
            b_data = {w: datasets[w] for w in config.workloads}
            results["B"] = experiment_b(b_data, main, long, config, train, registry, log)
            phase["B"] = time.perf_counter() - t0
        if "C" in config.experiments:
            t0 = time.perf_counter()
            w = config.c_workload
            short = _bench_config(config, w, config.c_steps, 0)
            results["C"] = experiment_c(datasets[w], short, config, train, registry, w, log)
            phase["C"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    results["phase_seconds"] = phase
    results["n_runs"] = n_runs[0]
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started
    results["load_average_end"] = machine_info(config.device)["load_average"]
    results["plots"] = []
    if out_dir is not None:
        write_outputs(results, Path(out_dir), plots=config.plots)
    return results
