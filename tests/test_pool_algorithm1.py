"""PoolLoader: Katharopoulos-Fleuret Algorithm 1, the iterator-owned epoch cursor, visibility, bounds."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

import isample.schemes as schemes
from isample import GradNormScorer, LossScorer, PoolLoader, UpperBoundScorer
from isample.metrics.functional import tau as tau_of
from isample.switch import ImportanceSamplingOffWarning

CE = nn.CrossEntropyLoss(reduction="none")
N, B = 48, 8


def dataset(n: int = N, seed: int = 0) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(*make_classification(n, 5, 3, seed))


class Counting(UpperBoundScorer):
    """The upper bound, counting calls and scored examples."""

    def __init__(self) -> None:
        super().__init__(CE)
        self.calls = 0
        self.examples = 0

    def score(self, model, inputs, targets):
        self.calls += 1
        self.examples += int(inputs.shape[0])
        return super().score(model, inputs, targets)


class RecordingLoss(LossScorer):
    """Loss scores; keeps every scored pool's targets and scores."""

    def __init__(self) -> None:
        super().__init__(CE)
        self.pools: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(self, model, inputs, targets):
        s = super().score(model, inputs, targets)
        self.pools.append((inputs.clone(), s.clone()))
        return s


def lazy(ds=None, model=None, scorer=None, **kw) -> PoolLoader:
    kw.setdefault("seed", 0)
    kw.setdefault("presample", 3.0)
    return PoolLoader(
        dataset() if ds is None else ds,
        make_mlp() if model is None else model,
        Counting() if scorer is None else scorer,
        B,
        score_when_off=False,
        **kw,
    )


def train_pass(loader, model, steps=None, feedback=True):
    """Iterate (one epoch, or ``steps`` batches across epochs), feeding outputs back; returns the batches."""
    out, it = [], iter(loader)
    while steps is None or len(out) < steps:
        try:
            batch = next(it)
        except StopIteration:
            if steps is None:
                break
            it = iter(loader)
            continue
        logits = model(batch.inputs)
        if feedback:
            loader.feedback(batch, logits.detach(), CE(logits, batch.targets).detach())
        out.append(batch)
    return out


# ---------------------------------------------------------------- Algorithm 1


