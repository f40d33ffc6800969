"""Data-parallel training with torch.distributed (gloo, 2 CPU processes) and the sharding logic.

One launch of two processes runs every multi-process scenario and writes its records to
files; a second launch restarts both ranks from the checkpoint a killed run left. The
tests then compare the records with each other and with single-process references.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer
from isample.testing import run_distributed

CE = nn.CrossEntropyLoss(reduction="none")
N, B, WORLD = 40, 3, 2  # dataset size, per-rank batch, ranks: 7 steps per epoch
STEPS, CUT = 11, 5  # steps of a run, step of the resume checkpoint (inside epoch 0)
DIE_AT, CKPT_EVERY = 7, 5  # the killed run: checkpoints every 5 steps, rank 1 dies at step 7


def dataset():
    x, y = make_classification(N)
    return torch.utils.data.TensorDataset(x.double(), y)


def model_and_opt(seed=0):
    model = make_mlp(seed=seed).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def make_loader(kind, ds, model, seed, **kw):
    if kind == "table":
        return ImportanceDataLoader(ds, TableSampler(N, B, seed=seed, power=0.5, **kw))
    return PoolLoader(ds, model, UpperBoundScorer(CE), B, presample=2.0, seed=seed, tau_threshold=1.2, **kw)


def train(loader, ddp, opt, steps, log, *, nan_rank=None, checkpoint=None, die_at=None):
    """The DDP loop; every step logs indices, weights, averaged gradients and parameters."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    it = iter(loader)
    while len(log) < steps:
        if die_at is not None and len(log) == die_at and rank == 1:
            Path(checkpoint[0], "died").write_text("rank 1")
            os._exit(3)  # a crash: no cleanup, no collective
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        before = flat(ddp.parameters())
        opt.zero_grad()
        losses = CE(ddp(batch.inputs), batch.targets)
        (batch.weights * losses).mean().backward()
        if isinstance(ddp, AllReduce):
            ddp.average_gradients()
        grads = flat(p.grad for p in ddp.parameters())
        opt.step()
        scores = losses.detach().clone()
        if nan_rank == rank:
            scores[0] = float("nan")
        loader.update(batch.indices, scores)
        log.append(
            {
                "indices": batch.indices.clone(),
                "weights": batch.weights.clone(),
                "grads": grads,
                "before": before,
                "scores": scores,
            }
        )
        if checkpoint is not None and len(log) % checkpoint[1] == 0:
            state = {
                "loader": loader.state_dict(),
                "model": ddp.module.state_dict(),
                "opt": opt.state_dict(),
                "step": len(log),
            }
            path = Path(checkpoint[0], f"ckpt_rank{rank}.pt")
            torch.save(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)  # atomic: a crash never leaves half a checkpoint
    return log


class AllReduce(nn.Module):
    """DDP's gradient averaging by hand (``all_reduce`` then divide by the world size).

    Bit-identical to DDP's division by a power of two and sum for two ranks, without the
    seconds that importing DDP's compiler stack costs; the restart launch uses it.
    """

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    def average_gradients(self):
        for p in self.module.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= torch.distributed.get_world_size()


def ddp_setup(seed=0, wrap=nn.parallel.DistributedDataParallel):
    torch.set_num_threads(1)
    model, opt = model_and_opt(seed)
    return wrap(model), opt


def save(out, name, rank, obj):
    torch.save(obj, Path(out, f"{name}_rank{rank}.pt"))


