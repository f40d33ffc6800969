"""How good are the loss and upper-bound samplers during real training? (isample.metrics probe)

An MLP 64-128-128-10 (ReLU) is trained on scikit-learn's digits (standardised features,
stratified 80/20 split) with uniform sampling, once with SGD (lr 0.1) and once with Adam
(lr 1e-3), batch 32. At fixed checkpoints a :class:`isample.metrics.SamplerQuality`
tracker computes exact per-example gradients on a probe of 512 training examples and
reports, per geometry (identity = SGD's step; Adam's preconditioned step for the Adam
run): kappa_opt (the best attainable variance ratio vs uniform), kappa and Q_log of the
LossScorer and UpperBoundScorer samplers, the Pearson correlation of each score with the
exact per-example gradient norm (in that geometry), and the upper bound's tau^2 and ESS.
Every kappa is a ratio against uniform sampling measured on the same probe, same step.

Usage::

    python benchmarks/quality_probe.py            # full run, ~1-3 minutes on 2 CPU cores
    python benchmarks/quality_probe.py --quick    # smoke test, a few seconds

Writes a Markdown table to stdout and JSON to ``benchmarks/results/quality_probe.json``
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _digits import accuracy, load_digits_split, make_mlp
from torch import nn

from isample import LossScorer, UpperBoundScorer
from isample.metrics import SamplerQuality

CE = nn.CrossEntropyLoss(reduction="none")


def run(optimizer_name: str, checkpoints: list[int], probe_size: int, seed: int, data) -> list[dict]:
    x_tr, y_tr, _, _ = data
    gen = torch.Generator().manual_seed(seed + 1)
    probe = torch.randperm(len(x_tr), generator=gen)[:probe_size]
    model = make_mlp(seed)
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = SamplerQuality(
        x_tr[probe],
        y_tr[probe],
        CE,
        scorers={"loss": LossScorer(CE), "upper_bound": UpperBoundScorer(CE)},
        optimizer=opt,
        every=1,
        chunk_size=64,
    )
    out = []
    order = torch.randperm(len(x_tr), generator=gen)
    pos = 0
    step = 0
    for target in checkpoints:
        while step < target:
            if pos + 32 > len(order):
                order, pos = torch.randperm(len(x_tr), generator=gen), 0
            idx = order[pos : pos + 32]
            pos += 32
            opt.zero_grad()
            CE(model(x_tr[idx]), y_tr[idx]).mean().backward()  # uniform sampling: weights all 1
            opt.step()
            step += 1
        t0 = time.perf_counter()
        rows = tracker.measure(model, step)
        seconds = time.perf_counter() - t0
        train_acc = accuracy(model, x_tr, y_tr)
        for geometry in dict.fromkeys(r["geometry"] for r in rows):
            by = {r["candidate"]: r for r in rows if r["geometry"] == geometry}
            out.append(
                {
                    "optimizer": optimizer_name,
                    "step": step,
                    "train_acc": train_acc,
                    "geometry": geometry,
                    "kappa_opt": by["loss"]["kappa_opt"],
                    "kappa_loss": by["loss"]["kappa"],
                    "q_log_loss": by["loss"]["q_log"],
                    "q_lin_loss": by["loss"]["q_lin"],
                    "corr_loss": by["loss"]["corr_grad_norm"],
                    "zero_p_loss": by["loss"]["zero_p"],
                    "bias_loss": by["loss"]["bias"],
                    "sqrt_v_u": float(by["loss"]["v_u"]) ** 0.5,
                    "kappa_ub": by["upper_bound"]["kappa"],
                    "q_log_ub": by["upper_bound"]["q_log"],
                    "q_lin_ub": by["upper_bound"]["q_lin"],
                    "corr_ub": by["upper_bound"]["corr_grad_norm"],
                    "tau2_ub": by["upper_bound"]["tau2"],
                    "ess_ub": by["upper_bound"]["ess"],
                    "measure_seconds": seconds,
                }
            )
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| optimizer | step | train acc | geometry | kappa_opt | kappa loss | Q_log loss "
        "| kappa UB | Q_log UB | corr(UB, norm) | corr(loss, norm) | tau^2 UB | ESS UB |"
    )
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['step']} | {r['train_acc']:.3f} | {r['geometry']} "
            f"| {r['kappa_opt']:.2f} | {r['kappa_loss']:.2f} | {r['q_log_loss']:.2f} "
            f"| {r['kappa_ub']:.2f} | {r['q_log_ub']:.2f} "
            f"| {r['corr_ub']:.3f} | {r['corr_loss']:.3f} | {r['tau2_ub']:.2f} | {r['ess_ub']:.3f} |"
        )
    for r in rows:
        if r["zero_p_loss"]:
            lines.append(
                f"\n{r['optimizer']} step {r['step']} ({r['geometry']}): {r['zero_p_loss']} probe "
                f"examples have float32 loss exactly 0 but a non-zero gradient, so the loss sampler "
                f"never draws them: "
                f"variance inf and kappa 0 by convention; the bias norm this causes is {r['bias_loss']:.2e} "
                f"(uniform one-draw std sqrt(V_u) = {r['sqrt_v_u']:.2e})."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke-test profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = [0, 20, 100] if args.quick else [0, 50, 300, 1500]
    probe_size = 128 if args.quick else 512
    data = load_digits_split(args.seed)
    t0 = time.perf_counter()
    rows = []
    for name in ("sgd", "adam"):
        rows.extend(run(name, checkpoints, probe_size, args.seed, data))
    total = time.perf_counter() - t0
    table = markdown(rows)
    print(table)
    print(f"\nprobe {probe_size} training examples, seed {args.seed}, total {total:.1f} s")
    result = {
        "benchmark": "quality_probe",
        "config": {
            "dataset": "sklearn digits, standardised, stratified 80/20 split",
            "model": "MLP 64-128-128-10 ReLU",
            "batch_size": 32,
            "optimizers": {"sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}},
            "sampling": "uniform (shuffled epochs)",
            "checkpoints": checkpoints,
            "probe_size": probe_size,
            "seed": args.seed,
            "quick": args.quick,
            "threads": args.threads,
        },
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "total_seconds": total,
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
