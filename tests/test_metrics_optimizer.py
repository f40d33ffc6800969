"""Optimizer geometry, learning-rate scaling and weight normalisation, against real torch.optim steps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from isample import metrics as M
from isample.preconditioner import NoOptimizerStateError

RTOL = 1e-9


def _mlp(seed: int, dtype=torch.float64) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.7)
    return model


def _data(seed: int, n: int = 5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=dtype)
    y = torch.randint(0, 2, (n,), generator=gen)
    return x, y


CE = nn.CrossEntropyLoss(reduction="none")


def _train(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int, weights=None) -> None:
    for t in range(steps):
        opt.zero_grad()
        w = torch.ones(len(x), dtype=x.dtype) if weights is None else weights[t]
        (w * CE(model(x), y)).mean().backward()
        opt.step()


def _brute_force_d(opt: torch.optim.Optimizer, params) -> np.ndarray:
    """D read element by element from the optimizer's state, written independently of isample."""
    out = []
    group = opt.param_groups[0]
    for p in params:
        st = opt.state[p]
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            beta2 = group["betas"][1]
            step = int(st["step"])
            v = st["exp_avg_sq"].numpy().ravel()
            denom = np.sqrt(v / (1 - beta2**step)) + group["eps"]
        else:
            v = st["square_avg"].numpy().ravel()
            denom = np.sqrt(v) + group["eps"]
        out.append(1.0 / denom)
    return np.concatenate(out)


def _enumerated_trace(H: np.ndarray, p: np.ndarray, b: int) -> float:
    n = H.shape[0]
    mean = np.zeros(H.shape[1])
    second = 0.0
    for tup in itertools.product(range(n), repeat=b):
        prob = np.prod(p[list(tup)])
        est = sum(H[i] / (n * p[i]) for i in tup) / b
        mean += prob * est
        second += prob * float(est @ est)
    return second - float(mean @ mean)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9),
    ],
    ids=["adam", "adamw", "rmsprop"],
)
def test_preconditioned_variance_matches_brute_force(make) -> None:
    model = _mlp(0)
    x, y = _data(1)
    opt = make(model.parameters())
    _train(model, opt, x, y, steps=4)
    params = list(model.parameters())
    G = M.per_example_gradients(model, CE, x, y, chunk_size=2)
    d = _brute_force_d(opt, params)
    np.testing.assert_allclose(M.flat_preconditioner(opt, params).numpy(), d, rtol=1e-12)
    H = G.numpy() * d  # per-example steps D g_i
    p = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    b = 2
    trace = _enumerated_trace(H, p, b)
    assert M.preconditioned_variance(G, torch.from_numpy(p), opt, params) / b == pytest.approx(
        trace, rel=RTOL
    )
    norms = np.linalg.norm(H, axis=1)
    np.testing.assert_allclose(
        M.preconditioned_optimal_probabilities(G, opt, params).numpy(), norms / norms.sum(), rtol=RTOL
    )
    q = M.preconditioned_quality(G, torch.from_numpy(p), opt, params)
    uni = _enumerated_trace(H, np.full(5, 0.2), 1)
    opt_trace = _enumerated_trace(H, norms / norms.sum(), 1)
    assert q.kappa == pytest.approx(uni / (b * trace), rel=1e-8)
    assert q.kappa_opt == pytest.approx(uni / opt_trace, rel=1e-8)
    # the geometry matters: the identity-optimal sampler is not the D-optimal one here
    q_id_opt = M.preconditioned_quality(G, M.optimal_probabilities(G), opt, params)
    assert q_id_opt.q_lin < 1 - 1e-6


def test_identity_geometry_and_errors() -> None:
    model = _mlp(0)
    x, y = _data(1)
    params = list(model.parameters())
    G = M.per_example_gradients(model, CE, x, y)
    p = torch.full((5,), 0.2, dtype=torch.float64) + torch.tensor(
        [0.1, -0.1, 0.05, -0.05, 0.0], dtype=torch.float64
    )
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert M.preconditioned_quality(G, p, sgd, params) == M.quality(G, p)
    assert M.preconditioned_quality(G, p, None, params) == M.quality(G, p)
    adam = torch.optim.Adam(params)
    with pytest.raises(NoOptimizerStateError, match="take at least one optimizer step"):
        M.preconditioned_quality(G, p, adam, params)
    with pytest.raises(ValueError, match="no state"):  # NoOptimizerStateError is a ValueError
        M.preconditioned_variance(G, p, adam, params)
    _train(model, adam, x, y, 1)
    with pytest.raises(ValueError, match="expected 6 columns"):
        M.preconditioned_gradients(G, adam, [params[1], params[3]])  # two biases: 4 + 2 elements
    Gnan = G.clone()
    Gnan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        M.preconditioned_quality(Gnan, p, adam, params)
    with pytest.raises(TypeError, match="not managed"):
        M.flat_preconditioner(adam, [nn.Parameter(torch.ones(2))])


