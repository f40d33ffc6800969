"""``torch.distributed`` glue for the loaders: world resolution, shared seeds and update gathering.

Distribution is opt-in and explicit, as in ``torch.utils.data.DistributedSampler``:
``num_replicas`` and ``rank`` default to the initialised default process group (and to a
single process when none is initialised). Collectives run on the CPU with gloo and on
the current CUDA device with NCCL.

The score table of :class:`~isample.TableSampler` stays bit-identical on every rank
because every rank applies the same concatenation of every rank's updates, in rank
order: :func:`all_gather_updates` gathers the raw bits (float64 scores are carried as
int64 words, so NaN payloads and signed zeros survive) and every rank then filters and
applies them with the same code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ._validation import check_int, check_seed, param_error

__all__ = [
    "check_configuration",
    "configuration",
    "all_gather_floats",
    "all_gather_updates",
    "all_gather_variable",
    "comm_device",
    "is_initialized",
    "nanmean",
    "resolve_world",
    "shared_seed",
]


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and its default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_world(num_replicas: Any, rank: Any, owner: str) -> tuple[int, int]:
    """Resolve ``(num_replicas, rank)``, defaulting from the default process group.

    Args:
        num_replicas: number of processes sharing the work (int >= 1), or None for
            ``torch.distributed.get_world_size()`` (1 when not initialised).
        rank: this process's rank in ``[0, num_replicas)``, or None for
            ``torch.distributed.get_rank()`` (0 when not initialised).
        owner: the class named in error messages.

    Returns:
        ``(num_replicas, rank)`` as ints.

    Raises:
        TypeError, ValueError: a non-int value, or a rank outside ``[0, num_replicas)``.
    """
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if is_initialized() else 1
    world = check_int(num_replicas, "num_replicas", owner, minimum=1)
    if rank is None:
        rank = torch.distributed.get_rank() if is_initialized() and world > 1 else 0
    rank = check_int(rank, "rank", owner, minimum=0)
    if rank >= world:  # type: ignore[operator]
        raise param_error("rank", owner, f"an int in [0, {world - 1}] (num_replicas={world})", rank)
    return int(world), int(rank)  # type: ignore[arg-type]


def comm_device() -> torch.device:
    """The device collectives of the default group need: CUDA for NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_variable(tensor: torch.Tensor, tag: int | None = None) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths (one per rank) over the default group.

    The lengths are gathered first; every rank then pads its tensor to the longest one,
    the padded tensors are gathered, and each is cut back to its true length.

    Args:
        tensor: Tensor of shape (k_r,) on rank r (any dtype the backend supports; same
            dtype on every rank).
        tag: an int >= 0 that must be equal on every rank (e.g. the number of batches
            consumed), carried with the lengths at no extra cost; None on any rank skips
            the comparison. Ranks whose calls pair up with different tags are out of step.

    Returns:
        A list of ``world_size`` CPU tensors, entry r of shape (k_r,), identical on every rank.

    Raises:
        RuntimeError: the tags differ (the same message on every rank, before the data
            gather, so no rank is left waiting).
    """
    device = comm_device()
    local = tensor.reshape(-1).to(device)
    world = torch.distributed.get_world_size()
    size = torch.tensor([local.numel(), -1 if tag is None else int(tag)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    lengths = [int(s[0].item()) for s in sizes]
    tags = [int(s[1].item()) for s in sizes]
    if min(tags) >= 0 and len(set(tags)) > 1:
        raise RuntimeError(
            f"Ranks are out of step: this collective paired calls made after {tags} consumed batches "
            "(rank 0 first). Every rank must call update() once per training step, the same number "
            "of times; a rank that skips or adds a call desynchronises every later collective."
        )
    longest = max(max(lengths), 1)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return [o[:n].cpu() for o, n in zip(out, lengths, strict=True)]


def all_gather_updates(
    indices: np.ndarray, scores: np.ndarray, tag: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's ``(indices, scores)`` updates in rank order, bit-exactly.

    Indices (int64) and scores (float64, reinterpreted as int64 words) travel in one
    int64 tensor per rank, so one variable-length gather carries both and NaN/inf
    entries arrive unchanged (the caller filters them identically on every rank).

    Args:
        indices: int64 array of shape (k_r,) on rank r.
        scores: float64 array of shape (k_r,) on rank r.
        tag: the step count every rank must agree on (see :func:`all_gather_variable`).

    Returns:
        ``(indices, scores)``: int64 and float64 arrays of shape (sum_r k_r,), the same on
        every rank, rank 0's entries first.

    Raises:
        RuntimeError: the ranks' tags differ.
    """
    idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
    val = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float64)).view(torch.int64)
    parts = all_gather_variable(torch.cat([idx, val]), tag)
    all_idx, all_val = [], []
    for part in parts:
        half = part.numel() // 2
        all_idx.append(part[:half])
        all_val.append(part[half:].contiguous().view(torch.float64))
    return torch.cat(all_idx).numpy(), torch.cat(all_val).numpy()


