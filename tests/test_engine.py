"""Tests of the table engine :class:`isample.engine.SumTree`.

The tree is checked exactly where exactness is possible: integer-valued tables have exact
float64 prefix sums in any summation order, so ``find`` must return the exact leaf for every
target on the integer grid; every internal node must equal ``np.add.reduce`` of its children
bit for bit, after any sequence of updates. Sampling is checked by seeded chi-square tests and
by exact enumeration of the successive-sampling inclusion probabilities.

Every test that builds a tree runs once per backend (the ``backend`` fixture sets
``ISAMPLE_ENGINE``): the pure NumPy path always, the compiled kernels where numba is
installed; the two are also compared with each other bit for bit on random trees.
"""

from __future__ import annotations

import itertools
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

import isample.engine as engine
from isample.engine import ENGINE_ENV, ROOT_WIDTH, SumTree, available_memory, descend, tree_layout

SMALL = settings(max_examples=60, deadline=None)

HAVE_NUMBA = engine.compiled_available()
BACKEND_PARAMS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")),
]


def own_backends(test):
    """Mark a test that picks its backends itself: it runs once, not once per backend."""
    test.own_backends = True
    return test


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        own = getattr(metafunc.function, "own_backends", False)
        metafunc.parametrize("backend", ["numpy"] if own else BACKEND_PARAMS, indirect=True)


@pytest.fixture(autouse=True)
def backend(request, monkeypatch):
    """Every tree built in a test uses this backend (through the environment variable)."""
    monkeypatch.setenv(ENGINE_ENV, request.param)
    return request.param

# Small fanouts and root widths so that tiny tables still have several levels.
shapes = st.tuples(st.integers(2, 5), st.integers(1, 4))


def check_consistent(tree: SumTree, reference: np.ndarray) -> None:
    """Leaves equal ``reference``; every internal node is exactly the sum of its children."""
    levels, fanout = tree._levels, tree.fanout
    np.testing.assert_array_equal(tree.values(), reference)
    assert np.all(levels[0][tree.size :] == 0), "padding leaves must stay zero"
    for depth in range(len(levels) - 1):
        rows = levels[depth].reshape(-1, fanout)
        expected = np.add.reduce(rows, axis=1)
        np.testing.assert_array_equal(levels[depth + 1][: rows.shape[0]], expected)
        assert np.all(levels[depth + 1][rows.shape[0] :] == 0)
    assert tree.total == float(np.add.reduce(levels[-1]))
    exact = math.fsum(reference.tolist())
    assert abs(tree.total - exact) <= 1e-9 * exact + 1e-300


