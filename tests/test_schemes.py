"""The published schemes behind isample.schemes: registry, protocol conformance, and each selection rule.

Generic tests run over the whole registry (contract, determinism, resume, weights,
cost counters); per-scheme tests check the selection rule against its formula, exact
unbiasedness where the probabilities are known, and measure (and print) the bias of the
biased schemes.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import math

import numpy as np
import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

import isample.schemes as schemes
from isample import LossScorer, UpperBoundScorer, WeightedBatch, score_dataset
from isample.metrics.functional import bias
from isample.metrics.per_example import per_example_gradients

CE = nn.CrossEntropyLoss(reduction="none")
N, D, C, B = 48, 5, 3, 8
ALL = [
    "auto",
    "history-gradnorm",
    "history-is",
    "infobatch",
    "kf",
    "laber",
    "obs",
    "pool-linear-gradnorm",
    "rho-loss",
    "selective-backprop",
    "uniform",
]
OPTIONAL = {"history-gradnorm": "isample.recorder", "pool-linear-gradnorm": "isample.linear_scorer"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on 2 shared cores: one intra-op thread is much faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dataset(n: int = N, seed: int = 0) -> torch.utils.data.TensorDataset:
    x, y = make_classification(n, D, C, seed)
    return torch.utils.data.TensorDataset(x, y)


def needs(name: str) -> None:
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
        pytest.skip(f"{OPTIONAL[name]} is not available")


def make(name: str, ds=None, model=None, seed: int = 1, epochs: int = 3, **kw):
    needs(name)
    ds = dataset() if ds is None else ds
    model = make_mlp(D, 8, C, 0) if model is None else model
    if name == "rho-loss" and not {"irreducible_model", "irreducible_losses", "holdout"} & set(kw):
        kw["irreducible_model"] = make_mlp(D, 8, C, 1)
    return schemes.build(name, ds, model, CE, B, seed=seed, epochs=epochs, **kw), ds, model


def step(loader, model, batch, opt=None):
    with loader.step_context(batch):
        out = model(batch.inputs)
        losses = CE(out, batch.targets)
        (batch.weights * losses).mean().backward()
    if opt is not None:
        opt.step()
    model.zero_grad()
    loader.feedback(batch, out.detach(), losses.detach())


def run(loader, model, epochs, opt=None, start=0):
    """The protocol loop; returns [(epoch, len, [(indices, weights), ...])]."""
    log = []
    for epoch in range(start, start + epochs):
        loader.set_epoch(epoch)
        length = len(loader)
        batches = []
        for batch in loader:
            batches.append((batch.indices.clone(), batch.weights.clone()))
            step(loader, model, batch, opt)
        log.append((epoch, length, batches))
    return log


def save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------- registry


def test_registry_names_and_describe():
    assert schemes.available() == sorted(ALL)
    for name in ALL:
        info = schemes.describe(name)
        assert info["kind"] in ("pool", "table", "uniform")
        assert isinstance(info["unbiased"], bool)
        for key in ("score", "weights", "extra_cost", "reference", "card", "defaults"):
            assert key in info
        assert info["card"] == f"docs/methods/{name}.md"
    assert schemes.describe("kf")["defaults"]["presample"] == 3.0
    assert schemes.describe("laber")["defaults"]["presample"] == 4.0
    assert schemes.describe("selective-backprop")["defaults"]["beta"] == 3.0
    assert schemes.describe("selective-backprop")["defaults"]["history_size"] == 1024
    assert schemes.describe("infobatch")["defaults"]["prune_ratio"] == 0.5
    assert schemes.describe("rho-loss")["defaults"]["ratio"] == 0.1


def test_registry_errors():
    ds, model = dataset(), make_mlp(D, 8, C, 0)
    with pytest.raises(
        ValueError, match=r"Unknown scheme 'kff'\. Available: auto, history-gradnorm, .*uniform"
    ):
        schemes.build("kff", ds, model, CE, B)
    with pytest.raises(ValueError, match="Unknown scheme"):
        schemes.describe("nope")
    with pytest.raises(TypeError, match="Unknown override 'presampel' for scheme 'kf'"):
        schemes.build("kf", ds, model, CE, B, presampel=4)
    with pytest.raises(ValueError, match="reduction='none'"):
        schemes.build("uniform", ds, model, nn.CrossEntropyLoss(), B)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("infobatch", {"prune_ratio": 1.0}, ValueError, "prune_ratio"),
        ("infobatch", {"prune_ratio": -0.1}, ValueError, "prune_ratio"),
        ("infobatch", {"min_keep": 0.0}, ValueError, "min_keep"),
        ("infobatch", {"min_keep": 1.5}, ValueError, "min_keep"),
        ("infobatch", {"epochs": None}, ValueError, "'epochs' parameter of InfoBatch"),
        ("selective-backprop", {"beta": 0.0}, ValueError, "beta"),
        ("selective-backprop", {"beta": -1.0}, ValueError, "beta"),
        ("selective-backprop", {"s_min": 1.5}, ValueError, "s_min"),
        ("selective-backprop", {"history_size": True}, TypeError, "history_size"),
        ("obs", {"selection_pressure": 0.5}, ValueError, "selection_pressure"),
        ("obs", {"final_selection_pressure": 0.0}, ValueError, "final_selection_pressure"),
        ("rho-loss", {"ratio": 0.0, "irreducible_losses": torch.zeros(N)}, ValueError, "ratio"),
        ("rho-loss", {"ratio": 1.5, "irreducible_losses": torch.zeros(N)}, ValueError, "ratio"),
        ("rho-loss", {"irreducible_losses": torch.zeros(3)}, TypeError, "irreducible_losses"),
        ("kf", {"presample": 0.5}, ValueError, "presample"),
        ("history-is", {"score": "grad"}, ValueError, "score"),
    ],
)
def test_bad_hyperparameters(name, kwargs, error, match):
    epochs = kwargs.pop("epochs", 3)
    with pytest.raises(error, match=match):
        make(name, epochs=epochs, **kwargs)


def test_rho_loss_without_holdout_is_a_clear_error():
    with pytest.raises(ValueError, match="needs exactly one source of irreducible losses.*holdout"):
        schemes.build("rho-loss", dataset(), make_mlp(D, 8, C, 0), CE, B)


# ---------------------------------------------------------------- generic conformance


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    loader, ds, model = make(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = ds.tensors
    trained = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        length = len(loader)
        count = 0
        for batch in loader:
            assert isinstance(batch, WeightedBatch)
            assert batch.indices.dtype == torch.long and batch.weights.dtype == torch.float32
            assert batch.weights.shape == batch.indices.shape
            torch.testing.assert_close(batch.inputs, x[batch.indices], rtol=0, atol=0)
            assert torch.equal(batch.targets, y[batch.indices])
            assert bool(torch.isfinite(batch.weights).all()) and bool((batch.weights > 0).all())
            trained += len(batch)
            count += 1
            step(loader, model, batch, opt)
        assert count == length, f"{name}: len() said {length}, yielded {count}"
    assert loader.cost()["trained_examples"] == trained
    assert loader.name == name
    assert loader.unbiased == schemes.describe(name)["unbiased"]


@pytest.mark.parametrize("name", ALL)
def test_seeded_determinism(name):
    logs = []
    for _ in range(2):
        model = make_mlp(D, 8, C, 0)
        loader, _, _ = make(name, model=model, seed=7)
        logs.append(run(loader, model, 2, torch.optim.SGD(model.parameters(), lr=0.05)))
    for (e1, l1, b1), (e2, l2, b2) in zip(*logs, strict=False):
        assert (e1, l1, len(b1)) == (e2, l2, len(b2))
        for (i1, w1), (i2, w2) in zip(b1, b2, strict=False):
            assert torch.equal(i1, i2) and torch.equal(w1, w2)
    other, _, model = make(name, seed=8)
    first = run(other, model, 1)[0][2]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, logs[0][0][2], strict=False))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.filterwarnings("ignore::isample.switch.ImportanceSamplingOffWarning")
def test_resume_mid_epoch(name):
    """Save mid-epoch, load into a fresh scheme: the rest of the stream is identical (fixed model)."""
    model = make_mlp(D, 8, C, 0)
    a, ds, _ = make(name, model=model, seed=3)
    run(a, model, 1)  # epoch 0 with feedback
    a.set_epoch(1)
    it = iter(a)
    for _ in range(2):
        step(a, model, next(it))
    state = save_load(a.state_dict())
    rest_a = [(b.indices.clone(), b.weights.clone()) for b in _drain(a, it, model)]
    rest_a += [x for _, _, bs in run(a, model, 1, start=2) for x in bs]

    b, _, _ = make(name, ds=ds, model=model, seed=99)  # another seed: the state must restore it
    b.load_state_dict(state)
    assert b.cost() == state["cost"]
    rest_b = [(x.indices.clone(), x.weights.clone()) for x in _drain(b, iter(b), model)]
    rest_b += [x for _, _, bs in run(b, model, 1, start=2) for x in bs]
    assert len(rest_a) == len(rest_b)
    for (i1, w1), (i2, w2) in zip(rest_a, rest_b, strict=False):
        assert torch.equal(i1, i2) and torch.equal(w1, w2)
    assert a.cost() == b.cost()


def _drain(loader, it, model):
    for batch in it:
        yield batch
        step(loader, model, batch)


def test_state_of_another_scheme_is_rejected():
    a, _, _ = make("uniform")
    b, _, _ = make("history-is")
    with pytest.raises(ValueError, match="saved by scheme 'uniform'"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "name, per_step",
    [
        ("uniform", 0),
        ("kf", None),  # Algorithm 1: a pool of 3b is scored only at steps with the switch on
        ("laber", 4 * B),
        ("rho-loss", 10 * B),
        ("history-is", 0),
        ("infobatch", 0),
    ],
)
def test_cost_counters(name, per_step):
    loader, _, model = make(name)
    log = run(loader, model, 2)
    steps = sum(len(bs) for _, _, bs in log)
    extra = N if name == "rho-loss" else 0  # irreducible losses precomputed once
    if per_step is None:
        expected = 3 * B * sum(bool(h["on"]) for h in loader.pool.tau_history)
        assert loader.cost()["scored_examples"] == expected
        return
    assert loader.cost()["scored_examples"] == steps * per_step + extra


# ---------------------------------------------------------------- exact unbiasedness and bias


def per_example_grads(model, ds):
    x, y = ds.tensors
    return per_example_gradients(model, CE, x, y).to(torch.float64)


class RecordingScorer:
    """Wraps a scorer and keeps each pool's inputs and scores."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.loss_fn = getattr(scorer, "loss_fn", None)
        self.pools = []

    def __call__(self, model, inputs, targets):
        s = self.scorer(model, inputs, targets)
        self.pools.append((inputs.clone(), s.clone()))
        return s


