"""Step cost of the framework integrations against the same framework without isample.

* Lightning: the same LightningModule trained with a plain shuffling ``DataLoader`` (no
  callback) and with an isample loader + ``ImportanceSamplingCallback`` (``history-is``:
  loss table, no extra forward; ``kf``: scored pools).
* Hugging Face: ``transformers.Trainer`` against ``ImportanceTrainer`` on a tiny BERT
  built from a config.

The figure is the median wall time of one training step (time between consecutive batch
starts, after ``--warmup`` steps), and the ratio to the baseline of the same framework.
Variants are interleaved over ``--repeats`` rounds (A B A B ...) so that load drift on a
shared machine hits all of them; the ratio is reported as median [min, max] over rounds.

Run ``python benchmarks/bench_integrations.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/integrations.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import isample

LOSS = nn.CrossEntropyLoss(reduction="none")


def _ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in times.items():
        r = [v / b for v, b in zip(values, times[baseline], strict=True)]
        out[name] = {
            "step_ms": 1e3 * statistics.median(values),
            "ratio": statistics.median(r),
            "min": min(r),
            "max": max(r),
        }
    return out


# --------------------------------------------------------------------------- Lightning
def lightning_round(variant: str, steps: int, warmup: int, seed: int) -> float:
    import lightning.pytorch as L

    from isample.integrations.lightning import ImportanceSamplingCallback

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8192, 64, generator=g), torch.randint(0, 10, (8192,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    starts: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(time.perf_counter())

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if variant == "uniform":
                x, y = batch
                return LOSS(self(x), y).mean()
            x, y, w = batch
            losses = LOSS(self(x), y)
            return {"loss": (w * losses).mean(), "losses": losses.detach()}

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            if variant == "uniform":
                return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
            return isample.schemes.build(variant, ds, self, LOSS, batch_size=64, seed=seed)

    callbacks: list[Any] = [Clock()]
    if variant != "uniform":
        callbacks.append(ImportanceSamplingCallback(log_every_n_steps=0))
    trainer = L.Trainer(
        max_steps=steps + warmup + 1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module())
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


# --------------------------------------------------------------------------- Hugging Face
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 2048, length: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[:, 0] = 1 + self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def huggingface_round(variant: str, steps: int, warmup: int, seed: int) -> float:
    import transformers

    from isample.integrations.huggingface import ImportanceTrainer

    starts: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="isample_hf_bench_"),
        per_device_train_batch_size=32,
        max_steps=steps + warmup + 1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        seed=seed,
    )
    cls = transformers.Trainer if variant == "Trainer" else ImportanceTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, args=args, train_dataset=_Tokens(), callbacks=[Clock()])
        trainer.train()
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "integrations.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 8, 2, 1
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": {"platform": platform.platform(), "load": os.getloadavg()}}
    light = {"uniform": [], "history-is": [], "kf": []}
    hf = {"Trainer": [], "ImportanceTrainer": []}
    for r in range(args.repeats):
        for name in light:
            light[name].append(lightning_round(name, args.steps, args.warmup, seed=r))
        for name in hf:
            hf[name].append(huggingface_round(name, args.steps, args.warmup, seed=r))
    results["lightning"] = _ratios(light, "uniform")
    results["huggingface"] = _ratios(hf, "Trainer")
    results["machine"]["load_after"] = os.getloadavg()
    print("| framework | variant | step (ms) | ratio to baseline, median [min, max] |\n|---|---|---|---|")
    for framework in ("lightning", "huggingface"):
        for name, v in results[framework].items():
            print(
                f"| {framework} | {name} | {v['step_ms']:.2f} "
                f"| {v['ratio']:.2f}x [{v['min']:.2f}, {v['max']:.2f}] |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
