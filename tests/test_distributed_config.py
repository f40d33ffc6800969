"""DDP configuration agreement: ranks that disagree fail fast, with the same message on every rank.

Before: only the seed was compared. Ranks with different dataset sizes or batch sizes ran
on silently and then failed with "Connection closed by peer" or an IndexError on one
rank, or hung until the process-group timeout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer
from isample.distributed import check_configuration, configuration
from isample.testing import run_distributed

CE = nn.CrossEntropyLoss(reduction="none")
WORLD = 2


def _ds(n):
    x, y = make_classification(n)
    return torch.utils.data.TensorDataset(x, y)


def _table(rank, n=(40, 40), b=(3, 3), **kw):
    return ImportanceDataLoader(_ds(n[rank]), TableSampler(n[rank], b[rank], seed=3, **kw))


def _pool(rank, n=(40, 40), b=(3, 3), presample=(2.0, 2.0)):
    model = make_mlp()
    return PoolLoader(_ds(n[rank]), model, UpperBoundScorer(CE), b[rank], presample=presample[rank], seed=3)


# name -> (factory, keyword arguments per rank); every one disagrees on something
DISAGREEING = {
    "table-N": (_table, {"n": (40, 44)}),
    "table-b": (_table, {"b": (3, 4)}),
    "table-drop_last": (_table, {"drop_last": None}),
    "pool-N": (_pool, {"n": (40, 44)}),
    "pool-b": (_pool, {"b": (3, 4)}),
    "pool-presample": (_pool, {"presample": (2.0, 3.0)}),
}


def _first_batch_error(factory, rank, kw):
    if kw.get("drop_last", 0) is None:
        kw = {"drop_last": rank == 1}
    loader = factory(rank, **kw)
    try:
        next(iter(loader))
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def scenarios(rank, world, out):
    record = {}
    start = time.perf_counter()
    for name, (factory, kw) in DISAGREEING.items():
        record[name] = _first_batch_error(factory, rank, dict(kw))
    # agreeing ranks train two epochs (the check runs at every epoch start, no false alarm)
    loader = _table(rank)
    batches = [b for _ in range(2) for b in loader]
    record["agree-table"] = len(batches)
    pool = _pool(rank)
    record["agree-pool"] = sum(1 for _ in pool)
    # rank 1 skips the update of step 2: the next gather pairs steps 2 and 3 and fails on both ranks
    loader = _table(rank)
    try:
        for step, batch in enumerate(loader, start=1):
            if not (rank == 1 and step == 2):
                loader.update(batch.indices, torch.ones(len(batch.indices)))
        record["uneven"] = None
    except RuntimeError as err:
        record["uneven"] = f"RuntimeError: {err}"
    record["seconds"] = time.perf_counter() - start
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_config")
    run_distributed(scenarios, WORLD, (str(out),), timeout=60.0)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(DISAGREEING))
def test_disagreeing_ranks_fail_with_the_same_message(records, name):
    r0, r1 = records[0][name], records[1][name]
    assert r0 is not None and r0 == r1, (r0, r1)
    assert r0.startswith("ValueError: ") and "configured differently across the 2 ranks" in r0


def test_the_message_names_the_key_and_the_values_per_rank(records):
    assert "'num_samples' is [40, 44]" in records[0]["table-N"]
    assert "'batch_size' is [3, 4]" in records[0]["table-b"]
    assert "'num_batches' is [7, 5]" in records[0]["table-b"]  # ceil(40 / (2 x 3)) vs ceil(40 / (2 x 4))
    assert "'drop_last' is [False, True]" in records[0]["table-drop_last"]
    assert "'num_samples' is [40, 44]" in records[0]["pool-N"]
    assert "'presample' is [2.0, 3.0]" in records[0]["pool-presample"]
    assert "'pool_size' is [6, 9]" in records[0]["pool-presample"]


def test_agreeing_ranks_train_and_everything_ends_within_seconds(records):
    for rec in records:
        assert rec["agree-table"] == 2 * 7 and rec["agree-pool"] == 7
        assert rec["seconds"] < 30.0  # the process-group timeout is 60 s: nobody waited for it


def test_a_rank_that_skips_an_update_is_detected_on_every_rank(records):
    r0, r1 = records[0]["uneven"], records[1]["uneven"]
    assert r0 is not None and r0 == r1
    assert "out of step" in r0 and "[2, 3]" in r0


def test_configuration_is_plain_and_skips_the_rank():
    sampler = TableSampler(40, 3, seed=3, num_replicas=2, rank=1)
    config = configuration(sampler)
    assert "rank" not in config and config["num_samples"] == 40 and config["num_replicas"] == 2
    assert config["policy.power"] == 1.0 and config["seed"] == 3
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in config.values())
    check_configuration(sampler, "TableSampler")  # no process group: a no-op
