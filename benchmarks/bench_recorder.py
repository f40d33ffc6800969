"""Cost of GradNormRecorder as a share of a training step (and of the batched scorers, for context).

MLP 64-128-128-10 on scikit-learn's digits (1797 x 64, standardised), Adam lr 1e-3,
weighted mean cross-entropy with weights in [0.5, 1.5]. Each variant trains its own copy
of the same initial model; blocks of ``--steps`` steps of every variant are interleaved
(order rotated each repeat) and the per-step time is the median over ``--repeats``
blocks. Ratios are against the plain training step measured in the same run.

Variants:

* ``step``: forward, weighted loss, backward, ``opt.step()``, ``opt.zero_grad()``.
* ``recorder_plain``: the same step inside ``GradNormRecorder(model).record(w)``.
* ``recorder_adam``: the same with ``GradNormRecorder(model, optimizer=opt)`` (norm of ``D g_i``).
* ``scorer_adam``: ``LinearGradNormScorer(loss, optimizer=opt)`` on the batch (a separate pass).
* ``vmap_scorer``: ``GradNormScorer`` (per-example autograd via torch.func) on the batch.

Run ``python benchmarks/bench_recorder.py`` (``--quick`` for a smoke run); ``--out DIR``
writes ``bench_recorder.json`` and ``bench_recorder.md``; ``--clock process`` times this
process's CPU time instead of wall time (steadier on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from isample.linear_scorer import LinearGradNormScorer
from isample.recorder import GradNormRecorder
from isample.scorers import GradNormScorer

VARIANTS = ("step", "recorder_plain", "recorder_adam", "scorer_adam", "vmap_scorer")


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(data.target, dtype=torch.long)


def make_model(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / p.shape[-1] ** 0.5
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return model


class Runner:
    """One variant: its own model, optimizer and (for recorder variants) recorder."""

    def __init__(self, variant: str, base: nn.Module, loss_fn: nn.Module) -> None:
        self.variant = variant
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = loss_fn
        self.recorder = None
        if variant == "recorder_plain":
            self.recorder = GradNormRecorder(self.model)
        elif variant == "recorder_adam":
            self.recorder = GradNormRecorder(self.model, optimizer=self.opt)
        self.scorer = None
        if variant == "scorer_adam":
            self.scorer = LinearGradNormScorer(loss_fn, optimizer=self.opt)
        elif variant == "vmap_scorer":
            self.scorer = GradNormScorer(loss_fn, chunk_size=256)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, record: bool = True) -> None:
        if self.recorder is None or not record:
            (w * self.loss_fn(self.model(x), y)).mean().backward()
        else:
            with self.recorder.record(w):
                (w * self.loss_fn(self.model(x), y)).mean().backward()
            self.recorder.norms()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        if self.scorer is None:
            self.train_step(x, y, w)
        else:
            self.scorer(self.model, x, y)


def bench_batch_size(
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    repeats: int,
    steps: int,
    seed: int,
    clock: str = "wall",
) -> dict:
    x_all, y_all = data
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    base = make_model(seed)
    runners = {v: Runner(v, base, loss_fn) for v in VARIANTS}
    n_batches = steps * 2
    idx = [torch.randint(0, x_all.shape[0], (batch_size,), generator=gen) for _ in range(n_batches)]
    batches = [(x_all[i], y_all[i], 0.5 + torch.rand(batch_size, generator=gen)) for i in idx]
    # warm-up: every model takes real steps, so Adam has state (no fallback) and caches are warm
    for runner in runners.values():
        runner.train_step(*batches[0], record=False)  # Adam gets its state before any recording
        for x, y, w in batches[1:4]:
            runner.train_step(x, y, w)
        for x, y, w in batches[:2]:
            runner.run(x, y, w)
    timer = time.perf_counter if clock == "wall" else time.process_time
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(repeats):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for variant in rotated:
            runner = runners[variant]
            start = timer()
            for k in range(steps):
                x, y, w = batches[(r + k) % n_batches]
                runner.run(x, y, w)
            times[variant].append((timer() - start) / steps)
    medians = {v: statistics.median(t) for v, t in times.items()}
    paired = {
        v: statistics.median(a / b for a, b in zip(times[v], times["step"], strict=True))
        for v in VARIANTS
        if v != "step"
    }
    return {
        "batch_size": batch_size,
        "median_s": medians,
        "ratio_of_medians": {v: medians[v] / medians["step"] for v in VARIANTS},
        "median_paired_ratio": paired,
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"MLP 64-128-128-10, digits, Adam; torch {meta['torch']}, {meta['threads']} thread(s), "
        f"{meta['clock']} clock, {meta['repeats']} repeats x {meta['steps']} steps, medians.",
        "",
        "| batch | train step (ms) | + recorder plain | + recorder Adam | LinearGradNormScorer (Adam) "
        "| GradNormScorer (vmap) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        med, ratio = res["median_s"], res["ratio_of_medians"]
        cells = [f"{res['batch_size']}", f"{1e3 * med['step']:.3f}"]
        for v in VARIANTS[1:]:
            cells.append(f"{1e3 * med[v]:.3f} ms ({ratio[v]:.2f}x step)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Recorder overhead = (step with recorder) / (step without) - 1; scorer columns are a separate pass "
        "relative to one training step. Median of paired per-repeat ratios:",
        "",
    ]
    for res in results:
        paired = ", ".join(f"{v} {r:.3f}" for v, r in res["median_paired_ratio"].items())
        lines.append(f"- batch {res['batch_size']}: {paired}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall: perf_counter; process: this process's CPU time (less sensitive to other jobs on a shared "
        "machine; with --threads 1 it is the compute the step costs)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats x 2 steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 3, 2
    torch.set_num_threads(args.threads)
    data = load_digits_tensors()
    results = [
        bench_batch_size(data, b, args.repeats, args.steps, args.seed, args.clock) for b in args.batch_sizes
    ]
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "steps": args.steps,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    report = {"meta": meta, "results": results}
    text = markdown(results, meta)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_recorder.json").write_text(json.dumps(report, indent=2))
        (args.out / "bench_recorder.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
