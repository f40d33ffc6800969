from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# Property tests explore new random examples on every local run (that is how they find
# bugs); under CI they replay a fixed, derandomised set so a submission's result does not
# depend on the luck of the draw.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tests use tiny models: one intra-op thread avoids oversubscribing the 2 cores (and the
# DataLoader workers some tests start), which made small autograd calls ~30x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_classification(n: int = 64, d: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


@pytest.fixture
def classification():
    x, y = make_classification()
    return torch.utils.data.TensorDataset(x, y)


def make_mlp(d: int = 5, hidden: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def mlp():
    return make_mlp()
