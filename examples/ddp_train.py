"""Importance-sampled data-parallel training with torch.distributed.

Launch on CPU (gloo) with two processes::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --loader pool
    torchrun --nproc_per_node=2 examples/ddp_train.py --checkpoint /tmp/ckpt --resume   # continue a run

Without torchrun it trains in one process. Data: scikit-learn's digits when installed,
else a synthetic 10-class problem. Every rank builds the same sampler (same seed); with
the table sampler each step draws one global batch of ``world_size x batch_size``
examples and each rank trains on its shard; score updates are all-gathered so the
tables stay identical (checked at the end). With the pool loader each rank scores its
own pool.
"""

from __future__ import annotations

import argparse
import os
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1797, 64, generator=g)
        y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
        return x, y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loader", choices=["table", "pool"], default="table")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--checkpoint", type=Path, default=None, help="folder for per-rank checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.set_num_threads(1)

    x, y = load_data()
    dataset = torch.utils.data.TensorDataset(x, y)
    g = torch.Generator().manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.to(device)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    if args.loader == "table":
        # num_replicas and rank default from torch.distributed; the seed must be shared
        loader = ImportanceDataLoader(dataset, TableSampler(len(dataset), args.batch_size, seed=0))
    else:  # score with the bare module, not the DDP wrapper
        loader = PoolLoader(dataset, model, UpperBoundScorer(loss_fn), args.batch_size, presample=3.0, seed=0)

    step = 0
    ckpt = args.checkpoint / f"rank{rank}.pt" if args.checkpoint else None
    if args.resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)  # each rank restores its own view
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
        step = state["step"]
    startepoch = loader.sampler.epoch if args.loader == "table" else loader.epoch

    for epoch in range(startepoch, args.epochs):
        total, count = 0.0, 0
        for batch in loader:  # the loader moves its own epoch and position forward
            out = net(batch.inputs.to(device))
            losses = loss_fn(out, batch.targets.to(device))
            opt.zero_grad()
            (batch.weights.to(device) * losses).mean().backward()  # DDP averages: the global estimate
            opt.step()
            loader.update(batch.indices, losses.detach())  # a collective for the table sampler
            total, count, step = total + float(losses.detach().mean()), count + 1, step + 1
            if ckpt is not None and step % 10 == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                state = {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "loader": loader.state_dict(),
                    "step": step,
                }
                torch.save(state, f"{ckpt}.tmp")
                os.replace(f"{ckpt}.tmp", ckpt)
            if args.max_steps is not None and step >= args.max_steps:
                break
        with torch.no_grad():
            accuracy = float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
        if rank == 0:
            print(
                f"epoch {epoch}: mean loss {total / max(count, 1):.4f}, accuracy {accuracy:.4f}", flush=True
            )
        if args.max_steps is not None and step >= args.max_steps:
            break

    if args.loader == "table":
        table = loader.sampler.state_dict()["table"]
        checksum = zlib.crc32(table.numpy().tobytes())
        sums = [checksum] * world
        if distributed:
            dist.all_gather_object(sums, checksum)
        if rank == 0:
            print(f"score tables identical on {world} rank(s): {len(set(sums)) == 1} (crc32 {checksum:08x})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
