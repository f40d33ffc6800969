"""``run_bench``: validate a configuration, tune, measure, summarise and write every output."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .curves import SCHEDULES
from .datasets import available_datasets, load_dataset
from .harness import (
    OPTIMIZERS,
    BenchConfig,
    _registry,
    available_optimizers,
    machine_info,
    measure_step_costs,
    parse_budget,
    resolve_schemes,
    train_run,
)
from .models import MODELS, available_models, build_model
from .plots import matplotlib_available, write_plots
from .report import SCHEMA_VERSION, summarize, write_csv, write_json, write_report
from .tuning import tune_learning_rate

__all__ = ["check_device", "run_bench", "validate_config"]


def check_device(name: str) -> torch.device:
    """The torch device ``name``, checked to exist on this machine (CUDA index, MPS).

    Raises:
        ValueError: an unknown device string, or one this machine does not have.
    """
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"The device {name!r} was requested but CUDA is not available here.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"The device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"The device {name!r} was requested but MPS is not available here.")
    return device


def validate_config(config: BenchConfig, registry: Any = None) -> BenchConfig:
    """Check every name and number of ``config`` before any work; returns a normalised copy.

    Raises:
        ValueError: an unknown scheme, optimizer, model or dataset (the message lists the
            valid names), or a bad number.
    """
    registry = registry if registry is not None else _registry()
    unknown = [k for k in config.lr_grids if k not in OPTIMIZERS]
    if unknown:
        raise ValueError(
            f"Unknown optimizer {unknown[0]!r} in the learning-rate grids. Valid optimizers: "
            f"{', '.join(available_optimizers())}."
        )
    if config.noise_optimizers is None and config.optimizers:
        config.noise_optimizers = ("adam",) if "adam" in config.optimizers else (config.optimizers[-1],)
    for opt in config.noise_optimizers or ():
        if opt not in config.optimizers:
            raise ValueError(
                f"The label-noise optimizer {opt!r} is not among the optimizers {list(config.optimizers)}; "
                "its learning rate is tuned in the main sweep."
            )
    if config.schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {config.schedule!r}. Valid schedules: {', '.join(SCHEDULES)}.")
    if config.noise_dataset is not None and (
        ":" not in config.noise_dataset and config.noise_dataset not in available_datasets()
    ):
        raise ValueError(
            f"Unknown dataset {config.noise_dataset!r}. Valid datasets: {', '.join(available_datasets())}."
        )
    for opt in config.optimizers:
        if opt not in OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {opt!r}. Valid optimizers: {', '.join(available_optimizers())}."
            )
        if opt not in config.lr_grids or not config.lr_grids[opt]:
            raise ValueError(f"No learning-rate grid for optimizer {opt!r}.")
    if config.model not in MODELS:
        raise ValueError(f"Unknown model {config.model!r}. Valid models: {', '.join(available_models())}.")
    if ":" not in config.dataset and config.dataset not in available_datasets():
        raise ValueError(
            f"Unknown dataset {config.dataset!r}. Valid datasets: {', '.join(available_datasets())} "
            "(or a user dataset as 'module:function')."
        )
    if not config.optimizers:
        raise ValueError("The 'optimizers' list is empty.")
    if not config.seeds:
        raise ValueError("The 'seeds' list is empty.")
    for name, value, minimum in (
        ("batch_size", config.batch_size, 1),
        ("eval_every", config.eval_every, 1),
        ("quality_every", config.quality_every, 0),
        ("probe_size", config.probe_size, 2),
        ("smooth", config.smooth, 1),
        ("max_grid", config.max_grid, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"The '{name}' setting must be an int >= {minimum}. Got {value!r}.")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ValueError(f"The 'seeds' must be ints >= 0. Got {list(config.seeds)!r}.")
    if not 0 < config.tune_fraction <= 1:
        raise ValueError(f"The 'tune_fraction' setting must be in (0, 1]. Got {config.tune_fraction!r}.")
    if config.train_eval_size is not None and (
        isinstance(config.train_eval_size, bool)
        or not isinstance(config.train_eval_size, int)
        or config.train_eval_size < 1
    ):
        raise ValueError(
            f"The 'train_eval_size' setting must be an int >= 1 or None. Got {config.train_eval_size!r}."
        )
    parse_budget(config.budget)
    check_device(config.device)
    config.schemes = tuple(resolve_schemes(config.schemes, registry))
    config.seeds = tuple(dict.fromkeys(int(s) for s in config.seeds))
    return config


def run_bench(
    config: BenchConfig,
    out_dir: str | Path,
    *,
    registry: Any = None,
    command: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Tune and measure every (scheme, optimizer, seed) and write the outputs into ``out_dir``.

    Writes ``report.md``, ``results.json``, ``results.csv`` and the PNG plots (when
    matplotlib is installed).

    Args:
        config: the sweep (see :class:`BenchConfig`).
        out_dir: output folder (created if needed).
        registry: the schemes registry (default :mod:`isample.schemes`).
        command: the command line, for the report.

    Returns:
        The results dict that was written to ``results.json`` (before JSON conversion).
    """
    registry = registry if registry is not None else _registry()
    config = validate_config(config, registry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpu_started = time.process_time()
    load_start = machine_info(config.device)["load_average"]
    data = load_dataset(config.dataset, config.data_seed)
    noise_data = load_dataset(config.noise_dataset, config.data_seed) if config.noise_dataset else None
    for d in (data, noise_data):
        if d is not None and config.batch_size > int(d.x_train.shape[0]):
            raise ValueError(
                f"The 'batch_size' setting ({config.batch_size}) is larger than the training set of "
                f"{d.name!r} ({int(d.x_train.shape[0])} examples); every step would see the whole set."
            )
    # fail before any training when the model does not fit the data (e.g. cnn on non-images)
    build_model(config.model, int(math.prod(data.input_shape)), data.num_classes, 0, "meta", data.image_shape)
    kind, amount = parse_budget(config.budget)
    costs = _measure_costs(config, data)
    r = costs["backward_cost"] if math.isfinite(costs["backward_cost"]) else 2.0

    n_grid = sum(len(config.lr_grids[o]) for o in config.optimizers) if config.tune else 0
    n_tune = n_grid * len(config.schemes)
    n_measure = (
        len(config.schemes)
        * len(config.seeds)
        * (len(config.optimizers) + (len(config.noise_optimizers) if noise_data is not None else 0))
    )
    bar = _progress(config, kind, amount, n_tune, n_measure)

    def tick(step: int) -> None:
        if bar is not None and kind == "steps":
            bar.update(1)

    def finish_run(before: int) -> None:  # a diverged run stops early: skip its remaining steps
        if bar is not None:
            bar.update(max(0, before + int(amount) - bar.n) if kind == "steps" else 1)

    tuning: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    noise_runs: list[dict[str, Any]] = []
    try:
        for opt in config.optimizers:
            tuning[opt] = {}
            for scheme in config.schemes:
                if bar is not None:
                    bar.set_description(f"tune {scheme}/{opt}")
                result = tune_learning_rate(
                    data, config, scheme, opt, registry=registry, on_step=tick, backward_cost=r
                )
                tuning[opt][scheme] = result

        def measure(
            run_data: Any, run_config: BenchConfig, optimizers: Any, label: str
        ) -> list[dict[str, Any]]:
            """Every seed x optimizer x scheme run, with the tuned learning rates."""
            out_runs = []
            for seed in config.seeds:
                for opt in optimizers:
                    for scheme in config.schemes:
                        if bar is not None:
                            bar.set_description(f"{label}{scheme}/{opt}/seed {seed}")
                        before = bar.n if bar is not None else 0
                        lr = tuning[opt][scheme]["chosen"]
                        out_runs.append(
                            train_run(
                                run_data,
                                run_config,
                                scheme,
                                opt,
                                lr,
                                seed,
                                registry=registry,
                                on_step=tick,
                                backward_cost=r,
                            )
                        )
                        finish_run(before)
            return out_runs

        runs = measure(data, config, config.optimizers, "run ")
        if noise_data is not None:
            noise_config = dataclasses.replace(config, quality_every=0)
            noise_runs = measure(noise_data, noise_config, config.noise_optimizers, "label noise ")
    finally:
        if bar is not None:
            bar.close()

    summary = summarize(runs, tuning, smooth=config.smooth)
    noise_summary = summarize(noise_runs, tuning, smooth=config.smooth) if noise_runs else {}
    notes = []
    plots: list[str] = []
    if not config.plots:
        notes.append("plots were switched off (--no-plots).")
    elif matplotlib_available():
        plots = write_plots(runs, out)
    else:
        notes.append(
            "matplotlib is not installed, so no plots were drawn; install the bench extra "
            "(pip install 'isample[bench]') to get them."
        )
    diverged = [f"{r['scheme']}/{r['optimizer']}/seed {r['seed']}" for r in runs if r["diverged"]]
    if diverged:
        notes.append("diverged runs (loss counted as inf after divergence): " + ", ".join(diverged))
    for opt, per in tuning.items():
        for scheme, t in per.items():
            if t["tuned"] and t.get("at_edge"):
                notes.append(
                    f"the tuned learning rate of {scheme}/{opt} is still at the edge of its grid "
                    f"({t['chosen']:g}) after extending it to {len(t['grid'])} points (--max-grid)."
                )
    if config.tune and config.tune_fraction < 1:
        notes.append(
            f"tuning runs lasted {config.tune_fraction:g} of the measured budget (--tune-fraction); a "
            "learning rate chosen on shorter runs can be too large for the full budget."
        )
    if isinstance(command, (list, tuple)):
        command = " ".join(str(c) for c in command)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "isample_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or "isample bench",
        "wall_seconds": math.nan,
        "cpu_seconds": math.nan,
        "config": config.to_dict(),
        "budget": {"kind": kind, "amount": amount, "text": _budget_text(kind, amount)},
        "machine": machine_info(config.device),
        "dataset": data.summary(),
        "noise_dataset": noise_data.summary() if noise_data is not None else None,
        "costs": costs,
        "schemes": {s: _describe(registry, s) for s in config.schemes},
        "tuning": tuning,
        "runs": runs,
        "summary": summary,
        "noise_runs": noise_runs,
        "noise_summary": noise_summary,
        "plots": plots,
        "notes": notes,
    }
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started
    results["machine"]["load_average_start"] = load_start
    results["machine"]["load_average_end"] = results["machine"].pop("load_average")
    write_csv(runs + noise_runs, out / "results.csv")
    write_report(results, out / "report.md")
    write_json(results, out / "results.json")
    return results


