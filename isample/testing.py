"""Conformance checks for importance-sampling loaders, and a launcher for multi-process tests.

:func:`check_sampler` runs a list of named checks against a loader factory, in the
spirit of scikit-learn's common estimator checks; :func:`sampler_checks` yields the same
checks as ``(name, check)`` pairs for ``pytest.mark.parametrize``. Every built-in loader
passes them; run them on your own sampler::

    from isample.testing import check_sampler

    def make_loader(dataset, *, batch_size, seed, **options):
        return ImportanceDataLoader(dataset, TableSampler(len(dataset), batch_size, seed=seed,
                                    drop_last=options.pop("drop_last", False)), **options)

    check_sampler(make_loader, dataset)

The factory contract: ``make_loader(dataset, *, batch_size, seed, **options)`` returns an
iterable of :class:`~isample.WeightedBatch` with ``len()`` and ``set_epoch(epoch)``
(``update(indices, scores)``, ``state_dict()`` and ``load_state_dict()`` are checked
when present). ``options`` is a subset of ``num_workers``, ``pin_memory``,
``persistent_workers``, ``drop_last``, ``collate_fn`` and ``multiprocessing_context``,
with the meaning they have for ``torch.utils.data.DataLoader``. The dataset yields
``(input, target)`` pairs of tensors; the dict check turns them into
``{"input_ids": input, "labels": target}``, so a model scoring pools must accept
``model(input_ids=...)`` (dict inputs are passed as keyword arguments, see
:class:`isample.scorers.ModelCall`; or skip ``"dict_batches"``). ``drop_last=False`` means an epoch of
``ceil(N / batch_size)`` batches, ``drop_last=True`` ``N // batch_size`` full ones.

:func:`run_distributed` starts ``world_size`` processes with an initialised process group
(gloo on 127.0.0.1 by default), for tests of distributed training.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, default_collate

from .batch import WeightedBatch, split_batch

__all__ = ["CHECKS", "check_sampler", "run_distributed", "sampler_checks"]

#: Names of the checks, in the order :func:`check_sampler` runs them.
CHECKS = (
    "batches",
    "len",
    "indices_in_range",
    "weights_finite_positive",
    "rows_match_dataset",
    "deterministic",
    "set_epoch",
    "exhausted_stays_exhausted",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "drop_last",
    "tuple_batches",
    "dict_batches",
    "custom_collate",
    "pickle_spawn",
    "state_dict_resume",
)


# ---------------------------------------------------------------------- picklable helpers
class _AsTuple(Dataset):
    """``dataset[i]`` as a plain tuple ``(input, target)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = _pair(self.dataset[i])
        return (x, y)


