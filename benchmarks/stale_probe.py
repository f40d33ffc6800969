"""Why is a stale score table worse than uniform, and does the fix hold? (history-is probe)

Trains ``history-is`` (a :class:`isample.TableSampler` fed by the training losses) on
digits, noisy-imbalanced (both :mod:`isample.bench.datasets`) and MNIST-1D (the
``mnist1d`` package, generated locally; skipped when it is not installed) with SGD,
SGD + momentum 0.9, RMSprop and Adam, and at fixed checkpoints measures on a probe of
training examples (exact per-example gradients, :class:`isample.bench.harness.ProbeQuality`):

* ``kappa``: V_uniform / V(p) of the table's own distribution restricted to the probe
  (identity geometry; ``kappa_pre`` in the optimizer's preconditioned geometry);
* ``kappa_fresh``: the same mixing level with *fresh* losses of the probe (no staleness),
  and ``kappa_opt``: the best attainable;
* the staleness: median / 90th percentile age (steps since the score was written) of the
  probe's table entries, and the correlation of stale table scores with fresh losses;
* the weight tail: share of V(p)'s second moment carried by examples with weight
  ``1/(n p_i) > 2`` (their stale score collapsed), and the largest weight;
* the mixing level in use and how many examples were never visited.

``--mixing 0.1`` is the table's former fixed default; ``--mixing auto`` the self-tuned
level (:class:`isample.staleness.AdaptiveMixing`). A uniform run at the same learning rate
is trained alongside as the divergence reference. Every kappa is a ratio against uniform
sampling of the same model at the same step.

Usage::

    python benchmarks/stale_probe.py --mixing 0.1 --out benchmarks/results/stale_probe_before.json
    python benchmarks/stale_probe.py --mixing auto --out benchmarks/results/stale_probe_after.json
    python benchmarks/stale_probe.py --quick      # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import isample.schemes as schemes
from isample.bench.datasets import BenchData, load_dataset
from isample.bench.harness import ProbeQuality, evaluate, quality_candidates
from isample.bench.models import build_model, init_parameters
from isample.metrics import quality_from_norms
from isample.staleness import AdaptiveMixing

CE = nn.CrossEntropyLoss(reduction="none")

OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
LR = {"sgd": 0.1, "momentum": 0.1, "rmsprop": 1e-3, "adam": 1e-3}


def load_mnist1d(seed: int, num_samples: int = 4000) -> BenchData:
    """MNIST-1D generated from its templates (no download), 70/10/20 split, standardised."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 0.8
    d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    n_tr, n_val = int(0.7 * len(x)), int(0.1 * len(x))
    mean, std = x[:n_tr].mean(), x[:n_tr].std()
    x = (x - mean) / std
    t = torch.from_numpy
    return BenchData(
        "mnist1d",
        t(x[:n_tr]),
        t(y[:n_tr]),
        t(x[n_tr : n_tr + n_val]),
        t(y[n_tr : n_tr + n_val]),
        t(x[n_tr + n_val :]),
        t(y[n_tr + n_val :]),
        10,
        f"MNIST-1D, {num_samples} examples generated locally",
    )


def cnn1d(length: int, seed: int) -> nn.Module:
    """1-D CNN 32-64-64 channels, kernels 5/5/3, strides 1/2/2, ReLU, then Linear."""
    out = length - 4
    out = (out - 5) // 2 + 1
    out = (out - 3) // 2 + 1
    model = nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, 32, 5, stride=1),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, stride=2),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * out, 10),
    )
    return init_parameters(model, torch.Generator().manual_seed(seed))


def _quality(norms: torch.Tensor, gsq: float, p: torch.Tensor) -> float:
    return quality_from_norms(norms, gsq, p).kappa


