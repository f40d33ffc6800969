"""Scoring throughput: the scorers against a plain no-grad forward of the same batch.

Part 1 (per-call cost). For each model and batch size, every variant runs on the same
batch; variants are interleaved within each repeat (order rotated), each timed over a block
of calls lasting about ``--block-ms`` after a warm-up, and the figure is the median over
``--repeats`` repeats (the best repeat and the median thread CPU time are reported too: the
machine may be shared). Ratios are against the plain ``torch.no_grad()`` forward measured in the same
run (model in eval mode, set once outside the timer). The scorers are called on the model
in train mode, as a loader calls them mid-training, so their figures include switching to
eval mode and back, moving inputs, the closed form and the non-finite check. On CUDA,
``torch.cuda.synchronize()`` brackets every timer.

Variants:

* ``forward``: ``with torch.no_grad(): model(x)`` (the baseline).
* ``forward_inference``: ``with torch.inference_mode(): model(x)`` (for reference).
* ``upper_bound``: ``UpperBoundScorer(CE)(model, x, y)`` (closed form).
* ``loss``: ``LossScorer(CE)(model, x, y)``.
* ``upper_bound_autograd``: ``UpperBoundScorer(CE, closed_form=False)`` (the backward of
  the loss alone), for reference.
* ``grad_norm``: ``GradNormScorer(CE, chunk_size=64)``: per-example gradients, timed over
  ``--grad-norm-repeats`` single calls after the others (about one backward per example).
* on CUDA also ``upper_bound_fp32``: ``UpperBoundScorer(CE, autocast=False)`` (the default
  there is a bf16 forward).

Models: ``mlp`` 64-128-128-10, ``mlp_wide`` 784-512-512-10, ``cnn`` two 3x3 conv layers
(16 and 32 channels, each followed by ReLU and 2x2 max-pool) and a linear layer on 1x28x28,
``transformer`` a 2-layer encoder (d 128, 4 heads, feed-forward 512) on 64 tokens with
per-token cross-entropy over 1,000 classes (logits (b, 1000, 64), batch 32).

Goals: upper bound / forward <= 1.10 (median wall), <= 1.5 for ``mlp`` (a 0.1 ms forward,
where the fixed per-call cost shows). ``--models`` restricts the run.

Part 2 (loading overlapped with scoring). A ``PoolLoader`` (batch 64, presample 4, the
``mlp_wide`` model, ``UpperBoundScorer``) over a dataset whose ``__getitem__`` sleeps
``--item-cost-us`` microseconds (simulated decoding or I/O), with a training step per
batch, run with ``num_workers`` 0 and 2 (persistent workers, started in a warm-up epoch).
With workers the next pools load while the main process scores and trains. The same for
``score_dataset``. Figures are medians over ``--epochs`` epochs.

Run ``python benchmarks/bench_scoring.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/scoring.json`` (or ``--out``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from isample import GradNormScorer, LossScorer, PoolLoader, UpperBoundScorer, score_dataset

MODELS = {
    "mlp": ((64,), (256, 1024)),
    "mlp_wide": ((784,), (256, 1024)),
    "cnn": ((1, 28, 28), (256,)),
    "transformer": ((64,), (32,)),
}
#: UpperBoundScorer / forward goals (ratios of medians, batch 256 or the model's batch).
TARGET_RATIO = 1.10
TARGETS = {"mlp": 1.5}
VOCAB = 1000


class TinyTransformer(nn.Module):
    """Token classifier: embedding, 2 pre-norm encoder layers (d 128, 4 heads), per-token logits.

    Returns logits of shape (b, VOCAB, T) (a transposed view of the head's (b, T, VOCAB) output),
    the layout ``nn.CrossEntropyLoss`` expects for per-token targets of shape (b, T).
    """

    def __init__(self, d_model: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens))).transpose(1, 2)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """The benchmark models, with a seeded initialisation (global RNG untouched)."""
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    elif name == "mlp_wide":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )
    elif name == "transformer":
        model = TinyTransformer()
    else:
        raise ValueError(f"unknown model {name!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.shape[0]
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / fan_in**0.5)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    block_s: float,
    max_inner: int,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Median seconds per call (wall and this thread's CPU time) of interleaved variants.

    Each variant is called ``inner`` times per timed block, ``inner`` chosen after the
    warm-up so that a block lasts about ``block_s`` (at most ``max_inner`` calls).
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        single = max(time.perf_counter() - start, 1e-9)
        inner[name] = max(1, min(max_inner, round(block_s / single)))
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            fn, n = fns[name], inner[name]
            _sync(device)
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            w1, c1 = time.perf_counter(), time.thread_time()
            wall[name].append((w1 - w0) / n)
            cpu[name].append((c1 - c0) / n)
    return {
        k: {
            "wall_s": statistics.median(wall[k]),
            "wall_best_s": min(wall[k]),
            "cpu_s": statistics.median(cpu[k]),
            "cpu_best_s": min(cpu[k]),
            "cpu_repeats_s": cpu[k],
            "calls": inner[k] * repeats,
        }
        for k in fns
    }


def bench_model(
    name: str,
    batch: int,
    device: torch.device,
    repeats: int,
    block_s: float,
    max_inner: int,
    grad_norm_repeats: int,
) -> dict:
    shape, _ = MODELS[name]
    gen = torch.Generator().manual_seed(1)
    if name == "transformer":  # per-token cross-entropy over VOCAB classes
        x = torch.randint(0, VOCAB, (batch, *shape), generator=gen)
        y = torch.randint(0, VOCAB, (batch, *shape), generator=gen)
    else:
        x = torch.randn(batch, *shape, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
    base = make_model(name).to(device).eval()
    scored = make_model(name).to(device).train()  # scorers see a model mid-training
    x_dev, y_dev = x.to(device), y.to(device)
    ce = nn.CrossEntropyLoss(reduction="none")
    ub, loss, gn = UpperBoundScorer(ce), LossScorer(ce), GradNormScorer(ce, chunk_size=64)
    ub_autograd = UpperBoundScorer(ce, closed_form=False)

    def forward() -> None:
        with torch.no_grad():
            base(x_dev)

    def forward_inference() -> None:
        with torch.inference_mode():
            base(x_dev)

    fns: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "forward_inference": forward_inference,
        "upper_bound": lambda: ub(scored, x_dev, y_dev),
        "loss": lambda: loss(scored, x_dev, y_dev),
        "upper_bound_autograd": lambda: ub_autograd(scored, x_dev, y_dev),
    }
    if device.type == "cuda":
        ub32 = UpperBoundScorer(ce, autocast=False)
        fns["upper_bound_fp32"] = lambda: ub32(scored, x_dev, y_dev)
    times = time_variants(fns, device, repeats, block_s, max_inner)
    if grad_norm_repeats:
        # about one backward per example: a few single calls, after the interleaved variants
        times["grad_norm"] = time_variants(
            {"grad_norm": lambda: gn(scored, x_dev, y_dev)}, device, grad_norm_repeats, 0.0, 1, warmup=1
        )["grad_norm"]
    ref = times["forward"]
    for entry in times.values():
        entry["ratio_wall"] = entry["wall_s"] / ref["wall_s"]
        entry["ratio_wall_best"] = entry["wall_best_s"] / ref["wall_best_s"]
        entry["ratio_cpu"] = entry["cpu_s"] / ref["cpu_s"] if ref["cpu_s"] > 0 else float("nan")
        entry["ratio_cpu_best"] = (
            entry["cpu_best_s"] / ref["cpu_best_s"] if ref["cpu_best_s"] > 0 else float("nan")
        )
        # per-repeat ratios (variant and baseline timed in the same repeat): median [min, max]
        mine, base = entry["cpu_repeats_s"], ref["cpu_repeats_s"]
        if len(mine) == len(base):
            pairs = [v / r for v, r in zip(mine, base, strict=True) if r > 0]
        else:  # grad_norm, timed after the interleaved variants: against the baseline's median
            pairs = [v / ref["cpu_s"] for v in mine] if ref["cpu_s"] > 0 else []
        entry["ratio_cpu_min"] = min(pairs) if pairs else float("nan")
        entry["ratio_cpu_max"] = max(pairs) if pairs else float("nan")
    return {"model": name, "batch": batch, "variants": times}


class SlowDataset(Dataset):
    """``(x_i, y_i)`` from tensors, each item costing ``item_cost_s`` of sleep (simulated I/O)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, item_cost_s: float) -> None:
        self.x, self.y, self.item_cost_s = x, y, item_cost_s

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.item_cost_s > 0:
            time.sleep(self.item_cost_s)
        return self.x[i], self.y[i]