def rows_of(x, inputs):
    """Dataset indices of the rows ``inputs`` (rows of x are distinct)."""
    return torch.cdist(inputs.double(), x.double()).argmin(1)


@pytest.mark.parametrize(
    "name, overrides", [("kf", {"always": True}), ("laber", {}), ("pool-linear-gradnorm", {})]
)
def test_pool_weights_follow_laber_mean_formula_and_are_exactly_unbiased(name, overrides):
    """w_i = mean_pool(s) / s_i = 1 / (B p_i); sum_pool p_i w_i g_i equals the pool mean gradient."""
    if name == "pool-linear-gradnorm":
        overrides = {"always": True}
    loader, ds, model = make(name, **overrides)
    rec = RecordingScorer(loader.pool.scorer)
    loader.pool.scorer = rec
    x, _ = ds.tensors
    G = per_example_grads(model, ds)
    batches = [b for _, b in zip(range(4), loader, strict=False)]
    assert len(rec.pools) == len(batches)
    for batch, (pool_inputs, s) in zip(batches, rec.pools, strict=False):
        pool_idx = rows_of(x, pool_inputs)
        s = s.double()
        assert s.numel() == round(schemes.describe(name)["defaults"]["presample"] * B)
        where = {int(i): k for k, i in enumerate(pool_idx)}
        sel = torch.tensor([where[int(i)] for i in batch.indices])
        expected = s.mean() / s[sel]
        torch.testing.assert_close(batch.weights.double(), expected, rtol=1e-5, atol=0)
        p = s / s.sum()
        w = s.mean() / s
        estimate = (p * w) @ G[pool_idx]
        torch.testing.assert_close(estimate, G[pool_idx].mean(0), rtol=0, atol=1e-9)