def test_no_scoring_pass_while_off_and_uniform_unit_weight_batches():
    model, scorer = make_mlp(), Counting()
    loader = lazy(model=model, scorer=scorer, tau_threshold=1e6, check_loss_fn=False)
    assert loader.pool_size == 3 * B and loader.lazy
    for epoch in range(2):
        batches = train_pass(loader, model)
        assert len(batches) == N // B
        seen = torch.cat([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(N))  # an off epoch is one uniform pass
        assert all(bool((b.weights == 1).all()) and len(b) == B for b in batches)
        assert loader.epoch == epoch + 1
    assert scorer.calls == 0 and loader.scored_examples == 0
    assert not any(h["on"] for h in loader.tau_history)
    # tau is observed once B = 3b training scores have arrived
    taus = [h["tau"] for h in loader.tau_history]
    assert all(math.isnan(t) for t in taus[:3]) and all(t >= 1.0 for t in taus[3:])
    assert {h["source"] for h in loader.tau_history[3:]} == {"batch"}


def test_tau_from_training_outputs_equals_tau_of_scoring_the_same_examples():
    model = make_mlp()  # no dropout / batch norm: training and scoring forwards agree
    ds = dataset()
    x, y = ds.tensors
    loader = lazy(ds, model, tau_threshold=1e6)
    batches = train_pass(loader, model, steps=5)
    history = list(loader.tau_history)
    next(iter(loader))  # the request of step 6 observes the scores of batches 3, 4, 5
    observed = loader.tau_history[-1]["tau"]
    idx = torch.cat([b.indices for b in batches[-3:]])
    scored = UpperBoundScorer(CE)(model, x[idx], y[idx])
    assert observed == pytest.approx(tau_of(scored), rel=1e-6)
    # and step 4's observation covered batches 1, 2, 3
    idx = torch.cat([b.indices for b in batches[:3]])
    assert history[3]["tau"] == pytest.approx(tau_of(UpperBoundScorer(CE)(model, x[idx], y[idx])), rel=1e-6)


def heavy_losses(batch):
    """Synthetic per-example losses with one dominant example: tau close to sqrt(B)."""
    s = torch.full((len(batch),), 1e-3)
    s[0] = 10.0
    return s


def test_switch_turns_on_with_pools_and_back_off_visibly():
    model, scorer = make_mlp(), RecordingLoss()
    loader = lazy(model=model, scorer=scorer, tau_momentum=0.0, check_loss_fn=False, num_batches=20)
    steps = []
    for batch in loader:
        on = loader.tau_history[-1]["on"]
        steps.append(on)
        assert loader.status().startswith("IS on" if on else "IS off")
        if on:  # a pool of B was scored; weights 1/(B p_i) with p from the pool's scores
            assert len(scorer.pools) and scorer.pools[-1][1].shape == (3 * B,)
            assert not bool((batch.weights == 1).all())
        else:
            assert bool((batch.weights == 1).all())
        # while off, feed heavy-tailed "losses": tau of the last B scores exceeds the threshold
        loader.feedback(batch, model(batch.inputs).detach(), heavy_losses(batch))
    assert steps[:3] == [False] * 3 and steps[3] is True  # three batches fill the window of B
    # on: tau comes from the pool's real losses (near uniform), so it turns off at the next step
    assert steps[4] is False and any(steps[5:]) and len(scorer.pools) == sum(steps)
    on_share = loader.describe()["on_share"]
    assert on_share == pytest.approx(sum(steps) / len(steps))
    assert [h["on"] for h in loader.tau_history[-3:]] == steps[-3:]


def test_pool_weights_when_on_are_exactly_unbiased():
    model, scorer = make_mlp(), RecordingLoss()
    loader = lazy(model=model, scorer=scorer, always=False, tau_threshold=1.0, check_loss_fn=False)
    x, _ = loader.dataset.tensors
    for batch in loader:
        if loader.tau_history[-1]["on"]:
            pool_x, s = scorer.pools[-1]
            pool_idx = torch.cdist(pool_x.double(), x.double()).argmin(1)
            where = {int(i): k for k, i in enumerate(pool_idx)}
            rows = torch.tensor([where[int(i)] for i in batch.indices])
            s = s.double()
            torch.testing.assert_close(batch.weights.double(), s.mean() / s[rows], rtol=1e-5, atol=0)
        loader.feedback(batch, model(batch.inputs).detach(), heavy_losses(batch))
    assert len(scorer.pools) > 0


def test_feedback_matches_prefetched_batches_and_ignores_unknown_ones():
    model = make_mlp()
    loader = lazy(model=model, tau_threshold=1e6)
    it = iter(loader)
    first, second = next(it), next(it)  # fetched ahead of the training step (as Lightning does)
    for batch in (first, second):
        loader.feedback(batch, model(batch.inputs).detach())
    third = next(it)
    loader.feedback(third, model(third.inputs).detach())
    loader.feedback(third, model(third.inputs).detach())  # twice: the second is ignored
    next(it)
    assert loader.tau_history[-1]["tau"] >= 1.0 and loader._feedbacks == 3
    skipped, kept = next(it), next(it)
    loader.feedback(kept, model(kept.inputs).detach())  # a batch without feedback stays queued
    loader.feedback(skipped, model(skipped.inputs).detach())
    assert loader._feedbacks == 5


def test_missing_feedback_warns_once():
    loader = lazy(tau_threshold=1e6, num_batches=PoolLoader.NO_FEEDBACK_WARN_STEPS)
    with pytest.warns(RuntimeWarning, match="without any feedback"):
        batches = list(loader)
    assert len(batches) == PoolLoader.NO_FEEDBACK_WARN_STEPS


def test_algorithm1_needs_a_scorer_that_reads_outputs():
    with pytest.raises(ValueError, match="score_when_off=False"):
        lazy(scorer=GradNormScorer(CE))


def test_kf_scheme_runs_algorithm1_and_scores_nothing_while_off():
    model = make_mlp()
    kf = schemes.build("kf", dataset(), model, CE, B, seed=0, tau_threshold=1e6)
    assert kf.pool.lazy
    for batch in kf:
        out = model(batch.inputs)
        kf.feedback(batch, out.detach(), CE(out, batch.targets).detach())
    assert kf.cost()["scored_examples"] == 0 and kf.describe()["scheme"] == "kf"
    assert kf.describe()["mode"] == "algorithm-1"
    legacy = schemes.build("kf", dataset(), model, CE, B, seed=0, score_when_off=True)
    list(legacy)
    assert legacy.cost()["scored_examples"] == 3 * B * len(legacy)


@pytest.mark.parametrize("tau_every", [1, 3])  # 3: the save at step 8 falls between two decisions
def test_algorithm1_resume_continues_bit_identically(tau_every):
    model = make_mlp()

    def build(seed=0):
        return lazy(
            model=model,
            scorer=RecordingLoss(),
            tau_momentum=0.5,
            seed=seed,
            check_loss_fn=False,
            tau_every=tau_every,
        )

    def run(loader, count, log, it=None):
        it = iter(loader) if it is None else it
        while count:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            log.append((batch.indices.clone(), batch.weights.clone(), loader.tau_history[-1]["on"]))
            loader.feedback(batch, model(batch.inputs).detach(), heavy_losses(batch) * (1 + len(log) % 3))
            count -= 1
        return it

    full: list = []
    run(build(), 15, full)
    part: list = []
    first = build()
    run(first, 8, part)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = build(seed=5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, 7, part)
    assert [on for _, _, on in full] != [False] * 15  # the switch did turn on
    for (i1, w1, o1), (i2, w2, o2) in zip(full, part, strict=True):
        assert torch.equal(i1, i2) and torch.equal(w1, w2) and o1 == o2


# ---------------------------------------------------------------- the epoch cursor


@pytest.mark.parametrize("score_when_off", [True, False])
def test_set_epoch_mid_epoch_does_not_truncate_either_epoch(score_when_off):
    def build():
        return PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0, score_when_off=score_when_off)

    reference = build()
    reference.set_epoch(1)
    epoch1 = [b.indices for b in reference]
    loader = build()
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    loader.set_epoch(1)  # mid-epoch: the running iterator finishes epoch 0 unchanged
    rest = list(it)
    assert len(head) + len(rest) == len(loader)
    full0 = build()
    epoch0 = [b.indices for b in full0]
    assert all(torch.equal(a, b.indices) for a, b in zip(epoch0, head + rest, strict=True))
    again = [b.indices for b in loader]  # the next iterator runs all of epoch 1
    assert len(again) == len(loader) and all(torch.equal(a, b) for a, b in zip(epoch1, again, strict=True))


