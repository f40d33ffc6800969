"""isample.DataLoader, the one entry point for every scheme (issue 14 items 1-2, issue 13 classes 1, 10)."""

from __future__ import annotations

import difflib
import inspect
import textwrap

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import isample
from isample import schemes
from isample.schemes.objects import SCHEME_OBJECTS

CE = nn.CrossEntropyLoss(reduction="none")
N, B = 40, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def data(n: int = N, with_index: bool = False) -> TensorDataset:
    x, y = make_classification(n)
    return TensorDataset(x, y, torch.arange(n)) if with_index else TensorDataset(x, y)


def extra_for(name: str) -> dict:
    if name == "rho-loss":
        return {"scheme": schemes.RhoLoss(holdout=TensorDataset(*make_classification(16, seed=5)))}
    return {"scheme": name}


def loader_for(name: str, ds=None, model=None, **options) -> isample.DataLoader:
    model = model if model is not None else make_mlp()
    ds = ds if ds is not None else data()
    return isample.DataLoader(ds, B, model=model, loss_fn=CE, seed=3, epochs=3, **extra_for(name), **options)


# ---------------------------------------------------------------- the drop-in claim
BEFORE = """
loader = torch.utils.data.DataLoader(train_set, batch_size=8, shuffle=True)
for epoch in range(2):
    for x, y in loader:
        losses = loss_fn(model(x), y)
        losses.mean().backward()
        optimizer.step(); optimizer.zero_grad()
"""

AFTER = """
loader = isample.DataLoader(train_set, batch_size=8, scheme=SCHEME, model=model, loss_fn=loss_fn, epochs=2)
for epoch in range(2):
    for x, y, w in loader:
        losses = loss_fn(model(x), y)
        (w * losses).mean().backward()
        optimizer.step(); optimizer.zero_grad()
        loader.update(losses.detach())
"""


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = list(difflib.ndiff(before.strip().splitlines(), after.strip().splitlines()))
    removed = [d[2:].strip() for d in diff if d.startswith("- ")]
    return removed, [d[2:].strip() for d in diff if d.startswith("+ ")]


def test_the_plain_loop_changes_by_the_loader_line_the_weights_and_one_update_call():
    removed, added = changed_lines(BEFORE, AFTER)
    assert removed == [
        "loader = torch.utils.data.DataLoader(train_set, batch_size=8, shuffle=True)",
        "for x, y in loader:",
        "losses.mean().backward()",
    ]
    assert added == [
        "loader = isample.DataLoader(train_set, batch_size=8, scheme=SCHEME, model=model, loss_fn=loss_fn, "
        "epochs=2)",
        "for x, y, w in loader:",
        "(w * losses).mean().backward()",
        "loader.update(losses.detach())",
    ]


@pytest.mark.parametrize("name", schemes.available())
def test_the_same_plain_loop_trains_with_torch_and_with_every_scheme(name):
    """One loop text: with torch's DataLoader (BEFORE) and, changed as above, with every scheme."""
    train_set = data(48)
    results = {}
    for label, source, scheme in (("torch", BEFORE, None), ("isample", AFTER, extra_for(name)["scheme"])):
        model = make_mlp()
        first = CE(model(train_set.tensors[0]), train_set.tensors[1]).mean().item()
        namespace = {
            "torch": torch,
            "isample": isample,
            "train_set": train_set,
            "model": model,
            "loss_fn": CE,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.2),
            "SCHEME": scheme,
        }
        exec(textwrap.dedent(source), namespace)
        last = CE(model(train_set.tensors[0]), train_set.tensors[1]).mean().item()
        results[label] = (first, last)
        assert last < first, f"{label}: the training loss did not fall ({first:.3f} -> {last:.3f})"
    loader = namespace["loader"]
    assert isinstance(loader, isample.DataLoader) and loader.cost()["trained_examples"] > 0