def test_kf_switch_threshold_and_uniform_until_on():
    loader, _, _ = make("kf")
    big_b = loader.pool.pool_size
    assert big_b == 3 * B
    assert loader.switch.threshold == pytest.approx((big_b + 3 * B) / (3 * B))
    on_history = []
    for batch in loader:
        on_history.append(loader.pool.tau_history[-1]["on"])
        if not on_history[-1]:
            assert bool((batch.weights == 1).all())
    assert any(on_history) or len(on_history) == len(loader)
    if importlib.util.find_spec("isample.linear_scorer") is not None:
        lin, _, _ = make("pool-linear-gradnorm")  # scoring also runs a backward: break-even (2B + 3b) / (3b)
        assert lin.pool.switch.threshold == pytest.approx((2 * 4 * B + 3 * B) / (3 * B))


@pytest.mark.parametrize(
    "name, overrides", [("history-is", {}), ("obs", {"unbiased": True}), ("history-gradnorm", {})]
)
def test_table_weights_are_exactly_unbiased(name, overrides):
    """Weights equal 1 / (N p_i) for the distribution in force at the draw; sum_i p_i w_i g_i = g."""
    loader, ds, model = make(name, **overrides)
    G = per_example_grads(model, ds)
    run(loader, model, 1)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        p = loader.probabilities() if name != "obs" else None
        batch = next(it)
        if p is None:  # obs re-ranks at the epoch start, i.e. inside the first next()
            p = loader.probabilities()
        torch.testing.assert_close(batch.weights.double(), 1.0 / (N * p[batch.indices]), rtol=1e-5, atol=0)
        step(loader, model, batch)
        w = 1.0 / (N * p)
        torch.testing.assert_close((p * w) @ G, G.mean(0), rtol=0, atol=1e-9)