def diagnostics(model, sampler, probe, x_p, y_p, last_update, step, share) -> dict:
    """Staleness, weight tail and the fresh-loss reference on the probe (identity geometry)."""
    from isample.metrics import per_example_gradients

    params = [p for p in model.parameters() if p.requires_grad]
    G = per_example_gradients(model, CE, x_p, y_p, 64, params).detach().to(torch.float64)
    norms = G.norm(dim=1)
    mean = G.mean(0)
    gsq = float(mean @ mean)
    with torch.no_grad():
        fresh = CE(model(x_p), y_p).to(torch.float64)
    n = len(probe)
    p_tab = sampler.probabilities()[probe]
    p_tab = p_tab / p_tab.sum()
    f = fresh / fresh.sum() if float(fresh.sum()) > 0 else torch.full_like(fresh, 1 / n)
    p_fresh = share / n + (1 - share) * f
    w = 1.0 / (n * p_tab)
    second = norms.square() / (n * n * p_tab)
    heavy = w > 2.0
    stale = sampler.scores()[probe]
    seen = ~torch.isnan(stale)
    ages = (step - last_update[probe])[seen].to(torch.float64)
    corr = math.nan
    if int(seen.sum()) > 2:
        a, b = stale[seen] - stale[seen].mean(), fresh[seen] - fresh[seen].mean()
        den = float(a.norm() * b.norm())
        corr = float(a @ b) / den if den > 0 else math.nan
    return {
        "kappa_fresh": _quality(norms, gsq, p_fresh),
        "kappa_fresh_nomix": _quality(norms, gsq, f) if bool((f > 0).all()) else 0.0,
        "age_median": float(ages.median()) if ages.numel() else math.nan,
        "age_p90": float(ages.quantile(0.9)) if ages.numel() else math.nan,
        "corr_stale_fresh": corr,
        "heavy_count": int(heavy.sum()),
        "heavy_share": float(second[heavy].sum() / second.sum()),
        "max_weight": float(w.max()),
        "unvisited": int(sampler.num_samples - int((~torch.isnan(sampler.scores())).sum())),
    }


