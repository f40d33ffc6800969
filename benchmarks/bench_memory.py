"""Peak memory of per-example gradient work against the chunk size and the batch size.

``GradNormScorer(loss, chunk_size=c)`` materialises the gradients of ``c`` examples at a
time, so its extra peak memory should be about ``c x P x 4`` bytes (P parameters, float32)
plus one chunk's activations, and should not grow with the batch size b.
``isample.metrics.per_example_gradients`` returns the whole (b, P) matrix, so its peak is
that result plus the same chunk-sized working memory; the table reports the working
memory (peak minus the result).

Measurement. CPU: ``tracemalloc`` does not see torch's allocations, so each (scorer,
chunk, batch) case runs in its own subprocess that builds the model and data, warms the
code path up on a tiny model, reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, scores
the batch and reads ``ru_maxrss`` again: the difference is the peak the scoring added. The
subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc maps every block over
64 KiB when it is allocated and unmaps it when it is freed: the resident set then follows
the live tensors (with glibc's default dynamic threshold, freed blocks stay cached in the
heap and the figure drifts with the allocation history, not with the live memory). CUDA
(``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the memory allocated
before, in process.

Model: MLP 784-256-256-10 (P = 269,322 parameters, 1.08 MB of float32 gradient per
example), cross-entropy, random inputs.

Run ``python benchmarks/bench_memory.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/memory.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHUNKS = (1, 4, 16, 64, 256)
MMAP_THRESHOLD = 65536
BATCHES = (256, 1024)
KINDS = ("grad_norm", "per_example_gradients")


def make_model(width: int = 256, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / p.shape[-1] ** 0.5)
    return model


def _run(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    loss = nn.CrossEntropyLoss(reduction="none")
    if kind == "grad_norm":
        from isample import GradNormScorer

        return GradNormScorer(loss, chunk_size=chunk)(model, x, y)
    from isample.metrics import per_example_gradients

    return per_example_gradients(model, loss, x, y, chunk_size=chunk)


def _maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def measure(kind: str, chunk: int, batch: int, device: str, width: int) -> dict[str, Any]:
    """One case, in this process: the peak bytes that scoring ``batch`` examples added."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    model = make_model(width).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 784, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    # warm-up on a tiny model: imports and lazy initialisation without raising the peak
    _run(kind, make_model(2).to(dev), x[:1], y[:1], 1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = _run(kind, model, x, y, chunk)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        before = _maxrss_bytes()
        out = _run(kind, model, x, y, chunk)
        peak = _maxrss_bytes() - before
    result_bytes = out.numel() * out.element_size()
    params = sum(p.numel() for p in model.parameters())
    return {
        "kind": kind,
        "chunk": chunk,
        "batch": batch,
        "params": params,
        "peak_bytes": int(peak),
        "result_bytes": int(result_bytes),
        "working_bytes": int(peak - (result_bytes if kind == "per_example_gradients" else 0)),
        "predicted_bytes": int(min(chunk, batch) * params * 4),
    }


def run_case(
    kind: str, chunk: int, batch: int, device: str, width: int, in_process: bool = False
) -> dict[str, Any]:
    if device != "cpu" or in_process:
        return measure(kind, chunk, batch, device, width)
    cmd = [sys.executable, __file__, "--child", kind, str(chunk), str(batch), "--width", str(width)]
    # a fixed mmap threshold: glibc then maps every block over 64 KiB on allocation and unmaps
    # it on free, so the resident set follows the live tensors instead of the allocator's cache
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    mb = 1e6
    lines = [
        "| scorer | chunk | batch | peak added (MB) | working memory (MB) | chunk x P x 4 B (MB) "
        "| working / predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        lines.append(
            f"| {r['kind']} | {r['chunk']} | {r['batch']} | {r['peak_bytes'] / mb:.1f} | "
            f"{r['working_bytes'] / mb:.1f} | "
            f"{r['predicted_bytes'] / mb:.1f} | {r['working_bytes'] / max(r['predicted_bytes'], 1):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CHUNK", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    if args.child:
        kind, chunk, batch = args.child
        print(json.dumps(measure(kind, int(chunk), int(batch), "cpu", args.width)))
        return {}
    if args.quick:
        chunks, batches, kinds, width = (4,), (16,), ("grad_norm",), 32
    else:
        chunks, batches, kinds, width = CHUNKS, BATCHES, KINDS, args.width
    # --quick measures one case in this process (no subprocess start-up): a smoke run only
    cases = [
        run_case(k, c, b, args.device, width, args.quick) for k in kinds for b in batches for c in chunks
    ]
    result = {
        "benchmark": "memory",
        "device": args.device,
        "method": (
            "cuda max_memory_allocated"
            if args.device != "cpu"
            else "ru_maxrss delta in "
            + (
                "this process (smoke run)"
                if args.quick
                else f"a subprocess per case, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
            )
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "width": width,
        "quick": args.quick,
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