# ---------------------------------------------------------------- batches
@pytest.mark.parametrize("name", schemes.available())
def test_third_field_is_kept_as_extras_and_unpacking_gives_three(name):
    model = make_mlp()
    loader = loader_for(name, ds=data(with_index=True), model=model)
    for batch in loader:
        x, y, w = batch  # unpacking never includes extras
        assert x is batch.inputs and y is batch.targets and w is batch.weights
        assert batch.extras is not None and len(batch.extras) == 1
        torch.testing.assert_close(batch.extras[0], batch.indices)  # the dataset's third field is its index
        losses = CE(model(x), y)
        (w * losses).mean().backward()
        model.zero_grad()
        loader.update(losses.detach())


def test_pairs_have_no_extras():
    batch = next(iter(loader_for("uniform")))
    assert batch.extras is None


@pytest.mark.parametrize("name", ["uniform", "history-is", "kf", "infobatch"])
def test_the_entry_point_yields_the_batches_of_schemes_build(name):
    ds, model = data(), make_mlp()
    a = isample.DataLoader(ds, B, name, model=model, loss_fn=CE, seed=7, epochs=2)
    b = schemes.build(name, ds, model, CE, B, seed=7, epochs=2)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.indices, y.indices)
        torch.testing.assert_close(x.weights, y.weights)


def test_uniform_needs_no_model_and_is_a_shuffled_loader_with_unit_weights():
    ds = data(with_index=True)
    loader = isample.DataLoader(ds, B, "uniform", seed=0)
    seen = torch.cat([b.indices for b in loader])
    assert sorted(seen.tolist()) == list(range(N))
    assert all(bool((b.weights == 1).all()) for b in loader)


def test_scheme_object_parameters_reach_the_loader():
    loader = isample.DataLoader(data(), B, schemes.HistoryIS(mixing=0.25), model=make_mlp(), loss_fn=CE)
    assert loader.loader.sampler.policy.mixing == 0.25
    scheme = schemes.KatharopoulosFleuret(presample=2.0)
    kf = isample.DataLoader(data(), B, scheme, model=make_mlp(), loss_fn=CE)
    assert kf.loader.pool.pool_size == 2 * B


def test_a_name_and_its_default_scheme_object_give_the_same_batches():
    ds, model = data(), make_mlp()
    by_name = isample.DataLoader(ds, B, "kf", model=model, loss_fn=CE, seed=1)
    by_object = isample.DataLoader(ds, B, schemes.KatharopoulosFleuret(), model=model, loss_fn=CE, seed=1)
    for a, b in zip(by_name, by_object, strict=True):
        torch.testing.assert_close(a.indices, b.indices)


# ---------------------------------------------------------------- update
def test_update_without_indices_feeds_the_last_yielded_batch():
    loader = loader_for("history-is")
    batch = next(iter(loader))
    scores = torch.linspace(0.5, 4.0, len(batch))
    loader.update(scores)
    table = loader.loader.sampler.scores()
    expected = dict(zip(batch.indices.tolist(), scores.tolist(), strict=True))  # last write wins
    assert table[list(expected)].tolist() == pytest.approx(list(expected.values()))
    assert int(torch.isfinite(table).sum()) == len(expected)  # nothing else was written


def test_update_with_indices_and_scores_still_works():
    loader = loader_for("history-is")
    loader.update(torch.tensor([0, 5]), torch.tensor([2.0, 3.0]))
    assert loader.loader.sampler.scores()[[0, 5]].tolist() == [2.0, 3.0]


def test_update_before_any_batch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no batch has been yielded"):
        loader_for("history-is").update(torch.ones(B))


@pytest.mark.parametrize("shape", [(B - 1,), (B, 1), (B, 3)])
def test_update_with_the_wrong_shape_is_a_clear_error(shape):
    loader = loader_for("history-is")
    next(iter(loader))
    with pytest.raises(ValueError, match=rf"shape \({B},\)"):
        loader.update(torch.ones(shape))


def test_update_with_three_arguments_is_a_type_error():
    loader = loader_for("uniform")
    with pytest.raises(TypeError, match="losses .for the last batch. or indices and scores"):
        loader.update(1, 2, 3)


