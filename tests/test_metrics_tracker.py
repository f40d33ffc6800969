"""per_example_gradients (analytic linear regression), SamplerQuality and validate_sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from isample import LossScorer, UpperBoundScorer, WeightedBatch
from isample import metrics as M

CE = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny autograd calls are much slower with 2 threads on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mse_per_example(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y) ** 2


def _linear_problem(seed: int, n: int = 9, d: int = 4):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
        model.bias.fill_(0.3)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    return model, x, y


# ------------------------------------------------------------------ per-example gradients


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_per_example_gradients_linear_regression(chunk_size: int) -> None:
    model, x, y = _linear_problem(0)
    G = M.per_example_gradients(model, _mse_per_example, x, y, chunk_size=chunk_size)
    w, c = model.weight.detach().numpy()[0], float(model.bias.detach())
    r = x.numpy() @ w + c - y.numpy()  # residuals
    expected = np.concatenate([2 * r[:, None] * x.numpy(), 2 * r[:, None]], axis=1)  # d/dw, d/dc
    assert G.shape == (9, 5) and G.dtype == torch.float64
    np.testing.assert_allclose(G.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert model.weight.grad is None  # nothing written to .grad


def test_per_example_gradients_subset_and_mode() -> None:
    model, x, y = _linear_problem(1)
    seq = nn.Sequential(nn.Dropout(0.5), model)
    seq.train()
    w, c = model.weight.detach().numpy()[0], float(model.bias.detach())
    r = x.numpy() @ w + c - y.numpy()
    G = M.per_example_gradients(seq, _mse_per_example, x, y, params=["1.bias"])
    np.testing.assert_allclose(G.numpy()[:, 0], 2 * r, rtol=1e-9)  # eval mode: dropout off
    assert seq.training and seq[0].training  # mode restored
    G2 = M.per_example_gradients(seq, _mse_per_example, x, y, params=[model.weight])
    np.testing.assert_allclose(G2.numpy(), 2 * r[:, None] * x.numpy(), rtol=1e-9)
    # a subset's norms understate the full norms
    full = M.per_example_gradients(seq, _mse_per_example, x, y)
    assert bool((G2.norm(dim=1) <= full.norm(dim=1) + 1e-12).all())
    assert [k for k, _ in M.select_parameters(seq)] == ["1.weight", "1.bias"]


def test_per_example_gradients_bad_input() -> None:
    model, x, y = _linear_problem(2)
    with pytest.raises(ValueError, match="params"):
        M.per_example_gradients(model, _mse_per_example, x, y, params=["nope"])
    with pytest.raises(ValueError, match="params"):
        M.per_example_gradients(model, _mse_per_example, x, y, params=[nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="rows"):
        M.per_example_gradients(model, _mse_per_example, x, y[:3])
    with pytest.raises(TypeError, match="chunk_size"):
        M.per_example_gradients(model, _mse_per_example, x, y, chunk_size=True)
    with pytest.raises(TypeError, match="model"):
        M.per_example_gradients("model", _mse_per_example, x, y)
    with pytest.raises(ValueError, match="scalar"):
        M.per_example_gradients(model, nn.MSELoss(), x, y.unsqueeze(1))


# ------------------------------------------------------------------ SamplerQuality


def _classifier(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _cls_data(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _oracle(model, inputs, targets):
    G = M.per_example_gradients(model, CE, inputs, targets)
    return M.optimal_probabilities(G)


def test_sampler_quality_rows_match_functional_core() -> None:
    model = _classifier(0)
    x, y = _cls_data(1, 24)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss, ub = LossScorer(CE), UpperBoundScorer(CE)
    tracker = M.SamplerQuality(
        x,
        y,
        CE,
        scorers={"loss": loss, "upper_bound": ub},
        probabilities={"oracle": _oracle},
        optimizer=opt,
        every=3,
    )
    assert tracker.update(model, 1) is None and tracker.compute() == []
    rows0 = tracker.update(model, 0)  # before the first optimizer step: identity geometry only
    assert {r["geometry"] for r in rows0} == {"identity"} and len(rows0) == 3
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).mean().backward()
        opt.step()
    rows = tracker.update(model, 3)
    assert {(r["candidate"], r["geometry"]) for r in rows} == {
        (c, g) for c in ("loss", "upper_bound", "oracle") for g in ("identity", "adam")
    }
    G = M.per_example_gradients(model, CE, x, y).double()
    params = list(model.parameters())
    scores = ub(model, x, y).double()
    p = scores / scores.sum()
    by = {(r["candidate"], r["geometry"]): r for r in rows}
    q = M.quality(G, p)
    r = by[("upper_bound", "identity")]
    assert r["kappa"] == pytest.approx(q.kappa, rel=1e-9) and r["q_log"] == pytest.approx(q.q_log, rel=1e-9)
    assert r["kappa_opt"] == pytest.approx(q.kappa_opt, rel=1e-9)
    assert r["tau2"] == pytest.approx(M.tau(scores) ** 2, rel=1e-12)
    assert r["corr_grad_norm"] == pytest.approx(
        float(np.corrcoef(scores.numpy(), G.norm(dim=1).numpy())[0, 1])
    )
    w = 1.0 / (24 * p)
    assert r["ess"] == pytest.approx(M.effective_sample_size(w, p), rel=1e-12)
    assert r["max_weight"] == pytest.approx(float(w.max()), rel=1e-12)
    qd = M.preconditioned_quality(G, p, opt, params)
    assert by[("upper_bound", "adam")]["kappa"] == pytest.approx(qd.kappa, rel=1e-9)
    assert by[("upper_bound", "adam")]["q_lin"] == pytest.approx(qd.q_lin, rel=1e-9)
    # the oracle candidate is optimal in the identity geometry, not in Adam's
    assert by[("oracle", "identity")]["q_lin"] == pytest.approx(1.0, rel=1e-6)
    assert by[("oracle", "adam")]["q_lin"] < 1.0 - 1e-6
    assert by[("oracle", "identity")]["tau2"] is None
    assert len(tracker.compute()) == 3 + 6


def test_sampler_quality_state_json_reset() -> None:
    model = _classifier(2)
    x, y = _cls_data(3, 10)
    make = lambda: M.SamplerQuality(x, y, CE, scorers={"loss": LossScorer(CE)}, every=5)  # noqa: E731
    tracker = make()
    tracker.update(model, 0)
    tracker.update(model, 5)
    state = tracker.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.compute() == tracker.compute()
    rows = json.loads(tracker.to_json())
    assert [r["step"] for r in rows] == [0, 5] and rows[0]["candidate"] == "loss"
    # infinite / nan values are written as strings in strict JSON
    fresh.load_state_dict({"every": 5, "rows": [{"step": 0, "kappa": math.inf, "q_lin": math.nan}]})
    assert json.loads(fresh.to_json()) == [{"step": 0, "kappa": "inf", "q_lin": "nan"}]
    tracker.reset()
    assert tracker.compute() == []
    with pytest.raises(ValueError, match="keys"):
        fresh.load_state_dict({"rows": []})
    with pytest.raises(ValueError, match="every"):
        fresh.load_state_dict({"every": 7, "rows": []})


def test_sampler_quality_bad_input() -> None:
    x, y = _cls_data(0, 6)
    with pytest.raises(ValueError, match="at least one candidate"):
        M.SamplerQuality(x, y, CE)
    with pytest.raises(TypeError, match="every"):
        M.SamplerQuality(x, y, CE, scorers={"l": LossScorer(CE)}, every=2.0)
    with pytest.raises(ValueError, match="rows"):
        M.SamplerQuality(x, y[:3], CE, scorers={"l": LossScorer(CE)})
    with pytest.raises(TypeError, match="optimizer"):
        M.SamplerQuality(x, y, CE, scorers={"l": LossScorer(CE)}, optimizer="adam")
    tracker = M.SamplerQuality(x, y, CE, probabilities={"bad": lambda m, i, t: torch.ones(5)})
    with pytest.raises(ValueError, match="shape"):
        tracker.update(_classifier(0), 0)
    tracker = M.SamplerQuality(x, y, CE, probabilities={"neg": lambda m, i, t: -torch.ones(6)})
    with pytest.raises(ValueError, match="negative"):
        tracker.update(_classifier(0), 0)
    nan_model = _classifier(0)
    with torch.no_grad():
        nan_model[0].weight[0, 0] = float("nan")
    tracker = M.SamplerQuality(x, y, CE, probabilities={"u": lambda m, i, t: torch.ones(6)})
    with pytest.raises(ValueError, match="non-finite"):
        tracker.update(nan_model, 0)


# ------------------------------------------------------------------ validate_sampler


class IIDLoader:
    """b i.i.d. draws from a known p per batch, seeded; weights as the loader computes them."""

    def __init__(self, x, y, p, batch_size, num_batches, seed, weights="unbiased"):
        self.x, self.y, self.p, self.b, self.t, self.seed, self.weights = (
            x,
            y,
            p,
            batch_size,
            num_batches,
            seed,
            weights,
        )

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        n = len(self.p)
        for _ in range(self.t):
            idx = torch.multinomial(self.p, self.b, replacement=True, generator=gen)
            w = (
                1.0 / (n * self.p[idx])
                if self.weights == "unbiased"
                else torch.ones(self.b, dtype=torch.float64)
            )
            yield WeightedBatch(self.x[idx], self.y[idx], idx, w.float())


def _validation_setup():
    model = _classifier(4)
    x, y = _cls_data(5, 30)
    G = M.per_example_gradients(model, CE, x, y)
    p = (G.norm(dim=1).double() + 0.05 * G.norm(dim=1).mean()).pow(1.5)  # non-uniform, full support
    return model, x, y, p / p.sum()


def test_validate_sampler_passes_for_correct_loader() -> None:
    model, x, y, p = _validation_setup()
    loader = IIDLoader(x, y, p, batch_size=6, num_batches=400, seed=0)
    report = M.validate_sampler(loader, model, CE, x, y, num_batches=400, probabilities=p)
    assert report.passed and report.mean_passed and report.variance_passed
    assert report.num_batches == 400 and report.batch_size == 6
    assert report.expected_variance == pytest.approx(
        M.gradient_variance(M.per_example_gradients(model, CE, x, y), p) / 6
    )
    assert abs(report.empirical_variance / report.expected_variance - 1) < 0.25
    assert 0.0 < report.norm_ratio < 20.0
    assert report.as_dict()["passed"] is True


def test_validate_sampler_catches_missing_weights_and_wrong_probabilities() -> None:
    model, x, y, p = _validation_setup()
    biased = IIDLoader(x, y, p, batch_size=6, num_batches=400, seed=1, weights="ones")
    report = M.validate_sampler(biased, model, CE, x, y, num_batches=400)
    assert not report.mean_passed and not report.passed and report.variance_passed is None
    # unbiased loader, but the claimed probabilities are uniform: variance check fails
    loader = IIDLoader(x, y, p, batch_size=6, num_batches=400, seed=2)
    wrong = torch.full((30,), 1 / 30, dtype=torch.float64)
    report = M.validate_sampler(loader, model, CE, x, y, num_batches=400, probabilities=wrong)
    assert report.mean_passed and report.variance_passed is False and not report.passed


def test_validate_sampler_bad_input() -> None:
    model, x, y, p = _validation_setup()
    with pytest.raises(ValueError, match="no batches"):
        M.validate_sampler([], model, CE, x, y, num_batches=5)
    with pytest.raises(TypeError, match="WeightedBatch"):
        M.validate_sampler([(x, y)], model, CE, x, y, num_batches=5)
    with pytest.raises(ValueError, match="num_batches"):
        M.validate_sampler([], model, CE, x, y, num_batches=1)
    with pytest.raises(ValueError, match="sum to 1"):
        M.validate_sampler([], model, CE, x, y, num_batches=5, probabilities=torch.ones(30))
    bad = [WeightedBatch(x[:2], y[:2], torch.tensor([0, 99]), torch.ones(2))]
    with pytest.raises(ValueError, match="indices"):
        M.validate_sampler(bad, model, CE, x, y, num_batches=5)