def test_two_iterators_do_not_corrupt_each_other():
    loader = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0)
    reference = [b.indices for b in PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0)]
    train = iter(loader)
    got = [next(train).indices for _ in range(3)]
    probe = iter(loader)  # e.g. validating the sampler during training
    probe_batches = [next(probe).indices for _ in range(2)]
    assert torch.equal(probe_batches[0], reference[0])  # a whole epoch of its own (as isample.DataLoader)
    del probe
    got += [b.indices for b in train]
    assert len(got) == len(loader) and all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))
    assert loader.epoch == 1 and loader.position == 0
    assert len(list(loader)) == len(loader)  # the next epoch is complete


def test_set_epoch_with_the_current_epoch_keeps_the_position():
    loader = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0)
    it = iter(loader)
    head = [next(it).indices for _ in range(2)]
    del it
    loader.set_epoch(0)  # Lightning calls this again when resuming mid-epoch
    rest = [b.indices for b in loader]
    reference = [b.indices for b in PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0)]
    assert len(head) + len(rest) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(reference, head + rest, strict=True))


def test_load_state_dict_rejects_positions_outside_the_epoch():
    loader = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0)
    state = loader.state_dict()
    for key, value in (("position", len(loader)), ("position", -1), ("epoch", -2), ("steps", 1.5)):
        bad = dict(state, **{key: value})
        with pytest.raises(ValueError, match=key):
            PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0).load_state_dict(bad)
    with pytest.raises(ValueError, match="score_when_off"):
        lazy().load_state_dict(dict(state, lazy=False, pool_size=3 * B))


# ---------------------------------------------------------------- visibility


