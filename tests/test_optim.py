"""BRMSprop and BAdam (isample.optim): hand-computed steps, state, limits, validation, training.

The references below are plain Python float arithmetic (``math``), written from the four
filtering equations of the module docstring, never from the optimizer's code.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from isample.optim import BAdam, BRMSprop

# ------------------------------------------------------------------ plain-float reference


def _reference(grads: list[float], w0: float, lr: float, beta1: float | None, beta2: float, sigma2: float):
    """One scalar weight through the filter; returns the weights and s^2 after each step.

    ``beta1 = None`` is BRMSprop (the mean moves along g), otherwise BAdam.
    """
    a = 1.0 - lr * lr / (2.0 * sigma2)
    w, v, m, s2 = w0, 0.0, 0.0, None
    weights, variances = [], []
    for t, g in enumerate(grads, start=1):
        v = beta2 * v + (1.0 - beta2) * g * g  # 2.
        v_hat = v / (1.0 - beta2**t)
        if s2 is None:
            s2 = 1.0 / (1.0 / sigma2 + math.sqrt(v_hat) / lr)  # initialisation
        s2_prior = a * a * s2 + lr * lr  # 1. predict
        s2 = 1.0 / (1.0 / s2_prior + v_hat)  # 3. precision
        if beta1 is None:
            direction = g
        else:
            m = beta1 * m + (1.0 - beta1) * g
            direction = m / (1.0 - beta1**t)
        w = a * w - s2 * direction  # 1. predict the mean, 4. update it
        weights.append(w)
        variances.append(s2)
    return weights, variances


def test_brmsprop_first_step_written_out() -> None:
    """lr = 0.1, beta2 = 0.9, sigma^2 = 0.5, w = 1, g = 2: every number by hand."""
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = BRMSprop([w], lr=0.1, beta2=0.9, prior_variance=0.5)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    a = 1.0 - 0.01 / 1.0  # 0.99
    v_hat = (0.1 * 4.0) / (1.0 - 0.9)  # 4.0: bias correction undoes the EMA at t = 1
    s2_0 = 1.0 / (1.0 / 0.5 + 2.0 / 0.1)  # 1 / 22
    s2_prior = a * a * s2_0 + 0.01  # 0.9801 / 22 + 0.01
    s2 = 1.0 / (1.0 / s2_prior + v_hat)
    assert v_hat == pytest.approx(4.0, rel=1e-15)
    assert float(w.detach()) == pytest.approx(a * 1.0 - s2 * 2.0, rel=1e-14)
    assert float(opt.state[w]["posterior_variance"]) == pytest.approx(s2, rel=1e-14)
    assert float(opt.state[w]["exp_avg_sq"]) == pytest.approx(0.4, rel=1e-14)
    assert float(opt.state[w]["step"]) == 1.0


@pytest.mark.parametrize("kind", ["brmsprop", "badam"])
def test_two_steps_match_the_hand_computation(kind: str) -> None:
    w0 = [0.5, -1.25, 2.0]
    grads = [[0.3, -2.0, 0.01], [-0.7, 1.5, 0.02]]
    lr, beta1, beta2, sigma2 = 0.05, 0.8, 0.95, 0.3
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    if kind == "brmsprop":
        opt = BRMSprop([w], lr=lr, beta2=beta2, prior_variance=sigma2)
        b1 = None
    else:
        opt = BAdam([w], lr=lr, betas=(beta1, beta2), prior_variance=sigma2)
        b1 = beta1
    expected = [_reference([g[k] for g in grads], w0[k], lr, b1, beta2, sigma2) for k in range(3)]
    for t, g in enumerate(grads):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for k in range(3):
            assert float(w.detach()[k]) == pytest.approx(expected[k][0][t], rel=1e-13, abs=1e-15)
            assert float(opt.state[w]["posterior_variance"][k]) == pytest.approx(expected[k][1][t], rel=1e-13)
    assert float(opt.state[w]["step"]) == 2.0
    assert set(opt.state[w]) == {"step", "exp_avg_sq", "posterior_variance"} | (
        {"exp_avg"} if kind == "badam" else set()
    )


def test_param_groups_use_their_own_hyperparameters() -> None:
    p = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    q = nn.Parameter(torch.tensor([0.25], dtype=torch.float64))
    opt = BAdam(
        [{"params": [p]}, {"params": [q], "lr": 0.2, "prior_variance": 2.0}], lr=0.01, betas=(0.5, 0.9)
    )
    grads_p, grads_q = [[1.0, 0.1], [0.5, -0.3], [2.0, 0.0]], [[3.0], [-1.0], [0.5]]
    for gp, gq in zip(grads_p, grads_q, strict=True):
        p.grad = torch.tensor(gp, dtype=torch.float64)
        q.grad = torch.tensor(gq, dtype=torch.float64)
        opt.step()
    for k, w0 in enumerate([1.0, -1.0]):
        ws, _ = _reference([g[k] for g in grads_p], w0, 0.01, 0.5, 0.9, 1.0)
        assert float(p.detach()[k]) == pytest.approx(ws[-1], rel=1e-13)
    ws, _ = _reference([g[0] for g in grads_q], 0.25, 0.2, 0.5, 0.9, 2.0)
    assert float(q.detach()[0]) == pytest.approx(ws[-1], rel=1e-13)


def test_closure_loss_is_returned_and_parameters_without_grad_are_skipped() -> None:
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = BRMSprop([p, q], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 2.0
    assert q not in opt.state and bool((q == 1).all())
    assert bool((p < 1).all())


# ------------------------------------------------------------------ state


def _trajectory(opt, params, grads):
    out = []
    for g in grads:
        for p, gp in zip(params, g, strict=True):
            p.grad = gp.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("kind", ["brmsprop", "badam"])
def test_state_dict_round_trip_is_bit_for_bit(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(3, generator=gen)), nn.Parameter(torch.randn(2, 2, generator=gen))]
    grads = [[torch.randn(3, generator=gen), torch.randn(2, 2, generator=gen)] for _ in range(8)]

    def make(ps):
        groups = [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.02}]
        if kind == "brmsprop":
            return BRMSprop(groups, lr=0.05, beta2=0.9, prior_variance=0.7)
        return BAdam(groups, lr=0.05, betas=(0.8, 0.9), prior_variance=0.7)

    opt = make(params)
    _trajectory(opt, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = make(twins)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.param_groups[1]["lr"] == 0.02
    a = _trajectory(opt, params, grads[3:])
    b = _trajectory(fresh, twins, grads[3:])
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)
    for p, q in zip(params, twins, strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[q][key]), key


def test_deepcopy_of_state_dict_loads_too() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = BRMSprop([p], lr=0.1)
    _trajectory(opt, [p], [[torch.tensor([1.0, 2.0, 3.0])]])
    fresh = BRMSprop([nn.Parameter(p.detach().clone())], lr=0.1)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert float(fresh.state_dict()["state"][0]["step"]) == 1.0


# ------------------------------------------------------------------ limits


def _steady_state_root(v_hat: torch.Tensor, lr: float, sigma2: float) -> torch.Tensor:
    """Positive root of v a^2 s^4 + (1 - a^2 + v lr^2) s^2 - lr^2 = 0: the fixed point of 1 and 3."""
    a = 1.0 - lr * lr / (2.0 * sigma2)
    b = 1.0 - a * a + v_hat * lr * lr
    return (-b + torch.sqrt(b * b + 4.0 * v_hat * a * a * lr * lr)) / (2.0 * v_hat * a * a)


@pytest.mark.parametrize("cls", [BRMSprop, BAdam])
def test_constant_gradient_steady_state_and_its_adam_and_sgd_limits(cls) -> None:
    """After many steps with a constant g, ``v_hat = g^2`` and ``m_hat = g`` exactly, and the step
    ``a w - w_new = s^2 g`` converges to the fixed point of the variance recursion. Against
    Adam's step ``lr g / (sqrt(v_hat) + lr / sigma^2)`` (eps = lr / sigma^2), x = |g|, c = lr / sigma^2:

    * Adam regime (c << x << 1 / lr): ratio = 1 + c / (2x) - lr x / 2 + O(2nd order); tolerance
      c / x + lr x, twice the first-order terms;
    * SGD regime (x << c): ratio = 1 + x / c + lr^2 / (4 sigma^2) + ...; tolerance 2 x / c + lr^2 / sigma^2;
    * crossover x = c: ratio -> sqrt(5) - 1 for small lr (the forms differ there, documented).

    The slowest mode decays as a^2 = 1 - lr^2 / sigma^2 per step (SGD regime): 8000 steps at
    lr = 0.05, sigma^2 = 1 is e^-20 of the initial error, so the root is matched to 1e-9.
    """
    lr, sigma2 = 0.05, 1.0
    c = lr / sigma2
    g = torch.tensor([2.0, 1.0, 0.5, c, 1e-3, 1e-4], dtype=torch.float64)
    w = nn.Parameter(torch.zeros_like(g))
    kwargs = {"beta2": 0.9} if cls is BRMSprop else {"betas": (0.8, 0.9)}
    opt = cls([w], lr=lr, prior_variance=sigma2, **kwargs)
    a = 1.0 - lr * lr / (2.0 * sigma2)
    for _ in range(8000):
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
    step = a * before - w.detach()
    v_hat = g * g
    torch.testing.assert_close(step, _steady_state_root(v_hat, lr, sigma2) * g, rtol=1e-9, atol=0)
    adam = lr * g / (g.abs() + c)
    ratio = (step / adam).tolist()
    x = g.tolist()
    for k in range(3):  # Adam regime
        assert abs(ratio[k] - 1.0) <= c / x[k] + lr * x[k], (k, ratio[k])
        # and so RMSprop / Adam with lr and no eps, to the same order
        assert abs(float(step[k]) / (lr * math.copysign(1.0, x[k])) - 1.0) <= 2 * c / x[k] + lr * x[k]
    assert ratio[3] == pytest.approx(math.sqrt(5.0) - 1.0, rel=1e-3)  # crossover
    for k in (4, 5):  # SGD regime: lr sigma^2
        assert abs(ratio[k] - 1.0) <= 2 * x[k] / c + lr * lr / sigma2, (k, ratio[k])
        assert float(step[k]) == pytest.approx(sigma2 * x[k], rel=2 * x[k] / c + lr * lr / sigma2)


def test_adam_limit_breaks_down_when_one_observation_dominates() -> None:
    """For lr sqrt(v_hat) >~ 1 the step falls below Adam's (s^2 -> 1 / v_hat from below): documented."""
    lr = 0.05
    g = torch.tensor([100.0], dtype=torch.float64)
    w = nn.Parameter(torch.zeros_like(g))
    opt = BRMSprop([w], lr=lr, beta2=0.9)
    for _ in range(50):
        w.grad = g.clone()
        opt.step()
    s2 = float(opt.state[w]["posterior_variance"])
    assert s2 == pytest.approx(float(_steady_state_root(g * g, lr, 1.0)), rel=1e-9)
    assert s2 < 0.25 * lr / 100.0  # Adam's step size would be lr / |g|
    assert 0.9 / 1e4 < s2 < 1.0 / 1e4  # the precision exceeds v_hat: s^2 < 1 / v_hat, and close to it


