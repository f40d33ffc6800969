"""validate_sampler: NaN never passes, and heavy-tailed unbiased samplers are not failed.

The heavy-tailed sampler draws example 0 (gradient norm ~40x the others) with
probability 3e-4 and weights it 1 / (N p) ~ 3,000: in 500 or 2,000 batches of 4 it is
usually never drawn (the sample standard errors then miss its share of the variance)
and sometimes drawn once (a jump of many sample standard errors). The old test failed
it in 9 of 10 seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from isample import WeightedBatch
from isample import metrics as M

CE = nn.CrossEntropyLoss(reduction="none")
N = 40


class IIDLoader:
    """b i.i.d. draws per batch from ``draw`` (seeded); weights ``1 / (N p)`` unless given."""

    def __init__(self, x, y, draw, batch_size, num_batches, seed, weights=None):
        self.x, self.y, self.draw, self.b, self.t, self.seed = x, y, draw, batch_size, num_batches, seed
        self.weights = weights if weights is not None else 1.0 / (len(draw) * draw)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.t):
            idx = torch.multinomial(self.draw, self.b, replacement=True, generator=gen)
            yield WeightedBatch(self.x[idx], self.y[idx], idx, self.weights[idx].float())


def heavy_setup(rare_p=3e-4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    x[0] *= 30.0  # one example with a large gradient ...
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g) * 0.3)
        model.bias.zero_()
    p = torch.ones(N, dtype=torch.float64)
    p[0] = rare_p  # ... drawn rarely, with a huge weight
    return model, x, y, p / p.sum()


@pytest.mark.parametrize("num_batches", [500, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_heavy_tailed_sampler_passes_with_probabilities(num_batches, seed):
    model, x, y, p = heavy_setup()
    loader = IIDLoader(x, y, p, 4, num_batches, seed)
    report = M.validate_sampler(loader, model, CE, x, y, num_batches, probabilities=p)
    assert report.passed and report.status == "passed", report.as_dict()
    assert report.mean_passed and report.variance_passed


@pytest.mark.parametrize("num_batches", [500, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_heavy_tailed_sampler_is_never_failed_without_probabilities(num_batches, seed):
    model, x, y, p = heavy_setup()
    report = M.validate_sampler(IIDLoader(x, y, p, 4, num_batches, seed), model, CE, x, y, num_batches)
    assert report.status in ("passed", "inconclusive"), report.as_dict()
    if report.status == "inconclusive":
        assert not report.passed and "never drawn" in report.reason


def test_biased_heavy_tailed_sampler_still_fails():
    """Power: draws from one distribution, weights from another (a real bias on every example)."""
    model, x, y, p = heavy_setup()
    draw = p.clone()
    draw[1 : N // 2] *= 3.0  # over-draws the first half ...
    draw /= draw.sum()
    loader = IIDLoader(x, y, draw, 4, 500, 0, weights=1.0 / (N * p))  # ... but weights for p
    for probs in (p, None):
        report = M.validate_sampler(loader, model, CE, x, y, 500, probabilities=probs)
        assert report.status == "failed" and not report.passed and not report.mean_passed, report.as_dict()
        assert "mean test" in report.reason


def test_exact_standard_error_makes_the_never_drawn_case_pass():
    """With p, the unseen heavy example's variance share enters the standard error (z stays small)."""
    model, x, y, p = heavy_setup(rare_p=1e-5)
    loader = IIDLoader(x, y, p, 4, 500, 0)
    assert not any(bool((b.indices == 0).any()) for b in loader)  # the heavy example is never drawn
    with_p = M.validate_sampler(loader, model, CE, x, y, 500, probabilities=p)
    without = M.validate_sampler(loader, model, CE, x, y, 500)
    assert with_p.passed and with_p.max_abs_z < 3.0 < with_p.z_threshold
    assert without.status == "inconclusive" and without.max_abs_z > without.z_threshold


@pytest.mark.parametrize("where", ["all", "one"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_minibatch_gradients_fail(where, value):
    model, x, y, p = heavy_setup()
    batches = list(IIDLoader(x, y, torch.full((N,), 1.0 / N, dtype=torch.float64), 4, 50, 0))
    for t, b in enumerate(batches):
        if where == "all" or t == 7:
            b.weights[0] = value
    for probs in (None, torch.full((N,), 1.0 / N, dtype=torch.float64)):
        report = M.validate_sampler(batches, model, CE, x, y, 50, probabilities=probs)
        assert not report.passed and report.status == "failed", report.as_dict()
        assert report.nonfinite_batches == (50 if where == "all" else 1)
        assert "NaN or inf" in report.reason
        assert not report.mean_passed


def test_uniform_sampler_still_passes_and_reports_status():
    model, x, y, _ = heavy_setup()
    u = torch.full((N,), 1.0 / N, dtype=torch.float64)
    report = M.validate_sampler(IIDLoader(x, y, u, 4, 300, 3), model, CE, x, y, 300, probabilities=u)
    assert report.passed and report.status == "passed" and report.reason == ""
    assert report.as_dict()["nonfinite_batches"] == 0