def exact_find(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Reference prefix search with exact (Python integer) prefix sums."""
    prefix = np.concatenate([[0], np.cumsum(values.astype(np.int64))])
    return np.searchsorted(prefix, targets, side="right") - 1


# ------------------------------------------------------------------ layout and memory


@pytest.mark.parametrize("fanout", [2, 3, 8, 16, 32])
@pytest.mark.parametrize("size", [1, 2, 3, 15, 16, 17, 255, 4096, 4097, 10**5 + 3, 10**8, 10**9])
def test_memory_within_three_words_per_leaf(size, fanout):
    estimate = SumTree.memory_estimate(size, fanout)
    assert estimate == 8 * sum(tree_layout(size, fanout))
    assert estimate <= 3 * 8 * size
    if fanout >= 8 and size >= 10**5:
        assert estimate <= 8 * size * (1 + 1 / (fanout - 1)) + 8 * fanout * 8


@pytest.mark.parametrize("fanout,width", [(2, 2), (3, 3), (4, 64), (16, 16), (16, ROOT_WIDTH), (64, 64)])
def test_memory_bound_for_every_small_size(fanout, width):
    sizes = np.arange(1, 3000)
    words = np.array([sum(tree_layout(int(n), fanout, width)) for n in sizes])
    assert np.all(words <= 3 * sizes)


@pytest.mark.parametrize("size,fanout,width", [(1, 2, 1), (5, 2, 1), (100, 3, 2), (5000, 16, ROOT_WIDTH)])
def test_nbytes_is_the_estimate(size, fanout, width):
    tree = SumTree(size, fanout, root_width=width)
    assert tree.nbytes == SumTree.memory_estimate(size, fanout, root_width=width)
    layout = tree_layout(size, fanout, width)
    assert layout[-1] <= width
    assert all(length % fanout == 0 for length in layout[:-1])


def test_memory_error_before_allocating(monkeypatch):
    monkeypatch.setattr(engine, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs about \d+ bytes"):
        SumTree(10**6)
    SumTree(10)  # 80 bytes fit


def test_available_memory_is_positive_or_unknown():
    free = available_memory()
    assert free is None or (isinstance(free, int) and free > 0)


# ------------------------------------------------------------------ exact structure


@SMALL
@given(
    values=st.lists(st.integers(0, 50), min_size=1, max_size=120),
    shape=shapes,
)
@example(values=[0, 0, 7], shape=(2, 1))
@example(values=[5], shape=(2, 1))
@example(values=[1, 0, 0, 0, 0, 0, 0, 0, 0, 0], shape=(3, 1))
def test_find_is_exact_on_integer_tables(values, shape):
    fanout, width = shape
    vals = np.array(values, dtype=np.float64)
    tree = SumTree(len(vals), fanout, root_width=width)
    tree.fill(vals)
    check_consistent(tree, vals)
    total = int(vals.sum())
    if total == 0:
        with pytest.raises(ValueError, match="positive total"):
            tree.find([0.0])
        return
    grid = np.arange(total, dtype=np.float64)
    found = tree.find(grid)
    np.testing.assert_array_equal(found, exact_find(vals, grid))
    # Every leaf gets exactly its value's share of the grid: the implied distribution is v / sum.
    np.testing.assert_array_equal(np.bincount(found, minlength=len(vals)), vals.astype(np.int64))
    # A target at the total lands on the last positive leaf.
    assert tree.find([float(total)])[0] == np.flatnonzero(vals)[-1]


@SMALL
@given(
    values=st.lists(
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False) | st.just(0.0), min_size=1, max_size=100
    ),
    shape=shapes,
)
@example(values=[5e-324, 5e-324, 5e-324], shape=(2, 1))
def test_find_midpoints_on_float_tables(values, shape):
    fanout, width = shape
    vals = np.array(values, dtype=np.float64)
    tree = SumTree(len(vals), fanout, root_width=width)
    tree.fill(vals)
    check_consistent(tree, vals)
    if tree.total == 0:
        return
    prefix = np.concatenate([[0.0], np.cumsum(vals)])
    # Leaves whose interval is wide compared with rounding must be found at their midpoint.
    wide = np.flatnonzero(vals > 1e-9 * tree.total)
    mids = (prefix[wide] + prefix[wide + 1]) / 2
    inside = (prefix[wide] <= mids) & (mids < prefix[wide + 1])  # false only for subnormal widths
    wide, mids = wide[inside], mids[inside]
    np.testing.assert_array_equal(tree.find(mids), wide)
    # Any target in [0, total] gives a positive leaf.
    grid = np.linspace(0.0, tree.total, 257)
    found = tree.find(grid)
    assert np.all(vals[found] > 0)


@SMALL
@given(
    size=st.integers(1, 80),
    shape=shapes,
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 9)), min_size=0, max_size=30),
        min_size=1,
        max_size=6,
    ),
)
def test_random_update_sequences_keep_the_tree_exact(size, shape, batches):
    fanout, width = shape
    tree = SumTree(size, fanout, root_width=width)
    reference = np.zeros(size)
    for batch in batches:
        idx = np.array([i % size for i, _ in batch], dtype=np.int64)
        val = np.array([float(v) for _, v in batch])
        tree.set(idx, val)
        for i, v in zip(idx.tolist(), val.tolist(), strict=True):  # last write wins
            reference[i] = v
        check_consistent(tree, reference)
        if reference.sum() > 0:
            grid = np.arange(int(reference.sum()), dtype=np.float64)
            np.testing.assert_array_equal(tree.find(grid), exact_find(reference, grid))


def test_updates_equal_a_rebuild_bit_for_bit():
    rng = np.random.default_rng(1)
    tree = SumTree(10**4 + 7, 16, root_width=64)
    tree.fill(np.exp(rng.uniform(-30, 30, tree.size)))
    for _ in range(20):
        idx = rng.integers(0, tree.size, 500)
        tree.set(idx, np.exp(rng.uniform(-30, 30, 500)))
    before = tree._buf.copy()
    tree.rebuild()
    np.testing.assert_array_equal(tree._buf, before)


def test_no_drift_after_a_million_updates():
    rng = np.random.default_rng(2)
    size = 50_000
    tree = SumTree(size, 16, rebuild_every=10**9, root_width=256)  # no automatic rebuild
    tree.fill(np.exp(rng.uniform(-20, 20, size)))
    for _ in range(10):  # 10 vectorised calls of 100_000 updates: 1e6 in all
        idx = rng.integers(0, size, 100_000)
        tree.set(idx, np.exp(rng.uniform(-20, 20, idx.shape[0])))
    exact = math.fsum(tree.values().tolist())
    assert abs(tree.total - exact) <= 1e-9 * exact
    before = tree._buf.copy()
    tree.rebuild()
    np.testing.assert_array_equal(tree._buf, before)  # nothing to correct


def test_periodic_rebuild_runs_after_rebuild_every_writes():
    tree = SumTree(100, 4, rebuild_every=10, root_width=2)
    calls = []
    original = tree.rebuild
    tree.rebuild = lambda: (calls.append(1), original())[1]  # type: ignore[method-assign]
    tree.set(np.arange(6), np.ones(6))
    assert calls == []
    tree.set(np.arange(6), np.ones(6))  # 12 writes >= 10
    assert calls == [1]
    tree.set(np.arange(9), np.ones(9))
    assert calls == [1]
    tree.set([1], [2.0])
    assert calls == [1, 1]
    check_consistent(tree, np.r_[1.0, 2.0, np.ones(7), np.zeros(91)])


def test_last_write_wins_for_repeated_indices():
    tree = SumTree(10, 2, root_width=1)
    tree.set([3, 3, 3, 7, 3], [1.0, 2.0, 5.0, 4.0, 6.0])
    assert tree.get([3, 7]).tolist() == [6.0, 4.0]
    tree.set([7, 3, 7], [0.0, 1.5, 2.5])
    assert tree.get([3, 7]).tolist() == [1.5, 2.5]
    ref = np.zeros(10)
    ref[3], ref[7] = 1.5, 2.5
    check_consistent(tree, ref)


def test_last_write_wins_against_a_python_loop():
    rng = np.random.default_rng(3)
    tree = SumTree(50, 3, root_width=2)
    ref = np.zeros(50)
    for _ in range(20):
        idx = rng.integers(0, 8, 200)  # many repeats
        val = rng.integers(0, 100, 200).astype(float)
        tree.set(idx, val)
        for i, v in zip(idx, val, strict=True):
            ref[i] = v
        check_consistent(tree, ref)


def test_size_one_and_tiny_tables():
    tree = SumTree(1)
    with pytest.raises(ValueError, match="positive total"):
        tree.sample(1, np.random.default_rng(0))
    tree.set([0], [2.5])
    assert tree.total == 2.5
    assert tree.sample(5, np.random.default_rng(0)).tolist() == [0] * 5
    assert tree.sample(1, np.random.default_rng(0), replacement=False).tolist() == [0]
    assert tree.find([0.0, 2.5]).tolist() == [0, 0]
    assert tree.nbytes <= 24


def test_values_view_is_read_only_and_get_keeps_shape():
    tree = SumTree(6, 2, root_width=1)
    tree.fill(np.arange(6.0))
    view = tree.values()
    with pytest.raises(ValueError):
        view[0] = 1.0
    assert tree.get(np.array([[1, 2], [3, 5]])).tolist() == [[1.0, 2.0], [3.0, 5.0]]
    assert tree.get([]).shape == (0,)
    idx = np.array([[5, 0], [2, 2]])
    np.testing.assert_array_equal(tree.get(idx, check=False), tree.get(idx))


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("fanout,width", [(16, ROOT_WIDTH), (2, 1), (4, 3)])
def test_sample_follows_the_probabilities_chi_square(fanout, width):
    rng = np.random.default_rng(4)
    vals = np.array([0.0, 1.0, 2.0, 0.0, 0.5, 3.0, 1e-3 + 1.0, 0.0, 4.0, 2.5, 0.0, 1.0, 7.0])
    tree = SumTree(len(vals), fanout, root_width=width)
    tree.fill(vals)
    draws = 200_000
    idx = np.concatenate([tree.sample(1000, rng) for _ in range(draws // 1000)])
    counts = np.bincount(idx, minlength=len(vals))
    assert counts[vals == 0].sum() == 0, "a zero-valued leaf was drawn"
    pos = vals > 0
    expected = draws * vals[pos] / vals.sum()
    result = stats.chisquare(counts[pos], expected)
    assert result.pvalue > 1e-4, result


def test_sample_on_a_large_table_never_returns_zero_or_padding():
    rng = np.random.default_rng(5)
    size = 100_003  # not a multiple of the fanout: padding leaves exist
    vals = rng.random(size)
    vals[rng.random(size) < 0.7] = 0.0
    vals[-50:] = 0.0  # trailing zeros next to the padding
    tree = SumTree(size, 16, root_width=64)
    tree.fill(vals)
    idx = tree.sample(100_000, rng)
    assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < size
    assert np.all(vals[idx] > 0)
    # Targets at (or rounded to) the total.
    last = np.flatnonzero(vals)[-1]
    assert tree.find([tree.total] * 3).tolist() == [last] * 3


def gap_tree(backend: str) -> tuple[SumTree, np.ndarray]:
    """A two-level tree whose parent sum exceeds the sequential sum of its children.

    The 16 children ``[1, 2**-53 x 15]`` add up to exactly 1 from left to right (each tiny
    term is rounded away) but to more than 1 in NumPy's pairwise order, the order the stored
    parent uses: targets in ``[1, parent)`` fall in a rounding gap past the children's end.
    """
    vals = np.zeros(32)
    vals[0] = 1.0
    vals[1:16] = 2.0**-53
    vals[16:20] = [0.0, 3.0, 0.0, 0.0]
    tree = SumTree(32, 16, root_width=2, backend=backend)
    tree.fill(vals)
    return tree, vals


def test_rounding_gap_goes_to_the_last_positive_child(backend):
    tree, vals = gap_tree(backend)
    parent = tree._levels[1][0]
    assert parent > 1.0, "the pairwise parent must exceed the sequential sum of its children"
    gap = [1.0, np.nextafter(1.0, 2.0), parent - 2.0**-60]
    gap = [t for t in gap if 1.0 <= t < parent]
    assert gap, "no target inside the gap"
    np.testing.assert_array_equal(tree.find(gap), [15] * len(gap))  # last positive child
    assert tree.find([parent])[0] == 17  # the next node's first positive leaf
    assert tree.find([np.nextafter(1.0, 0.0)])[0] == 0
    assert tree.find([tree.total])[0] == 17
    np.testing.assert_array_equal(tree.find(gap), descend(tree._levels, 16, np.array(gap)))
    assert np.all(vals[tree.sample(10_000, np.random.default_rng(0))] > 0)


def test_large_batches_are_processed_in_chunks(monkeypatch):
    monkeypatch.setattr(engine, "_CHUNK", 100)
    rng = np.random.default_rng(8)
    vals = rng.integers(0, 5, 3000).astype(float)
    tree = SumTree(3000, 4, root_width=10)
    tree.fill(vals)
    grid = np.arange(int(vals.sum()), dtype=np.float64)
    np.testing.assert_array_equal(tree.find(grid), exact_find(vals, grid))
    idx = rng.integers(0, 3000, 1000)
    new = rng.integers(0, 5, 1000).astype(float)
    tree.set(idx, new)
    for i, v in zip(idx.tolist(), new.tolist(), strict=True):  # last write wins
        vals[i] = v
    check_consistent(tree, vals)
    draws = tree.sample(1000, rng)
    assert np.all(vals[draws] > 0)


def test_sample_draws_nothing_for_count_zero():
    tree = SumTree(3)
    assert tree.sample(0, np.random.default_rng(0)).shape == (0,)  # even with a zero total


# ------------------------------------------------------------------ without replacement


def successive_inclusion(values: np.ndarray, count: int) -> np.ndarray:
    """Exact inclusion probabilities of successive sampling, by enumerating ordered outcomes."""
    positive = [i for i in range(len(values)) if values[i] > 0]
    incl = np.zeros(len(values))
    total = float(values.sum())
    for order in itertools.permutations(positive, count):
        prob, left = 1.0, total
        for i in order:
            prob *= values[i] / left
            left -= values[i]
        incl[list(order)] += prob
    return incl


def ordered_probability(values: np.ndarray, order: tuple[int, ...]) -> float:
    """P(i_1, ..., i_k) = prod_j v_{i_j} / (V - sum_{m<j} v_{i_m})."""
    prob, left = 1.0, float(values.sum())
    for i in order:
        prob *= values[i] / left
        left -= values[i]
    return prob


@pytest.mark.parametrize("count", [2, 3])
def test_without_replacement_matches_exact_successive_sampling(count):
    vals = np.array([1.0, 0.0, 2.0, 3.0, 0.5, 6.0])
    tree = SumTree(len(vals), 2, root_width=1)
    tree.fill(vals)
    buffer = tree._buf.copy()
    rng = np.random.default_rng(10 + count)
    reps = 3000
    draws = np.array([tree.sample(count, rng, replacement=False) for _ in range(reps)])
    np.testing.assert_array_equal(tree._buf, buffer)  # the tree is restored bit for bit
    assert all(len(set(row)) == count for row in draws.tolist())
    # Inclusion probabilities against exact enumeration (5 standard errors).
    exact = successive_inclusion(vals, count)
    observed = np.bincount(draws.ravel(), minlength=len(vals)) / reps
    assert exact.sum() == pytest.approx(count)
    p = vals / vals.sum()
    assert np.all(exact >= p - 1e-12) and np.all(exact <= 1.0)
    assert np.all(np.diff(exact[np.argsort(vals)]) >= -1e-12)  # ordered like the values
    assert exact[5] < count * p[5] and exact[0] > count * p[0]  # not proportional: big under, small over
    tol = 5 * np.sqrt(exact * (1 - exact) / reps) + 1e-12
    assert np.all(np.abs(observed - exact) <= tol), (observed, exact)
    if count == 2:  # the ordered outcomes follow the product formula (chi-square)
        orders = list(itertools.permutations(np.flatnonzero(vals).tolist(), 2))
        expected = np.array([reps * ordered_probability(vals, o) for o in orders])
        seen = {o: 0 for o in orders}
        for row in draws.tolist():
            seen[tuple(row)] += 1
        assert stats.chisquare(np.array([seen[o] for o in orders]), expected).pvalue > 1e-4


def test_without_replacement_all_positive_and_too_many():
    vals = np.array([0.0, 1.0, 0.0, 5.0, 2.0])
    tree = SumTree(5, 2, root_width=1)
    tree.fill(vals)
    buffer = tree._buf.copy()
    idx = tree.sample(3, np.random.default_rng(0), replacement=False)
    assert sorted(idx.tolist()) == [1, 3, 4]
    with pytest.raises(ValueError, match="at least count=4 positive"):
        tree.sample(4, np.random.default_rng(0), replacement=False)
    np.testing.assert_array_equal(tree._buf, buffer)  # restored after the error too


def test_without_replacement_on_a_large_skewed_table():
    rng = np.random.default_rng(21)
    vals = np.exp(rng.uniform(-25, 25, 20_000))
    tree = SumTree(len(vals))
    tree.fill(vals)
    buffer = tree._buf.copy()
    idx = tree.sample(256, rng, replacement=False)
    assert len(np.unique(idx)) == 256 and np.all(vals[idx] > 0)
    np.testing.assert_array_equal(tree._buf, buffer)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "size,error", [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError)]
)
def test_bad_size(size, error):
    with pytest.raises(error, match="'size' parameter of SumTree"):
        SumTree(size)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"fanout": 1}, ValueError),
        ({"fanout": 1000}, ValueError),
        ({"rebuild_every": 0}, ValueError),
        ({"fanout": True}, TypeError),
        ({"root_width": 0}, ValueError),
    ],
)
def test_bad_options(kwargs, error):
    with pytest.raises(error, match="parameter of SumTree"):
        SumTree(10, **kwargs)


@pytest.mark.parametrize(
    "values,match",
    [
        ([-1.0], "negative"),
        ([float("nan")], "NaN"),
        ([float("inf")], "finite"),
        ([1e308, 1e308], "total stays finite"),
    ],
)
def test_bad_values_in_set(values, match):
    tree = SumTree(4)
    tree.set([0, 1], [1.0, 1.0])
    buffer = tree._buf.copy()
    with pytest.raises(ValueError, match=match):
        tree.set(list(range(len(values))), values)
    np.testing.assert_array_equal(tree._buf, buffer)  # nothing written


def test_bad_indices_and_shapes():
    tree = SumTree(4)
    with pytest.raises(IndexError, match=r"\[0, 4\). Got index 4"):
        tree.set([4], [1.0])
    with pytest.raises(IndexError, match="Got index -1"):
        tree.set([-1], [1.0])
    with pytest.raises(IndexError):
        tree.get([7])
    with pytest.raises(TypeError, match="integer array"):
        tree.set([0.5], [1.0])
    with pytest.raises(TypeError, match="integer array"):
        tree.get(np.array([True, False]))
    with pytest.raises(ValueError, match="one value per index"):
        tree.set([0, 1], [1.0])
    tree.set([0, 1], 2.0)  # a scalar value is broadcast
    assert tree.values().tolist() == [2.0, 2.0, 0.0, 0.0]
    tree.set([], [])  # nothing to do


def test_bad_fill_find_and_sample_arguments():
    tree = SumTree(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        tree.fill([1.0, 2.0])
    with pytest.raises(ValueError, match="negative"):
        tree.fill([1.0, -2.0, 0.0])
    with pytest.raises(TypeError, match="real array"):
        tree.fill(np.array([True, False, True]))
    with pytest.raises(ValueError, match="positive total"):
        tree.sample(2, np.random.default_rng(0))
    tree.fill(np.array([1, 2, 3], dtype=np.int32))
    assert tree.total == 6.0
    with pytest.raises(ValueError, match="'targets'"):
        tree.find([-0.5])
    with pytest.raises(ValueError, match="'targets'"):
        tree.find([6.5])
    with pytest.raises(ValueError, match="'targets'"):
        tree.find([float("nan")])
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        tree.sample(2, np.random.RandomState(0))  # noqa: NPY002 - the wrong type on purpose
    with pytest.raises(ValueError, match="'count'"):
        tree.sample(-1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="'replacement'"):
        tree.sample(1, np.random.default_rng(0), replacement=None)


# ------------------------------------------------------------------ state


def test_state_dict_round_trip_and_pickle():
    rng = np.random.default_rng(30)
    tree = SumTree(1000, 8, root_width=10)
    tree.fill(rng.random(1000))
    tree.set(rng.integers(0, 1000, 300), rng.random(300))
    state = tree.state_dict()
    assert set(state) == {SumTree.STATE_SIZE, SumTree.STATE_VALUES}
    fresh = SumTree(1000, 8, root_width=10)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh._buf, tree._buf)
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(fresh.sample(500, a), tree.sample(500, b))
    state[SumTree.STATE_VALUES][0] = 123.0  # the state is a copy
    assert tree.get([0])[0] != 123.0
    clone = pickle.loads(pickle.dumps(tree))
    np.testing.assert_array_equal(clone._buf, tree._buf)
    clone.set([0], [5.0])  # the clone's levels still share its own buffer
    assert clone.total == pytest.approx(tree.total - tree.get([0])[0] + 5.0)


def test_load_state_dict_checks_size_and_keys():
    tree = SumTree(5)
    with pytest.raises(ValueError, match="holds 6 values but this tree has size 5"):
        tree.load_state_dict(SumTree(6).state_dict())
    with pytest.raises(KeyError, match="missing"):
        tree.load_state_dict({SumTree.STATE_SIZE: 5})
    with pytest.raises(ValueError, match="negative"):
        tree.load_state_dict({SumTree.STATE_SIZE: 5, SumTree.STATE_VALUES: -np.ones(5)})


# ------------------------------------------------------------------ backends

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")

# Values that stress rounding: zeros, subnormals, and magnitudes 2**-60 ... 2**60 side by side.
stress_values = st.one_of(
    st.just(0.0),
    st.just(5e-324),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    st.integers(-60, 60).map(lambda e: 2.0**e),
    st.integers(-60, 60).map(lambda e: 2.0**e * (1 + 2.0**-52)),
)


def boundary_targets(values: np.ndarray, total: float, rng: np.random.Generator) -> np.ndarray:
    """Random targets plus every sequential prefix end, its float neighbours, 0 and the total."""
    prefix = np.cumsum(values)
    near = np.concatenate([prefix, np.nextafter(prefix, 0.0), np.nextafter(prefix, np.inf)])
    targets = np.concatenate([rng.random(200) * total, near, [0.0, total, np.nextafter(total, 0.0)]])
    return targets[(targets >= 0) & (targets <= total)]


@own_backends
@needs_numba
@SMALL
@given(
    values=st.lists(stress_values, min_size=1, max_size=150),
    fanout=st.integers(2, 17),
    width=st.integers(1, 40),
    updates=st.lists(
        st.lists(st.tuples(st.integers(0, 10**6), stress_values), min_size=1, max_size=40),
        min_size=0,
        max_size=4,
    ),
    seed=st.integers(0, 2**32 - 1),
)
@example(values=[1.0] + [2.0**-53] * 15 + [0.0, 3.0], fanout=16, width=1, updates=[], seed=0)
@example(values=[5e-324] * 5, fanout=2, width=1, updates=[[(0, 0.0), (4, 0.0)]], seed=1)
def test_backends_agree_bit_for_bit(values, fanout, width, updates, seed):
    """Same sums (every node, bit for bit) and same leaves for every target, both kernels."""
    vals = np.array(values, dtype=np.float64)
    size = len(vals)
    trees = [SumTree(size, fanout, root_width=width, backend=name) for name in ("numpy", "numba")]
    rng = np.random.default_rng(seed)
    for tree in trees:
        tree.fill(vals)
    reference = vals.copy()
    for batch in [[]] + updates:
        if batch:
            idx = np.array([i % size for i, _ in batch], dtype=np.int64)
            new = np.array([v for _, v in batch])
            for tree in trees:
                tree.set(idx, new)
            for i, v in zip(idx.tolist(), new.tolist(), strict=True):
                reference[i] = v
        numpy_tree, numba_tree = trees
        assert numpy_tree._buf.tobytes() == numba_tree._buf.tobytes()
        assert numpy_tree.total == numba_tree.total
        check_consistent(numba_tree, reference)
        if numba_tree.total == 0:
            continue
        targets = boundary_targets(reference, numba_tree.total, rng)
        expected = numpy_tree.find(targets)
        assert np.all(reference[expected] > 0)
        np.testing.assert_array_equal(numba_tree.find(targets), expected)
        kernels = engine._kernels()
        args = (numba_tree._buf, numba_tree._starts, numba_tree._lengths, fanout, targets)
        np.testing.assert_array_equal(kernels.descend_by_level(*args), expected)
        np.testing.assert_array_equal(kernels.descend(*args), expected)


@own_backends
@needs_numba
def test_compiled_row_sum_is_numpy_add_reduce_for_every_fanout():
    kernels = engine._kernels()
    rng = np.random.default_rng(40)
    for fanout in range(1, 257):
        rows = np.exp(rng.uniform(-40, 40, (16, fanout))) * (rng.random((16, fanout)) < 0.8)
        expected = np.add.reduce(rows, axis=1)
        flat = rows.ravel()
        got = np.array([kernels.row_sum(flat, r * fanout, fanout) for r in range(16)])
        assert got.tobytes() == expected.tobytes(), fanout


@own_backends
@needs_numba
@pytest.mark.parametrize("fanout", [2, 16, 64])
def test_level_by_level_descent_on_a_large_tree(monkeypatch, fanout):
    rng = np.random.default_rng(41)
    size = 300_007
    vals = rng.random(size) * (rng.random(size) < 0.6)
    numpy_tree = SumTree(size, fanout, backend="numpy")
    numpy_tree.fill(vals)
    monkeypatch.setattr(engine, "BY_LEVEL_MIN", size)
    deep = SumTree(size, fanout, backend="numba")
    monkeypatch.setattr(engine, "BY_LEVEL_MIN", size + 1)
    shallow = SumTree(size, fanout, backend="numba")
    assert deep._by_level and not shallow._by_level
    for tree in (deep, shallow):
        tree.fill(vals)
    targets = boundary_targets(vals[:2000], numpy_tree.total, rng)
    targets = np.concatenate([targets, rng.random(50_000) * numpy_tree.total])
    expected = numpy_tree.find(targets)
    np.testing.assert_array_equal(deep.find(targets), expected)
    np.testing.assert_array_equal(shallow.find(targets), expected)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(deep.sample(4096, a), numpy_tree.sample(4096, b))


@own_backends
def test_backend_selection_and_bad_values(monkeypatch):
    assert SumTree(4, backend="numpy").backend == "numpy"
    monkeypatch.setenv(ENGINE_ENV, "numpy")
    assert SumTree(4).backend == "numpy"
    assert "backend='numpy'" in repr(SumTree(4))
    monkeypatch.setenv(ENGINE_ENV, "")
    assert SumTree(4).backend == ("numba" if HAVE_NUMBA else "numpy")
    monkeypatch.setenv(ENGINE_ENV, " Auto ")
    assert SumTree(4).backend == ("numba" if HAVE_NUMBA else "numpy")
    monkeypatch.setenv(ENGINE_ENV, "fast")
    with pytest.raises(ValueError, match="ISAMPLE_ENGINE must be one of 'auto', 'numpy', 'numba'"):
        SumTree(4)
    assert SumTree(4, backend="numpy").backend == "numpy"  # an argument overrides the variable
    with pytest.raises(ValueError, match="'backend' parameter of SumTree must be one of"):
        SumTree(4, backend="cython")
    with pytest.raises(TypeError, match="'backend' parameter of SumTree"):
        SumTree(4, backend=1)


@own_backends
def test_without_numba_auto_falls_back_and_numba_is_an_error(monkeypatch):
    monkeypatch.setattr(engine, "_kernels", lambda: None)
    assert SumTree(10, backend="auto").backend == "numpy"
    assert not engine.compiled_available()
    with pytest.raises(ImportError, match=r"needs numba.*isample\[fast\]"):
        SumTree(10, backend="numba")


@own_backends
@needs_numba
def test_disagreeing_kernels_are_not_used(monkeypatch):
    monkeypatch.setattr(engine, "_kernels_agree", lambda fanout: False)
    assert SumTree(10, backend="auto").backend == "numpy"
    with pytest.raises(RuntimeError, match="disagree with the NumPy path for fanout 16"):
        SumTree(10, backend="numba")


@own_backends
@needs_numba
def test_pickled_tree_keeps_its_backend_argument():
    tree = SumTree(100, 4, root_width=3, backend="numpy")
    tree.fill(np.arange(100.0))
    clone = pickle.loads(pickle.dumps(tree))
    assert clone.backend == "numpy"
    compiled = pickle.loads(pickle.dumps(SumTree(100, 4, root_width=3, backend="numba")))
    assert compiled.backend == "numba"


@own_backends
def test_importing_isample_does_not_import_numba():
    code = "import sys, isample, isample.engine; print('numba' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@own_backends
@needs_numba
def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """Where numba refuses cache=True (no writable cache directory), kernels still compile."""
    import numba

    from isample import _engine_kernels

    calls = []
    real = numba.njit

    def njit(**options):
        calls.append(options["cache"])
        if options["cache"]:
            raise RuntimeError("cannot cache function: no locator available")
        return real(**options)

    monkeypatch.setattr(numba, "njit", njit)
    double = _engine_kernels._jit(lambda x: 2 * x)
    assert calls == [True, False] and double(21) == 42


@own_backends
@needs_numba
def test_compiled_pairwise_sum_is_numpy_add_reduce_for_any_length():
    kernels = engine._kernels()
    rng = np.random.default_rng(42)
    for n in [*range(1, 700), 1023, 1024, 4095, 4096, 10_007, 65_536, 100_003]:
        row = rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))
        assert np.float64(kernels.pairwise_sum(row, 0, n)).tobytes() == np.add.reduce(row).tobytes(), n