def test_sgd_limit_with_varying_small_gradients() -> None:
    """v_hat << c^2 from the first step: BRMSprop is SGD with lr sigma^2, BAdam SGD with EMA momentum."""
    lr, sigma2 = 0.1, 0.5
    gen = torch.Generator().manual_seed(3)
    grads = [1e-6 * torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(20)]
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    brms = BRMSprop([p], lr=lr, beta2=0.9, prior_variance=sigma2)
    badam = BAdam([q], lr=lr, betas=(0.7, 0.9), prior_variance=sigma2)
    a = 1.0 - lr * lr / (2.0 * sigma2)
    m = torch.zeros(4, dtype=torch.float64)
    # s^2 stays within O(x / c + lr^2 / sigma^2) of sigma^2: x / c <= 1e-4 here, lr^2 / sigma^2 = 0.02
    for t, g in enumerate(grads, start=1):
        p_old, q_old = p.detach().clone(), q.detach().clone()
        p.grad, q.grad = g.clone(), g.clone()
        brms.step()
        badam.step()
        m = 0.7 * m + 0.3 * g
        torch.testing.assert_close(a * p_old - p.detach(), sigma2 * g, rtol=0.03, atol=0)
        torch.testing.assert_close(a * q_old - q.detach(), sigma2 * m / (1 - 0.7**t), rtol=0.03, atol=0)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, "'lr'"),
        ({"lr": -1e-3}, ValueError, "'lr'"),
        ({"lr": math.inf}, ValueError, "'lr'"),
        ({"lr": math.nan}, ValueError, "'lr'"),
        ({"lr": True}, TypeError, "'lr'"),
        ({"lr": "0.1"}, TypeError, "'lr'"),
        ({"prior_variance": 0.0}, ValueError, "'prior_variance'"),
        ({"prior_variance": -1.0}, ValueError, "'prior_variance'"),
        ({"prior_variance": math.inf}, ValueError, "'prior_variance'"),
        ({"eps": -1e-12}, ValueError, "'eps'"),
        ({"eps": math.nan}, ValueError, "'eps'"),
        ({"lr": 2.0, "prior_variance": 1.0}, ValueError, r"lr\*\*2 < 2 \* prior_variance"),
        ({"lr": 1.5, "prior_variance": 1.0}, ValueError, r"lr\*\*2 < 2 \* prior_variance"),
    ],
)
@pytest.mark.parametrize("cls", [BRMSprop, BAdam])
def test_bad_hyperparameters_raise(cls, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        cls([nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, math.nan])
def test_bad_betas_raise(beta) -> None:
    with pytest.raises(ValueError, match="'beta2'"):
        BRMSprop([nn.Parameter(torch.ones(2))], beta2=beta)
    with pytest.raises(ValueError, match=r"'betas\[0\]'"):
        BAdam([nn.Parameter(torch.ones(2))], betas=(beta, 0.999))
    with pytest.raises(ValueError, match=r"'betas\[1\]'"):
        BAdam([nn.Parameter(torch.ones(2))], betas=(0.9, beta))


def test_bad_betas_shape_and_bad_param_group_raise() -> None:
    with pytest.raises(TypeError, match="'betas'"):
        BAdam([nn.Parameter(torch.ones(2))], betas=(0.9,))
    opt = BRMSprop([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="'lr'"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": -1.0})
    with pytest.raises(ValueError, match="'lr'"):
        BAdam([{"params": [nn.Parameter(torch.ones(1))], "lr": 0.0}])
    # beta = 0 is allowed (no averaging), and so is eps = 0
    BAdam([nn.Parameter(torch.ones(2))], betas=(0.0, 0.0), eps=0.0)


def test_a_scheduler_that_breaks_the_decay_is_caught_at_step() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = BRMSprop([p], lr=0.1)
    opt.param_groups[0]["lr"] = 10.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"lr\*\*2 < 2 \* prior_variance"):
        opt.step()


@pytest.mark.parametrize("cls", [BRMSprop, BAdam])
def test_sparse_gradients_raise(cls) -> None:
    emb = nn.Embedding(5, 2, sparse=True)
    opt = cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", [BRMSprop, BAdam])
def test_nan_gradients_propagate_elementwise_only(cls) -> None:
    p = nn.Parameter(torch.ones(3))
    q = nn.Parameter(torch.ones(2))
    p2, q2 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt, ref = cls([p, q], lr=0.1), cls([p2, q2], lr=0.1)
    p.grad, q.grad = torch.tensor([1.0, math.nan, 2.0]), torch.tensor([0.5, -0.5])
    p2.grad, q2.grad = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.5, -0.5])
    opt.step()
    ref.step()
    assert math.isnan(float(p.detach()[1]))
    assert torch.equal(p.detach()[[0, 2]], p2.detach()[[0, 2]])
    assert torch.equal(q.detach(), q2.detach())


# ------------------------------------------------------------------ training


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: BRMSprop(ps, lr=0.01, beta2=0.99, prior_variance=1.0),
        lambda ps: BAdam(ps, lr=0.01, betas=(0.9, 0.99), prior_variance=1.0),
    ],
    ids=["brmsprop", "badam"],
)
def test_a_tiny_model_trains(make) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(128, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = make(model.parameters())
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = ((model(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