def test_upper_bound_history_needs_the_outputs():
    model = make_mlp()
    loader = isample.DataLoader(data(), B, schemes.HistoryIS(score="upper_bound"), model=model, loss_fn=CE)
    x, y, w = next(iter(loader))
    out = model(x)
    with pytest.raises(ValueError, match="outputs=out.detach"):
        loader.update(CE(out, y).detach())
    loader.update(CE(out, y).detach(), outputs=out.detach())
    assert torch.isfinite(loader.loader.sampler.scores()[loader.last_batch.indices]).all()


# ---------------------------------------------------------------- options, validated in one place
@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"prefetch_factor": 0, "num_workers": 1}, ValueError, "'prefetch_factor' parameter of isample"),
        ({"prefetch_factor": 2}, ValueError, "prefetch_factor.*needs worker processes"),
        ({"persistent_workers": True}, ValueError, "persistent_workers.*needs worker processes"),
        ({"multiprocessing_context": "spawn"}, ValueError, "needs worker processes"),
        ({"num_workers": -1}, ValueError, "'num_workers' parameter of isample.DataLoader must be an int >="),
        ({"num_workers": 1.5}, TypeError, "'num_workers'"),
        ({"num_workers": True}, TypeError, "'num_workers'"),
        ({"pin_memory": "yes"}, TypeError, "'pin_memory' parameter of isample.DataLoader must be a bool"),
        ({"collate_fn": 3}, TypeError, "'collate_fn'"),
        ({"worker_init_fn": "f"}, TypeError, "'worker_init_fn'"),
        ({"timeout": -1}, ValueError, "'timeout'"),
        ({"timeout": "1"}, TypeError, "'timeout'"),
        ({"multiprocessing_context": "nope", "num_workers": 1}, ValueError, "multiprocessing_context"),
        ({"shuffle": True}, TypeError, "the scheme decides the order"),
        ({"sampler": [0, 1]}, TypeError, "the scheme draws the examples"),
        ({"batch_sampler": [[0, 1]]}, TypeError, "docs/distributed.md"),
        ({"generator": torch.Generator()}, TypeError, "seed="),
        ({"pin_memory_device": "cuda"}, TypeError, "does not support"),
        ({"num_wokers": 2}, TypeError, "unknown option 'num_wokers'.*num_workers"),
        ({"drop_last": 1}, TypeError, "'drop_last'"),
    ],
)
def test_bad_dataloader_options_are_clear_errors(options, error, match):
    for name in ("uniform", "history-is", "kf"):
        with pytest.raises(error, match=match):
            loader_for(name, **options)


def test_iterable_dataset_with_len_gets_a_clear_error():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(10)

        def __len__(self):
            return 10

    with pytest.raises(TypeError, match="IterableDataset.*draws examples by index"):
        isample.DataLoader(Stream(), 4, "uniform")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scheme": "history-is", "model": None}, TypeError, "needs model"),
        ({"scheme": "kf", "loss_fn": None}, TypeError, "needs loss_fn"),
        ({"scheme": "nope"}, ValueError, "Unknown scheme 'nope'. Available:"),
        ({"scheme": 3}, TypeError, "'scheme' parameter of isample.DataLoader"),
        ({"scheme": schemes.HistoryIS}, TypeError, "call it: scheme=HistoryIS()"),
        ({"scheme": "uniform", "num_batches": 3}, TypeError, "does not take the 'num_batches'"),
        ({"scheme": "history-is", "batch_size": 0}, ValueError, "'batch_size'"),
        ({"scheme": "history-is", "seed": -1}, ValueError, "'seed'"),
    ],
)
def test_bad_entry_point_arguments_are_clear_errors(kwargs, error, match):
    args = {"model": make_mlp(), "loss_fn": CE, "batch_size": B, **kwargs}
    with pytest.raises(error, match=match):
        isample.DataLoader(data(), **args)


