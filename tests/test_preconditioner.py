"""``preconditioner_diagonal`` against a NumPy hand computation of each optimizer's state.

Every test feeds known float64 gradients (set on ``.grad`` directly, no model), runs the
real ``torch.optim`` step, recomputes the second-moment statistic with its textbook
recurrence in NumPy and compares ``D = 1 / (sqrt(v_hat) + eps)``; a second check takes
``D`` from the parameter update the optimizer actually made.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from isample.preconditioner import NoOptimizerStateError, is_identity_geometry, preconditioner_diagonal

RTOL = 1e-12
SHAPES = ((3, 4), (4,), (2, 3))


def _params(dtype=torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _grads(steps: int, seed: int) -> list[list[np.ndarray]]:
    """Gradients per step and parameter; large early, small late (so amsgrad's max matters)."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) * (3.0 if t < 2 else 0.2) for s in SHAPES] for t in range(steps)]


def _run(opt: torch.optim.Optimizer, params, grads, skip: dict[int, set[int]] | None = None) -> None:
    """Optimizer steps with the given gradients; ``skip[t]`` lists parameters without a grad at step t."""
    for t, step_grads in enumerate(grads):
        for k, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = None if skip and k in skip.get(t, set()) else torch.tensor(g, dtype=p.dtype)
        opt.step()


def _ema(grads: list[np.ndarray], beta: float, power: int) -> np.ndarray:
    v = np.zeros_like(grads[0])
    for g in grads:
        v = beta * v + (1 - beta) * g**power
    return v


def _numpy(d: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().numpy() for t in d]


def _assert_close(actual: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(_numpy(actual), expected, strict=True):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=0)


def _column(grads, k: int) -> list[np.ndarray]:
    return [step[k] for step in grads]


# ------------------------------------------------------------------ hand computations


@pytest.mark.parametrize("seed", [0, 1])
def test_adam_matches_hand_computation(seed: int) -> None:
    params = _params()
    beta2, eps, steps = 0.95, 1e-3, 5
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.8, beta2), eps=eps)
    grads = _grads(steps, seed)
    _run(opt, params, grads)
    expected = []
    for k in range(len(params)):
        v_hat = _ema(_column(grads, k), beta2, 2) / (1 - beta2**steps)
        expected.append(1.0 / (np.sqrt(v_hat) + eps))
    _assert_close(preconditioner_diagonal(opt, params), expected)


def test_adamw_amsgrad_uses_running_max() -> None:
    params = _params()
    beta2, eps, steps = 0.9, 1e-4, 6
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, beta2), eps=eps, weight_decay=0.1, amsgrad=True)
    grads = _grads(steps, 2)
    _run(opt, params, grads)
    expected = []
    for k in range(len(params)):
        column = _column(grads, k)
        v_max = np.max([_ema(column[: t + 1], beta2, 2) for t in range(steps)], axis=0)
        v_last = _ema(column, beta2, 2)
        assert np.any(v_max > v_last * (1 + 1e-6))  # the max is not the last value here
        expected.append(1.0 / (np.sqrt(v_max / (1 - beta2**steps)) + eps))
    _assert_close(preconditioner_diagonal(opt, params), expected)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_matches_hand_computation(centered: bool) -> None:
    params = _params()
    alpha, eps = 0.8, 1e-3
    opt = torch.optim.RMSprop(params, lr=0.01, alpha=alpha, eps=eps, momentum=0.5, centered=centered)
    grads = _grads(4, 3)
    _run(opt, params, grads)
    expected = []
    for k in range(len(params)):
        column = _column(grads, k)
        v = _ema(column, alpha, 2)
        if centered:
            v = v - _ema(column, alpha, 1) ** 2
        expected.append(1.0 / (np.sqrt(v) + eps))
    _assert_close(preconditioner_diagonal(opt, params), expected)


def test_adagrad_matches_hand_computation() -> None:
    params = _params()
    eps, init = 1e-6, 0.5
    opt = torch.optim.Adagrad(params, lr=0.1, eps=eps, initial_accumulator_value=init, lr_decay=0.01)
    grads = _grads(3, 4)
    _run(opt, params, grads)
    expected = [1.0 / (np.sqrt(init + sum(g**2 for g in _column(grads, k))) + eps) for k in range(3)]
    _assert_close(preconditioner_diagonal(opt, params), expected)


@pytest.mark.parametrize("optimizer", [None, "sgd", "sgd-momentum"], ids=["none", "sgd", "sgd-momentum"])
def test_identity_geometry_is_ones(optimizer) -> None:
    params = _params()
    if optimizer is not None:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9 if optimizer == "sgd-momentum" else 0.0)
        _run(opt, params, _grads(2, 5))
    else:
        opt = None
    assert is_identity_geometry(opt)
    d = preconditioner_diagonal(opt, params)
    for t, p in zip(d, params, strict=True):
        assert t.shape == p.shape
        assert t.dtype == torch.float32
        assert bool((t == 1).all())