# ------------------------------------------------------------------ learning-rate scaling


def test_scaled_hyperparameters_rules() -> None:
    w = [nn.Parameter(torch.ones(2))]
    sgd = torch.optim.SGD([{"params": w, "lr": 0.1}, {"params": [nn.Parameter(torch.ones(1))], "lr": 0.3}])
    assert M.scaled_hyperparameters(sgd, 4.0) == [{"lr": pytest.approx(0.4)}, {"lr": pytest.approx(1.2)}]
    adam = torch.optim.Adam(w, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    (new,) = M.scaled_hyperparameters(adam, 4.0)
    assert new["lr"] == pytest.approx(2e-3)
    assert new["betas"] == (pytest.approx(0.6), pytest.approx(0.996))
    assert new["eps"] == pytest.approx(5e-9)
    rms = torch.optim.RMSprop(w, lr=1e-2, alpha=0.99, eps=1e-8)
    (new,) = M.scaled_hyperparameters(rms, 9.0)
    assert new == {"lr": pytest.approx(3e-2), "alpha": pytest.approx(0.91), "eps": pytest.approx(1e-8 / 3)}
    # kappa < 1 (a sampler worse than uniform) moves the other way
    (new,) = M.scaled_hyperparameters(adam, 0.25)
    assert new["betas"][0] == pytest.approx(0.975)
    # needs kappa < 1 / (1 - beta1) = 10
    M.scaled_hyperparameters(adam, 9.99)
    with pytest.raises(ValueError, match=r"1 / \(1 - beta1\) = 10"):
        M.scaled_hyperparameters(adam, 10.0)
    with pytest.raises(ValueError, match="alpha"):
        M.scaled_hyperparameters(rms, 150.0)
    for bad, err in (
        (0.0, ValueError),
        (-2.0, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("2", TypeError),
    ):
        with pytest.raises(err, match="kappa"):
            M.scaled_hyperparameters(sgd, bad)
    with pytest.raises(TypeError, match="Adagrad"):
        M.scaled_hyperparameters(torch.optim.Adagrad(w), 2.0)
    with pytest.raises(TypeError, match="optimizer"):
        M.scaled_hyperparameters("adam", 2.0)


def test_apply_scaled_hyperparameters_is_atomic_and_undoable() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam(
        [{"params": [a], "betas": (0.5, 0.999)}, {"params": [b], "betas": (0.9, 0.99)}], lr=1e-3
    )
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="param group 0"):
        M.apply_scaled_hyperparameters(opt, 3.0)  # 1 - 3 * 0.5 < 0 in group 0
    assert [dict(g) for g in opt.param_groups] == before  # nothing changed
    previous = M.apply_scaled_hyperparameters(opt, 1.5)
    assert opt.param_groups[1]["betas"] == (pytest.approx(0.85), pytest.approx(0.985))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * math.sqrt(1.5))
    for group, old in zip(opt.param_groups, previous, strict=True):
        group.update(old)
    assert [dict(g) for g in opt.param_groups] == before


# ------------------------------------------------------------------ weight normalisation


def _ema_ratio(values: np.ndarray, beta: float, power: int) -> np.ndarray:
    out = []
    for t in range(1, len(values) + 1):
        s = sum((1 - beta) * beta ** (t - k) * values[k - 1] ** power for k in range(1, t + 1))
        out.append(s / (1 - beta**t))
    return np.array(out)


