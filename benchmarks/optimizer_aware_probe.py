"""Do optimizer-aware scores find where Adam's and RMSprop's steps are noisy? (issue 8 closing numbers)

An MLP 64-128-128-10 (ReLU) is trained on scikit-learn's digits (standardised features,
stratified 80/20 split) with uniform sampling, batch 32, once with Adam (lr 1e-3) and once
with RMSprop (lr 1e-3). At steps 100, 300 and 1000 a :class:`isample.metrics.SamplerQuality`
tracker computes the exact per-example gradients ``g_i`` of a probe of 512 training
examples and, in the geometry of the live optimizer (``D g_i`` with ``D`` read from its
state), reports for each candidate sampler ``p proportional to score``:

* ``kappa_D = V_D(uniform) / V_D(p)`` (variance of the optimizer's step relative to uniform
  sampling, same probe, same step) and ``Q_log = log kappa_D / log kappa_D_opt``;
* ``kappa_D_opt``, the best attainable value (``p_i proportional to ||D g_i||``, exact).

Candidates: ``upper_bound`` (:class:`isample.UpperBoundScorer`, the Katharopoulos-Fleuret
bound ``||dl_i/dz_i||`` of the logits), ``last_layer_D`` (:class:`isample.LinearGradNormScorer`
over the last layer only, preconditioned), ``linear_plain`` (all linear layers, plain norm
``||g_i||``) and ``linear_D`` (all linear layers, preconditioned: ``||D g_i||``). For this MLP
every parameter is in a linear layer, so ``linear_D`` should reach the optimum exactly.

A second part times :func:`isample.preconditioner.preconditioner_diagonal` (the fused
``torch._foreach`` implementation) against :func:`per_parameter_reference` (the
per-parameter loop it replaced, kept here as the baseline) on the MLP's Adam and RMSprop
state, and a training step with ``GradNormRecorder(model, optimizer=adam)`` using each, in
the same run (interleaved blocks, rotated order, process CPU time, medians).

Usage::

    python benchmarks/optimizer_aware_probe.py             # 3 seeds, a few minutes on 2 cores
    python benchmarks/optimizer_aware_probe.py --seeds 1   # single seed
    python benchmarks/optimizer_aware_probe.py --quick     # smoke test, seconds

Writes Markdown tables to stdout and JSON to ``benchmarks/results/optimizer_aware_probe.json``
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _digits import accuracy, load_digits_split, make_mlp
from torch import nn

import isample.recorder as recorder_module
from isample import GradNormRecorder, LinearGradNormScorer, UpperBoundScorer
from isample.metrics import SamplerQuality
from isample.preconditioner import NoOptimizerStateError, preconditioner_diagonal

CE = nn.CrossEntropyLoss(reduction="none")
CANDIDATES = ("upper_bound", "last_layer_D", "linear_plain", "linear_D")
OPTIMIZERS = {"adam": (torch.optim.Adam, 1e-3), "rmsprop": (torch.optim.RMSprop, 1e-3)}


# ---------------------------------------------------------------------------------- data, model


# ---------------------------------------------------------------------------------- quality probe


def probe_run(
    optimizer_name: str, seed: int, checkpoints: list[int], probe_size: int, sampling: str = "epochs"
) -> list[dict]:
    """Train with uniform sampling; at each checkpoint, one row per candidate in the optimizer geometry."""
    x_tr, y_tr, _, _ = load_digits_split(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    probe = torch.randperm(len(x_tr), generator=gen)[:probe_size]
    model = make_mlp(seed)
    cls, lr = OPTIMIZERS[optimizer_name]
    opt = cls(model.parameters(), lr=lr)
    tracker = SamplerQuality(
        x_tr[probe],
        y_tr[probe],
        CE,
        scorers={
            "upper_bound": UpperBoundScorer(CE),
            "last_layer_D": LinearGradNormScorer(CE, layers=["4"], optimizer=opt),
            "linear_plain": LinearGradNormScorer(CE),
            "linear_D": LinearGradNormScorer(CE, optimizer=opt),
        },
        optimizer=opt,
        every=1,
        chunk_size=64,
    )
    geometry = optimizer_name
    out = []
    order, pos, step = torch.randperm(len(x_tr), generator=gen), 0, 0
    for target in checkpoints:
        while step < target:
            if sampling == "replacement":
                idx = torch.randint(0, len(x_tr), (32,), generator=gen)
            else:
                if pos + 32 > len(order):
                    order, pos = torch.randperm(len(x_tr), generator=gen), 0
                idx = order[pos : pos + 32]
                pos += 32
            opt.zero_grad()
            CE(model(x_tr[idx]), y_tr[idx]).mean().backward()  # uniform sampling: all weights 1
            opt.step()
            step += 1
        start = time.perf_counter()
        rows = tracker.measure(model, step)
        seconds = time.perf_counter() - start
        by = {r["candidate"]: r for r in rows if r["geometry"] == geometry}
        ident = {r["candidate"]: r for r in rows if r["geometry"] == "identity"}
        row = {
            "optimizer": optimizer_name,
            "seed": seed,
            "step": step,
            "train_acc": accuracy(model, x_tr, y_tr),
            "kappa_opt": by["upper_bound"]["kappa_opt"],
            "identity_kappa_opt": ident["upper_bound"]["kappa_opt"],
            "probe_seconds": seconds,
        }
        for name in CANDIDATES:
            row[f"kappa_{name}"] = by[name]["kappa"]
            row[f"q_log_{name}"] = by[name]["q_log"]
            row[f"corr_{name}"] = by[name]["corr_grad_norm"]
            row[f"identity_kappa_{name}"] = ident[name]["kappa"]
        out.append(row)
    return out


def median_rows(rows: list[dict]) -> list[dict]:
    """Median over seeds of every numeric field, per (optimizer, step)."""
    keys = sorted(
        {(r["optimizer"], r["step"]) for r in rows}, key=lambda k: (list(OPTIMIZERS).index(k[0]), k[1])
    )
    out = []
    for optimizer_name, step in keys:
        group = [r for r in rows if r["optimizer"] == optimizer_name and r["step"] == step]
        med = {"optimizer": optimizer_name, "step": step, "seeds": len(group)}
        for field, value in group[0].items():
            if field in ("optimizer", "step", "seed") or not isinstance(value, (int, float)):
                continue
            med[field] = statistics.median(float(r[field]) for r in group)
        out.append(med)
    return out


def quality_table(rows: list[dict], seeds: int, probe_size: int) -> str:
    what = "single seed (0)" if seeds == 1 else f"median over {seeds} seeds"
    lines = [
        f"kappa_D (Q_log) in the optimizer's geometry, probe of {probe_size} training examples, {what}:",
        "",
        "| optimizer | step | train acc | upper bound | last layer, D | all linear, plain | all linear, D "
        "| optimum kappa_D_opt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["optimizer"], str(r["step"]), f"{r['train_acc']:.3f}"]
        for name in CANDIDATES:
            cells.append(f"{r[f'kappa_{name}']:.2f} ({r[f'q_log_{name}']:.2f})")
        cells.append(f"{r['kappa_opt']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- preconditioner timing


def per_parameter_reference(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> list[torch.Tensor]:
    """The per-parameter loop ``preconditioner_diagonal`` used before fusing (Adam/AdamW, RMSprop only).

    Four separate tensor operations per parameter: ``(v / (1 - beta2^t)).sqrt() + eps`` then
    ``1 / denom``; kept as the timing baseline.
    """
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    out = []
    for p in params:
        group = group_of[p]
        state = optimizer.state.get(p, {})
        if not state:
            raise NoOptimizerStateError("no state")
        eps = group["eps"]
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
            denom = (v / (1.0 - group["betas"][1] ** step)).sqrt() + eps
        else:
            v = state["square_avg"]
            if group.get("centered", False):
                v = v - state["grad_avg"] ** 2
            denom = v.sqrt() + eps
        out.append(1.0 / denom)
    return out


def _interleaved(fns: dict, repeats: int, calls: int) -> dict[str, list[float]]:
    """Per-call process CPU seconds of each function, blocks of ``calls`` calls, order rotated per repeat."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.process_time() - start) / calls)
    return times