def monte_carlo_z(estimates: np.ndarray, truth: np.ndarray) -> float:
    se = estimates.std(0, ddof=1) / np.sqrt(estimates.shape[0])
    return float((np.abs(estimates.mean(0) - truth) / se).max())


@pytest.mark.parametrize("name, overrides", [("laber", {}), ("kf", {"always": True}), ("uniform", {})])
def test_pool_monte_carlo_unbiased(name, overrides):
    """Two-stage draws (uniform pool, then p within it): the batch mean gradient is unbiased for g."""
    loader, ds, model = make(name, num_batches=240, **overrides) if name != "uniform" else make(name)
    G = per_example_grads(model, ds).numpy()
    est = []
    for epoch in range(1 if name != "uniform" else 40):
        loader.set_epoch(epoch)
        for batch in loader:
            est.append((batch.weights.double().numpy()[:, None] * G[batch.indices.numpy()]).mean(0))
    z = monte_carlo_z(np.array(est), G.mean(0))
    assert z < 4.5, f"{name}: max z-score {z:.2f}"


def test_biased_schemes_bias_is_measured(capsys):
    """||E[g_hat] - g|| > 0 for obs, selective-backprop and rho-loss on a tiny problem (printed)."""
    ds = dataset()
    model = make_mlp(D, 8, C, 0)
    G = per_example_grads(model, ds)
    losses = score_dataset(model, ds, LossScorer(CE)).double()
    ones = torch.ones(N, dtype=torch.float64)
    measured = {}
    # obs: rank-exponential distribution with s_e = 100, weights 1
    obs, _, _ = make("obs", model=model)
    next(iter(obs))
    measured["obs"] = bias(G, obs.probabilities(), ones)
    # selective-backprop: inclusion P_i = CDF(loss_i)^3 over a history of all losses, weights 1
    from isample.rank_policies import cdf_power_probabilities

    keep = cdf_power_probabilities(losses, losses, 3.0, 0.0)
    measured["selective-backprop"] = bias(G, keep / keep.sum(), ones)
    # rho-loss with the pool = whole dataset: deterministic top-b by reducible loss
    rho, _, _ = make("rho-loss", model=model, ratio=B / N, irreducible_losses=torch.zeros(N))
    batch = next(iter(rho))
    p = torch.zeros(N, dtype=torch.float64)
    p[batch.indices] = 1.0 / B
    measured["rho-loss"] = bias(G, p, ones)
    g_norm = float(G.mean(0).norm())
    with capsys.disabled():
        values = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
        print(f"\nbias ||E[g_hat] - g|| (||g|| = {g_norm:.4g}): {values}")
    for name, value in measured.items():
        assert value > 1e-3 * g_norm, name
    # and the unbiased references measure ~0 with the same function
    assert bias(G, torch.full((N,), 1.0 / N, dtype=torch.float64), ones) < 1e-12


