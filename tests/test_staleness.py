"""Self-tuned mixing of stale score tables (isample.staleness + the TableSampler hook).

Proves: the second-moment estimates are exactly unbiased (enumeration, float64); the
table's draws under an adapted level are exactly importance-weighted (unbiased) and follow
``probabilities()``; on a synthetic problem whose scores go stale the adapted table is never
worse than uniform (kappa >= 1 at every checkpoint) where the former fixed level 0.1 is
about 3x worse, while with fresh scores it still finds the gain; state round-trips exactly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy import stats

from isample import TableSampler
from isample.metrics import quality_from_norms
from isample.staleness import DEFAULT_LEVELS, AdaptiveMixing, mixing_second_moments


def _q(stale, total, n, share):
    return share / n + (1 - share) * stale / total


@pytest.mark.parametrize("base_share", [0.0, 0.3])
@pytest.mark.parametrize("draw_level", [1.0, 0.25])
def test_second_moments_unbiased_by_enumeration(base_share, draw_level):
    rng = np.random.default_rng(0)
    n = 7
    stale = rng.exponential(size=n) * (rng.random(n) < 0.7)  # some stale scores collapsed to 0
    fresh = rng.exponential(size=n)
    total = float(stale.sum())
    levels = np.array(DEFAULT_LEVELS)
    p = _q(stale, total, n, draw_level + (1 - draw_level) * base_share)
    # E_{i ~ p}[estimate from the single draw i], enumerated exactly
    expected = sum(
        p[i] * mixing_second_moments(stale[[i]], fresh[[i]], total, n, base_share, draw_level, levels)
        for i in range(n)
    )
    for lam, got in zip(levels, expected, strict=True):
        q = _q(stale, total, n, lam + (1 - lam) * base_share)
        want = np.mean(fresh**2 / (n * q))  # M(lambda) = (1/N) sum_i s_i^2 / (N q_i)
        assert got == pytest.approx(want, rel=1e-12)
    full = mixing_second_moments(stale, fresh, total, n, base_share, None, levels)
    assert full == pytest.approx(expected, rel=1e-12)  # a full pass is exact


def _adapted_sampler(n=12, steps=60, seed=0):
    s = TableSampler(n, 4, seed=seed, mixing=AdaptiveMixing(warmup=5, confidence=0.0), num_batches=10**6)
    truth = np.linspace(0.05, 3.0, n)
    for step in range(steps):
        idx, _ = s.draw(0, step)
        s.update(idx, truth[idx.numpy()])
    return s, truth


def test_adapted_table_is_exactly_unbiased():
    s, truth = _adapted_sampler()
    assert s.mixing_level < 1.0  # the level moved: the check is not of the uniform case
    n = s.num_samples
    p = s.probabilities().numpy()
    assert p.sum() == pytest.approx(1.0, abs=1e-15) and (p > 0).all()
    g = np.random.default_rng(1).normal(size=(n, 3))
    w_exact = 1.0 / (n * p)
    assert (p[:, None] * w_exact[:, None] * g).sum(0) == pytest.approx(g.mean(0), rel=1e-12)
    # every drawn weight is the exact 1 / (N p_i) of the distribution it was drawn from
    counts = np.zeros(n)
    for step in range(400):
        idx, w = s.draw(1, step)
        idx = idx.numpy()
        np.testing.assert_allclose(w.numpy(), w_exact[idx], rtol=1e-6)
        np.add.at(counts, idx, 1)
    # and the draws follow p (chi-square, 1600 draws)
    assert stats.chisquare(counts, counts.sum() * p).pvalue > 1e-4


def _stale_problem(mixing, seed=0, n=400, b=16, steps=800, flip=0.01, every=100):
    """20% of examples are hard (norm 1) and 80% easy (0.02); each flips w.p. ``flip`` per step.

    The table only learns an example's current norm when it is drawn, so examples recorded
    as easy go stale. Returns kappa = V_uniform / V(p) (exact, from the current norms) at
    every checkpoint, and the final level.
    """
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.2
    s = TableSampler(n, b, seed=seed, mixing=mixing, num_batches=steps)
    kappas = []
    for step, batch in enumerate(s):
        idx = np.array([i for i, _ in batch])
        s.update(idx, np.where(hard, 1.0, 0.02)[idx])
        hard = np.where(rng.random(n) < flip, ~hard, hard)
        if step % every == every - 1:
            norms = torch.tensor(np.where(hard, 1.0, 0.02))
            kappas.append(quality_from_norms(norms, 0.0, s.probabilities()).kappa)
    return kappas, s.mixing_level


def test_stale_scores_never_worse_than_uniform():
    fixed, _ = _stale_problem(0.1)
    assert max(fixed) < 0.5  # the failure being fixed: the former default is ~3x worse than uniform
    auto, level = _stale_problem("auto")
    assert min(auto) >= 1.0, auto
    assert level > 0.1


def test_fresh_scores_keep_the_gain():
    fixed, _ = _stale_problem(0.1, flip=0.0)
    auto, level = _stale_problem("auto", flip=0.0)
    assert level == pytest.approx(0.1)
    assert min(auto[2:]) > 3.0 and min(auto[2:]) > 0.9 * min(fixed[2:])


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("delay,prefetch", [(0, 0), (2, 0), (2, 1), (3, 2)])
def test_state_round_trip_continues_identically(delay, prefetch):
    """Save mid-run (with draws applied ahead of consumption, as a prefetching loader does),
    reload into a fresh sampler: the rest of the stream and the levels are identical."""
    n = 40
    truth = torch.linspace(0.01, 2.0, n, dtype=torch.float64)

    def make():
        return TableSampler(n, 4, seed=3, delay=delay, num_batches=500, mixing=AdaptiveMixing(warmup=3))

    def run(sampler, steps, stop=None, depth=prefetch):
        out = []
        sampler.advance(0)
        it = iter(sampler)
        ahead = [next(it) for _ in range(depth)]
        for step in range(steps):
            ahead.append(next(it))
            batch = ahead.pop(0)
            idx = torch.tensor([i for i, _ in batch])
            out.append(batch)
            sampler.update(idx, truth[idx])
            sampler.advance(1)
            if stop is not None and step + 1 == stop:
                return out, _save_load(sampler.state_dict())
        return out, sampler.mixer.state_dict()

    full, mixer = run(make(), 150)
    part, state = run(make(), 150, stop=90)
    assert state["mixer"]["updates"] > 3 and float(state["mixer"]["level"]) < 1.0
    resumed = make()
    resumed.load_state_dict(state)
    rest, mixer_resumed = run(resumed, 60)
    assert part == full[:90]
    assert rest == full[90:]
    # the estimator saw every update exactly once, as in the uninterrupted run
    assert mixer_resumed["updates"] == mixer["updates"] and mixer_resumed["level"] == mixer["level"]
    for key in ("moments", "spread"):
        assert torch.equal(mixer_resumed[key], mixer[key])


def test_nan_scores_leave_the_level_alone():
    s = TableSampler(10, 2, seed=0)
    s.update([0, 1], [1.0, 2.0])
    before = s.mixer.state_dict()
    with pytest.warns(RuntimeWarning, match="NaN"):
        s.update([2, 3], [float("nan"), float("inf")])
    after = s.mixer.state_dict()
    assert after["updates"] == before["updates"]
    assert torch.isfinite(after["moments"]).all()


def test_bad_input():
    with pytest.raises(ValueError, match="'mixing' parameter of TableSampler"):
        TableSampler(10, 2, mixing="adaptive")
    with pytest.raises(ValueError, match="includes 1.0"):
        AdaptiveMixing(levels=[0.5, 0.1])
    with pytest.raises(TypeError, match="'levels' parameter of AdaptiveMixing"):
        AdaptiveMixing(levels="0.5")
    with pytest.raises(ValueError, match=r"'levels' parameter of AdaptiveMixing must be a float in \(0"):
        AdaptiveMixing(levels=[1.0, 0.0])
    with pytest.raises(ValueError, match="'momentum'"):
        AdaptiveMixing(momentum=1.0)
    with pytest.raises(ValueError, match="'initial'"):
        AdaptiveMixing(initial=0.3)
    with pytest.raises(TypeError, match="'warmup'"):
        AdaptiveMixing(warmup=True)
    s = TableSampler(10, 2, seed=0)
    with pytest.raises(KeyError, match="mixer"):
        s.load_state_dict(TableSampler(10, 2, seed=0, mixing=0.1).state_dict())
    other = TableSampler(10, 2, seed=0, mixing=AdaptiveMixing(levels=[1.0, 0.5]))
    with pytest.raises(ValueError, match="levels"):
        s.load_state_dict(other.state_dict())


def test_starts_uniform_and_reports_its_level():
    s = TableSampler(10, 2, seed=0)
    assert s.mixing_level == 1.0
    np.testing.assert_allclose(s.probabilities().numpy(), np.full(10, 0.1))
    assert TableSampler(10, 2, seed=0, mixing=0.2).mixing_level == 0.2


def test_overflowing_scores_are_skipped_not_fatal():
    mixer = AdaptiveMixing()
    mixer.observe(np.ones(3), np.array([1e200, 1.0, 2.0]), 3.0, 3, 0.0)  # s^2 overflows float64
    assert mixer.updates == 0 and mixer.level == 1.0
    mixer.observe(np.ones(3), np.array([1.0, 1.0, 2.0]), 3.0, 3, 0.0)
    assert mixer.updates == 1 and np.isfinite(mixer.moments).all()


def _train_digits_momentum(mixing, steps=400):
    """history-is on digits, MLP, SGD momentum 0.9 at lr 0.1: the former default collapsed here."""
    from isample import schemes
    from isample.bench.datasets import load_dataset
    from isample.bench.harness import evaluate
    from isample.bench.models import build_model

    data = load_dataset("digits", 0)
    model = build_model("mlp", 64, 10, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    ds = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    loader = schemes.build("history-is", ds, model, ce, 32, seed=0, mixing=mixing)
    step = epoch = 0
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            out = model(batch.inputs)
            losses = ce(out, batch.targets)
            (batch.weights * losses).mean().backward()
            opt.step()
            opt.zero_grad()
            loader.feedback(batch, out.detach(), losses.detach())
            step += 1
            if step == steps:
                break
        epoch += 1
    return evaluate(model, data.x_train, data.y_train, ce)[0]


def test_no_collapse_with_momentum_where_uniform_converges():
    uniform = _train_digits_momentum(1.0)
    assert uniform < 0.1
    assert _train_digits_momentum(0.1) > 1.0  # the failure: the fixed level collapses training
    assert _train_digits_momentum("auto") < max(0.1, 3 * uniform)


needs_numba = pytest.mark.skipif(
    not __import__("isample.engine", fromlist=["x"]).compiled_available(), reason="numba is not installed"
)


@needs_numba
@pytest.mark.parametrize("k", [1, 7, 64, 256, 300, 1000])
def test_compiled_update_is_the_numpy_update_bit_for_bit(k):
    """The compiled AdaptiveMixing update: same moments, spread, updates and levels as NumPy."""
    from isample.staleness import compiled_observe

    kernel = compiled_observe("numba")
    assert kernel is not None and compiled_observe("numpy") is None
    rng = np.random.default_rng(k)
    for trial in range(20):
        warmup, confidence = int(rng.integers(0, 4)), float(rng.choice([0.0, 1.0, 3.0]))
        ref = AdaptiveMixing(warmup=warmup, confidence=confidence)
        fast = AdaptiveMixing(warmup=warmup, confidence=confidence)
        n = int(rng.integers(k, 10**7))
        for step in range(40):
            stale = np.exp(rng.uniform(-4, 4, k)) * (rng.random(k) < 0.95)
            spread = rng.uniform(0, 2) if trial % 2 else 0.05
            fresh = stale * np.exp(rng.normal(0, spread, k))
            total = 0.0 if step == 3 else float(stale.sum() * n / k * rng.uniform(0.5, 2.0))
            if step == 5:
                fresh[0] = 1e300  # an overflowing estimate: skipped by both
            args = (stale, fresh, total, n, float(rng.choice([0.0, 0.05])))
            full = step % 9 == 8
            (ref.observe_full if full else ref.observe)(*args, _kernel=None)
            (fast.observe_full if full else fast.observe)(*args, _kernel=kernel)
            assert fast.level == ref.level and fast.updates == ref.updates
            assert fast.moments.tobytes() == ref.moments.tobytes()
            assert fast.spread.tobytes() == ref.spread.tobytes()


@needs_numba
@pytest.mark.parametrize("initial_score", [None, 2.0])
def test_table_sampler_backends_draw_the_same_batches(monkeypatch, initial_score):
    """Fused compiled draw + compiled mixing vs the NumPy path: same batches, weights and tables.

    Scores that track the table let the level fall below 1 (draws from the tree and from
    the uniform component both happen); the run starts with unvisited examples.
    """
    runs = []
    for engine_name in ("numpy", "numba"):
        monkeypatch.setenv("ISAMPLE_ENGINE", engine_name)
        s = TableSampler(5000, 64, seed=3, power=0.5, initial_score=initial_score, num_batches=10**6)
        assert s._tree.backend == engine_name
        rng = np.random.default_rng(0)
        truth = np.exp(rng.normal(0, 2, 5000))
        log, levels = [], set()
        it = iter(s)
        for step in range(400):
            if step == 50:  # visit every example
                s.update(np.arange(5000), truth)
            batch = next(it)
            log.append((batch.indices.numpy().copy(), batch.weights.numpy().copy()))
            idx = batch.indices.numpy()
            s.update(idx, truth[idx] * np.exp(rng.normal(0, 0.1, idx.size)))
            levels.add(s.mixing_level)
        runs.append((log, s._tree._buf.tobytes(), s.mixer.moments.tobytes(), levels))
    (log_a, buf_a, mom_a, levels_a), (log_b, buf_b, mom_b, _) = runs
    assert min(levels_a) < 1.0  # the tree was drawn from
    for (ia, wa), (ib, wb) in zip(log_a, log_b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        assert wa.tobytes() == wb.tobytes()
    assert buf_a == buf_b and mom_a == mom_b
