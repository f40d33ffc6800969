"""Every registered scheme passes the public conformance suite (isample.testing.check_sampler).

Skipped for all schemes: ``pickle_spawn`` (seconds per scheme; covered for the core loaders
in tests/test_contract.py), ``persistent_workers`` (schemes build their DataLoader once
and take no such option) and ``dict_batches`` (the scoring model takes tensors). Selective
Backprop and RHO-LOSS always yield full batches of b from their selection queue, so they
take no ``drop_last``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import schemes
from isample.testing import CHECKS, check_sampler

CE = nn.CrossEntropyLoss(reduction="none")
ALWAYS_SKIPPED = ("pickle_spawn", "persistent_workers", "dict_batches")
NO_DROP_LAST = {"rho-loss", "selective-backprop"}


@pytest.mark.parametrize("name", schemes.available())
def test_scheme_passes_check_sampler(name, recwarn):
    x, y = make_classification(24)
    dataset = torch.utils.data.TensorDataset(x, y)
    model = make_mlp()
    extra = {}
    if name == "rho-loss":
        extra["holdout"] = torch.utils.data.TensorDataset(*make_classification(16, seed=5))

    def make_loader(data, *, batch_size, seed, **options):
        return schemes.build(name, data, model, CE, batch_size, seed=seed, epochs=4, **extra, **options)

    skip = ALWAYS_SKIPPED + (("drop_last",) if name in NO_DROP_LAST else ())
    ran = check_sampler(make_loader, dataset, skip=skip)
    assert ran == [c for c in CHECKS if c not in skip]


@pytest.mark.parametrize("name", schemes.available())
def test_every_scheme_through_the_entry_point_passes_check_sampler(name, recwarn):
    """isample.DataLoader passes the DataLoader options through, persistent_workers included."""
    import isample

    x, y = make_classification(24)
    dataset = torch.utils.data.TensorDataset(x, y)
    model = make_mlp()
    scheme = name
    if name == "rho-loss":
        scheme = schemes.RhoLoss(holdout=torch.utils.data.TensorDataset(*make_classification(16, seed=5)))

    def make_loader(data, *, batch_size, seed, **options):
        return isample.DataLoader(
            data, batch_size, scheme, model=model, loss_fn=CE, seed=seed, epochs=4, **options
        )

    skip = ("pickle_spawn", "dict_batches") + (("drop_last",) if name in NO_DROP_LAST else ())
    ran = check_sampler(make_loader, dataset, skip=skip)
    assert "persistent_workers" in ran and "num_workers" in ran