def test_dataloader_options_pass_through_to_the_workers():
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.utils.data.default_collate(items)

    for name in ("uniform", "history-is", "kf", "selective-backprop"):
        calls.clear()
        loader = loader_for(name, collate_fn=collate)
        next(iter(loader))
        assert calls, f"{name}: collate_fn was not used"


def test_workers_give_the_same_uniform_batches():
    a = [b.indices for b in loader_for("uniform")]
    b = [b.indices for b in loader_for("uniform", num_workers=1, prefetch_factor=1, persistent_workers=True)]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_loader_level_options_reach_the_scheme():
    loader = loader_for("history-is", num_batches=2)
    assert len(loader) == 2
    dropped = isample.DataLoader(data(N + 3), B, "uniform", seed=0, drop_last=True)
    assert len(dropped) == (N + 3) // B and all(len(b) == B for b in dropped)


# ---------------------------------------------------------------- scheme objects
@pytest.mark.parametrize("name", schemes.available())
def test_scheme_objects_have_the_loaders_defaults_and_at_most_ten_parameters(name):
    cls = SCHEME_OBJECTS[name]
    params = inspect.signature(cls).parameters
    assert len(params) <= 10
    own = schemes.scheme_parameters(name)
    for key, p in params.items():
        assert key in own, f"{cls.__name__}.{key} is not a parameter of the loader"
        assert p.default == own[key] or (p.default is None and own[key] is None), key
    left_out = set(own) - set(params)
    # kf's replacement and score_when_off (False: Algorithm 1) stay reachable through build()
    assert left_out <= {"replacement", "score_when_off"}, left_out
    assert cls().params == {k: own[k] for k in params}


def test_scheme_object_repr_and_equality():
    assert repr(schemes.HistoryIS(mixing=0.2)) == "HistoryIS(mixing=0.2)"
    assert schemes.HistoryIS(mixing=0.2) == schemes.HistoryIS(mixing=0.2)
    assert schemes.HistoryIS() != schemes.HistoryIS(mixing=0.2)
    assert schemes.HistoryIS().describe()["name"] == "history-is"
    with pytest.raises(TypeError):
        schemes.HistoryIS(num_workers=2)  # a loader option, not a scheme parameter
    with pytest.raises(TypeError, match="base class"):
        schemes.Scheme()


# ---------------------------------------------------------------- the epoch cursor (issue 13, class 1)
# Every scheme: the first live iterator continues from the resume point and moves it; another
# iterator made meanwhile yields a whole epoch of its own (TableSampler / PoolLoader /
# SchemeLoader implement the same rule).


def lengths(loader, epochs):
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append(sum(1 for _ in loader))
    return out


NO_FEEDBACK = pytest.mark.filterwarnings(
    "ignore:InfoBatch received no loss feedback:RuntimeWarning",
    "ignore::isample.switch.ImportanceSamplingOffWarning",  # pools scored for 3 epochs without switching on
)


@NO_FEEDBACK
@pytest.mark.parametrize("name", [n for n in schemes.available() if n != "selective-backprop"])
def test_set_epoch_mid_epoch_never_truncates_the_next_epoch(name):
    loader = loader_for(name)
    full = len(loader)
    it = iter(loader)
    next(it), next(it)
    loader.set_epoch(1)  # mid-epoch; the live iterator finishes its own epoch
    rest = sum(1 for _ in it)
    assert rest == full - 2
    full = len(loader)
    assert sum(1 for _ in loader) == full  # epoch 1, whole


@NO_FEEDBACK
@pytest.mark.parametrize("name", [n for n in schemes.available() if n != "selective-backprop"])
def test_two_live_iterators_never_truncate_an_epoch(name):
    loader = loader_for(name)
    full = len(loader)
    first = iter(loader)
    next(first)
    second = sum(1 for _ in loader)  # e.g. checking the sampler during training
    assert second == full
    assert sum(1 for _ in first) + 1 == full  # the first iterator finishes its own epoch
    loader.set_epoch(1)
    full = len(loader)
    assert sum(1 for _ in loader) == full