@contextlib.contextmanager
def recorder_reads_with(fn) -> Iterator[None]:
    """Make the recorder (and scorer) read D with ``fn`` inside the block."""
    saved = recorder_module.preconditioner_diagonal
    recorder_module.preconditioner_diagonal = fn
    try:
        yield
    finally:
        recorder_module.preconditioner_diagonal = saved


def timing(repeats: int, calls: int, steps: int) -> dict:
    x_tr, y_tr, _, _ = load_digits_split(0)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, len(x_tr), (32,), generator=gen) for _ in range(64)]
    result: dict = {"preconditioner_diagonal": {}, "recorder_step": {}}
    for name, (cls, lr) in OPTIMIZERS.items():
        model = make_mlp(0)
        opt = cls(model.parameters(), lr=lr)
        for idx in batches[:5]:
            opt.zero_grad()
            CE(model(x_tr[idx]), y_tr[idx]).mean().backward()
            opt.step()
        params = list(model.parameters())
        for a, b in zip(
            per_parameter_reference(opt, params), preconditioner_diagonal(opt, params), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        times = _interleaved(
            {
                "per_parameter": lambda o=opt, p=params: per_parameter_reference(o, p),
                "fused": lambda o=opt, p=params: preconditioner_diagonal(o, p),
            },
            repeats,
            calls,
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        result["preconditioner_diagonal"][name] = {
            "median_s": med,
            "speedup": med["per_parameter"] / med["fused"],
            "median_paired_speedup": statistics.median(
                a / b for a, b in zip(times["per_parameter"], times["fused"], strict=True)
            ),
        }
    # a training step with GradNormRecorder(model, optimizer=adam), D read either way, and without recorder
    base = make_mlp(0)
    runners = {}
    for variant in ("step", "recorder_per_parameter", "recorder_fused"):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt.zero_grad()
        CE(model(x_tr[batches[0]]), y_tr[batches[0]]).mean().backward()
        opt.step()
        rec = None if variant == "step" else GradNormRecorder(model, optimizer=opt)
        runners[variant] = (model, opt, rec)
    weights = 0.5 + torch.rand(32, generator=gen)
    counter = iter(range(10**9))

    def step(variant: str) -> None:
        model, opt, rec = runners[variant]
        idx = batches[next(counter) % len(batches)]
        if rec is None:
            (weights * CE(model(x_tr[idx]), y_tr[idx])).mean().backward()
        else:
            reader = (
                per_parameter_reference if variant == "recorder_per_parameter" else preconditioner_diagonal
            )
            with recorder_reads_with(reader), rec.record(weights):
                (weights * CE(model(x_tr[idx]), y_tr[idx])).mean().backward()
            rec.norms()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for variant in runners:
        for _ in range(3):
            step(variant)
    times = _interleaved({v: (lambda v=v: step(v)) for v in runners}, repeats, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    result["recorder_step"] = {
        "median_s": med,
        "ratio_to_step": {k: v / med["step"] for k, v in med.items()},
    }
    result["config"] = {"repeats": repeats, "calls_per_block": calls, "steps_per_block": steps}
    return result


def timing_table(t: dict) -> str:
    cfg = t["config"]
    lines = [
        f"preconditioner_diagonal on the MLP's optimizer state (6 tensors, 26,122 elements), process CPU "
        f"time, median of {cfg['repeats']} interleaved blocks of {cfg['calls_per_block']} calls:",
        "",
        "| optimizer | per-parameter loop (us) | fused foreach (us) | speed-up (ratio of medians) "
        "| median paired speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in t["preconditioner_diagonal"].items():
        m = r["median_s"]
        lines.append(
            f"| {name} | {1e6 * m['per_parameter']:.1f} | {1e6 * m['fused']:.1f} | {r['speedup']:.2f}x "
            f"| {r['median_paired_speedup']:.2f}x |"
        )
    m, ratio = t["recorder_step"]["median_s"], t["recorder_step"]["ratio_to_step"]
    lines += [
        "",
        f"Adam training step, batch 32 (median of {cfg['repeats']} blocks of "
        f"{cfg['steps_per_block']} steps):",
        "",
        "| variant | ms per step | x plain step |",
        "| --- | --- | --- |",
    ]
    for variant, label in (
        ("step", "plain step"),
        ("recorder_per_parameter", "+ GradNormRecorder(Adam), per-parameter D read"),
        ("recorder_fused", "+ GradNormRecorder(Adam), fused D read"),
    ):
        lines.append(f"| {label} | {1e3 * m[variant]:.3f} | {ratio[variant]:.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1); medians are reported")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=31, help="timing repeats")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny probe, few repeats")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument(
        "--sampling",
        choices=["epochs", "replacement"],
        default="epochs",
        help="uniform batches from shuffled epochs (default) or drawn with replacement",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "optimizer_aware_probe.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    calls, steps = 200, 20
    if args.quick:
        args.seeds, args.checkpoints, args.probe_size, args.repeats = 1, [5, 10], 64, 3
        calls, steps = 5, 2
    start = time.perf_counter()
    rows = [
        row
        for name in OPTIMIZERS
        for seed in range(args.seeds)
        for row in probe_run(name, seed, args.checkpoints, args.probe_size, args.sampling)
    ]
    medians = median_rows(rows)
    print(quality_table(medians, args.seeds, args.probe_size))
    timings = None
    if not args.no_timing:
        timings = timing(args.repeats, calls, steps)
        print(timing_table(timings))
    result = {
        "benchmark": "optimizer_aware_probe",
        "config": {
            "dataset": "sklearn digits, standardised, stratified 80/20 split (random_state = seed)",
            "model": "MLP 64-128-128-10 ReLU",
            "batch_size": 32,
            "sampling": f"uniform ({'shuffled epochs' if args.sampling == 'epochs' else 'with replacement'})",
            "optimizers": {k: {"class": c.__name__, "lr": lr} for k, (c, lr) in OPTIMIZERS.items()},
            "checkpoints": args.checkpoints,
            "probe_size": args.probe_size,
            "seeds": list(range(args.seeds)),
            "geometry": "the live optimizer's D (kappa_D, q_log); identity_* fields: plain geometry",
            "quick": args.quick,
            "threads": 1,
        },
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
        "medians": medians,
        "timing": timings,
        "total_seconds": time.perf_counter() - start,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
