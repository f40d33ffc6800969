"""PoolLoader, TableSampler, ImportanceDataLoader: unbiasedness, distribution, workers, resume, bad input."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from conftest import make_classification, make_mlp
from scipy import stats
from torch import nn

from isample import (
    ImportanceDataLoader,
    LossScorer,
    PoolLoader,
    TableSampler,
    UpperBoundScorer,
    WeightedBatch,
)

CE = nn.CrossEntropyLoss(reduction="none")


def linear_problem(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    G = 2 * (x @ w - y)[:, None] * x  # per-example gradients of squared error
    return x, y, G


def assert_unbiased(estimates: np.ndarray, truth: np.ndarray, z_max: float = 4.5) -> None:
    """Mean of i.i.d. batch estimates vs truth, tolerance from the measured standard error."""
    k = estimates.shape[0]
    se = estimates.std(0, ddof=1) / np.sqrt(k)
    z = np.abs(estimates.mean(0) - truth) / se
    assert z.max() < z_max, f"z-scores {z}"


def save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------- TableSampler


def test_table_monte_carlo_unbiased():
    x, y, G = linear_problem()
    n = G.shape[0]
    sampler = TableSampler(n, 6, seed=3, mixing=0.0, num_batches=4000)
    scores = G.norm(dim=1) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    sampler.update(torch.arange(n), scores)
    est = []
    for batch in sampler:
        idx = torch.tensor([i for i, _ in batch])
        w = torch.tensor([wt for _, wt in batch], dtype=torch.float64)
        est.append((w[:, None] * G[idx]).mean(0).numpy())
    assert_unbiased(np.array(est), G.mean(0).numpy())


def test_table_draws_follow_probabilities_chi_square():
    n = 12
    sampler = TableSampler(n, 64, seed=5, mixing=0.2, power=0.5, num_batches=300)
    sampler.update(torch.arange(n - 3), torch.arange(1, n - 2, dtype=torch.float64) ** 2)  # 3 unvisited
    p = sampler.probabilities().numpy()
    counts = np.zeros(n)
    weights = {}
    for batch in sampler:
        for i, w in batch:
            counts[i] += 1
            weights[i] = w
    assert stats.chisquare(counts, counts.sum() * p).pvalue > 1e-3
    for i, w in weights.items():
        assert w == pytest.approx(1.0 / (n * p[i]), rel=1e-5)
    np.testing.assert_allclose(p.sum(), 1.0)


def test_table_initial_score_and_running_mean():
    s = TableSampler(4, 2, seed=0, mixing=0.0)
    torch.testing.assert_close(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    # unvisited take the running mean 2.0: t = [1, 3, 2, 2]
    torch.testing.assert_close(s.probabilities(), torch.tensor([1, 3, 2, 2], dtype=torch.float64) / 8)
    s2 = TableSampler(4, 2, seed=0, mixing=0.0, initial_score=0.0)
    s2.update(torch.tensor([0]), torch.tensor([2.0]))
    torch.testing.assert_close(s2.probabilities(), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    # repeated indices in one update: last write wins
    s.update(torch.tensor([2, 2]), torch.tensor([5.0, 0.5]))
    assert float(s.scores()[2]) == 0.5


def test_table_nan_scores_are_skipped_with_a_warning():
    s = TableSampler(5, 2, seed=0)
    s.update(torch.arange(5), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    before = s.probabilities().clone()
    with pytest.warns(RuntimeWarning, match="skipped 2 NaN"):
        s.update(torch.tensor([1, 3, 4]), torch.tensor([float("nan"), float("inf"), 5.0]))
    torch.testing.assert_close(s.probabilities(), before)


def test_table_all_zero_scores_fall_back_to_uniform():
    s = TableSampler(6, 3, seed=0, mixing=0.0, num_batches=2)
    s.update(torch.arange(6), torch.zeros(6))
    with pytest.warns(RuntimeWarning, match="every score is zero"):
        batches = list(s)
    assert all(w == pytest.approx(1.0) for batch in batches for _, w in batch)


# ---------------------------------------------------------------- ImportanceDataLoader


def test_importance_dataloader_batches(classification):
    sampler = TableSampler(len(classification), 8, seed=0)
    loader = ImportanceDataLoader(classification, sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    for batch in batches:
        assert isinstance(batch, WeightedBatch)
        x, y, w = batch
        torch.testing.assert_close(x, classification.tensors[0][batch.indices])
        torch.testing.assert_close(y, classification.tensors[1][batch.indices])
        assert w.dtype == torch.float32 and batch.indices.dtype == torch.long


def _run_table(dataset, num_workers, pin_memory, steps=12, delay=4):
    sampler = TableSampler(len(dataset), 8, seed=11)
    loader = ImportanceDataLoader(
        dataset, sampler, num_workers=num_workers, pin_memory=pin_memory, delay=delay
    )
    out = []
    for _ in range(2):
        for batch in loader:
            out.append((batch.indices.clone(), batch.weights.clone(), batch.inputs.clone()))
            loader.update(batch.indices, batch.inputs.abs().sum(1) + len(out))  # deterministic feedback
            if len(out) == steps:
                return out
    return out


def test_table_workers_and_pin_memory_give_identical_batches(classification):
    a = _run_table(classification, 0, False)
    b = _run_table(classification, 2, True)
    for (ia, wa, xa), (ib, wb, xb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(wa, wb) and torch.equal(xa, xb)


def test_table_resume_mid_epoch_is_identical(classification):
    def fresh():
        sampler = TableSampler(len(classification), 8, seed=2, power=0.5)
        return ImportanceDataLoader(classification, sampler)

    def run(loader, steps, log):
        it = iter(loader)
        for _ in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            log.append((batch.indices.tolist(), batch.weights.tolist()))
            loader.update(batch.indices, batch.inputs.pow(2).sum(1) * (1 + len(log)))

    full = []
    run(fresh(), 13, full)
    first = []
    loader = fresh()
    run(loader, 5, first)
    state = save_load(copy.deepcopy(loader.state_dict()))
    resumed = fresh()
    resumed.load_state_dict(state)
    rest = list(first)
    run(resumed, 8, rest)
    assert rest == full


# ---------------------------------------------------------------- PoolLoader


def test_pool_monte_carlo_unbiased():
    x, y, G = linear_problem(n=20)

    def scorer(model, inputs, targets):  # score = a fixed function of the example, not of the model
        return inputs.abs().sum(1).float() + 0.1

    ds = torch.utils.data.TensorDataset(x, y)
    loader = PoolLoader(ds, nn.Linear(3, 1), scorer, 4, presample=2.5, always=True, seed=1, num_batches=3000)
    est = [(batch.weights.double()[:, None] * G[batch.indices]).mean(0).numpy() for batch in loader]
    assert_unbiased(np.array(est), G.mean(0).numpy())


def test_pool_draws_follow_probabilities_chi_square():
    x, y = make_classification(16)
    ds = torch.utils.data.TensorDataset(x, y)
    model = make_mlp()
    scorer = UpperBoundScorer(CE)
    loader = PoolLoader(ds, model, scorer, 4, presample=4.0, always=True, seed=9, num_batches=1500, power=0.5)
    assert loader.pool_size == 16  # the pool is the whole dataset
    p = loader.policy.probabilities(scorer(model, x, y).double()).numpy()
    counts = np.zeros(16)
    for batch in loader:
        np.add.at(counts, batch.indices.numpy(), 1)
        torch.testing.assert_close(
            batch.weights, torch.tensor(1.0 / (16 * p[batch.indices]), dtype=torch.float32)
        )
    assert stats.chisquare(counts, counts.sum() * p).pvalue > 1e-3


def test_pool_switch_warms_up_uniformly(classification, mlp):
    loader = PoolLoader(
        classification, mlp, UpperBoundScorer(CE), 8, presample=3.0, seed=0, tau_threshold=1e9
    )
    for batch in loader:
        assert torch.all(batch.weights == 1)
    assert len(loader.tau_history) == len(loader) and not loader.tau_history[-1]["on"]
    assert loader.switch.threshold == 1e9
    default = PoolLoader(classification, mlp, UpperBoundScorer(CE), 8, presample=3.0, seed=0)
    assert default.switch.threshold == pytest.approx((24 + 24) / 24)


def _run_pool(dataset, model, num_workers, pin_memory, steps=10):
    loader = PoolLoader(
        dataset,
        model,
        LossScorer(CE),
        8,
        presample=2.0,
        seed=4,
        always=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    out = []
    while len(out) < steps:
        for batch in loader:
            out.append((batch.indices.clone(), batch.weights.clone(), batch.inputs.clone()))
            if len(out) == steps:
                break
    return out


def test_pool_workers_and_pin_memory_give_identical_batches(classification, mlp):
    a = _run_pool(classification, mlp, 0, False)
    b = _run_pool(classification, mlp, 2, True)
    for (ia, wa, xa), (ib, wb, xb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(wa, wb) and torch.equal(xa, xb)


def test_pool_resume_mid_epoch_is_identical(classification):
    def train(loader, model, opt, steps, log):
        it = iter(loader)
        for _ in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            log.append((batch.indices.tolist(), batch.weights.tolist()))
            opt.zero_grad()
            (batch.weights * CE(model(batch.inputs), batch.targets)).mean().backward()
            opt.step()

    def fresh(model):
        return PoolLoader(classification, model, UpperBoundScorer(CE), 8, presample=2.0, seed=7)

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    full = []
    train(fresh(model), model, opt, 13, full)

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = fresh(model)
    part = []
    train(loader, model, opt, 5, part)
    state = save_load({"loader": loader.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
    model2 = make_mlp(seed=99)
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    opt2.load_state_dict(state["opt"])
    loader2 = fresh(model2)
    loader2.load_state_dict(state["loader"])
    train(loader2, model2, opt2, 8, part)
    assert part == full


# ---------------------------------------------------------------- bad input


def test_bad_input_messages(classification, mlp):
    scorer = UpperBoundScorer(CE)
    with pytest.raises(ValueError, match="'batch_size' parameter of PoolLoader"):
        PoolLoader(classification, mlp, scorer, 0)
    with pytest.raises(TypeError, match="'batch_size' parameter of TableSampler"):
        TableSampler(10, True)
    with pytest.raises(
        ValueError, match="'presample' parameter of PoolLoader must be a float >= 1.0. Got 0.5"
    ):
        PoolLoader(classification, mlp, scorer, 4, presample=0.5)
    empty = torch.utils.data.TensorDataset(torch.empty(0, 5), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        PoolLoader(empty, mlp, scorer, 4)
    with pytest.raises(ValueError, match="empty"):
        ImportanceDataLoader(empty, TableSampler(1, 1))
    with pytest.raises(ValueError, match="'num_samples' parameter of TableSampler"):
        TableSampler(0, 4)
    with pytest.raises(ValueError, match="'mixing'"):
        TableSampler(10, 2, mixing=-0.1)
    with pytest.raises(ValueError, match="'bias_exponent'"):
        PoolLoader(classification, mlp, scorer, 4, bias_exponent=2.0)
    with pytest.raises(ValueError, match="num_samples=10"):
        ImportanceDataLoader(classification, TableSampler(10, 2))

    def scalar_loss(out, t):
        return nn.functional.cross_entropy(out, t)

    with pytest.raises(ValueError, match="scalar"):  # caught at construction, before training
        PoolLoader(classification, mlp, LossScorer(scalar_loss), 4)

    s = TableSampler(10, 2, seed=0)
    with pytest.raises(ValueError, match="lengths must match"):
        s.update(torch.arange(3), torch.ones(2))
    with pytest.raises(IndexError, match="index 10 outside"):
        s.update(torch.tensor([1, 10]), torch.ones(2))
    with pytest.raises(ValueError, match="negative"):
        s.update(torch.tensor([1]), torch.tensor([-1.0]))
    state = s.state_dict()
    with pytest.raises(ValueError, match="saved for a dataset of 10"):
        TableSampler(11, 2).load_state_dict(state)
    loader = PoolLoader(classification, mlp, scorer, 8)
    bad = loader.state_dict()
    bad["num_samples"] = 5
    with pytest.raises(ValueError, match="num_samples=5"):
        PoolLoader(classification, mlp, scorer, 8).load_state_dict(bad)
    with pytest.raises(ValueError, match="either 'seed' or 'generator'"):
        TableSampler(10, 2, seed=1, generator=torch.Generator())


def test_generator_seeding_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    a = list(TableSampler(50, 5, generator=torch.Generator().manual_seed(3)))
    b = list(TableSampler(50, 5, generator=torch.Generator().manual_seed(3)))
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_set_epoch_changes_order_and_is_reproducible():
    s = TableSampler(50, 5, seed=1)
    s.set_epoch(3)
    e3 = list(s)
    s.set_epoch(4)
    e4 = list(s)
    s.set_epoch(3)
    assert list(s) == e3 and e3 != e4


def test_exhausted_iterators_stay_exhausted(classification, mlp):
    for loader in (
        ImportanceDataLoader(classification, TableSampler(len(classification), 16, seed=0)),
        PoolLoader(classification, mlp, UpperBoundScorer(CE), 16, seed=0),
    ):
        it = iter(loader)
        assert len(list(it)) == len(loader)
        with pytest.raises(StopIteration):
            next(it)


class _RowDataset(torch.utils.data.Dataset):
    """The same rows as a TensorDataset, read one by one (no batched fast path)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