def _measure_costs(config: BenchConfig, data: Any) -> dict[str, Any]:
    """The measured cost model: forward and backward of a fresh benchmark model on one batch."""
    device = torch.device(config.device)
    model = build_model(
        config.model, int(math.prod(data.input_shape)), data.num_classes, 0, device, data.image_shape
    )
    model.train()
    b = min(config.batch_size, int(data.x_train.shape[0]))
    x, y = data.x_train[:b].to(device), data.y_train[:b].to(device)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    costs = measure_step_costs(model, loss_fn, x, y)
    costs["clock"] = "process CPU time" if device.type == "cpu" else "wall clock (synchronised)"
    return costs


def _budget_text(kind: str, amount: float) -> str:
    return f"{int(amount)} steps" if kind == "steps" else f"{amount:g} s of training"


def _describe(registry: Any, name: str) -> dict[str, Any]:
    try:
        info = registry.describe(name)
    except Exception as exc:  # describe is informative only
        return {"error": str(exc)}
    if not isinstance(info, dict):
        return {"description": str(info)}
    return {
        k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
    }


def _progress(config: BenchConfig, kind: str, amount: float, n_tune: int, n_measure: int) -> Any:
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    if kind == "steps":
        tune_steps = max(1, int(round(amount * config.tune_fraction)))
        total = n_tune * tune_steps + n_measure * int(amount)
        return tqdm(total=total, unit="step", desc="isample bench", dynamic_ncols=True, mininterval=0.5)
    return tqdm(
        total=n_tune + n_measure, unit="run", desc="isample bench", dynamic_ncols=True, mininterval=0.5
    )