def all_gather_floats(value: float) -> list[float]:
    """Every rank's ``value`` (a Python float, NaN allowed), in rank order."""
    device = comm_device()
    local = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, local)
    return [float(o.item()) for o in out]


def shared_seed(seed: Any, generator: Any, owner: str, num_replicas: int) -> int:
    """Resolve ``seed`` / ``generator`` into one seed that every rank shares.

    With one replica this is :func:`isample._validation.check_seed`. With several and an
    initialised process group, a missing seed is rank 0's fresh seed (broadcast), and a
    given seed is checked to be the same on every rank.

    Returns:
        int, a non-negative 63-bit seed, equal on every rank.

    Raises:
        ValueError: ranks passed different seeds, or several replicas without an
            initialised process group and without a seed.
    """
    explicit = seed is not None or generator is not None
    value = check_seed(seed, generator, owner)
    if num_replicas == 1:
        return value
    if not is_initialized():
        if not explicit:
            raise ValueError(
                f"{owner} with num_replicas={num_replicas} needs a 'seed' shared by every rank "
                "when torch.distributed is not initialised."
            )
        return value
    # float64 cannot hold 63-bit ints exactly: carry the seed as int64.
    device = comm_device()
    local = torch.tensor([value], dtype=torch.int64, device=device)
    if not explicit:
        torch.distributed.broadcast(local, src=0)
        return int(local.item())
    seeds = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(seeds, local)
    values = [int(s.item()) for s in seeds]
    if len(set(values)) > 1:
        raise ValueError(
            f"The 'seed' of {owner} differs across ranks ({values}); every rank must pass the same "
            "seed (or none, to share rank 0's)."
        )
    return value


_PLAIN = (bool, int, float, str, type(None))


def configuration(obj: Any, exclude: tuple[str, ...] = ("rank",)) -> dict[str, Any]:
    """The configuration of a loader as a flat dict of plain values, for comparison across ranks.

    Every public attribute holding a bool, int, float, str or None is taken (dataset size,
    batch size, number of batches, drop_last, seed, presample, smoothing, epoch, position,
    ...), and so is every such field of a dataclass attribute (e.g. ``policy.power``).
    Attributes named in ``exclude`` (the rank, which differs by design) are left out.

    Returns:
        dict from attribute name (``"policy.power"`` for a dataclass field) to value, sorted.
    """
    out: dict[str, Any] = {}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key in exclude:
            continue
        if isinstance(value, _PLAIN):
            out[key] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                inner = getattr(value, field.name)
                if isinstance(inner, _PLAIN):
                    out[f"{key}.{field.name}"] = inner
    return out


def check_configuration(obj: Any, owner: str) -> None:
    """Check that every rank built ``obj`` (a loader or sampler) with the same configuration.

    A no-op unless ``obj.num_replicas > 1`` and the default process group is initialised.
    One ``all_gather_object`` of :func:`configuration` (a few hundred bytes); every rank
    then compares the same gathered list, so every rank raises the same error, and none
    is left waiting in a later collective.

    Raises:
        ValueError: some entries differ; the message names each differing key and its
            value on every rank (rank 0 first).
    """
    if getattr(obj, "num_replicas", 1) <= 1 or not is_initialized():
        return
    world = torch.distributed.get_world_size()
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, configuration(obj))
    keys = sorted(set().union(*gathered))
    missing = "<missing>"
    differing = []
    for key in keys:
        values = [g.get(key, missing) for g in gathered]
        if len({repr(v) for v in values}) > 1:
            differing.append(f"'{key}' is {values}")
    if differing:
        raise ValueError(
            f"{owner} is configured differently across the {world} ranks (values listed rank 0 first): "
            + "; ".join(differing)
            + ". Every rank must build it from the same dataset with the same arguments."
        )


def nanmean(values: list[float]) -> float:
    """Mean of the finite entries of ``values`` (NaN when none is finite)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
