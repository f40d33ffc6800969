"""Loader throughput: isample's loaders against a plain shuffling DataLoader.

In-memory ``TensorDataset`` (``--n`` examples x ``--dim`` features, 10 classes), batch size
``--batch-size``. Each variant iterates ``--batches`` batches (no training step: this
measures the loader alone) with 0 and 2 workers; the figure is batches per second, the
median over ``--repeats`` timed passes after one warm-up pass (the warm-up also starts
the worker processes, which are persistent). Ratios are against the plain
``DataLoader(shuffle=True)`` with the same worker count, measured in the same run.

Variants:

* ``dataloader``: ``DataLoader(ds, batch_size, shuffle=True)``: the baseline.
* ``table``: ``TableSampler`` + ``ImportanceDataLoader`` with a score fed back for every
  batch (``loader.update(indices, scores)``, as a training loop would), so the sum-tree
  draws are from a non-uniform table.
* ``pool``: ``PoolLoader`` with presample 3 and a cheap scorer (``LossScorer`` of a linear
  model), so the figure includes reading B = 3b examples and one no-grad forward of the
  pool per batch; workers read the pools.

Run ``python benchmarks/bench_loader.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/loader.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from isample import ImportanceDataLoader, LossScorer, PoolLoader, TableSampler

VARIANTS = ("dataloader", "table", "pool")


def make_data(n: int, dim: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(variant: str, ds: TensorDataset, batch_size: int, workers: int, model: nn.Module) -> Any:
    common: dict[str, Any] = {"num_workers": workers}
    if workers:
        common["persistent_workers"] = True
    if variant == "dataloader":
        g = torch.Generator().manual_seed(0)
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, **common)
    if variant == "table":
        sampler = TableSampler(len(ds), batch_size, seed=0)
        return ImportanceDataLoader(ds, sampler, **common)
    if variant == "pool":
        scorer = LossScorer(nn.CrossEntropyLoss(reduction="none"))
        return PoolLoader(ds, model, scorer, batch_size, presample=3.0, always=True, seed=0, **common)
    raise ValueError(f"Unknown variant {variant!r}. Valid variants: {', '.join(VARIANTS)}.")


def time_pass(loader: Any, variant: str, batches: int, epoch: int) -> float:
    """Seconds to draw ``batches`` batches (restarting epochs as needed)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    done = 0
    start = time.perf_counter()
    while done < batches:
        for batch in loader:
            if variant == "table":
                loader.update(batch.indices, batch.inputs[:, 0].abs())
            done += 1
            if done >= batches:
                break
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    ds = make_data(args.n, args.dim)
    model = nn.Linear(args.dim, 10)
    results: list[dict[str, Any]] = []
    for workers in args.workers:
        loaders = {v: make_loader(v, ds, args.batch_size, workers, model) for v in VARIANTS}
        for v in VARIANTS:  # warm-up (and worker start-up)
            time_pass(loaders[v], v, args.batches, 0)
        timings: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]  # rotate to spread drift
            for v in order:
                timings[v].append(time_pass(loaders[v], v, args.batches, r + 1))
        base = statistics.median(timings["dataloader"])
        for v in VARIANTS:
            med = statistics.median(timings[v])
            results.append(
                {
                    "variant": v,
                    "num_workers": workers,
                    "batches_per_second": args.batches / med,
                    "seconds_per_batch": med / args.batches,
                    "ratio_vs_dataloader": base / med,
                    "repeats_seconds": timings[v],
                }
            )
        del loaders
    return {
        "benchmark": "loader",
        "config": {
            "n": args.n,
            "dim": args.dim,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "repeats": args.repeats,
            "workers": list(args.workers),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| variant | workers | batches/s | ms/batch | ratio vs DataLoader (same workers) |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['num_workers']} | {r['batches_per_second']:.0f} | "
            f"{1000 * r['seconds_per_batch']:.3f} | {r['ratio_vs_dataloader']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batches, args.repeats = 2000, 10, 2
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(markdown(report))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