def scenarios(rank, world, out):
    """Launch 1: every scenario, then a run in which rank 1 dies."""
    ds = dataset()
    for kind, seed in (("table", 5), ("pool", 8)):
        # uninterrupted run
        ddp, opt = ddp_setup()
        loader = make_loader(kind, ds, ddp.module, seed)
        log = train(loader, ddp, opt, STEPS, [])
        extra = (
            {"table": loader.sampler.state_dict()["table"]}
            if kind == "table"
            else {"tau_history": loader.tau_history}
        )
        save(out, f"{kind}_full", rank, {"log": log, "params": flat(ddp.parameters()), **extra})
        # interrupted at CUT, resumed from a checkpoint into fresh objects
        ddp, opt = ddp_setup()
        loader = make_loader(kind, ds, ddp.module, seed)
        log = train(loader, ddp, opt, CUT, [])
        path = Path(out, f"{kind}_cut_rank{rank}.pt")
        torch.save(
            {"loader": loader.state_dict(), "model": ddp.module.state_dict(), "opt": opt.state_dict()}, path
        )
        del ddp, opt, loader
        state = torch.load(path, weights_only=True)
        ddp, opt = ddp_setup(seed=99)
        ddp.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader = make_loader(kind, ds, ddp.module, seed + 1)  # the seed comes back from the state
        loader.load_state_dict(state["loader"])
        train(loader, ddp, opt, STEPS, log)
        save(out, f"{kind}_resumed", rank, {"log": log, "params": flat(ddp.parameters())})
    # a rank feeding NaN scores, updates gathered every 2 steps
    ddp, opt = ddp_setup()
    loader = make_loader("table", ds, ddp.module, 6, sync_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = train(loader, ddp, opt, 12, [], nan_rank=1)
        train(loader, ddp, opt, 13, log)  # the 13th update stays in each rank's buffer
    save(
        out,
        "nan",
        rank,
        {
            "log": log,
            "state": loader.state_dict(),
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        },
    )
    # killed run: checkpoints every CKPT_EVERY steps, rank 1 dies at step DIE_AT
    ddp, opt = ddp_setup()
    loader = make_loader("table", ds, ddp.module, 4, sync_every=2)
    train(loader, ddp, opt, STEPS, [], checkpoint=(out, CKPT_EVERY), die_at=DIE_AT)


def restart(rank, world, out):
    """Launch 2: restart both ranks from the last checkpoint, and an uninterrupted reference."""
    ds = dataset()
    ddp, opt = ddp_setup(wrap=AllReduce)
    loader = make_loader("table", ds, ddp.module, 4, sync_every=2)
    reference = train(loader, ddp, opt, STEPS, [])
    ref_params = flat(ddp.parameters())
    state = torch.load(Path(out, f"ckpt_rank{rank}.pt"), weights_only=True)
    ddp, opt = ddp_setup(seed=42, wrap=AllReduce)
    ddp.module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    loader = make_loader("table", ds, ddp.module, 4, sync_every=2)
    loader.load_state_dict(state["loader"])
    log = train(loader, ddp, opt, STEPS - state["step"], [])
    save(
        out,
        "restart",
        rank,
        {
            "reference": reference,
            "log": log,
            "step": state["step"],
            "params": flat(ddp.parameters()),
            "ref_params": ref_params,
        },
    )


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # rank 1 dies; the launcher reports it (or rank 0's broken collective, whichever it sees first)
    with pytest.raises(
        (torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException)
    ):
        run_distributed(scenarios, WORLD, (str(out),))
    assert (out / "died").exists() and (out / "ckpt_rank0.pt").exists() and (out / "ckpt_rank1.pt").exists()
    run_distributed(restart, WORLD, (str(out),))

    def load(name):
        return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]

    return load


def same_logs(a, b, keys=("indices", "weights", "grads", "before")):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in keys:
            assert torch.equal(x[key], y[key]), f"{key} differ at step {step}"