def test_normalisation_effect_closed_forms() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [torch.rand(8, generator=gen) * 4 + 0.1 for _ in range(12)]
    c = np.array([1.0 / float(w.max()) for w in batches])
    eff = M.normalisation_effect("adam", batches, "max")
    np.testing.assert_allclose(eff.scales.numpy(), c, rtol=1e-12)
    adam_ref = _ema_ratio(c, 0.9, 1) / np.sqrt(_ema_ratio(c, 0.999, 2))
    np.testing.assert_allclose(eff.multipliers.numpy(), adam_ref, rtol=1e-9)
    rms_ref = c / np.sqrt(_ema_ratio(c, 0.99, 2))
    np.testing.assert_allclose(
        M.normalisation_effect("rmsprop", batches, "max").multipliers.numpy(), rms_ref, rtol=1e-9
    )
    np.testing.assert_allclose(
        M.normalisation_effect("sgd", batches, "max").multipliers.numpy(), c, rtol=1e-12
    )
    cm = np.array([1.0 / float(w.double().mean()) for w in batches])
    np.testing.assert_allclose(M.normalisation_effect("sgd", batches, "mean").scales.numpy(), cm, rtol=1e-12)
    # SGD with momentum: the update is the momentum-weighted average of the scales
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9)
    mom = M.normalisation_effect(sgd, batches, "max").multipliers.numpy()
    ref = [
        sum(0.9 ** (t - k) * c[k] for k in range(t + 1)) / sum(0.9 ** (t - k) for k in range(t + 1))
        for t in range(12)
    ]
    np.testing.assert_allclose(mom, ref, rtol=1e-9)
    # constant rescale: a learning-rate change for SGD, cancelled by Adam / AdamW / RMSprop
    for name, expected in (("sgd", 2.5), ("adam", 1.0), ("adamw", 1.0), ("rmsprop", 1.0)):
        eff = M.normalisation_effect(name, batches, "constant", constant=2.5)
        np.testing.assert_allclose(eff.multipliers.numpy(), expected, rtol=1e-12)
    # a per-batch rescale is not cancelled by Adam
    assert float(M.normalisation_effect("adam", batches, "max").multipliers.std()) > 1e-3


def test_normalisation_effect_bad_input() -> None:
    with pytest.raises(ValueError, match="normalize"):
        M.normalisation_effect("adam", [torch.ones(2)], "median")
    with pytest.raises(ValueError, match="optimizer"):
        M.normalisation_effect("lion", [torch.ones(2)])
    with pytest.raises(TypeError, match="optimizer"):
        M.normalisation_effect(torch.optim.Adagrad([nn.Parameter(torch.ones(1))]), [torch.ones(2)])
    with pytest.raises(ValueError, match="weights > 0"):
        M.normalisation_effect("sgd", [torch.tensor([1.0, 0.0])])
    with pytest.raises(ValueError, match="at least one batch"):
        M.normalisation_effect("sgd", [])
    with pytest.raises(ValueError, match="constant"):
        M.normalisation_effect("sgd", [torch.ones(2)], "constant", constant=0.0)


def _weights(seed: int, steps: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen, dtype=torch.float64) * 3 + 0.2 for _ in range(steps)]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_constant_rescale_leaves_adaptive_step_unchanged(cls) -> None:
    x, y = _data(2, n=6)
    ws = _weights(0, 6, 6)
    runs = []
    for c in (1.0, 7.0):
        model = _mlp(5)
        opt = cls(model.parameters(), lr=0.01, eps=1e-12)
        _train(model, opt, x, y, 6, [c * w for w in ws])
        runs.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    start = torch.cat([p.detach().ravel() for p in _mlp(5).parameters()])
    # same trajectory up to eps (eps = 1e-12 here; relative differences ~1e-10)
    torch.testing.assert_close(runs[1] - start, runs[0] - start, rtol=1e-7, atol=1e-12)
    # a per-batch (max) normalisation does change the trajectory
    model = _mlp(5)
    opt = cls(model.parameters(), lr=0.01, eps=1e-12)
    _train(model, opt, x, y, 6, [w / w.max() for w in ws])
    moved = torch.cat([p.detach().ravel() for p in model.parameters()])
    assert float((moved - runs[0]).abs().max()) > 1e-5


def test_constant_rescale_scales_sgd_step() -> None:
    x, y = _data(2, n=6)
    (w,) = _weights(1, 1, 6)
    deltas = []
    for c in (1.0, 7.0):
        model = _mlp(5)
        start = torch.cat([p.detach().ravel() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        _train(model, opt, x, y, 1, [c * w])
        deltas.append(torch.cat([p.detach().ravel() for p in model.parameters()]) - start)
    torch.testing.assert_close(deltas[1], 7.0 * deltas[0], rtol=1e-10, atol=1e-14)


def test_normalisation_effect_matches_real_adam_on_constant_gradient() -> None:
    # loss c_t * (a . theta): a constant gradient direction; the real step ratio is the multiplier
    a = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    batches = _weights(4, 10, 5)
    eff = M.normalisation_effect("adam", batches, "max")
    steps = {}
    for name, scales in (("raw", [1.0] * 10), ("max", [1.0 / float(w.max()) for w in batches])):
        theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.Adam([theta], lr=0.1, eps=1e-14)
        out = []
        for c in scales:
            before = theta.detach().clone()
            opt.zero_grad()
            (c * (a * theta).sum()).backward()
            opt.step()
            out.append((before - theta.detach()) / a.sign())
        steps[name] = torch.stack(out)
    ratio = steps["max"] / steps["raw"]
    torch.testing.assert_close(ratio, eff.multipliers.unsqueeze(1).expand(-1, 3), rtol=1e-9, atol=0)
