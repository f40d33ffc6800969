"""Per-step overhead of the free-score schemes in a real training loop.

The same loop (forward, weighted loss, backward, optimizer step, feedback) runs with a
plain ``torch.utils.data.DataLoader(shuffle=True)`` and with ``isample.DataLoader`` for the
schemes whose scores come free with the training step (``history-is``,
``history-gradnorm``, ``infobatch``). Two models bracket the issue-12 goals:

* ``cnn``: a small 2-conv CNN on 1x28x28 inputs, batch 64 (a step of about 17 ms on 1 CPU
  thread here); goal <= 5% over the plain step;
* ``mlp``: MLP 64-128-128-10, batch 64 (a step of about 1.5 ms); goal <= 20%.

Rounds interleave the variants (A B C D, A B C D, ...) so load drift hits all of them;
each round times ``--steps`` steps after ``--warmup`` and the ratio to the plain loader is
taken per round, reported as median [min, max] over rounds, with the process CPU time.

With ``--old DIR`` (the ``isample`` package directory of another version, e.g.
``git archive main isample | tar -x -C /tmp/before`` then ``--old /tmp/before/isample``)
that version's schemes run in the same rounds as ``old:<scheme>`` (before vs after in one run).

Run ``python benchmarks/bench_step_overhead.py`` (``--quick`` for a smoke run); writes
``benchmarks/results/step_overhead.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import isample

VARIANTS = ("torch", "history-is", "history-gradnorm", "infobatch")
LOSS = nn.CrossEntropyLoss(reduction="none")


def load_old(path: str) -> Any:
    """Import the ``isample`` package directory ``path`` as ``isample_old`` (relative imports only)."""
    init = Path(path) / "__init__.py"
    spec = importlib.util.spec_from_file_location("isample_old", init, submodule_search_locations=[path])
    if spec is None or spec.loader is None:
        raise ValueError(f"--old must be an isample package directory; got {path!r}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules["isample_old"] = module
    spec.loader.exec_module(module)
    return module


def model_and_data(kind: str, n: int, seed: int) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        x = torch.randn(n, 1, 28, 28, generator=g)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    else:
        x = torch.randn(n, 64, generator=g)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    y = torch.randint(0, 10, (n,), generator=g)
    return model, TensorDataset(x, y)


def one_round(
    kind: str, variant: str, steps: int, warmup: int, n: int, seed: int, old: Any = None
) -> tuple[float, float]:
    """Seconds (wall, process CPU) per step of ``steps`` timed steps (``old:<scheme>``: ``old``'s)."""
    package = isample
    if variant.startswith("old:"):
        package, variant = old, variant[4:]
    model, ds = model_and_data(kind, n, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant == "torch":
        g = torch.Generator().manual_seed(seed)
        loader: Any = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=g)
    else:
        loader = package.DataLoader(
            ds,
            batch_size=64,
            scheme=variant,
            model=model,
            loss_fn=LOSS,
            optimizer=opt,
            epochs=1000,
            seed=seed,
        )
    done, t0, c0 = 0, 0.0, 0.0
    while True:
        for batch in loader:
            if done == warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            if variant == "torch":
                x, y = batch
                LOSS(model(x), y).mean().backward()
            else:
                x, y, w = batch
                losses = LOSS(model(x), y)
                (w * losses).mean().backward()
            opt.step()
            opt.zero_grad()
            if variant != "torch":
                loader.update(losses.detach())
            done += 1
            if done == warmup + steps:
                return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--old", default=None, help="another version's isample package directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 5, 2, 1
    torch.set_num_threads(1)
    old = load_old(args.old) if args.old else None
    variants = VARIANTS + (tuple(f"old:{v}" for v in VARIANTS[1:]) if old is not None else ())
    results: dict[str, Any] = {"load_before": os.getloadavg(), "models": {}, "old": args.old}
    print("| model | variant | step ms (wall) | wall ratio | CPU ratio |\n|---|---|---|---|---|")
    for kind in args.models.split(","):
        wall: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants:
                w, c = one_round(kind, variant, args.steps, args.warmup, args.n, seed=r, old=old)
                wall[variant].append(w)
                cpu[variant].append(c)
        rows = {}
        for variant in variants:
            rw = [a / b for a, b in zip(wall[variant], wall["torch"], strict=True)]
            rc = [a / b for a, b in zip(cpu[variant], cpu["torch"], strict=True)]
            rows[variant] = {
                "step_ms": 1e3 * statistics.median(wall[variant]),
                "wall_ratio": [statistics.median(rw), min(rw), max(rw)],
                "cpu_ratio": [statistics.median(rc), min(rc), max(rc)],
            }
            w, c = rows[variant]["wall_ratio"], rows[variant]["cpu_ratio"]
            print(
                f"| {kind} | {variant} | {rows[variant]['step_ms']:.2f} "
                f"| {w[0]:.3f} [{w[1]:.3f}, {w[2]:.3f}] | {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}] |"
            )
        results["models"][kind] = rows
    results["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