# ------------------------------------------------------------------ against the real update


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "adagrad"])
def test_d_is_the_one_the_last_step_used(kind: str) -> None:
    """The last update was ``lr * m_hat * D`` (Adam), ``lr * g * D`` (RMSprop, Adagrad)."""
    params = _params()
    lr = 0.05
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(0.7, 0.9), eps=1e-3, foreach=False)
    elif kind == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-3, centered=True, foreach=False)
    else:
        opt = torch.optim.Adagrad(params, lr=lr, eps=1e-3, foreach=False)
    grads = _grads(4, 6)
    _run(opt, params, grads[:-1])
    before = [p.detach().clone() for p in params]
    _run(opt, params, grads[-1:])
    d = preconditioner_diagonal(opt, params)
    for k, (p, old) in enumerate(zip(params, before, strict=True)):
        update = (old - p.detach()).numpy()
        if kind == "adam":
            direction = opt.state[p]["exp_avg"].numpy() / (1 - 0.7**4)
        else:
            direction = grads[-1][k]
        np.testing.assert_allclose(update, lr * direction * d[k].numpy(), rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------ groups, steps, order, dtypes


def test_param_groups_and_lagging_steps() -> None:
    """Each group's own hyperparameters; a parameter that missed steps uses its own step count."""
    params = _params()
    opt = torch.optim.Adam(
        [{"params": params[:2], "betas": (0.9, 0.8), "eps": 1e-2}, {"params": params[2:], "eps": 1e-5}],
        lr=0.01,
    )
    grads = _grads(5, 7)
    skip = {0: {1}, 3: {1}}  # parameter 1 has no gradient at steps 0 and 3: Adam skips it
    _run(opt, params, grads, skip)
    assert int(opt.state[params[1]]["step"]) == 3
    expected = []
    for k, (beta2, eps) in enumerate(((0.8, 1e-2), (0.8, 1e-2), (0.999, 1e-5))):
        column = [g for t, g in enumerate(_column(grads, k)) if k not in skip.get(t, set())]
        v_hat = _ema(column, beta2, 2) / (1 - beta2 ** len(column))
        expected.append(1.0 / (np.sqrt(v_hat) + eps))
    # any order, a subset, repeats: results follow ``params``
    order = [2, 0, 2, 1]
    d = preconditioner_diagonal(opt, [params[k] for k in order])
    _assert_close(d, [expected[k] for k in order])
    assert d[0] is not d[2]  # a repeated parameter gets its own tensor
    assert preconditioner_diagonal(opt, []) == []


def test_results_are_new_tensors_not_state_views() -> None:
    params = _params()
    opt = torch.optim.RMSprop(params, lr=0.01)
    _run(opt, params, _grads(2, 8))
    state = opt.state[params[0]]["square_avg"].clone()
    d = preconditioner_diagonal(opt, params)
    d[0].fill_(123.0)
    assert torch.equal(opt.state[params[0]]["square_avg"], state)
    assert all(not t.requires_grad for t in d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype) -> None:
    params = _params(dtype)
    opt = torch.optim.Adam(params, lr=0.01, eps=1e-3)
    _run(opt, params, _grads(2, 9))
    d = preconditioner_diagonal(opt, params)
    for t, p in zip(d, params, strict=True):
        assert t.dtype == torch.float32  # bfloat16 state is read in float32
        v = opt.state[p]["exp_avg_sq"].double() / (1 - 0.999**2)
        np.testing.assert_allclose(t.double().numpy(), (1 / (v.sqrt() + 1e-3)).numpy(), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    beta2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-12, 1e-8, 1e-3, 0.5]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_adam_hand_computation_property(beta2: float, eps: float, steps: int, seed: int) -> None:
    params = _params()[:2]
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.9, beta2), eps=eps)
    grads = [g[:2] for g in _grads(steps, seed)]
    _run(opt, params, grads)
    expected = []
    for k in range(2):
        v_hat = _ema(_column(grads, k), beta2, 2) / (1 - beta2**steps)
        expected.append(1.0 / (np.sqrt(v_hat) + eps))
    _assert_close(preconditioner_diagonal(opt, params), expected)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps),
        lambda ps: torch.optim.AdamW(ps, amsgrad=True),
        lambda ps: torch.optim.RMSprop(ps, centered=True),
        lambda ps: torch.optim.Adagrad(ps),  # state exists from construction, with step 0
    ],
    ids=["adam", "adamw", "rmsprop", "adagrad"],
)
def test_no_step_yet_raises(make) -> None:
    params = _params()
    opt = make(params)
    with pytest.raises(NoOptimizerStateError, match="take at least one optimizer step"):
        preconditioner_diagonal(opt, params)
    assert issubclass(NoOptimizerStateError, ValueError)
    # one parameter stepped, the other not: still an error, naming the shape
    _run(opt, params, _grads(1, 0), skip={0: {1}})
    with pytest.raises(NoOptimizerStateError, match=r"shape \(4,\)"):
        preconditioner_diagonal(opt, params)
    preconditioner_diagonal(opt, [params[0], params[2]])