def test_batched_reads_equal_row_by_row_reads(classification, mlp):
    rows = _RowDataset(classification.tensors)
    for make in (
        lambda ds: ImportanceDataLoader(ds, TableSampler(len(ds), 8, seed=1)),
        lambda ds: PoolLoader(ds, mlp, UpperBoundScorer(CE), 8, 2.0, seed=1, always=True),
    ):
        fast, slow = list(make(classification)), list(make(rows))
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow, strict=True):
            for x, y in zip(
                (a.inputs, a.targets, a.indices, a.weights),
                (b.inputs, b.targets, b.indices, b.weights),
                strict=True,
            ):
                assert torch.equal(x, y) and x.dtype == y.dtype


def test_pool_loader_construction_leaves_batchnorm_alone(classification):
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PoolLoader(classification, model, LossScorer(CE), 8, 2.0, seed=0, scoring_batch_size=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


def test_table_update_accepts_half_precision_scores():
    s = TableSampler(4, 2, seed=0, mixing=0.0)
    s.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.bfloat16))
    torch.testing.assert_close(s.probabilities(), torch.tensor([1, 2, 3, 2], dtype=torch.float64) / 8)


def test_pool_scoring_in_chunks_equals_one_pass(classification, mlp):
    def batches(chunk):
        loader = PoolLoader(
            classification, mlp, UpperBoundScorer(CE), 8, 3.0, seed=2, always=True, scoring_batch_size=chunk
        )
        return [(b.indices, b.weights) for b in loader]

    for (ia, wa), (ib, wb) in zip(batches(None), batches(5), strict=True):
        assert torch.equal(ia, ib)
        torch.testing.assert_close(wa, wb)


def test_table_rejects_scores_that_would_overflow_the_sum():
    s = TableSampler(10, 2, seed=0)
    with pytest.raises(ValueError, match="overflow"):
        s.update(torch.tensor([0]), torch.tensor([1e308], dtype=torch.float64))
    assert s.probabilities().isfinite().all()


def test_table_probabilities_with_subnormal_scores():
    s = TableSampler(3, 4, seed=0, mixing=0.1, num_batches=2)
    s.update(torch.arange(3), torch.tensor([5e-324, 1e-323, 0.0], dtype=torch.float64))
    p = s.probabilities()
    assert float(p.sum()) == pytest.approx(1.0) and bool(torch.isfinite(p).all())
    for batch in s:
        assert all(0 < w < float("inf") for _, w in batch)