def test_describe_status_and_tau_history_slices():
    model = make_mlp()
    loader = lazy(model=model, tau_threshold=1e6)
    assert loader.status() == "IS off | tau -- | on 0%"
    train_pass(loader, model)
    info = loader.describe()
    assert info["is_on"] is False and info["mode"] == "algorithm-1" and info["tau_source"] == "batch"
    assert info["tau_ema"] >= 1.0 and info["threshold"] == 1e6 and info["steps"] == len(loader)
    assert info["switch"]["rule"] == "tau"
    assert loader.status() == f"IS off | tau {info['tau_ema']:.2f} <= 1000000.00 | on 0%"
    last3 = loader.tau_history[-3:]
    assert isinstance(last3, list) and [h["step"] for h in last3] == [3, 4, 5]
    assert loader.tau_history[-1] is last3[-1] and len(loader.tau_history) == len(loader)


def test_warns_when_scoring_for_epochs_with_the_switch_off():
    loader = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0, tau_threshold=1e6)
    for _ in range(2):
        list(loader)
    with pytest.warns(ImportanceSamplingOffWarning, match="3 epochs"):
        list(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(loader)  # once per loader
        quiet = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0, warn_off_epochs=None)
        never = PoolLoader(dataset(), make_mlp(), Counting(), B, 2.0, seed=0, tau_threshold=math.inf)
        model = make_mlp()
        alg1 = lazy(model=model, tau_threshold=1e6)  # Algorithm 1 pays no scoring while off
        for _ in range(4):
            list(quiet), list(never), train_pass(alg1, model)


# ---------------------------------------------------------------- parameter ranges


@pytest.mark.parametrize("value", [1e15, 1024.5, math.inf])
def test_presample_is_bounded(value):
    with pytest.raises(
        ValueError, match=r"'presample' parameter of PoolLoader must be a (finite float|float in \[1.0, 1024)"
    ):
        PoolLoader(dataset(), make_mlp(), Counting(), B, value)
    with pytest.raises(ValueError, match="'presample' parameter of KatharopoulosFleuret"):
        schemes.build("kf", dataset(), make_mlp(), CE, B, presample=value)


def test_tau_parameter_errors_name_the_users_parameters():
    for owner, build in (
        ("PoolLoader", lambda **kw: PoolLoader(dataset(), make_mlp(), Counting(), B, **kw)),
        ("KatharopoulosFleuret", lambda **kw: schemes.build("kf", dataset(), make_mlp(), CE, B, **kw)),
    ):
        with pytest.raises(ValueError, match=f"'tau_threshold' parameter of {owner} must be a float >= 1"):
            build(tau_threshold=0.5)
        with pytest.raises(ValueError, match=f"'tau_threshold' parameter of {owner}"):
            build(tau_threshold=math.nan)
        with pytest.raises(
            ValueError, match=rf"'tau_momentum' parameter of {owner} must be a float in \[0.0, 1.0\)"
        ):
            build(tau_momentum=1.0)
        with pytest.raises(TypeError, match=f"'tau_momentum' parameter of {owner}"):
            build(tau_momentum="0.9")
    with pytest.raises(TypeError, match="'score_when_off' parameter of PoolLoader must be a bool"):
        PoolLoader(dataset(), make_mlp(), Counting(), B, score_when_off=1)


def test_update_with_losses_feeds_tau_for_a_loss_scorer():
    """A plain loop's ``update(indices, losses)`` is the training-batch score when the score is the loss."""
    model, scorer = make_mlp(), LossScorer(CE)
    loader = lazy(model=model, scorer=scorer, tau_threshold=1e6, check_loss_fn=False)
    x, y = loader.dataset.tensors
    batches = []
    for batch in loader:
        batches.append(batch)
        loader.update(batch.indices, CE(model(batch.inputs), batch.targets).detach())
        if len(batches) == 3:
            break
    next(iter(loader))
    idx = torch.cat([b.indices for b in batches])
    assert loader.tau_history[-1]["tau"] == pytest.approx(tau_of(scorer(model, x[idx], y[idx])), rel=1e-6)