# ---------------------------------------------------------------- per-scheme rules


def test_uniform_is_a_permutation_per_epoch():
    loader, _, model = make("uniform")
    for _, length, batches in run(loader, model, 2):
        idx = torch.cat([i for i, _ in batches])
        assert sorted(idx.tolist()) == list(range(N))
        assert all(bool((w == 1).all()) for _, w in batches)
        assert length == math.ceil(N / B)


def test_obs_probabilities_follow_rank_formula_and_anneal():
    loader, ds, model = make("obs", epochs=5)
    assert loader.pressure(0) == pytest.approx(100.0)
    assert loader.pressure(4) == pytest.approx(1.0)
    assert loader.pressure(2) == pytest.approx(10.0)  # geometric midpoint
    losses = score_dataset(model, ds, LossScorer(CE)).double().numpy()
    batch = next(iter(loader))  # epoch 0 re-scores the dataset (rescore_every=2) and ranks
    assert loader.cost()["scored_examples"] == N
    ranks = np.empty(N)
    ranks[np.argsort(-losses, kind="stable")] = np.arange(N)
    ref = np.exp(-math.log(100.0) * ranks / N)
    ref /= ref.sum()
    np.testing.assert_allclose(loader.probabilities().numpy(), ref, rtol=1e-10)
    assert ref.max() / ref.min() == pytest.approx(100.0 ** ((N - 1) / N))
    assert bool((batch.weights == 1).all())


def test_obs_epoch_without_rescoring_uses_training_losses():
    loader, ds, model = make("obs", rescore_every=None)
    next(iter(loader))  # never-seen examples: all NaN -> ties -> rank by position
    loader.update(torch.tensor([5]), torch.tensor([100.0]))  # the largest loss ranks first next epoch
    loader.set_epoch(1)
    next(iter(loader))
    p = loader.probabilities()
    assert loader.cost()["scored_examples"] == 0
    # example 5 has a finite loss, every other is still unseen (ranked first): it ranks last
    assert float(p[5]) == pytest.approx(float(p.min()))


def test_selective_backprop_rule_and_queue():
    loader, ds, model = make("selective-backprop", history_size=64)
    x, _ = ds.tensors
    # epoch 0: uniform, no scoring; training losses fill the history
    run(loader, model, 1)
    assert loader.cost()["scored_examples"] == 0
    assert loader.history().numel() == N
    loader.set_epoch(1)
    for batch in loader:
        assert len(batch) == B and bool((batch.weights == 1).all())
        sel = loader.last_selection
        expected_losses = LossScorer(CE)(model, x[sel["indices"]], ds.tensors[1][sel["indices"]]).double()
        torch.testing.assert_close(sel["losses"], expected_losses, rtol=1e-6, atol=1e-7)
        hist = loader.history().numpy()
        cdf = (hist[None, :] <= sel["losses"].numpy()[:, None]).mean(1)
        np.testing.assert_allclose(sel["probabilities"].numpy(), np.maximum(0.0, cdf**3.0), rtol=1e-12)
        step(loader, model, batch)
    assert loader.cost()["scored_examples"] > len(loader) * B  # forwarded more candidates than trained
    # Monte Carlo: kept fraction vs mean keep probability over many chunks
    loader2, _, model2 = make("selective-backprop", uniform_epochs=0, num_batches=60, chunk_size=16)
    kept = probs = var = 0.0
    seen = None
    for _ in loader2:
        sel = loader2.last_selection
        if sel is not seen:  # one record per scored chunk
            seen = sel
            p = sel["probabilities"]
            kept += float(sel["kept"].sum())
            probs += float(p.sum())
            var += float((p * (1 - p)).sum())
    assert abs(kept - probs) < 4.5 * math.sqrt(var), (kept, probs, var)


