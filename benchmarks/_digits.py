"""Shared set-up of the digits probes: data split, seeded MLP, accuracy (benchmarks only)."""

from __future__ import annotations

import math

import torch
from torch import nn


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits, stratified 80/20 split (``random_state=seed``), standardised on the train part."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)

    def as_x(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def make_mlp(seed: int) -> nn.Module:
    """64-128-128-10 ReLU MLP with PyTorch-style uniform init from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound)
                layer.bias.copy_((torch.rand(layer.bias.shape, generator=gen) * 2 - 1) * bound)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was_training)
    return acc
