"""Exact resume: train k steps, save, reload into fresh objects, continue n steps == k + n uninterrupted."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer

CE = nn.CrossEntropyLoss(reduction="none")
K, STEPS = 5, 13  # save after 5 steps; 13 in all (8 batches per epoch: crosses a boundary)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # tensors, ints, floats, lists and dicts only


def dataset():
    return torch.utils.data.TensorDataset(*make_classification(64))


def build(kind, model, num_workers, seed=3):
    if kind == "table":
        sampler = TableSampler(64, 8, seed=seed, power=0.5, mixing=0.2)
        return ImportanceDataLoader(dataset(), sampler, num_workers=num_workers)
    return PoolLoader(
        dataset(),
        model,
        UpperBoundScorer(CE),
        8,
        presample=2.0,
        seed=seed,
        tau_threshold=1.08,
        num_workers=num_workers,
    )


def train(loader, model, opt, steps, log):
    it = iter(loader)
    while len(log) < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        opt.zero_grad()
        losses = CE(model(batch.inputs), batch.targets)
        (batch.weights * losses).mean().backward()
        opt.step()
        loader.update(batch.indices, losses.detach())
        log.append((batch.indices.tolist(), batch.weights.tolist()))
    return log


def fresh(seed=0):
    model = make_mlp(seed=seed)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


@pytest.mark.parametrize("kind", ["table", "pool"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_identical_to_an_uninterrupted_run(kind, num_workers):
    model, opt = fresh()
    full_loader = build(kind, model, num_workers)
    full = train(full_loader, model, opt, STEPS, [])
    final = [p.detach().clone() for p in model.parameters()]

    model, opt = fresh()
    loader = build(kind, model, num_workers)
    part = train(loader, model, opt, K, [])
    state = roundtrip({"loader": loader.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
    del loader  # abandon the run, its prefetched batches included

    model, opt = fresh(seed=7)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    resumed = build(kind, model, num_workers, seed=11)  # seed, epoch, position come from the state
    resumed.load_state_dict(state["loader"])
    train(resumed, model, opt, STEPS, part)
    assert part == full
    for a, b in zip(final, model.parameters(), strict=True):
        assert torch.equal(a, b)
    if kind == "pool":  # the switch state came back: EMA of tau and on/off
        assert resumed.switch.state_dict() == full_loader.switch.state_dict()
        assert resumed.tau_history[-1]["ema"] == full_loader.tau_history[-1]["ema"]
        assert [e["on"] for e in full_loader.tau_history] != [True] * STEPS  # the switch did flip


def test_table_state_reverts_updates_applied_by_prefetched_draws():
    """With delay 2 the sampler draws ahead; the saved table is the one at the consumption point."""

    def run(sampler, steps, log, stop=None):
        sampler.advance(0)  # count consumed batches (advance), not draws
        it = iter(sampler)
        for _ in range(steps):
            batch = next(it)
            sampler.advance(1)
            log.append(batch)
            idx = torch.tensor([i for i, _ in batch])
            sampler.update(idx, idx.double() + len(log))
            if stop is not None and len(log) == stop:
                next(it)  # a prefetched draw, applying an update that is not due at the consumption point
                next(it)
                return sampler.state_dict()
        return None

    full = []
    run(TableSampler(30, 3, seed=1, delay=2), 9, full)
    part = []
    state = run(TableSampler(30, 3, seed=1, delay=2), 9, part, stop=4)
    resumed = TableSampler(30, 3, seed=1, delay=2)
    resumed.load_state_dict(roundtrip(state))
    run(resumed, 5, part)
    assert part == full


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 on recent torch
def test_stateful_dataloader_saves_and_restores_the_sampler():
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")
    from isample import WeightedDataset, weighted_collate

    ds = dataset()

    def loader(seed):
        sampler = TableSampler(64, 8, seed=seed, power=0.5)
        return torchdata.StatefulDataLoader(
            WeightedDataset(ds), batch_sampler=sampler, collate_fn=weighted_collate
        )

    def run(dl, steps, log):
        for batch in dl:
            log.append((batch.indices.tolist(), batch.weights.tolist()))
            dl.batch_sampler.update(batch.indices, batch.inputs.abs().sum(1) + len(log))
            if len(log) == steps:
                return

    full = []
    dl = loader(4)
    run(dl, 8, full)
    run(dl, 13, full)  # second epoch
    part = []
    dl = loader(4)
    run(dl, 5, part)
    state = roundtrip(dl.state_dict())
    resumed = loader(9)
    resumed.load_state_dict(state)
    run(resumed, 8, part)
    run(resumed, 13, part)
    assert part == full
    for obj in (
        dl.batch_sampler,
        ImportanceDataLoader(ds, TableSampler(64, 8, seed=0)),
        PoolLoader(ds, make_mlp(), UpperBoundScorer(CE), 8, seed=0),
    ):
        assert isinstance(obj, torchdata.Stateful)
