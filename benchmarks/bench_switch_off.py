"""Step cost of a switched pool scheme while its switch is off, against a uniform step.

Katharopoulos and Fleuret's Algorithm 1 (``kf``, ``score_when_off=False``, the default)
reads only a uniform batch of b while the tau switch is off and takes tau from the
training outputs; the goal is a step within 3% of a uniform step. For reference the
script also times ``kf`` with ``score_when_off=True`` (a pool of 3b read and scored at every
step, the previous behaviour) and ``auto`` (Algorithm 1 with the measured-cost switch and
its timed scoring probes; on this workload it may turn importance sampling on, see
``on_share``).

Workloads (``--workloads``): ``cnn1d``, MNIST-1D-sized synthetic signals (``--n`` examples
of 40 values, 10 classes) and a small 1-D CNN (32-64-64 channels) as in ``docs/bench.md``
(the default ``isample bench`` workload); ``mlp``, the sklearn digits (1,437 training
examples of 64 pixels) and a 64-128-128-10 MLP, a much cheaper step, so a fixed per-step
overhead weighs more. Adam, batch ``--batch-size``, one torch thread. Every variant
runs the full protocol loop of ``isample bench`` (loader, forward, backward, optimizer
step, ``feedback``). ``kf`` gets ``tau_threshold=1e6`` so its switch stays off.

Timing: ``--repeats`` rounds; in each round every variant runs ``--warmup`` untimed steps
then ``--steps`` timed steps, variants in a rotated order. The ratio of a round is the
variant's mean step time over the uniform mean of the same round (means, not medians:
``kf`` and ``auto`` decide every ``tau_every = 16`` steps while off, and the batched
scoring of those steps lands on one of them); the table shows the median ratio over
rounds with [min, max] and the load average.

A second table times the loader and its feedback alone (fixed outputs and losses, no
model work; ``auto`` held off with ``efficiency=0``): the scheme's own CPU microseconds per
step over uniform's, the overhead a step of any size pays.

Run ``python benchmarks/bench_switch_off.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/switch_off.json`` (or ``--out``) and prints a Markdown table.
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
from torch.utils.data import TensorDataset

import isample.schemes as schemes

VARIANTS = ("uniform", "kf (switch off)", "kf score_when_off=True", "auto")


def make_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 40, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    shift = torch.randint(-5, 6, (n,), generator=g)
    x = torch.stack([torch.roll(templates[int(c)], int(s)) for c, s in zip(y, shift, strict=True)])
    x = x + 0.4 * torch.randn(n, 40, generator=g)
    return TensorDataset(x.unsqueeze(1), y)


def make_digits() -> TensorDataset:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _digits import load_digits_split

    x, y, _, _ = load_digits_split(0)
    return TensorDataset(x, y)


def make_model(seed: int = 0, workload: str = "cnn1d") -> nn.Module:
    torch.manual_seed(seed)  # benchmark set-up only: the library never touches global RNG
    if workload == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 10, 10),
    )


def build(variant: str, ds: TensorDataset, model: nn.Module, opt: torch.optim.Optimizer, b: int) -> Any:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if variant == "uniform":
        return schemes.build("uniform", ds, model, loss_fn, b, seed=0)
    if variant == "kf (switch off)":
        return schemes.build("kf", ds, model, loss_fn, b, seed=0, tau_threshold=1e6)
    if variant == "kf score_when_off=True":
        return schemes.build("kf", ds, model, loss_fn, b, seed=0, tau_threshold=1e6, score_when_off=True)
    return schemes.build("auto", ds, model, loss_fn, b, seed=0, optimizer=opt)


def time_steps(
    loader: Any, model: nn.Module, opt: torch.optim.Optimizer, warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per protocol step (loader + forward + backward + optimizer + feedback)."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    times: list[float] = []
    cpu: list[float] = []
    it = iter(loader)
    while len(times) < steps:
        t0 = time.perf_counter()
        c0 = time.process_time()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        out = model(batch.inputs)
        losses = loss_fn(out, batch.targets)
        (batch.weights * losses).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loader.feedback(batch, out.detach(), losses.detach())
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if warmup > 0:
            warmup -= 1
        else:
            times.append(dt)
            cpu.append(dc)
    return times, cpu


def loader_overhead(
    loaders: dict[str, Any], model: nn.Module, ds: TensorDataset, steps: int, rounds: int
) -> dict:
    """CPU microseconds per step of the loader and its feedback alone (no training), interleaved.

    Each variant iterates its loader and hands back fixed outputs and losses (what the
    protocol loop does around the model); the extra over uniform is the scheme's own
    per-step cost, which a step of any size pays. Median over ``rounds`` with [min, max].
    """
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        out = model(ds.tensors[0][:512])
    labels = ds.tensors[1][:512]
    losses = loss_fn(out, labels)
    per: dict[str, list[float]] = {v: [] for v in loaders}
    for r in range(rounds):
        order = list(loaders)[r % len(loaders) :] + list(loaders)[: r % len(loaders)]
        for v in order:
            loader, it, k = loaders[v], iter(loaders[v]), 0
            c0 = time.process_time()
            while k < steps:
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    continue
                n = len(batch)
                with loader.step_context(batch):
                    pass
                loader.feedback(batch, out[:n], losses[:n])
                k += 1
            per[v].append(1e6 * (time.process_time() - c0) / steps)
    extra = {v: [a - b for a, b in zip(per[v], per["uniform"], strict=True)] for v in per}
    return {
        v: {
            "us": statistics.median(per[v]),
            "extra_us": statistics.median(extra[v]),
            "extra_min": min(extra[v]),
            "extra_max": max(extra[v]),
        }
        for v in per
    }


def run_workload(workload: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    ds = make_digits() if workload == "mlp" else make_data(args.n)
    loaders: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for v in VARIANTS:
        models[v] = make_model(workload=workload)
        opts[v] = torch.optim.Adam(models[v].parameters(), lr=1e-3)
        loaders[v] = build(v, ds, models[v], opts[v], args.batch_size)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    means: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_means: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loads = []
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            wall, cpu = time_steps(loaders[v], models[v], opts[v], args.warmup, args.steps)
            means[v].append(statistics.fmean(wall))
            cpu_means[v].append(statistics.fmean(cpu))
        for v in VARIANTS:
            ratios[v].append(means[v][-1] / means["uniform"][-1])
            cpu_ratios[v].append(cpu_means[v][-1] / cpu_means["uniform"][-1])
        loads.append(os.getloadavg()[0])
    # the loader's own cost, on fresh loaders (auto with efficiency 0: held off)
    fresh = {
        "uniform": build("uniform", ds, models["uniform"], opts["uniform"], args.batch_size),
        "kf (switch off)": build("kf (switch off)", ds, models["uniform"], opts["uniform"], args.batch_size),
    }
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    # an older auto has no discount (efficiency): there a hysteresis no gain can pass keeps it off
    for never_on in ({"efficiency": 0.0}, {"hysteresis": 10.0}):
        try:
            fresh["auto"] = schemes.build(
                "auto",
                ds,
                models["uniform"],
                loss_fn,
                args.batch_size,
                seed=0,
                optimizer=opts["uniform"],
                **never_on,
            )
            break
        except TypeError:
            continue
    overhead = loader_overhead(fresh, models["uniform"], ds, args.overhead_steps, args.repeats)
    rows = []
    for v in VARIANTS:
        pool = getattr(loaders[v], "pool", None)
        on_share = pool.describe()["on_share"] if pool is not None else 0.0
        rows.append(
            {
                "workload": workload,
                "variant": v,
                "step_ms": 1e3 * statistics.median(means[v]),
                "ratio_median": statistics.median(ratios[v]),
                "ratio_min": min(ratios[v]),
                "ratio_max": max(ratios[v]),
                "cpu_step_ms": 1e3 * statistics.median(cpu_means[v]),
                "cpu_ratio_median": statistics.median(cpu_ratios[v]),
                "cpu_ratio_min": min(cpu_ratios[v]),
                "cpu_ratio_max": max(cpu_ratios[v]),
                "on_share": on_share,
                "scored_examples": loaders[v].cost()["scored_examples"],
                "load_1min": [min(loads), max(loads)],
                "loader_us": overhead.get(v, {}).get("us"),
                "loader_extra_us": overhead.get(v, {}).get("extra_us"),
                "loader_extra_range": [
                    overhead.get(v, {}).get("extra_min"),
                    overhead.get(v, {}).get("extra_max"),
                ],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=19_200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workloads", default="cnn1d,mlp", help="comma list of cnn1d, mlp")
    parser.add_argument("--overhead-steps", type=int, default=1000, help="steps per loader-only round")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "switch_off.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.warmup, args.repeats, args.overhead_steps = 2_000, 24, 8, 2, 50
    torch.set_num_threads(1)
    rows = []
    for workload in args.workloads.split(","):
        rows += run_workload(workload.strip(), args)
    result = {
        "config": vars(args) | {"out": str(args.out)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| workload | variant | CPU step (ms) | CPU ratio to uniform, median [min, max] | wall step (ms) "
        "| wall ratio, median [min, max] | IS on | scored examples | load (1 min) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['workload']} | {row['variant']} | {row['cpu_step_ms']:.3f} "
            f"| {row['cpu_ratio_median']:.3f} "
            f"[{row['cpu_ratio_min']:.3f}, {row['cpu_ratio_max']:.3f}] | {row['step_ms']:.3f} "
            f"| {row['ratio_median']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] "
            f"| {100 * row['on_share']:.0f}% | {row['scored_examples']:,} "
            f"| {row['load_1min'][0]:.1f}-{row['load_1min'][1]:.1f} |"
        )
    print()
    print(
        "| workload | variant | loader + feedback CPU us/step (no model) "
        "| extra over uniform, median [min, max] |"
    )
    print("| --- | --- | ---: | ---: |")
    for row in rows:
        if row["loader_us"] is None:
            continue
        lo, hi = row["loader_extra_range"]
        print(
            f"| {row['workload']} | {row['variant']} | {row['loader_us']:.1f} "
            f"| {row['loader_extra_us']:.1f} [{lo:.1f}, {hi:.1f}] |"
        )
    return result


if __name__ == "__main__":
    main()
