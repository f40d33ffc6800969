"""Gaps in the tests of the learning-rate coupling helper (issue 8 item 4).

``tests/test_metrics_optimizer.py`` covers the SGD/Adam/RMSprop rules, the upper limit
``kappa < 1 / (1 - beta)`` and atomic application. Here: a multiplier that pushes a beta to
1 (tiny kappa) is refused too, kappa = 1 changes nothing, AdamW and amsgrad groups, the
proposal does not touch the optimizer, and the end-to-end path from scores via ``tau**2``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from isample import metrics as M


def _w() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    "make",
    [
        lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9),
        lambda w: torch.optim.Adam(w, lr=1e-3),
        lambda w: torch.optim.AdamW(w, lr=1e-3, amsgrad=True, weight_decay=0.05),
        lambda w: torch.optim.RMSprop(w, lr=1e-2, alpha=0.99, centered=True),
    ],
    ids=["sgd", "adam", "adamw-amsgrad", "rmsprop"],
)
def test_kappa_one_is_identity_and_optimizer_untouched(make) -> None:
    opt = make(_w())
    before = [dict(g) for g in opt.param_groups]
    (new,) = M.scaled_hyperparameters(opt, 1.0)
    assert [dict(g) for g in opt.param_groups] == before  # a proposal only
    for key, value in new.items():
        assert value == pytest.approx(before[0][key], rel=1e-15)
    # momentum, weight decay, amsgrad, centred are never part of the proposal
    assert set(new) <= {"lr", "betas", "alpha", "eps"}


def test_adamw_square_root_rule() -> None:
    opt = torch.optim.AdamW(_w(), lr=4e-4, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    kappa = 2.5
    (new,) = M.scaled_hyperparameters(opt, kappa)
    assert new["lr"] == pytest.approx(4e-4 * math.sqrt(kappa), rel=1e-14)
    assert new["betas"][0] == pytest.approx(1 - kappa * 0.2, rel=1e-14)
    assert new["betas"][1] == pytest.approx(1 - kappa * 0.01, rel=1e-14)
    assert new["eps"] == pytest.approx(1e-6 / math.sqrt(kappa), rel=1e-14)


def test_multiplier_that_pushes_beta_to_one_is_refused() -> None:
    """For a tiny kappa, 1 - kappa (1 - beta) rounds to 1.0: refused, not silently accepted."""
    adam = torch.optim.Adam(_w(), betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="kappa"):
        M.scaled_hyperparameters(adam, 1e-20)
    rms = torch.optim.RMSprop(_w(), alpha=0.99)
    with pytest.raises(ValueError, match="alpha"):
        M.scaled_hyperparameters(rms, 1e-20)
    # the smaller beta binds: 1 / (1 - 0.5) = 2 for beta1 here ...
    opt = torch.optim.Adam(_w(), betas=(0.5, 0.999))
    with pytest.raises(ValueError, match=r"1 / \(1 - beta1\) = 2 "):
        M.scaled_hyperparameters(opt, 2.0)
    # ... and 1 / (1 - 0.9) = 10 for beta2 when beta1 = 0.99 allows up to 100
    opt = torch.optim.Adam(_w(), betas=(0.99, 0.9))
    M.scaled_hyperparameters(opt, 9.9)
    with pytest.raises(ValueError, match=r"1 / \(1 - beta2\) = 10 "):
        M.scaled_hyperparameters(opt, 10.0)
    sgd = torch.optim.SGD(_w(), lr=0.1)
    assert M.scaled_hyperparameters(sgd, 1e-20) == [{"lr": pytest.approx(1e-21)}]  # no beta: fine


def test_tau_squared_feeds_the_rule() -> None:
    """Scores -> tau^2 -> proposal (tau^2 = B sum q^2 = 4 * 12 / 36 = 4/3 for these scores)."""
    scores = torch.tensor([1.0, 1.0, 1.0, 3.0])  # q = (1, 1, 1, 3) / 6
    kappa = M.tau(scores) ** 2
    assert kappa == pytest.approx(4.0 / 3.0, rel=1e-12)
    opt = torch.optim.RMSprop(_w(), lr=1e-2, alpha=0.9, eps=1e-8)
    previous = M.apply_scaled_hyperparameters(opt, kappa)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(1e-2 * math.sqrt(kappa), rel=1e-12)
    assert group["alpha"] == pytest.approx(1 - kappa * 0.1, rel=1e-12)
    assert previous == [{"lr": 1e-2, "alpha": 0.9, "eps": 1e-8}]


def test_bayesian_filters_scale_lr_betas_and_prior_variance() -> None:
    """lr and betas by the square-root rule, prior_variance (the SGD-limit lr) by the linear one.

    The implied Adam eps = lr / prior_variance then scales as eps / sqrt(kappa), and the prior
    decay a = 1 - lr^2 / (2 prior_variance) is unchanged; eps (a precision floor) is not proposed.
    """
    from isample.optim import BAdam, BRMSprop

    kappa = 2.5
    brms = BRMSprop(_w(), lr=4e-3, beta2=0.99, prior_variance=0.5, eps=1e-12)
    (new,) = M.scaled_hyperparameters(brms, kappa)
    assert set(new) == {"lr", "beta2", "prior_variance"}
    assert new["lr"] == pytest.approx(4e-3 * math.sqrt(kappa), rel=1e-14)
    assert new["beta2"] == pytest.approx(1 - kappa * 0.01, rel=1e-14)
    assert new["prior_variance"] == pytest.approx(0.5 * kappa, rel=1e-14)
    assert new["lr"] / new["prior_variance"] == pytest.approx(4e-3 / 0.5 / math.sqrt(kappa), rel=1e-14)
    assert new["lr"] ** 2 / new["prior_variance"] == pytest.approx(4e-3**2 / 0.5, rel=1e-13)
    badam = BAdam(
        [{"params": _w()}, {"params": _w(), "lr": 1e-2, "prior_variance": 2.0}], lr=1e-3, betas=(0.8, 0.99)
    )
    previous = M.apply_scaled_hyperparameters(badam, kappa)
    assert previous == [
        {"lr": 1e-3, "betas": (0.8, 0.99), "prior_variance": 1.0},
        {"lr": 1e-2, "betas": (0.8, 0.99), "prior_variance": 2.0},
    ]
    group = badam.param_groups[1]
    assert group["lr"] == pytest.approx(1e-2 * math.sqrt(kappa), rel=1e-14)
    assert group["betas"][0] == pytest.approx(1 - kappa * 0.2, rel=1e-14)
    assert group["betas"][1] == pytest.approx(1 - kappa * 0.01, rel=1e-14)
    assert group["prior_variance"] == pytest.approx(2.0 * kappa, rel=1e-14)
    for p in badam.param_groups[0]["params"] + group["params"]:
        p.grad = torch.ones_like(p)
    badam.step()  # the scaled groups are valid
    with pytest.raises(ValueError, match=r"1 / \(1 - beta1\) = 5 "):
        M.scaled_hyperparameters(BAdam(_w(), betas=(0.8, 0.999)), 5.0)
    with pytest.raises(ValueError, match="beta2"):
        M.scaled_hyperparameters(BRMSprop(_w(), beta2=0.9), 10.0)
    (same,) = M.scaled_hyperparameters(BRMSprop(_w()), 1.0)
    assert same == {"lr": pytest.approx(1e-3), "beta2": pytest.approx(0.999), "prior_variance": 1.0}