@NO_FEEDBACK
@pytest.mark.parametrize("name", schemes.available())
def test_set_epoch_to_the_current_epoch_keeps_the_position(name):
    loader = loader_for(name)
    full = len(loader)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    loader.set_epoch(0)  # Lightning does this on resume
    assert sum(1 for _ in loader) == full - 2


def test_selective_backprop_refuses_a_second_live_iterator_clearly():
    loader = loader_for("selective-backprop")
    first = iter(loader)
    next(first)
    with pytest.raises(RuntimeError, match="one live iterator at a time"):
        next(iter(loader))
    loader.set_epoch(1)
    with pytest.raises(RuntimeError, match="detached by set_epoch"):
        next(first)


def test_a_resumed_uniform_loader_continues_mid_epoch():
    a = loader_for("uniform")
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    rest = [b.indices for b in it]
    b = loader_for("uniform")
    b.load_state_dict(state)
    b.set_epoch(0)  # as Lightning does on resume
    for x, y in zip(rest, [batch.indices for batch in b], strict=True):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["uniform", "history-is", "kf"])
def test_batches_are_on_the_models_device(name):
    model = make_mlp().cuda()
    loader = loader_for(name, model=model, pin_memory=True)
    batch = next(iter(loader))
    assert batch.inputs.is_cuda and batch.targets.is_cuda and batch.weights.is_cuda


def test_recorder_fed_scheme_gets_its_norms_from_the_plain_loop():
    """history-gradnorm records the training backward with no step_context in the loop."""
    model = make_mlp()
    loader = loader_for("history-gradnorm", model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y, w in loader:
        losses = CE(model(x), y)
        (w * losses).mean().backward()
        opt.step()
        opt.zero_grad()
        loader.update(losses.detach())
        scores = loader.loader.sampler.scores()[loader.last_batch.indices]
        assert torch.isfinite(scores).all() and (scores > 0).all()
        # the recorded norms, not the losses, were written
        assert not torch.allclose(scores.float(), losses.detach())


def test_update_after_a_skipped_backward_names_the_missing_step():
    loader = loader_for("history-gradnorm")
    x, y, w = next(iter(loader))
    with pytest.raises(RuntimeError, match="no recorded norms.*forward and backward before update"):
        loader.update(torch.ones(len(x)))  # no forward / backward ran for this batch


def test_a_registry_name_without_its_own_class_still_builds():
    """A scheme registered later (no class in isample.schemes.objects) works by name."""
    from isample.schemes.objects import _Registered

    scheme = _Registered("kf", presample=2.0)
    loader = isample.DataLoader(data(), B, scheme, model=make_mlp(), loss_fn=CE, seed=0)
    assert loader.loader.pool.pool_size == 2 * B
    assert repr(scheme) == "scheme_object('kf', presample=2.0)"
    with pytest.raises(TypeError, match="has no parameter 'nope'"):
        _Registered("kf", nope=1)


@pytest.mark.parametrize("name", ["history-is", "kf", "infobatch"])
def test_state_dict_through_the_entry_point_resumes_mid_epoch_exactly(name):
    def run(loader, model, batches):
        out = []
        for x, y, w in loader:
            losses = CE(model(x), y)
            loader.update(losses.detach())
            out.append((loader.last_batch.indices.clone(), w.clone()))
            if len(out) == batches:
                break
        return out

    model = make_mlp()
    a = loader_for(name, model=model)
    run(a, model, 2)
    state = a.state_dict()
    rest_a = run(a, model, 100)
    b = loader_for(name, model=model)
    b.load_state_dict(state)
    b.set_epoch(b.epoch)  # what Lightning does on resume: must not reset the position
    rest_b = run(b, model, 100)
    assert len(rest_a) == len(rest_b) > 0
    for (ia, wa), (ib, wb) in zip(rest_a, rest_b, strict=True):
        torch.testing.assert_close(ia, ib)
        torch.testing.assert_close(wa, wb)