def test_selective_backprop_stale_mode_skips_forwards():
    fresh, _, model = make("selective-backprop")
    stale, _, _ = make("selective-backprop", model=model, staleness=2)
    run(fresh, model, 3)
    run(stale, model, 3)
    assert 0 < stale.cost()["scored_examples"] < fresh.cost()["scored_examples"]


def test_infobatch_plan_rule_weights_and_exact_unbiasedness():
    loader, ds, model = make("infobatch", epochs=8)
    G = per_example_grads(model, ds)
    losses = score_dataset(model, ds, LossScorer(CE)).double()
    loader.update(torch.arange(N), losses)
    loader.set_epoch(1)
    idx, w = loader.epoch_plan()
    well = losses < losses.mean()
    n_well = int(well.sum())
    k = max(1, round(0.5 * n_well))
    assert idx.numel() == N - n_well + k and len(set(idx.tolist())) == idx.numel()
    assert set(torch.nonzero(~well).flatten().tolist()) <= set(idx.tolist())
    in_well = well[idx]
    torch.testing.assert_close(w[in_well].double(), torch.full((k,), n_well / k, dtype=torch.float64))
    assert bool((w[~in_well] == 1).all())
    assert len(loader) == math.ceil(idx.numel() / B)
    # exact: inclusion probability x weight = 1 for every example -> epoch sum of w g = sum g
    one = torch.ones(N, dtype=torch.float64)
    incl = torch.where(well, one * k / n_well, one)
    weight = torch.where(well, one * n_well / k, one)
    torch.testing.assert_close((incl * weight) @ G, G.sum(0), rtol=0, atol=1e-9)
    # Monte Carlo over epochs and seeds: each well-learned example is kept with frequency k / |W|
    counts = torch.zeros(N)
    trials = 300
    for e in range(trials):
        other, _, _ = make("infobatch", ds=ds, model=model, epochs=8, seed=e)
        other.update(torch.arange(N), losses)
        other.set_epoch(1 + e % 6)
        counts[other.epoch_plan()[0]] += 1
    freq = counts[well] / trials
    sd = math.sqrt((k / n_well) * (1 - k / n_well) / trials)
    assert float((freq - k / n_well).abs().max()) < 5 * sd
    # the final 12.5% of epochs use the full data with weights 1
    loader.set_epoch(7)
    idx7, w7 = loader.epoch_plan()
    assert sorted(idx7.tolist()) == list(range(N)) and bool((w7 == 1).all())


def test_infobatch_lengths_and_total_steps():
    loader, _, model = make("infobatch", epochs=8)  # epochs 0-6 prune (< 0.875 x 8), epoch 7 is full
    full = math.ceil(N / B)
    assert loader.total_steps() == 8 * full  # before feedback: nothing is below the initial score
    log = run(loader, model, 8)
    lengths = [length for _, length, _ in log]
    assert lengths == [len(bs) for _, _, bs in log]
    assert lengths[0] == full and lengths[7] == full
    assert max(lengths[1:7]) < full
    assert loader.total_steps() == sum(lengths)
    fresh, _, _ = make("infobatch", epochs=8)
    assert fresh.total_steps(well_learned_fraction=0.5) == full + 6 * math.ceil((N - 24 + 12) / B) + full


def test_infobatch_warns_without_feedback():
    loader, _, model = make("infobatch", epochs=4)
    for _ in loader:
        pass  # no feedback
    with pytest.warns(RuntimeWarning, match="no loss feedback during epoch 0"):
        len(loader)
    assert loader.is_pruning(1)  # pruning is not switched off


