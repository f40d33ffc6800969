"""``run_bench``: validate a configuration, tune, measure, summarise and write every output."""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .datasets import available_datasets, load_dataset
from .harness import (
    OPTIMIZERS,
    BenchConfig,
    _registry,
    available_optimizers,
    machine_info,
    parse_budget,
    resolve_schemes,
    train_run,
)
from .models import MODELS, available_models, build_model
from .plots import matplotlib_available, write_plots
from .report import SCHEMA_VERSION, summarize, write_csv, write_json, write_report
from .tuning import tune_learning_rate

__all__ = ["run_bench", "validate_config"]


def validate_config(config: BenchConfig, registry: Any = None) -> BenchConfig:
    """Check every name and number of ``config`` before any work; returns a normalised copy.

    Raises:
        ValueError: an unknown scheme, optimizer, model or dataset (the message lists the
            valid names), or a bad number.
    """
    registry = registry if registry is not None else _registry()
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
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"The '{name}' setting must be an int >= {minimum}. Got {value!r}.")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ValueError(f"The 'seeds' must be ints >= 0. Got {list(config.seeds)!r}.")
    if not 0 < config.tune_fraction <= 1:
        raise ValueError(f"The 'tune_fraction' setting must be in (0, 1]. Got {config.tune_fraction!r}.")
    parse_budget(config.budget)
    try:
        torch.device(config.device)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {config.device!r}: {exc}") from exc
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
    # fail before any training when the model does not fit the data (e.g. cnn on non-images)
    build_model(config.model, int(math.prod(data.input_shape)), data.num_classes, 0, "meta", data.image_shape)
    kind, amount = parse_budget(config.budget)

    n_grid = sum(len(config.lr_grids[o]) for o in config.optimizers) if config.tune else 0
    n_tune = n_grid * len(config.schemes)
    n_measure = len(config.schemes) * len(config.optimizers) * len(config.seeds)
    bar = _progress(config, kind, amount, n_tune, n_measure)

    def tick(step: int) -> None:
        if bar is not None and kind == "steps":
            bar.update(1)

    tuning: dict[str, dict[str, Any]] = {}
    try:
        for opt in config.optimizers:
            tuning[opt] = {}
            for scheme in config.schemes:
                if bar is not None:
                    bar.set_description(f"tune {scheme}/{opt}")
                before = bar.n if bar is not None else 0
                result = tune_learning_rate(data, config, scheme, opt, registry=registry, on_step=tick)
                tuning[opt][scheme] = result
                if bar is not None and config.tune:
                    if kind == "steps":  # a diverged tuning run stops early: skip its remaining steps
                        expected = len(result["grid"]) * max(1, int(round(amount * config.tune_fraction)))
                        bar.update(max(0, before + expected - bar.n))
                    else:
                        bar.update(len(result["grid"]))
        runs: list[dict[str, Any]] = []
        for seed in config.seeds:
            for opt in config.optimizers:
                for scheme in config.schemes:
                    if bar is not None:
                        bar.set_description(f"run {scheme}/{opt}/seed {seed}")
                    before = bar.n if bar is not None else 0
                    run = train_run(
                        data,
                        config,
                        scheme,
                        opt,
                        tuning[opt][scheme]["chosen"],
                        seed,
                        registry=registry,
                        on_step=tick,
                    )
                    runs.append(run)
                    if bar is not None:
                        bar.update(max(0, before + int(amount) - bar.n) if kind == "steps" else 1)
    finally:
        if bar is not None:
            bar.close()

    summary = summarize(runs, tuning)
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
            if t["tuned"] and t["index"] in (0, len(t["grid"]) - 1) and len(t["grid"]) > 2:
                notes.append(
                    f"the tuned learning rate of {scheme}/{opt} is at the edge of its grid ({t['chosen']:g})."
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
        "schemes": {s: _describe(registry, s) for s in config.schemes},
        "tuning": tuning,
        "runs": runs,
        "summary": summary,
        "plots": plots,
        "notes": notes,
    }
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started
    results["machine"]["load_average_start"] = load_start
    results["machine"]["load_average_end"] = results["machine"].pop("load_average")
    write_csv(runs, out / "results.csv")
    write_report(results, out / "report.md")
    write_json(results, out / "results.json")
    return results


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
