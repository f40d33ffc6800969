"""Quickstart: uniform minibatches vs upper-bound importance sampling on scikit-learn's digits.

Run: python examples/quickstart.py   (needs the `bench` extra for scikit-learn; < 60 s on 2 CPU cores)

Both runs use the same model initialisation, optimizer, learning rate and number of steps;
the importance-sampled run reads pools of 4 x 32 examples, scores them with the
Katharopoulos-Fleuret upper bound and trains on 32 drawn from each pool, reweighted by
1 / (B p_i) so the gradient stays unbiased.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import isample


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the example's own script; the library never touches global RNG
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(loader, model, loss_fn, steps: int, lr: float) -> None:
    """The plain training loop: one weighted loss and one ``update`` call differ from a torch loop."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for x, y, w in loader:
            losses = loss_fn(model(x), y)
            (w * losses).mean().backward()
            opt.step()
            opt.zero_grad()
            loader.update(losses.detach())  # the scores of the last batch
            done += 1
            if done == steps:
                break


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_digits_tensors(args.seed)
    train_set = torch.utils.data.TensorDataset(x_train, y_train)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    results = {}

    # Uniform baseline: the same loop, a shuffled loader with weights all 1.
    model = make_model(args.seed)
    uniform = isample.DataLoader(train_set, args.batch_size, scheme="uniform", seed=args.seed)
    train(uniform, model, loss_fn, args.steps, args.lr)
    results["uniform"] = _evaluate(model, loss_fn, x_train, y_train, x_test, y_test)

    # Importance sampling: pools of 4b scored with the gradient-norm upper bound.
    model = make_model(args.seed)
    sampled = isample.DataLoader(
        train_set,
        args.batch_size,
        scheme=isample.schemes.KatharopoulosFleuret(presample=4.0, always=True),
        model=model,
        loss_fn=loss_fn,
        seed=args.seed,
    )
    train(sampled, model, loss_fn, args.steps, args.lr)
    results["upper-bound IS"] = _evaluate(model, loss_fn, x_train, y_train, x_test, y_test)

    print(
        f"{'sampler':<16} {'train loss':>11} {'test acc':>9}"
        f"   ({args.steps} steps of {args.batch_size}, Adam)"
    )
    for name, (loss, acc) in results.items():
        print(f"{name:<16} {loss:>11.5f} {acc:>9.3f}")
    return {name: loss for name, (loss, _) in results.items()}


@torch.no_grad()
def _evaluate(model, loss_fn, x_train, y_train, x_test, y_test) -> tuple[float, float]:
    model.eval()
    loss = float(loss_fn(model(x_train), y_train).mean())
    acc = float((model(x_test).argmax(1) == y_test).float().mean())
    model.train()
    return loss, acc


if __name__ == "__main__":
    main()