class _AsDict(Dataset):
    """``dataset[i]`` as ``{"input_ids": input, "labels": target}``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = _pair(self.dataset[i])
        return {"input_ids": x, "labels": y}


class _ScaledCollate:
    """A custom collate: default collate, inputs multiplied by ``scale``, as a list."""

    def __init__(self, scale: float = 2.0) -> None:
        self.scale = scale

    def __call__(self, items: list[Any]) -> list[Any]:
        x, y = split_batch(default_collate(items))
        return [x * self.scale, y]


def _pair(item: Any) -> tuple[Any, Any]:
    inputs, targets = split_batch(item)
    return inputs, targets


# ---------------------------------------------------------------------- helpers
def _batches(loader: Any, feedback: bool = False, limit: int | None = None) -> list[WeightedBatch]:
    """One pass over ``loader`` (CPU copies), feeding back deterministic scores if asked."""
    out = []
    for batch in loader:
        cpu = _cpu(batch)
        out.append(cpu)
        if feedback and hasattr(loader, "update"):
            loader.update(cpu.indices, _scores(cpu.indices, len(out)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _scores(indices: torch.Tensor, step: int) -> torch.Tensor:
    return (indices.double() * 0.37 + step) % 5.0 + 0.5


def _cpu(batch: Any) -> WeightedBatch:
    assert isinstance(batch, WeightedBatch), f"expected a WeightedBatch, got {type(batch).__name__}"
    return WeightedBatch(
        _to_cpu(batch.inputs), _to_cpu(batch.targets), batch.indices.cpu(), batch.weights.cpu()
    )


def _to_cpu(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu()
    if isinstance(data, Mapping):
        return {k: _to_cpu(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_to_cpu(v) for v in data) if not hasattr(data, "_fields") else data
    return data


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same_stream(a: list[WeightedBatch], b: list[WeightedBatch], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} batches against {len(b)}"
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x.indices, y.indices), f"{what}: indices differ at batch {step}"
        assert torch.equal(x.weights, y.weights), f"{what}: weights differ at batch {step}"
        assert _equal(x.inputs, y.inputs) and _equal(x.targets, y.targets), (
            f"{what}: rows differ at batch {step}"
        )


def _rows_match(batches: list[WeightedBatch], dataset: Dataset, collate: Callable, what: str) -> None:
    for step, batch in enumerate(batches):
        expected_x, expected_y = split_batch(collate([dataset[i] for i in batch.indices.tolist()]))
        assert _equal(batch.inputs, expected_x), f"{what}: inputs of batch {step} are not dataset[indices]"
        assert _equal(batch.targets, expected_y), f"{what}: targets of batch {step} are not dataset[indices]"


def _default_collate(items: list[Any]) -> Any:
    return default_collate(items)


# ---------------------------------------------------------------------- the checks
def sampler_checks(
    make_loader: Callable[..., Any],
    dataset: Dataset,
    *,
    batch_size: int = 4,
    seed: int = 0,
) -> Iterator[tuple[str, Callable[[], None]]]:
    """Yield ``(name, check)`` pairs, one per entry of :data:`CHECKS`.

    Each ``check()`` takes no argument, returns None and raises ``AssertionError`` with
    a message when the loader breaks the contract. For pytest::

        @pytest.mark.parametrize("name, check", list(sampler_checks(make_loader, ds)))
        def test_contract(name, check):
            check()

    Args:
        make_loader: the factory described in the module docstring.
        dataset: a map-style dataset of ``(input, target)`` tensor pairs (a dozen to a
            few dozen examples keeps the checks fast).
        batch_size: b passed to the factory.
        seed: seed passed to the factory (``seed + 1`` for the different-seed check).

    Yields:
        ``(str, callable)`` pairs.
    """
    n = len(dataset)  # type: ignore[arg-type]
    b = batch_size

    def build(data: Dataset = dataset, s: int = seed, **options: Any) -> Any:
        return make_loader(data, batch_size=b, seed=s, **options)

    def check_batches() -> None:
        for step, batch in enumerate(_batches(build())):
            k = batch.indices.shape[0]
            assert batch.indices.dtype == torch.long and batch.indices.dim() == 1, (
                f"indices of batch {step} must be a 1-D LongTensor, got {batch.indices.dtype} "
                f"{tuple(batch.indices.shape)}"
            )
            assert batch.weights.dtype == torch.float32 and batch.weights.shape == (k,), (
                f"weights of batch {step} must be float32 of shape ({k},), got {batch.weights.dtype} "
                f"{tuple(batch.weights.shape)}"
            )
            assert 1 <= k <= b, f"batch {step} has {k} rows; expected 1 to {b}"
            assert len(batch) == k

    def check_len() -> None:
        loader = build()
        for epoch in range(2):
            count = len(_batches(loader))
            assert count == len(loader), (
                f"pass {epoch} yielded {count} batches but len(loader) = {len(loader)}"
            )
            assert count > 0, "the loader yielded no batch"

    def check_indices_in_range() -> None:
        for step, batch in enumerate(_batches(build(), feedback=True)):
            assert int(batch.indices.min()) >= 0 and int(batch.indices.max()) < n, (
                f"batch {step} has indices outside [0, {n}): {batch.indices.tolist()}"
            )

    def check_weights_finite_positive() -> None:
        loader = build()
        for _ in range(2):
            for step, batch in enumerate(_batches(loader, feedback=True)):
                w = batch.weights
                assert bool(torch.isfinite(w).all()) and bool((w > 0).all()), (
                    f"batch {step} has non-finite or non-positive weights: {w.tolist()}"
                )

    def check_rows_match_dataset() -> None:
        _rows_match(_batches(build(), feedback=True), dataset, _default_collate, "default collate")

    def check_deterministic() -> None:
        runs = []
        for s in (seed, seed, seed + 1):
            loader = build(s=s)
            runs.append(_batches(loader, feedback=True) + _batches(loader, feedback=True))
        _same_stream(runs[0], runs[1], "two loaders with the same seed")
        differs = any(
            not torch.equal(x.indices, y.indices) for x, y in zip(runs[0], runs[2], strict=False)
        ) or len(runs[0]) != len(runs[2])
        assert differs, f"seeds {seed} and {seed + 1} gave identical batches"

    def check_set_epoch() -> None:
        a = build()
        a.set_epoch(1)
        first = _batches(a)
        b_ = build()
        b_.set_epoch(0)
        zero = _batches(b_)
        b_.set_epoch(1)
        again = _batches(b_)
        _same_stream(first, again, "set_epoch(1) on two loaders")
        assert any(not torch.equal(x.indices, y.indices) for x, y in zip(zero, first, strict=False)), (
            "set_epoch(0) and set_epoch(1) gave the same order"
        )

    def check_exhausted_stays_exhausted() -> None:
        loader = build()
        it = iter(loader)
        count = sum(1 for _ in it)
        assert count == len(loader)
        for _ in range(2):
            try:
                next(it)
            except StopIteration:
                continue
            raise AssertionError("an exhausted iterator yielded another batch")

    def check_num_workers() -> None:
        base = _batches(build(num_workers=0))
        _same_stream(base, _batches(build(num_workers=2)), "num_workers=2 against num_workers=0")

    def check_pin_memory() -> None:
        base = _batches(build())
        with warnings.catch_warnings():  # "pin_memory ... no accelerator": expected on a CPU-only machine
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            pinned = _batches(build(pin_memory=True))
        _same_stream(base, pinned, "pin_memory=True against pin_memory=False")

    def check_persistent_workers() -> None:
        base = build(num_workers=0)
        expected = _batches(base) + _batches(base)
        loader = build(num_workers=2, persistent_workers=True)
        got = _batches(loader) + _batches(loader)
        _same_stream(expected, got, "persistent workers (two epochs) against num_workers=0")

    def check_drop_last() -> None:
        m = n if n % b else n - 1
        subset = Subset(dataset, list(range(m)))
        if m < b:
            return
        dropping = build(subset, drop_last=True)
        full = _batches(dropping)
        assert len(dropping) == m // b == len(full), (
            f"drop_last=True on {m} examples: len {len(dropping)}, {len(full)} batches; expected {m // b}"
        )
        assert all(len(x) == b for x in full), "drop_last=True yielded a short batch"
        keeping = build(subset, drop_last=False)
        assert len(keeping) == math.ceil(m / b) == len(_batches(keeping)), (
            f"drop_last=False on {m} examples: expected {math.ceil(m / b)} batches, len {len(keeping)}"
        )

    def check_tuple_batches() -> None:
        data = _AsTuple(dataset)
        batches = _batches(build(data), feedback=True)
        assert all(isinstance(x.inputs, torch.Tensor) for x in batches), "tuple items must give tensor inputs"
        _rows_match(batches, data, _default_collate, "tuple items")

    def check_dict_batches() -> None:
        data = _AsDict(dataset)
        batches = _batches(build(data), feedback=True)
        for step, x in enumerate(batches):
            assert isinstance(x.inputs, Mapping) and "input_ids" in x.inputs, (
                f"dict items: batch {step} inputs should be a dict with 'input_ids', "
                f"got {type(x.inputs).__name__}"
            )
            assert "labels" not in x.inputs, "dict items: 'labels' must be split off as the targets"
        _rows_match(batches, data, _default_collate, "dict items")

    def check_custom_collate() -> None:
        collate = _ScaledCollate(2.0)
        batches = _batches(build(collate_fn=collate), feedback=True)
        _rows_match(batches, dataset, collate, "custom collate_fn")

    def check_pickle_spawn() -> None:
        base = _batches(build(), limit=2)
        pickle.dumps(_AsDict(dataset))  # the dataset itself must pickle for spawned workers
        spawned = _batches(build(num_workers=2, multiprocessing_context="spawn"), limit=2)
        _same_stream(base, spawned, "spawned workers against num_workers=0")

    def check_state_dict_resume() -> None:
        probe = build()
        if not (hasattr(probe, "state_dict") and hasattr(probe, "load_state_dict")):
            return
        steps = len(probe) + max(len(probe) // 2, 1)  # crosses an epoch boundary
        k = max(steps // 2, 1)

        def run(loader: Any, count: int, log: list[WeightedBatch]) -> None:
            it = iter(loader)
            while count:
                try:
                    batch = _cpu(next(it))
                except StopIteration:
                    it = iter(loader)
                    continue
                log.append(batch)
                if hasattr(loader, "update"):
                    loader.update(batch.indices, _scores(batch.indices, len(log)))
                count -= 1

        full: list[WeightedBatch] = []
        run(build(), steps, full)
        part: list[WeightedBatch] = []
        loader = build()
        run(loader, k, part)
        buf = io.BytesIO()
        torch.save(loader.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = build(s=seed + 1)  # the state must carry the seed
        resumed.load_state_dict(state)
        run(resumed, steps - k, part)
        _same_stream(full, part, f"resumed after {k} batches against an uninterrupted run")

    table = {
        "batches": check_batches,
        "len": check_len,
        "indices_in_range": check_indices_in_range,
        "weights_finite_positive": check_weights_finite_positive,
        "rows_match_dataset": check_rows_match_dataset,
        "deterministic": check_deterministic,
        "set_epoch": check_set_epoch,
        "exhausted_stays_exhausted": check_exhausted_stays_exhausted,
        "num_workers": check_num_workers,
        "pin_memory": check_pin_memory,
        "persistent_workers": check_persistent_workers,
        "drop_last": check_drop_last,
        "tuple_batches": check_tuple_batches,
        "dict_batches": check_dict_batches,
        "custom_collate": check_custom_collate,
        "pickle_spawn": check_pickle_spawn,
        "state_dict_resume": check_state_dict_resume,
    }
    for name in CHECKS:
        yield name, table[name]


def check_sampler(
    make_loader: Callable[..., Any],
    dataset: Dataset,
    *,
    batch_size: int = 4,
    seed: int = 0,
    skip: Sequence[str] = (),
) -> list[str]:
    """Run every check of :func:`sampler_checks` except those named in ``skip``.

    Args:
        make_loader, dataset, batch_size, seed: see :func:`sampler_checks`.
        skip: names from :data:`CHECKS` not to run (e.g. ``("pickle_spawn",)`` to save the
            seconds that starting spawned workers costs).

    Returns:
        The names of the checks that ran (all passed).

    Raises:
        AssertionError: ``"check '<name>' failed: <reason>"`` for the first failing check.
        ValueError: ``skip`` names an unknown check.
    """
    unknown = sorted(set(skip) - set(CHECKS))
    if unknown:
        raise ValueError(
            f"The 'skip' parameter of check_sampler names unknown checks {unknown}; known: {CHECKS}."
        )
    ran = []
    for name, check in sampler_checks(make_loader, dataset, batch_size=batch_size, seed=seed):
        if name in skip:
            continue
        try:
            check()
        except AssertionError as error:
            raise AssertionError(f"check '{name}' failed: {error}") from error
        except Exception as error:  # a crash is a failed check too, named the same way
            raise AssertionError(f"check '{name}' failed with {type(error).__name__}: {error}") from error
        ran.append(name)
    return ran


# ---------------------------------------------------------------------- multi-process
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _distributed_entry(
    rank: int, fn: Callable, world_size: int, port: int, backend: str, timeout: float, args: tuple
):
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., None],
    world_size: int = 2,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with a process group.

    Each process initialises the default group (``backend``, TCP rendezvous on a free
    port of 127.0.0.1, collective ``timeout`` in seconds), calls ``fn`` and destroys the
    group. ``fn`` must be importable (defined at module level) and ``args`` picklable.
    Results travel back through files (e.g. ``torch.save`` into a temporary folder).

    Raises:
        torch.multiprocessing.ProcessRaisedException: ``fn`` raised in a process.
        torch.multiprocessing.ProcessExitedException: a process died.
    """
    torch.multiprocessing.start_processes(
        _distributed_entry,
        args=(fn, world_size, free_port(), backend, timeout, tuple(args)),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
