"""The public conformance suite (isample.testing) on every built-in loader, and on broken ones."""

from __future__ import annotations

import pytest
import torch
from conftest import make_classification
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer, WeightedBatch
from isample.testing import CHECKS, check_sampler, sampler_checks

CE = nn.CrossEntropyLoss(reduction="none")


class DictMLP(nn.Module):
    """An MLP that also accepts ``input_ids=x`` (dict batches are called as ``model(**inputs)``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x=None, input_ids=None):  # dict inputs arrive as model(**inputs)
        return self.net(x if input_ids is None else input_ids)


def make_table(dataset, *, batch_size, seed, drop_last=False, **options):
    sampler = TableSampler(len(dataset), batch_size, seed=seed, drop_last=drop_last, power=0.5)
    return ImportanceDataLoader(dataset, sampler, **options)


def make_pool(dataset, *, batch_size, seed, **options):
    return PoolLoader(
        dataset, DictMLP(), UpperBoundScorer(CE), batch_size, presample=2.0, always=True, seed=seed, **options
    )


def make_pool_with_switch(dataset, *, batch_size, seed, **options):  # uniform warm-up, then the tau switch
    return PoolLoader(
        dataset, DictMLP(), UpperBoundScorer(CE), batch_size, presample=3.0, seed=seed, **options
    )


DATASET = torch.utils.data.TensorDataset(*make_classification(22))
FACTORIES = {"table": make_table, "pool": make_pool, "pool_switch": make_pool_with_switch}
CASES = [
    pytest.param(kind, name, check, id=f"{kind}-{name}")
    for kind, factory in FACTORIES.items()
    for name, check in sampler_checks(factory, DATASET, batch_size=4)
    if not (
        kind == "pool_switch" and name in ("pickle_spawn", "persistent_workers")
    )  # same code path as "pool"
]


def test_check_names_are_unique_and_all_generated():
    names = [name for name, _ in sampler_checks(make_table, DATASET)]
    assert tuple(names) == CHECKS and len(set(names)) == len(names)


# A spawned DataLoader worker occasionally aborts while the interpreter tears it down
# ("terminate called without an active exception", in torch's C++ runtime), after every
# batch was delivered and checked; pytest would report that teardown as an unraisable
# exception of the test. The check's own assertions are unaffected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind, name, check", CASES)
def test_builtin_loaders_pass(kind, name, check):
    check()


def test_check_sampler_runs_everything_requested():
    assert check_sampler(make_table, DATASET, skip=("pickle_spawn", "persistent_workers")) == [
        c for c in CHECKS if c not in ("pickle_spawn", "persistent_workers")
    ]
    with pytest.raises(ValueError, match="unknown checks \\['nope'\\]"):
        check_sampler(make_table, DATASET, skip=("nope",))


# ---------------------------------------------------------------- broken samplers are caught, by name


class Broken:
    """A loader that wraps a correct one and breaks one part of the contract."""

    def __init__(self, inner, flaw):
        self.inner, self.flaw = inner, flaw

    def __len__(self):
        return len(self.inner) + (1 if self.flaw == "len" else 0)

    def set_epoch(self, epoch):
        if self.flaw != "set_epoch":
            self.inner.set_epoch(epoch)

    def update(self, indices, scores):
        self.inner.update(indices, scores)

    def __iter__(self):
        for batch in self.inner:
            if self.flaw == "weights":
                batch = WeightedBatch(batch.inputs, batch.targets, batch.indices, -batch.weights)
            elif self.flaw == "rows":
                batch = WeightedBatch(batch.inputs, batch.targets, batch.indices.flip(0), batch.weights)
            elif self.flaw == "range":
                batch = WeightedBatch(batch.inputs, batch.targets, batch.indices + 1000, batch.weights)
            yield batch


@pytest.mark.parametrize(
    "flaw, failing",
    [
        ("len", "len"),
        ("weights", "weights_finite_positive"),
        ("rows", "rows_match_dataset"),
        ("range", "indices_in_range"),
        ("set_epoch", "set_epoch"),
    ],
)
def test_broken_loader_fails_the_named_check(flaw, failing):
    def factory(dataset, **kwargs):
        return Broken(make_table(dataset, **kwargs), flaw)

    skip = ("pickle_spawn", "persistent_workers", "num_workers", "pin_memory")
    with pytest.raises(AssertionError, match=f"check '{failing}' failed"):
        check_sampler(factory, DATASET, skip=skip)


def test_unseeded_sampler_fails_determinism():
    def factory(dataset, *, batch_size, seed, drop_last=False, **options):
        sampler = TableSampler(len(dataset), batch_size, drop_last=drop_last)  # ignores the seed
        return ImportanceDataLoader(dataset, sampler, **options)

    with pytest.raises(AssertionError, match="check 'deterministic' failed"):
        check_sampler(factory, DATASET, skip=("pickle_spawn", "persistent_workers", "num_workers"))