def run(
    data: BenchData, model_fn, optimizer: str, mixing: str, steps: int, checkpoints, seed: int, extra: dict
) -> dict:
    torch.manual_seed(seed)  # nothing below draws from it; guards against hidden global use
    model = model_fn(seed)
    opt = OPTIMIZERS[optimizer](model.parameters(), LR[optimizer])
    ds = TensorDataset(data.x_train, data.y_train)
    n = len(ds)
    mix: float | str | AdaptiveMixing = mixing if mixing == "auto" else float(mixing)
    if mixing == "auto" and extra.get("mixer"):
        mix = AdaptiveMixing(**extra["mixer"])
    uniform = mixing != "auto" and float(mixing) == 1.0
    loader = schemes.build(
        "history-is",
        ds,
        model,
        CE,
        32,
        seed=seed,
        optimizer=opt,
        mixing=mix,
        score=extra.get("score", "loss"),
    )
    sampler = loader.sampler
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:256]
    x_p, y_p = data.x_train[probe], data.y_train[probe]
    tracker = ProbeQuality(x_p, y_p, CE, quality_candidates(loader, probe), opt)
    last_update = torch.zeros(n, dtype=torch.long)
    rows = []
    step = epoch = 0
    diverged = False
    t0 = time.perf_counter()
    while step < steps and not diverged:
        loader.set_epoch(epoch)
        for batch in loader:
            if step in checkpoints and uniform:
                rows.append({"step": step, "train_loss": evaluate(model, data.x_train, data.y_train, CE)[0]})
            elif step in checkpoints:
                share = _share(sampler)
                q = {r["geometry"]: r for r in tracker.measure(model, step)}
                row = {"step": step, "kappa": q["identity"]["kappa"], "kappa_opt": q["identity"]["kappa_opt"]}
                pre = [r for g, r in q.items() if g != "identity"]
                row["kappa_pre"] = pre[0]["kappa"] if pre else math.nan
                row["mixing"] = share
                row["train_loss"] = evaluate(model, data.x_train, data.y_train, CE)[0]
                row.update(diagnostics(model, sampler, probe, x_p, y_p, last_update, step, share))
                rows.append(row)
            out = model(batch.inputs)
            losses = CE(out, batch.targets)
            (batch.weights * losses).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not bool(torch.isfinite(losses).all()):
                diverged = True
                break
            loader.feedback(batch, out.detach(), losses.detach())
            last_update[batch.indices] = step
            step += 1
            if step >= steps:
                break
        epoch += 1
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train, CE)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, CE)
    return {
        "optimizer": optimizer,
        "lr": LR[optimizer],
        "mixing": mixing,
        "diverged": diverged or not math.isfinite(train_loss),
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def _share(sampler) -> float:
    level = getattr(sampler, "mixing_level", None)
    return float(level) if level is not None else float(sampler.policy.mixing)


def workloads(quick: bool, seed: int) -> dict:
    out = {}
    digits = load_dataset("digits", seed)
    out["digits"] = (digits, lambda s, d=digits: build_model("mlp", 64, 10, s))
    noisy = load_dataset("noisy-imbalanced", seed)
    out["noisy-imbalanced"] = (noisy, lambda s, d=noisy: build_model("mlp", d.x_train.shape[1], 10, s))
    if quick:
        return out
    try:
        m1d = load_mnist1d(seed)
    except ImportError:
        print("mnist1d not installed: MNIST-1D skipped (pip install mnist1d)")
        return out
    out["mnist1d"] = (m1d, lambda s, d=m1d: cnn1d(d.x_train.shape[1], s))
    return out


def summary(results: list[dict]) -> str:
    lines = [
        "| workload | optimizer | mixing | kappa min | kappa median | kappa_pre min | final mixing "
        "| train CE | uniform CE | test acc | uniform acc | diverged |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        ks = [row["kappa"] for row in r["rows"] if row["step"] > 0]
        kp = [row["kappa_pre"] for row in r["rows"] if row["step"] > 0 and math.isfinite(row["kappa_pre"])]
        u = r["uniform"]
        pre = f"{min(kp):.2f}" if kp else "-"
        lines.append(
            f"| {r['workload']} | {r['optimizer']} | {r['mixing']} | {min(ks):.2f} "
            f"| {statistics.median(ks):.2f} | {pre} | {r['rows'][-1]['mixing']:.2f} "
            f"| {r['train_loss']:.4f} | {u['train_loss']:.4f} | {r['test_accuracy']:.3f} "
            f"| {u['test_accuracy']:.3f} | {r['diverged']} (uniform {u['diverged']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixing", default="auto", help="'auto' or a fixed level in [0, 1]")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="", help="comma-separated subset")
    parser.add_argument("--optimizers", default="", help="comma-separated subset")
    parser.add_argument("--score", default="loss", choices=("loss", "upper_bound"))
    parser.add_argument("--mixer", default="{}", help="JSON of AdaptiveMixing arguments (with --mixing auto)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stale_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = {"digits": 600, "noisy-imbalanced": 600, "mnist1d": 1500}
    checkpoints = {
        "digits": [0, 25, 50, 100, 200, 300, 400, 500, 599],
        "noisy-imbalanced": [0, 25, 50, 100, 200, 300, 400, 500, 599],
        "mnist1d": [0, 50, 100, 200, 400, 600, 800, 1000, 1250, 1499],
    }
    if args.quick:
        steps = {k: 60 for k in steps}
        checkpoints = {k: [0, 20, 59] for k in checkpoints}
    wanted_w = [w for w in args.workloads.split(",") if w]
    wanted_o = [o for o in args.optimizers.split(",") if o] or list(OPTIMIZERS)
    extra = {"score": args.score, "mixer": json.loads(args.mixer)}
    results = []
    t0 = time.perf_counter()
    for name, (data, model_fn) in workloads(args.quick, args.seed).items():
        if wanted_w and name not in wanted_w:
            continue
        for opt in wanted_o:
            res = run(data, model_fn, opt, args.mixing, steps[name], set(checkpoints[name]), args.seed, extra)
            uni = run(data, model_fn, opt, "1.0", steps[name], set(checkpoints[name]), args.seed, extra)
            res["workload"] = name
            res["uniform"] = {
                k: uni[k] for k in ("train_loss", "test_accuracy", "diverged", "seconds", "rows")
            }
            results.append(res)
            print(summary([res]).splitlines()[-1], flush=True)
    table = summary(results)
    print(table)
    result = {
        "benchmark": "stale_probe",
        "config": {
            "mixing": args.mixing,
            "seed": args.seed,
            "batch_size": 32,
            "probe_size": 256,
            "lr": LR,
            "steps": steps,
            "quick": args.quick,
            "score": args.score,
            "mixer": extra["mixer"],
        },
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "total_seconds": time.perf_counter() - t0,
        "results": results,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