def bench_overlap(
    device: torch.device,
    n: int,
    num_batches: int,
    epochs: int,
    item_cost_us: float,
    workers_list: tuple = (0, 2),
) -> dict:
    gen = torch.Generator().manual_seed(2)
    ds = SlowDataset(
        torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen), item_cost_us * 1e-6
    )
    ce = nn.CrossEntropyLoss(reduction="none")
    rows = []
    for workers in workers_list:
        model = make_model("mlp_wide").to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = PoolLoader(
            ds,
            model,
            UpperBoundScorer(ce),
            batch_size=64,
            presample=4.0,
            always=True,
            num_batches=num_batches,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            seed=0,
        )
        epoch_s, score_s = [], []
        for epoch in range(epochs + 1):  # epoch 0 starts the workers: not timed
            loader.set_epoch(epoch)
            _sync(device)
            start = time.perf_counter()
            first_step = loader.steps
            for batch in loader:
                losses = ce(model(batch.inputs), batch.targets)
                (batch.weights * losses).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
            if epoch:
                epoch_s.append(time.perf_counter() - start)
                score_s.append(sum(h["score_seconds"] for h in loader.tau_history if h["step"] >= first_step))
        del loader
        sd_s = []
        model.eval()
        for rep in range(epochs + 1):
            start = time.perf_counter()
            score_dataset(model, ds, UpperBoundScorer(ce), batch_size=256, num_workers=workers)
            if rep:
                sd_s.append(time.perf_counter() - start)
        rows.append(
            {
                "num_workers": workers,
                "pool_epoch_s": statistics.median(epoch_s),
                "pool_score_s": statistics.median(score_s),
                "score_dataset_s": statistics.median(sd_s),
            }
        )
    for row in rows:
        row["pool_speedup"] = rows[0]["pool_epoch_s"] / row["pool_epoch_s"]
        row["score_dataset_speedup"] = rows[0]["score_dataset_s"] / row["score_dataset_s"]
    pools_items = num_batches * 256
    return {
        "n": n,
        "num_batches": num_batches,
        "batch_size": 64,
        "pool_size": 256,
        "item_cost_us": item_cost_us,
        "pool_load_sleep_s": pools_items * item_cost_us * 1e-6,
        "score_dataset_sleep_s": n * item_cost_us * 1e-6,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "| model | batch | variant | median ms/call | ratio (median wall) | ratio (best wall) "
        "| ratio (median thread CPU) [min, max] | ratio (best thread CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for variant, t in case["variants"].items():
            lines.append(
                f"| {case['model']} | {case['batch']} | {variant} | {t['wall_s'] * 1e3:.3f} | "
                f"{t['ratio_wall']:.3f} | {t['ratio_wall_best']:.3f} | {t['ratio_cpu']:.3f} "
                f"[{t['ratio_cpu_min']:.3f}, {t['ratio_cpu_max']:.3f}] | {t['ratio_cpu_best']:.3f} |"
            )
    lines.append("")
    lines.append(
        f"UpperBoundScorer target: <= {TARGET_RATIO:.2f}x the no-grad forward (ratios of medians; "
        f"{', '.join(f'{k} <= {v}x' for k, v in TARGETS.items())})."
    )
    for case in result["cases"]:
        t = case["variants"]["upper_bound"]
        ok = "met" if t["ratio_wall"] <= TARGETS.get(case["model"], TARGET_RATIO) else "NOT met"
        lines.append(
            f"- {case['model']} b={case['batch']}: {t['ratio_wall']:.3f}x (median wall) -> {ok}; "
            f"best-of-repeats {t['ratio_wall_best']:.3f}x, thread CPU {t['ratio_cpu']:.3f}x "
            f"[{t['ratio_cpu_min']:.3f}, {t['ratio_cpu_max']:.3f}], "
            f"best thread CPU {t['ratio_cpu_best']:.3f}x"
        )
    ov = result.get("overlap")
    if ov:
        lines += [
            "",
            f"Loading overlapped with scoring: {ov['n']} items, {ov['item_cost_us']:.0f} us sleep per item; "
            f"PoolLoader {ov['num_batches']} batches of {ov['batch_size']} from pools of {ov['pool_size']} "
            f"(sleep alone {ov['pool_load_sleep_s']:.2f} s/epoch), training step per batch; "
            f"score_dataset batch 256 (sleep alone {ov['score_dataset_sleep_s']:.2f} s).",
            "",
            "| num_workers | PoolLoader epoch s | of which scoring s | speed-up "
            "| score_dataset s | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for row in ov["rows"]:
            lines.append(
                f"| {row['num_workers']} | {row['pool_epoch_s']:.3f} | {row['pool_score_s']:.3f} | "
                f"{row['pool_speedup']:.2f} | {row['score_dataset_s']:.3f} | "
                f"{row['score_dataset_speedup']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--block-ms", type=float, default=20.0, help="target duration of a timed block")
    parser.add_argument("--max-inner", type=int, default=50, help="most calls per timed block")
    parser.add_argument("--grad-norm-repeats", type=int, default=3)
    parser.add_argument("--item-cost-us", type=float, default=100.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-overlap", action="store_true", help="skip part 2 (loading overlap)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models to run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        cases = [("mlp", 32)]
        timing = {"repeats": 3, "block_s": 0.002, "max_inner": 2, "grad_norm_repeats": 1}
        overlap = {"n": 256, "num_batches": 2, "epochs": 1, "item_cost_us": 0.0, "workers_list": (0,)}
    else:
        chosen = args.models.split(",")
        unknown = [m for m in chosen if m not in MODELS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
        cases = [(name, b) for name, (_, batches) in MODELS.items() if name in chosen for b in batches]
        timing = {
            "repeats": args.repeats,
            "block_s": args.block_ms / 1e3,
            "max_inner": args.max_inner,
            "grad_norm_repeats": args.grad_norm_repeats,
        }
        overlap = {"n": 4096, "num_batches": 16, "epochs": args.epochs, "item_cost_us": args.item_cost_us}
    result: dict[str, Any] = {
        "benchmark": "scoring",
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "timing": timing,
        "quick": args.quick,
        "target_ratio": TARGET_RATIO,
        "cases": [],
    }
    for name, batch in cases:
        result["cases"].append(bench_model(name, batch, device, **timing))
    if not args.no_overlap:
        result["overlap"] = bench_overlap(device, **overlap)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
