"""The pure selection rules of isample.rank_policies against independent NumPy / SciPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from isample.rank_policies import (
    annealed_selection_pressure,
    cdf_power_probabilities,
    descending_ranks,
    infobatch_kept_count,
    infobatch_plan,
    rank_exponential_probabilities,
    top_k_rows,
)

scores_st = st.lists(st.floats(0.0, 10.0, allow_nan=False, width=32), min_size=1, max_size=40)


@given(scores_st, st.floats(1.0, 1e4))
@example([1.0, 1.0, 1.0], 100.0)
@settings(max_examples=40, deadline=None)
def test_rank_exponential_matches_numpy(scores, s_e):
    s = np.asarray(scores, dtype=np.float64)
    m = s.size
    ranks = np.empty(m)
    ranks[np.argsort(-s, kind="stable")] = np.arange(m)
    ref = np.exp(-math.log(s_e) * ranks / m)
    ref /= ref.sum()
    p = rank_exponential_probabilities(torch.tensor(scores, dtype=torch.float64), s_e).numpy()
    np.testing.assert_allclose(p, ref, rtol=1e-10, atol=1e-300)
    assert p.max() / p.min() == pytest.approx(s_e ** ((m - 1) / m), rel=1e-9)


def test_rank_never_seen_rank_first_and_uniform_at_pressure_one():
    r = descending_ranks(torch.tensor([0.5, float("nan"), 2.0]))
    assert r.tolist() == [2, 0, 1]
    p = rank_exponential_probabilities(torch.rand(7, generator=torch.Generator().manual_seed(0)), 1.0)
    torch.testing.assert_close(p, torch.full((7,), 1 / 7, dtype=torch.float64))


def test_annealed_selection_pressure_is_geometric():
    assert annealed_selection_pressure(100.0, 1.0, 0, 5) == 100.0
    assert annealed_selection_pressure(100.0, 1.0, 4, 5) == pytest.approx(1.0)
    assert annealed_selection_pressure(100.0, 1.0, 1, 5) == pytest.approx(100.0**0.75)
    assert annealed_selection_pressure(100.0, 1.0, 9, 5) == pytest.approx(1.0)
    assert annealed_selection_pressure(100.0, 1.0, 3, None) == 100.0
    with pytest.raises(ValueError, match="'initial' parameter"):
        annealed_selection_pressure(0.5, 1.0, 0, 5)


@given(scores_st, scores_st, st.floats(0.1, 8.0), st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_cdf_power_matches_scipy_percentile(losses, history, beta, s_min):
    p = cdf_power_probabilities(torch.tensor(losses), torch.tensor(history), beta, s_min).numpy()
    h = np.asarray(history, dtype=np.float32).astype(np.float64)
    x = np.asarray(losses, dtype=np.float32).astype(np.float64)
    cdf = np.array([stats.percentileofscore(h, v, kind="weak") / 100.0 for v in x])
    np.testing.assert_allclose(p, np.maximum(s_min, cdf**beta), rtol=1e-12, atol=1e-15)


def test_cdf_power_bad_input():
    with pytest.raises(ValueError, match="'beta' parameter"):
        cdf_power_probabilities(torch.ones(2), torch.ones(3), beta=0.0)
    with pytest.raises(ValueError, match="'s_min' parameter"):
        cdf_power_probabilities(torch.ones(2), torch.ones(3), s_min=-0.1)
    with pytest.raises(ValueError, match="empty"):
        cdf_power_probabilities(torch.ones(2), torch.ones(0))


@given(scores_st, st.integers(1, 50))
@settings(max_examples=40, deadline=None)
def test_top_k_matches_numpy(scores, k):
    rows = top_k_rows(torch.tensor(scores), k).numpy()
    ref = np.argsort(-np.asarray(scores, dtype=np.float32).astype(np.float64), kind="stable")[:k]
    np.testing.assert_array_equal(rows, ref)


@given(scores_st, st.floats(0.0, 0.99), st.floats(0.01, 1.0), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_infobatch_plan_structure(scores, r, min_keep, seed):
    s = torch.tensor(scores, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx, w = infobatch_plan(s, r, g, min_keep)
    well = (s < s.mean()).numpy()
    n_well, m = int(well.sum()), s.numel()
    k = infobatch_kept_count(n_well, m, r, min_keep)
    assert idx.numel() == m - n_well + k and len(set(idx.tolist())) == idx.numel()
    assert idx.numel() >= min(m, math.ceil(min_keep * m))
    kept_well = well[idx.numpy()]
    assert int(kept_well.sum()) == k
    assert set(np.nonzero(~well)[0].tolist()) <= set(idx.tolist())
    if k:
        np.testing.assert_allclose(w.numpy()[kept_well], n_well / k, rtol=1e-6)
    assert bool((w[~torch.from_numpy(kept_well)] == 1).all())


def test_infobatch_kept_count_cases():
    assert infobatch_kept_count(0, 10, 0.5) == 0
    assert infobatch_kept_count(10, 20, 0.5) == 5
    assert infobatch_kept_count(1, 20, 0.9) == 1  # never 0: the epoch sum stays unbiased
    assert infobatch_kept_count(90, 100, 0.99, min_keep=0.5) == 40  # 10 above the mean + 40 kept = 50%
    with pytest.raises(ValueError, match="'prune_ratio' parameter"):
        infobatch_plan(torch.ones(3), 1.0, torch.Generator())