# ---------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_table_ddp_tables_identical_shards_cover_global_batch_gradient_matches(records):
    ranks = records("table_full")
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])  # bit-identical score tables
    assert int((ranks[0]["table"] > 0).sum()) > 2 * B * 5
    # single-process reference: one sampler of batch WORLD x B, same seed, same training
    model, opt = model_and_opt()
    ds = dataset()
    loader = ImportanceDataLoader(ds, TableSampler(N, WORLD * B, seed=5, power=0.5))
    single = train(loader, model, opt, STEPS, [])
    x, y = ds.tensors
    for step in range(STEPS):
        shards = [r["log"][step] for r in ranks]
        glob = torch.cat([s["indices"] for s in shards])
        weights = torch.cat([s["weights"] for s in shards])
        # disjoint positions of one global draw, covering it: rank r holds positions [r B, (r+1) B)
        assert torch.equal(glob, single[step]["indices"]) and torch.equal(weights, single[step]["weights"])
        # the averaged DDP gradient is the weighted gradient of the global batch
        torch.testing.assert_close(shards[0]["grads"], shards[1]["grads"], rtol=0, atol=0)
        ref, _ = model_and_opt()
        torch.nn.utils.vector_to_parameters(shards[0]["before"], ref.parameters())
        (weights * CE(ref(x[glob]), y[glob])).mean().backward()
        torch.testing.assert_close(
            shards[0]["grads"], flat(p.grad for p in ref.parameters()), rtol=1e-12, atol=1e-14
        )
    torch.testing.assert_close(ranks[0]["params"], flat(model.parameters()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loader.sampler.state_dict()["table"], ranks[0]["table"], rtol=1e-10, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["table", "pool"])
def test_ddp_resume_is_bit_identical(records, kind):
    full, resumed = records(f"{kind}_full"), records(f"{kind}_resumed")
    for rank in range(WORLD):
        same_logs(full[rank]["log"], resumed[rank]["log"])
        assert torch.equal(full[rank]["params"], resumed[rank]["params"])


@pytest.mark.slow
def test_pool_ddp_ranks_read_their_own_pools_and_switch_together(records):
    ranks = records("pool_full")
    h0, h1 = ranks[0]["tau_history"], ranks[1]["tau_history"]
    assert [e["ema"] for e in h0] == [e["ema"] for e in h1] and [e["on"] for e in h0] == [e["on"] for e in h1]
    assert [e["tau"] for e in h0] != [e["tau"] for e in h1]  # different pools, one shared switch
    for e0, e1 in zip(h0, h1, strict=True):
        assert e0["tau_global"] == pytest.approx((e0["tau"] + e1["tau"]) / 2, rel=1e-12)
    pool = 2 * B
    for step in range(STEPS):  # pools of one step are disjoint slices of one permutation, so are batches
        a, b = (set(r["log"][step]["indices"].tolist()) for r in ranks)
        lo = (step % 7) * WORLD * pool  # global stream position of this step's first pool
        if lo // N == (lo + WORLD * pool - 1) // N:  # both pools inside one permutation
            assert not a & b, f"step {step}"


@pytest.mark.slow
def test_nan_scores_on_one_rank_do_not_desynchronise_tables(records):
    ranks = records("nan")
    s0, s1 = ranks[0]["state"]["sampler"], ranks[1]["state"]["sampler"]
    assert torch.equal(s0["table"], s1["table"]) and torch.equal(s0["visited"], s1["visited"])
    assert bool(torch.isfinite(s0["table"]).all())
    # both ranks warned about the same dropped entries (one per step of rank 1, gathered every 2 steps)
    assert ranks[0]["warnings"] == ranks[1]["warnings"] and len(ranks[0]["warnings"]) == 6
    assert all("skipped 2 NaN" in w for w in ranks[0]["warnings"])
    # the table is the single-process replay of the gathered updates (rank 0's two steps, then
    # rank 1's) minus the NaN entries
    replay = TableSampler(N, WORLD * B, seed=6, power=0.5)
    for step in range(0, 12, 2):
        idx = torch.cat([r["log"][s]["indices"] for r in ranks for s in (step, step + 1)])
        val = torch.cat([r["log"][s]["scores"] for r in ranks for s in (step, step + 1)])
        keep = torch.isfinite(val)
        replay.update(idx[keep], val[keep])
    assert torch.equal(replay.state_dict()["table"], s0["table"])
    # the 13th step's updates wait in each rank's own buffer
    assert len(s0["unsynced"]) == len(s1["unsynced"]) == 1
    assert torch.equal(s1["unsynced"][0][0], ranks[1]["log"][12]["indices"])
    with pytest.raises(ValueError, match="holds unsynchronised updates"):
        TableSampler(N, B, seed=6, power=0.5, num_replicas=2, rank=0).load_state_dict(s1)


@pytest.mark.slow
def test_killed_rank_resumes_from_checkpoint(records):
    ranks = records("restart")
    for rank in range(WORLD):
        r = ranks[rank]
        assert r["step"] == CKPT_EVERY
        same_logs(r["reference"][r["step"] :], r["log"])
        assert torch.equal(r["params"], r["ref_params"])


# ---------------------------------------------------------------- single process, explicit replicas


def test_world_resolution_and_bad_input():
    s = TableSampler(10, 2, seed=0)
    assert (s.num_replicas, s.rank, s.global_batch_size) == (1, 0, 2)
    with pytest.raises(ValueError, match="'rank' parameter of TableSampler must be an int in \\[0, 1\\]"):
        TableSampler(10, 2, seed=0, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="'num_replicas' parameter of PoolLoader"):
        PoolLoader(dataset(), make_mlp().double(), UpperBoundScorer(CE), 2, num_replicas=True)
    with pytest.raises(ValueError, match="'sync_every' parameter of TableSampler"):
        TableSampler(10, 2, seed=0, sync_every=0)
    with pytest.raises(ValueError, match="needs a 'seed' shared by every rank"):
        TableSampler(10, 2, num_replicas=2, rank=0)
    explicit = TableSampler(10, 2, seed=0, num_replicas=2, rank=1)
    with pytest.raises(RuntimeError, match="not initialised"):
        explicit.update(torch.tensor([1]), torch.tensor([1.0]))


def test_table_shards_are_the_halves_of_the_single_process_global_batch():
    single = TableSampler(50, 8, seed=3, power=0.5)
    single.update(torch.arange(50), torch.linspace(0.1, 3.0, 50))
    state = single.state_dict()
    shards = []
    for rank in range(2):
        s = TableSampler(50, 4, seed=3, power=0.5, num_replicas=2, rank=rank)
        s.load_state_dict({**state, "batch_size": 4, "num_replicas": 2})
        assert len(s) == len(single) == 7  # ceil(50 / 8) steps per epoch on every rank
        shards.append(list(s))
    for step, batch in enumerate(single):
        assert shards[0][step] + shards[1][step] == batch


def test_pool_ranks_read_disjoint_chunks_of_one_stream():
    """presample 1 and the switch off: a batch is its whole pool, so pools are visible."""
    ds = dataset()
    model = make_mlp().double()

    def pools(**kw):
        loader = PoolLoader(
            ds, model, UpperBoundScorer(CE), 5, presample=1.0, seed=2, tau_threshold=1e9, **kw
        )
        return [sorted(batch.indices.tolist()) for batch in loader]

    single = pools(num_batches=8)  # 8 pools of 5 = one permutation of the 40 examples
    ranks = [pools(num_replicas=2, rank=r) for r in range(2)]  # 4 steps each
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [p for step in zip(*ranks, strict=True) for p in step] == single  # chunk s R + r
    assert sorted(i for p in single for i in p) == list(range(N))


def test_pool_rank_average_is_unbiased():
    """Average over ranks of the weighted linear-regression gradient vs the full gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    G = 2 * (x @ w - y)[:, None] * x

    def scorer(model, inputs, targets):
        return inputs.abs().sum(1).float() + 0.1

    ds = torch.utils.data.TensorDataset(x, y)
    per_rank = []
    for rank in range(2):
        loader = PoolLoader(
            ds,
            nn.Linear(3, 1),
            scorer,
            4,
            presample=2.5,
            always=True,
            seed=1,
            num_batches=700,
            num_replicas=2,
            rank=rank,
        )
        per_rank.append(
            np.array([(b.weights.double()[:, None] * G[b.indices]).mean(0).numpy() for b in loader])
        )
    est = (per_rank[0] + per_rank[1]) / 2
    se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
    z = np.abs(est.mean(0) - G.mean(0).numpy()) / se
    assert z.max() < 4.5, z


def test_other_world_size_is_refused_with_a_clear_error():
    s = TableSampler(20, 2, seed=0, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas=2; this sampler has num_replicas=1.*re-shard"):
        TableSampler(20, 2, seed=0).load_state_dict(s.state_dict())
    ds = dataset()
    pool = PoolLoader(ds, make_mlp().double(), UpperBoundScorer(CE), 2, seed=0, num_replicas=2, rank=1)
    other = PoolLoader(
        ds, make_mlp().double(), UpperBoundScorer(CE), 2, seed=0, num_batches=10, num_replicas=4
    )
    with pytest.raises(ValueError, match="num_replicas=2, but this loader has num_replicas=4"):
        other.load_state_dict(pool.state_dict())
    same_world = PoolLoader(ds, make_mlp().double(), UpperBoundScorer(CE), 2, seed=5, num_replicas=2, rank=0)
    same_world.load_state_dict(pool.state_dict())  # another rank's state: only the tau history differs
    assert same_world.seed == 0 and same_world.rank == 0
