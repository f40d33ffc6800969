"""Every numeric parameter has a finite, meaningful range checked at construction.

Before: ``check_float`` accepted +inf wherever only a lower bound was set (initial_score,
additive, relative, power, max_weight, ...), ``initial_score = 1e308`` and ``additive`` /
``relative = 1e308`` gave NaN weights, ``power = inf`` failed only at the first batch,
``presample = 1e15`` never returned, seeds >= 2**63 failed only under DDP and seeds >= 2**64
aliased smaller ones, and Selective Backprop's candidate loop had no bound.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import make_classification, make_mlp
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import isample.schemes as schemes
from isample import LossScorer, PoolLoader, TableSampler
from isample._random import derive_seed
from isample._validation import MAX_SEED, check_float, check_seed
from isample.policies import ScorePolicy
from isample.switch import TauSwitch

CE = nn.CrossEntropyLoss(reduction="none")
N, D, C, B = 48, 5, 3, 8
NON_FINITE = [math.inf, -math.inf, math.nan]


def dataset(n=N):
    x, y = make_classification(n, D, C, 0)
    return torch.utils.data.TensorDataset(x, y)


# ---------------------------------------------------------------- check_float itself


@pytest.mark.parametrize("value", [math.inf, -math.inf, 10**400, -(10**400)])
def test_check_float_rejects_infinite_by_default(value):
    with pytest.raises(ValueError, match=r"The 'x' parameter of Owner must be a finite float >= 0.0. Got"):
        check_float(value, "x", "Owner", minimum=0.0)
    with pytest.raises(ValueError, match=r"must be a finite float or None\. Got"):
        check_float(value, "x", "Owner", allow_none=True)


def test_check_float_allow_inf_keeps_the_bounds():
    assert check_float(math.inf, "x", "O", minimum=1.0, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"must be a float >= 1.0\. Got -inf"):
        check_float(-math.inf, "x", "O", minimum=1.0, allow_inf=True)
    with pytest.raises(ValueError, match=r"must be a float >= 1.0\. Got nan"):
        check_float(math.nan, "x", "O", minimum=1.0, allow_inf=True)
    assert check_float(1e308, "x", "O", minimum=0.0) == 1e308  # large but finite is the caller's call
    assert check_float(2**100, "x", "O") == float(2**100)
    with pytest.raises(TypeError, match="must be a float"):
        check_float(True, "x", "O")


# ---------------------------------------------------------------- every constructor


def _table(**kw):
    return TableSampler(N, B, seed=0, **kw)


def _pool(**kw):
    return PoolLoader(dataset(), make_mlp(D, 8, C, 0), LossScorer(CE), B, seed=0, **kw)


TABLE_FLOATS = ["initial_score", "power", "additive", "relative", "mixing", "bias_exponent", "max_weight"]
POOL_FLOATS = ["presample", "power", "additive", "relative", "mixing", "bias_exponent", "max_weight"]
POOL_FLOATS += ["tau_momentum"]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    "factory, name",
    [(_table, n) for n in TABLE_FLOATS] + [(_pool, n) for n in POOL_FLOATS],
    ids=[f"table-{n}" for n in TABLE_FLOATS] + [f"pool-{n}" for n in POOL_FLOATS],
)
def test_loaders_reject_non_finite_parameters(factory, name, value):
    shown = name.removeprefix("tau_")  # TauSwitch names it 'momentum'
    with pytest.raises(ValueError, match=f"{shown}' parameter of .* must be a"):
        factory(**{name: value})


def _scheme_float_parameters():
    cases = []
    for name in schemes.available():
        for key, default in schemes.describe(name)["defaults"].items():
            numeric = isinstance(default, float) or key in ("max_weight", "initial_score")
            if numeric and not key.startswith("holdout") and key != "tau_threshold":
                cases.append((name, key))
    return cases


SCHEME_FLOATS = _scheme_float_parameters()


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("name, key", SCHEME_FLOATS, ids=[f"{n}-{k}" for n, k in SCHEME_FLOATS])
def test_every_scheme_float_rejects_non_finite_values(name, key, value):
    kw = {key: value}
    if name == "rho-loss":
        kw["irreducible_losses"] = torch.zeros(N)
    with pytest.raises((ValueError, ImportError), match=f"{key.removeprefix('tau_')}'|No module"):
        schemes.build(name, dataset(), make_mlp(D, 8, C, 0), CE, B, seed=0, epochs=3, **kw)


def test_the_sweep_covers_the_known_parameters():
    keys = {k for _, k in SCHEME_FLOATS}
    assert {"power", "additive", "relative", "mixing", "beta", "s_min", "presample", "prune_ratio"} <= keys
    assert {"initial_score", "max_weight", "selection_pressure", "ratio", "tau_momentum"} <= keys


def test_tau_threshold_inf_still_means_never():
    switch = TauSwitch(math.inf)
    assert switch.threshold == math.inf
    assert not any(switch.observe(tau, {}) for tau in (1.0, 50.0, 1e300))
    with pytest.raises(ValueError, match="'momentum' parameter of TauSwitch must be a finite float"):
        TauSwitch(2.0, momentum=math.inf)


# ---------------------------------------------------------------- values that would overflow


def test_initial_score_that_overflows_the_table_sum_is_rejected():
    with pytest.raises(
        ValueError, match=r"'initial_score' parameter of TableSampler must be a float in \[0, "
    ):
        _table(initial_score=1e308)
    with pytest.raises(ValueError, match="'initial_score'"):
        _table(initial_score=1e300, power=2.0)  # (1e300)^2 overflows
    limit = _table()._max_score
    sampler = _table(initial_score=limit)  # the largest accepted value gives finite weights
    w = torch.tensor([wt for batch in sampler for _, wt in batch])
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())


@pytest.mark.parametrize("kw", [{"additive": 1e308}, {"relative": 1e308}, {"power": 400.0}, {"power": 1e5}])
def test_extreme_smoothing_gives_finite_weights(kw):
    sampler = _table(**kw)
    top = min(40.0, sampler._max_score)  # larger scores are refused by update (they would overflow)
    sampler.update(torch.arange(N), torch.linspace(0.01, 1.0, N, dtype=torch.float64) * top)
    w = torch.tensor([wt for batch in sampler for _, wt in batch])
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
    loader = _pool(always=True, presample=2.0, **kw)
    for _, batch in zip(range(3), loader, strict=False):
        assert bool(torch.isfinite(batch.weights).all()) and bool((batch.weights > 0).all())


def _exact_probabilities(scores, power, additive, relative, mixing):
    """The policy formula in exact rational arithmetic (integer powers)."""
    t = [Fraction(s) ** power for s in scores]
    m = len(t)
    total = sum(t)
    c = Fraction(additive) + Fraction(relative) * total / m
    denom = total + m * c
    if denom == 0:
        return [1.0 / m] * m
    return [float(Fraction(mixing) / m + (1 - Fraction(mixing)) * (ti + c) / denom) for ti in t]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 1000), min_size=1, max_size=8),
    st.integers(-300, 300),
    st.integers(1, 4),
    st.sampled_from([0.0, 1e-300, 0.5, 3.0, 1e200, 1e308]),
    st.sampled_from([0.0, 0.5, 1e10, 1e308]),
    st.sampled_from([0.0, 0.1, 1.0]),
)
@example([1, 2, 3], 300, 4, 0.0, 0.0, 0.0)
@example([0, 1], -81, 4, 0.0, 0.0, 0.0)  # s^4 underflows to 0: still p = [0, 1]
@example([5, 1], -100, 4, 1e-300, 0.0, 0.0)  # tiny c_0 against underflowing scores
@example([1, 2, 3], 100, 1, 1e308, 0.0, 0.0)
@example([1, 2, 3], 0, 1, 0.0, 1e308, 0.0)
def test_policy_probabilities_never_overflow(ints, e, power, additive, relative, mixing):
    scores = [float(i) * 10.0**e for i in ints]
    if not all(math.isfinite(s) for s in scores):
        return
    policy = ScorePolicy(power=float(power), additive=additive, relative=relative, mixing=mixing)
    p = policy.probabilities(torch.tensor(scores, dtype=torch.float64))
    assert bool(torch.isfinite(p).all()) and bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    exact = _exact_probabilities(scores, power, additive, relative, mixing)
    for got, want in zip(p.tolist(), exact, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_presample_beyond_the_dataset_is_rejected():
    for value in (1e15, N / B + 0.5):
        bound = r"'presample' parameter of PoolLoader must be a float in \[1(\.0)?, (N / b|1024)"
        with pytest.raises(ValueError, match=bound):
            _pool(presample=value)
    assert _pool(presample=N / B).pool_size == N  # a pool of the whole dataset is fine


# ---------------------------------------------------------------- seeds: one rule everywhere


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**64 + 5, -1])
def test_seeds_outside_int64_are_rejected_everywhere(seed):
    match = r"The 'seed' parameter of .* must be an int in \[0, 9223372036854775807\]"
    with pytest.raises(ValueError, match=match):
        check_seed(seed, None, "Owner")
    with pytest.raises(ValueError, match=match):
        TableSampler(N, B, seed=seed)
    with pytest.raises(ValueError, match=match):
        PoolLoader(dataset(), make_mlp(D, 8, C, 0), LossScorer(CE), B, seed=seed)
    with pytest.raises(ValueError, match=match):
        schemes.build("uniform", dataset(), make_mlp(D, 8, C, 0), CE, B, seed=seed)


def test_largest_seed_works_and_seeds_do_not_alias():
    assert check_seed(MAX_SEED, None, "O") == MAX_SEED == 2**63 - 1
    a = [b for b in TableSampler(N, B, seed=MAX_SEED)]
    assert len(a) == math.ceil(N / B)
    with pytest.raises(ValueError, match="derive_seed"):
        derive_seed(2**64 + 5, 0)  # would alias derive_seed(5, 0)
    with pytest.raises(ValueError, match="derive_seed"):
        derive_seed(-1)
    assert derive_seed(2**64 - 1) != derive_seed(2**63 - 1)
    with pytest.raises(TypeError, match="'seed'"):
        check_seed(1.0, None, "O")
    fresh = check_seed(None, None, "O")
    assert 0 <= fresh <= MAX_SEED


# ---------------------------------------------------------------- Selective Backprop's loop


def test_selective_backprop_beta_is_bounded():
    model = make_mlp(D, 8, C, 0)
    for beta in (101.0, 1e300, math.inf):
        with pytest.raises(
            ValueError, match=r"'beta' parameter of SelectiveBackprop must be a .*float in \(0.0, 100.0\]"
        ):
            schemes.build("selective-backprop", dataset(), model, CE, B, beta=beta)
    assert schemes.build("selective-backprop", dataset(), model, CE, B, beta=100.0).beta == 100.0


class Drifting(torch.utils.data.Dataset):
    """Every read is easier than the last: each candidate's loss is below the whole history."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.full((1,), 1.0 / self.reads), torch.zeros(1)


def _mse(out, target):
    return (out - target).square().mean(1)


def test_selective_backprop_candidate_loop_is_bounded():
    """Keep probabilities of ~(c / R)^beta never fill a batch: a clear error, not an endless loop."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    loader = schemes.build(
        "selective-backprop", Drifting(64), model, _mse, 4, beta=100.0, uniform_epochs=0, chunk_size=32
    )
    with pytest.raises(
        RuntimeError, match=r"SelectiveBackprop read \d+ candidates without filling a batch of 4"
    ):
        next(iter(loader))
    limit = loader.history_size + loader.chunk_size + 100 * math.ceil(101 * 4)
    assert loader._consumed <= limit + loader.chunk_size
    # the same data with a probability floor trains normally
    floor = schemes.build(
        "selective-backprop",
        Drifting(64),
        model,
        _mse,
        4,
        beta=100.0,
        s_min=0.5,
        uniform_epochs=0,
        chunk_size=32,
    )
    assert next(iter(floor)).indices.numel() == 4