def test_algorithm1_replicas_read_disjoint_batches_and_pools():
    """Rank r reads global chunks r, r + R, ...: disjoint within an epoch, whatever the decisions."""
    ds = dataset(96)
    loaders = [
        lazy(ds, make_mlp(), RecordingLoss(), tau_momentum=0.0, num_replicas=2, rank=r, check_loss_fn=False)
        for r in range(2)
    ]
    assert len(loaders[0]) == 96 // (2 * B)
    per_rank = []
    for loader in loaders:
        model = loader.model
        seen = []
        for batch in loader:  # the same feedback on both ranks: the same decisions
            seen.append((bool(loader.tau_history[-1]["on"]), batch.indices))
            loader.feedback(batch, model(batch.inputs).detach(), heavy_losses(batch))
        per_rank.append(seen)
    assert [on for on, _ in per_rank[0]] == [on for on, _ in per_rank[1]]
    # the first permutation block holds 96 / (2 b) = 6 chunks per rank; batches read from it are disjoint
    first_block = []
    for seen in per_rank:
        chunk, rows = 0, []
        for on, indices in seen:
            if not on and chunk < 6:
                rows += indices.tolist()
            chunk += 3 if on else 1
        first_block.append(rows)
    assert first_block[0] and first_block[1] and set(first_block[0]).isdisjoint(first_block[1])
    assert len(set(first_block[0])) == len(first_block[0])
    assert loaders[0].chunk == loaders[1].chunk == 0  # both completed the epoch
    pools = [p for loader in loaders for p in loader.scorer.pools]
    assert len(pools) == 2 * sum(on for on, _ in per_rank[0]) > 0


@pytest.mark.gpu
def test_algorithm1_on_cuda():
    device = torch.device("cuda")
    model = make_mlp().to(device)
    loader = lazy(model=model, scorer=RecordingLoss(), tau_momentum=0.0, check_loss_fn=False)
    states = []
    for _ in range(2):
        for batch in loader:
            assert batch.inputs.device.type == "cuda" and batch.weights.device.type == "cuda"
            assert batch.indices.device.type == "cpu"
            states.append(loader.tau_history[-1]["on"])
            loader.feedback(batch, model(batch.inputs).detach(), heavy_losses(batch).to(device))
    assert any(states) and not all(states)


@pytest.mark.parametrize("scheme", ["kf", "auto"])
@pytest.mark.parametrize("n", [320, 330])  # 330: N mod b != 0, a short last batch per epoch
def test_a_switch_that_stays_off_reproduces_the_uniform_scheme_exactly(scheme, n):
    """Algorithm 1 reads uniform's batches while off: same seed, same batches, same parameters."""
    from torch.utils.data import TensorDataset

    import isample

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    never = {"kf": isample.schemes.KatharopoulosFleuret(tau_threshold=math.inf), "auto": "auto"}

    def train(choice):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = isample.DataLoader(
            TensorDataset(x, y), batch_size=32, scheme=choice, model=model, loss_fn=ce, seed=7
        )
        seen = []
        for _ in range(2):
            for xb, yb, w in loader:
                losses = ce(model(xb), yb)
                (w * losses).mean().backward()
                opt.step()
                opt.zero_grad()
                loader.update(losses.detach())
                seen.append(loader.last_batch.indices.clone())
        return seen, list(model.parameters())

    (u, pu), (s, ps) = train("uniform"), train(never[scheme])
    assert len(u) == len(s)
    if scheme == "kf":
        assert all(torch.equal(a, b) for a, b in zip(u, s, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(pu, ps, strict=True))
    else:  # auto starts off (its costs are not measured yet): uniform's first batches
        assert torch.equal(u[0], s[0]) and torch.equal(u[1], s[1])


def test_feedback_reads_the_logits_with_the_scorers_logits_hook():
    """Outputs are read by the scorer's ModelCall: its logits= key applies to the training outputs too."""

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, x):
            return {"aux": x.sum(1), "scores": self.net(x)}

    model, scorer = Named(), UpperBoundScorer(CE, logits="scores")
    loader = lazy(model=model, scorer=scorer, tau_threshold=1e6)
    x, y = loader.dataset.tensors
    batches = []
    for batch in loader:
        batches.append(batch)
        with torch.no_grad():
            loader.feedback(batch, model(batch.inputs), None)
        if len(batches) == 3:
            break
    next(iter(loader))  # this request observes the scores of the 3 batches fed back
    idx = torch.cat([b.indices for b in batches])
    assert loader.tau_history[-1]["tau"] == pytest.approx(tau_of(scorer(model, x[idx], y[idx])), rel=1e-6)
