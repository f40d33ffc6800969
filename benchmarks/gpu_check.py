"""GPU check: scoring a pool of 4b in bf16 against one training step on b, ResNet-18-sized.

Needs a CUDA device. The model is a ResNet-18-like network written with torch only
(CIFAR stem: a 3x3 convolution, four stages of two basic blocks with 64-128-256-512
channels, global average pooling and a linear layer; 11.2M parameters) on 3x32x32 inputs
(``--size 64`` for 3x64x64), 10 classes, b = 128, pool B = 4b = 512.

Variants (interleaved, ``--repeats`` repeats of ``--inner`` calls after a warm-up,
``torch.cuda.synchronize()`` around every timer, medians):

* ``train_step_fp32`` / ``train_step_bf16``: forward, mean cross-entropy, backward and an
  SGD step on b examples, in float32 / under ``torch.autocast(bfloat16)``.
* ``forward_pool_bf16`` / ``forward_pool_fp32``: a plain no-grad forward of the pool.
* ``score_pool_bf16``: ``UpperBoundScorer(CE)`` on the pool (its CUDA default: bf16 forward,
  float32 bound) with the model in train mode (switched to eval and back by the scorer).
* ``score_pool_fp32``: the same with ``autocast=False``.
* ``score_pool_bf16_pinned``: ``score_pool_bf16`` on a pool in pinned CPU memory (includes
  the non-blocking host-to-device copy).

Reported: seconds per call, ratios against ``train_step_fp32`` and ``train_step_bf16``,
each variant's peak CUDA memory, and how close the bf16 scores are to the float32 ones
(max absolute difference, Spearman rank correlation). Ratios are against baselines
measured in the same run.

On a machine without CUDA the script says so and exits with status 2; ``--cpu-smoke``
runs a tiny version (width 8, b = 4, 16x16 inputs) on the CPU to check the code path.

Run ``python benchmarks/gpu_check.py`` (writes ``benchmarks/results/gpu_check.json`` or
``--out``; prints a Markdown table). Together with ``python -m pytest tests/test_gpu.py -q``
this is the whole GPU check of the scorers and loaders.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isample import UpperBoundScorer

NO_CUDA_MESSAGE = (
    "gpu_check.py measures scoring on a CUDA device and none is available here "
    "(torch.cuda.is_available() is False). Nothing was measured. "
    "Run it on a machine with a GPU, or pass --cpu-smoke for a tiny CPU run that only checks the code path."
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (1x1 projection when needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Like(nn.Module):
    """ResNet-18 layout for small images: 3x3 stem, stages of 2 blocks, widths w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    ra = torch.empty_like(a, dtype=torch.float64)
    rb = torch.empty_like(b, dtype=torch.float64)
    ra[a.argsort()] = torch.arange(a.numel(), dtype=torch.float64, device=a.device)
    rb[b.argsort()] = torch.arange(b.numel(), dtype=torch.float64, device=b.device)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, inner: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median seconds per call of interleaved variants, and each one's peak CUDA memory."""
    peaks: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {
        k: {"seconds": statistics.median(v), "peak_mib": peaks.get(k, float("nan"))} for k, v in times.items()
    }


def run(
    device: torch.device, width: int, batch: int, size: int, repeats: int, inner: int, warmup: int
) -> dict:
    gen = torch.Generator().manual_seed(0)
    pool = 4 * batch
    x_cpu = torch.randn(pool, 3, size, size, generator=gen)
    y_cpu = torch.randint(0, 10, (pool,), generator=gen)
    x, y = x_cpu.to(device), y_cpu.to(device)
    xb, yb = x[:batch], y[:batch]
    pinned = device.type == "cuda"
    x_pin = x_cpu.pin_memory() if pinned else x_cpu
    y_pin = y_cpu.pin_memory() if pinned else y_cpu
    with torch.random.fork_rng(devices=[]):  # seeded initialisation; the caller's RNG state is untouched
        torch.manual_seed(0)
        model = ResNet18Like(width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = sum(p.numel() for p in model.parameters())
    ce_mean = nn.CrossEntropyLoss()
    ce = nn.CrossEntropyLoss(reduction="none")
    score_bf16 = UpperBoundScorer(ce, autocast=True)  # the CUDA default; on the CPU smoke run, CPU autocast
    score_fp32 = UpperBoundScorer(ce, autocast=False)
    amp_dtype = torch.bfloat16

    def train_step(amp: bool) -> None:
        model.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = ce_mean(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward_pool(amp: bool) -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            model(x)
        model.train()

    def scored(scorer: UpperBoundScorer, xs: torch.Tensor, ys: torch.Tensor) -> Callable[[], Any]:
        def call() -> torch.Tensor:
            model.train()
            return scorer(model, xs, ys)

        return call

    fns: dict[str, Callable[[], Any]] = {
        "train_step_fp32": lambda: train_step(False),
        "train_step_bf16": lambda: train_step(True),
        "forward_pool_fp32": lambda: forward_pool(False),
        "forward_pool_bf16": lambda: forward_pool(True),
        "score_pool_fp32": scored(score_fp32, x, y),
        "score_pool_bf16": scored(score_bf16, x, y),
        "score_pool_bf16_pinned": scored(score_bf16, x_pin, y_pin),
    }
    if device.type != "cuda":  # bf16 autocast on CPU is slow and beside the point of a smoke run
        fns = {k: v for k, v in fns.items() if "bf16" not in k or k == "score_pool_bf16"}
    times = measure(fns, device, repeats, inner, warmup)
    for ref in ("train_step_fp32", "train_step_bf16"):
        if ref in times:
            for entry in times.values():
                entry[f"ratio_vs_{ref}"] = entry["seconds"] / times[ref]["seconds"]
    model.train()
    s16 = score_bf16(model, x, y).double()
    s32 = score_fp32(model, x, y).double()
    return {
        "model": "ResNet18Like",
        "width": width,
        "params": params,
        "input": [3, size, size],
        "batch": batch,
        "pool": pool,
        "variants": times,
        "bf16_vs_fp32": {
            "max_abs_diff": float((s16 - s32).abs().max()),
            "mean_abs_diff": float((s16 - s32).abs().mean()),
            "spearman": spearman(s16, s32),
        },
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['params'] / 1e6:.2f}M parameters), input {result['input']}, "
        f"b = {result['batch']}, pool = {result['pool']}, device {result['device']}",
        "",
        "| variant | median ms | x train_step_fp32 | x train_step_bf16 | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for name, t in result["variants"].items():
        r32 = t.get("ratio_vs_train_step_fp32", float("nan"))
        r16 = t.get("ratio_vs_train_step_bf16", float("nan"))
        lines.append(f"| {name} | {t['seconds'] * 1e3:.3f} | {r32:.3f} | {r16:.3f} | {t['peak_mib']:.1f} |")
    acc = result["bf16_vs_fp32"]
    lines += [
        "",
        f"bf16 vs fp32 scores: max |diff| {acc['max_abs_diff']:.2e}, mean |diff| {acc['mean_abs_diff']:.2e}, "
        f"Spearman {acc['spearman']:.4f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny CPU run that only checks the code path"
    )
    parser.add_argument("--size", type=int, default=32, choices=(32, 64), help="input height and width")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        config = {"width": 8, "batch": 4, "size": 16, "repeats": 2, "inner": 1, "warmup": 1}
    elif not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        config = {
            "width": 64,
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "inner": args.inner,
            "warmup": 5,
        }
    result = run(device, **config)
    result.update(
        {
            "benchmark": "gpu_check",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_smoke": args.cpu_smoke,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "repeats": config["repeats"],
            "inner": config["inner"],
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