def test_unmanaged_and_unsupported() -> None:
    params = _params()
    opt = torch.optim.Adam(params[:2])
    _run(opt, params[:2], [g[:2] for g in _grads(1, 0)])
    with pytest.raises(TypeError, match=r"shape \(2, 3\) is not managed by the given Adam"):
        preconditioner_diagonal(opt, params)
    adamax = torch.optim.Adamax(params)
    with pytest.raises(TypeError, match="Adamax"):  # before any step too
        preconditioner_diagonal(adamax, params)
    _run(adamax, params, _grads(1, 0))
    with pytest.raises(TypeError, match="supported: SGD, Adam, AdamW, RMSprop, Adagrad"):
        preconditioner_diagonal(adamax, params)


# ------------------------------------------------------------------ Bayesian filtering optimizers


def _bayesian(kind: str, params, lr: float = 0.05, sigma2: float = 0.8):
    from isample.optim import BAdam, BRMSprop

    if kind == "brmsprop":
        return BRMSprop(params, lr=lr, beta2=0.9, prior_variance=sigma2)
    return BAdam(params, lr=lr, betas=(0.7, 0.9), prior_variance=sigma2)


def _posterior_variance(grads: list[np.ndarray], lr: float, beta2: float, sigma2: float) -> np.ndarray:
    """s^2 after the last step, from the filter's equations in NumPy float64."""
    a = 1.0 - lr**2 / (2.0 * sigma2)
    v = np.zeros_like(grads[0])
    s2 = None
    for t, g in enumerate(grads, start=1):
        v = beta2 * v + (1 - beta2) * g**2
        v_hat = v / (1 - beta2**t)
        if s2 is None:
            s2 = 1.0 / (1.0 / sigma2 + np.sqrt(v_hat) / lr)
        s2 = 1.0 / (1.0 / (a * a * s2 + lr * lr) + v_hat)
    return s2


@pytest.mark.parametrize("kind", ["brmsprop", "badam"])
def test_bayesian_d_is_posterior_variance_over_lr_and_the_one_the_last_step_used(kind: str) -> None:
    """Adam's convention (D excludes lr): the last update was ``lr D direction`` after the decay a."""
    params = _params()
    lr, sigma2 = 0.05, 0.8
    opt = _bayesian(kind, params, lr, sigma2)
    assert not is_identity_geometry(opt)
    grads = _grads(4, 9)
    _run(opt, params, grads[:-1])
    before = [p.detach().clone() for p in params]
    _run(opt, params, grads[-1:])
    d = preconditioner_diagonal(opt, params)
    _assert_close(d, [_posterior_variance(_column(grads, k), lr, 0.9, sigma2) / lr for k in range(3)])
    a = 1.0 - lr**2 / (2.0 * sigma2)
    for k, (p, old) in enumerate(zip(params, before, strict=True)):
        update = (a * old - p.detach()).numpy()
        if kind == "badam":
            direction = opt.state[p]["exp_avg"].numpy() / (1 - 0.7**4)
        else:
            direction = grads[-1][k]
        np.testing.assert_allclose(update, lr * direction * d[k].numpy(), rtol=1e-10, atol=1e-15)
    state = opt.state[params[0]]["posterior_variance"].clone()
    d[0].add_(1.0)
    assert torch.equal(opt.state[params[0]]["posterior_variance"], state)  # a new tensor, not a view


def test_bayesian_d_uses_each_groups_lr_and_needs_a_step() -> None:
    from isample.optim import BRMSprop

    params = _params(torch.float32)
    opt = BRMSprop([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], lr=0.1)
    with pytest.raises(NoOptimizerStateError):
        preconditioner_diagonal(opt, params)
    _run(opt, params, _grads(2, 4))
    d = preconditioner_diagonal(opt, params)
    for k, (p, lr) in enumerate(zip(params, (0.1, 0.01, 0.01), strict=True)):
        assert d[k].dtype == torch.float32
        torch.testing.assert_close(d[k], opt.state[p]["posterior_variance"] / lr, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["brmsprop", "badam"])
def test_bayesian_d_matches_adams_in_the_adam_limit(kind: str) -> None:
    """With |g| fixed per coordinate (random signs) v_hat = g^2 at every step; in the Adam regime
    c = lr / sigma^2 << |g| << 1 / lr the filter's D = s^2 / lr is Adam's 1 / sqrt(v_hat) up to a
    relative c / |g| + lr |g| <= 2e-3 + 2e-3 here (test_optim derives it): the same geometry."""
    params = _params()
    lr = 1e-3
    opt = _bayesian(kind, params, lr=lr, sigma2=1.0)
    adam_params = [nn.Parameter(p.detach().clone()) for p in params]
    adam = torch.optim.Adam(adam_params, lr=lr, betas=(0.7, 0.9), eps=0.0)
    rng = np.random.default_rng(5)
    size = [rng.uniform(0.5, 2.0, s) for s in SHAPES]
    grads = [[m * rng.choice([-1.0, 1.0], m.shape) for m in size] for _ in range(30)]
    _run(opt, params, grads)
    _run(adam, adam_params, grads)
    mine_all, theirs_all = preconditioner_diagonal(opt, params), preconditioner_diagonal(adam, adam_params)
    for mine, theirs in zip(mine_all, theirs_all, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=5e-3, atol=0)