def test_rho_loss_selects_top_reducible_losses():
    irreducible = torch.linspace(0, 1, N)
    loader, ds, model = make("rho-loss", irreducible_losses=irreducible)
    assert loader.pool_size == 10 * B
    x, y = ds.tensors
    for _, batch in zip(range(3), loader, strict=False):
        sel = loader.last_selection
        pool = sel["indices"]
        red = LossScorer(CE)(model, x[pool], y[pool]).double() - irreducible[pool].double()
        torch.testing.assert_close(sel["scores"], red)
        # rows of one example repeated in a pool may differ by an ulp: rank the scheme's own scores
        order = np.argsort(-sel["scores"].numpy(), kind="stable")[:B]
        assert (
            float(red[torch.from_numpy(order)].min()) >= float(red.sort(descending=True).values[B - 1]) - 1e-6
        )
        assert torch.equal(batch.indices, pool[torch.from_numpy(order)])
        assert bool((batch.weights == 1).all())


def test_rho_loss_trains_a_holdout_model():
    holdout = dataset(16, seed=5)
    loader, _, model = make("rho-loss", holdout=holdout, holdout_epochs=2)
    before = make_mlp(D, 8, C, 0)
    assert not torch.equal(loader.irreducible, score_dataset(before, dataset(), LossScorer(CE)).double())
    assert torch.equal(next(model.parameters()), next(before.parameters()))  # the main model is untouched
    assert len(next(iter(loader))) == B


def test_history_is_upper_bound_feedback_has_no_extra_forward():
    loader, ds, model = make("history-is", score="upper_bound")
    x, y = ds.tensors
    batch = next(iter(loader))
    step(loader, model, batch)
    expected = UpperBoundScorer(CE)(model, x[batch.indices], y[batch.indices]).double()
    torch.testing.assert_close(loader.sampler.scores()[batch.indices], expected, rtol=1e-6, atol=1e-7)
    assert loader.cost()["scored_examples"] == 0


def test_history_is_rescore_every():
    loader, ds, model = make("history-is", rescore_every=2)
    run(loader, model, 3)
    assert loader.cost()["scored_examples"] == 2 * N  # epochs 0 and 2


def test_history_gradnorm_records_exact_norms():
    needs("history-gradnorm")
    from isample.scorers import GradNormScorer

    loader, ds, model = make("history-gradnorm")
    x, y = ds.tensors
    batch = next(iter(loader))
    step(loader, model, batch)
    expected = GradNormScorer(CE)(model, x[batch.indices], y[batch.indices]).double()
    torch.testing.assert_close(loader.sampler.scores()[batch.indices], expected, rtol=1e-4, atol=1e-6)
    batch = next(iter(loader))
    out = model(batch.inputs)
    losses = CE(out, batch.targets)
    with pytest.raises(RuntimeError, match="step_context"):
        loader.feedback(batch, out.detach(), losses.detach())


# ---------------------------------------------------------------- DataLoader options through build()
@pytest.mark.parametrize("name", schemes.available())
def test_build_validates_the_dataloader_options_in_one_place(name):
    with pytest.raises(ValueError, match="'prefetch_factor' parameter of .* must be an int >= 1"):
        make(name, num_workers=1, prefetch_factor=0)
    with pytest.raises(ValueError, match="needs worker processes"):
        make(name, persistent_workers=True)
    with pytest.raises(TypeError, match="the scheme decides the order"):
        make(name, shuffle=True)


@pytest.mark.parametrize("name", schemes.available())
def test_build_refuses_an_iterable_dataset_with_len_clearly(name):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from dataset()

        def __len__(self):
            return N

    with pytest.raises(TypeError, match="IterableDataset"):
        make(name, ds=Stream())


@pytest.mark.parametrize("name", schemes.available())
def test_scheme_describe_lists_own_parameters_not_dataloader_options(name):
    needs(name)
    defaults = schemes.describe(name)["defaults"]
    assert not {"num_workers", "pin_memory", "collate_fn"} & set(defaults)
    assert set(schemes.scheme_parameters(name)) <= set(defaults) | {
        k for k, v in schemes.scheme_parameters(name).items() if v is inspect.Parameter.empty
    }
