"""``TableSampler``: importance sampling from a table of one (stale) score per example.

The table holds the latest score of every example (typically its training loss, fed
back by the loop, so no extra forward pass). Each step draws b indices from the whole
dataset in O(b log N) with a sum tree, computes their weights at draw time, and yields
``(index, weight)`` pairs; :class:`ImportanceDataLoader` unpacks them inside the worker
so weights can never be mismatched with their rows by prefetching.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from . import distributed as _dist
from ._random import step_generator
from ._validation import check_choice, check_float, check_int, param_error
from .engine import SumTree
from .policies import ScorePolicy
from .staleness import AdaptiveMixing
from .weighting import NORMALIZATIONS, weights_array

__all__ = ["TableSampler"]


class TableSampler(Sampler[list[tuple[int, float]]]):
    """A batch sampler drawing b examples per step proportionally to a score table.

    .. math::

        p_i = \\frac{\\lambda}{N} + (1 - \\lambda)\\frac{t_i + c}{\\sum_j t_j + N c},
        \\quad t_i = s_i^{\\alpha}, \\qquad w_i = \\Big(\\frac{1}{N p_i}\\Big)^k

    (see :class:`isample.policies.ScorePolicy` for ``c``). Examples never updated
    ("unvisited") count with ``initial_score``; by default the running mean of the
    current scores of visited examples (1.0 before any update, i.e. uniform).

    Args:
        num_samples: N, the dataset size.
        batch_size: b, indices per batch.
        num_batches: batches per epoch (default ceil(N / b), floor with drop_last).
        drop_last: see ``num_batches``.
        initial_score: score of unvisited examples (>= 0), or None for the running mean.
        power, additive, relative: score smoothing (see :class:`ScorePolicy`).
        mixing: uniform mixing lambda in [0, 1] (weights <= 1 / lambda), or ``"auto"``
            (default) or an :class:`isample.staleness.AdaptiveMixing`: lambda re-chosen
            after every update from the measured staleness of the scores, between 1
            (uniform) and 0.1, so that a stale table is not worse than uniform.
        bias_exponent: k in [0, 1]; 1 = unbiased.
        max_weight: clip weights (None = no clipping).
        normalize: ``"none"``, ``"mean"`` or ``"max"`` (see :mod:`isample.weighting`).
        seed, generator: randomness source (one of them).
        delay: apply a score update only to draws at least ``delay`` steps after the
            step it was given at. :class:`ImportanceDataLoader` sets it to its prefetch
            depth so that the batches are identical for any number of workers.
        num_replicas: number of data-parallel processes (default: the world size of the
            initialised default process group, else 1). Every step draws one global
            batch of ``num_replicas x batch_size`` indices from the global distribution
            (shared seed); rank r takes positions ``[r b, (r + 1) b)``.
        rank: this process's rank (default: from ``torch.distributed``, else 0).
        sync_every: with several replicas, gather every rank's score updates every
            ``sync_every``-th call of :meth:`update` (a collective: every rank must call
            :meth:`update` equally often) and apply them in rank order on every rank,
            so the tables stay bit-identical. Default 1.

    Distributed estimator: the averaged DDP gradient of the rank shards is

    .. math::

        \\frac{1}{R}\\sum_{r=1}^{R} \\frac{1}{b}\\sum_{j \\in \\mathrm{shard}_r} w_{i_j} g_{i_j}
        = \\frac{1}{R b}\\sum_{j=1}^{R b} w_{i_j} g_{i_j},

    the single-process weighted gradient of the global batch, unbiased for the full
    gradient because the weights ``1 / (N p_i)`` use the global distribution.

    Yields:
        Lists of b ``(index, weight)`` pairs (int, float).

    Raises:
        ValueError: on negative scores or mismatched lengths in :meth:`update` (NaN and
            inf entries are skipped with a warning instead; with several replicas they
            are dropped after the gather, identically on every rank).
        IndexError: an updated index outside [0, N).

    Example:
        >>> sampler = TableSampler(len(ds), batch_size=64, seed=0)   # DDP: same call on every rank
        >>> loader = ImportanceDataLoader(ds, sampler)
    """

    STATE_VERSION = 2

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_batches: int | None = None,
        drop_last: bool = False,
        initial_score: float | None = None,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float | str | AdaptiveMixing = "auto",
        bias_exponent: float = 1.0,
        max_weight: float | None = None,
        normalize: str = "none",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        delay: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        sync_every: int = 1,
    ) -> None:
        owner = "TableSampler"
        self.num_samples = check_int(num_samples, "num_samples", owner, minimum=1)
        self.batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _dist.resolve_world(num_replicas, rank, owner)
        self.sync_every = check_int(sync_every, "sync_every", owner, minimum=1)
        step_size = self.batch_size * self.num_replicas
        default = self.num_samples // step_size if self.drop_last else math.ceil(self.num_samples / step_size)
        given = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True)
        self.num_batches = given or max(default, 1)
        self.initial_score = check_float(initial_score, "initial_score", owner, minimum=0.0, allow_none=True)
        self.mixer = None  # staleness-tuned mixing level (isample.staleness)
        if isinstance(mixing, str) and mixing != "auto":
            raise param_error("mixing", owner, "a float in [0, 1], 'auto' or an AdaptiveMixing", mixing)
        if isinstance(mixing, (str, AdaptiveMixing)):
            self.mixer, mixing = (AdaptiveMixing() if isinstance(mixing, str) else mixing), 0.0
        self.policy = ScorePolicy(power=power, additive=additive, relative=relative, mixing=mixing)
        self.bias_exponent = check_float(bias_exponent, "bias_exponent", owner, minimum=0.0, maximum=1.0)
        self.max_weight = check_float(
            max_weight, "max_weight", owner, minimum=0.0, min_inclusive=False, allow_none=True
        )
        self.normalize = check_choice(normalize, "normalize", owner, NORMALIZATIONS)
        self.seed = _dist.shared_seed(seed, generator, owner, self.num_replicas)
        self.delay = check_int(delay, "delay", owner, minimum=0)
        self._tree = SumTree(self.num_samples)
        # largest raw score whose transformed value keeps the float64 sum of N finite
        limit = math.log(np.finfo(np.float64).max / self.num_samples) / self.policy.power
        self._max_score = math.exp(limit) if limit < 709.0 else math.inf
        self._visited = np.zeros(self.num_samples, dtype=bool)
        self._num_visited = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch consumed by the training loop
        self._consumed = 0  # batches consumed over the sampler's life (tags of updates)
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        # pending updates already applied by a prefetched draw, with the values they replaced
        # (reverted in state_dict() while not yet due at the consumption point)
        self._applied: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._unsynced: list[tuple[np.ndarray, np.ndarray]] = []  # this rank's updates awaiting sync
        self._updates_since_sync = 0
        self._warned_zero = False
        self._tracked = False

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: draws are a pure function of (seed, epoch, step, table)."""
        self.epoch = check_int(epoch, "epoch", "TableSampler.set_epoch", minimum=0)
        self.position = 0

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        return self._iterate()

    def _iterate(self) -> Iterator[list[tuple[int, float]]]:
        epoch = self.epoch
        start = self.position
        global_base = self._consumed - start
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for step in range(start, self.num_batches):
            self._apply_pending(global_base + step - self.delay)
            indices, weights = self.draw(epoch, step)
            if not self._tracked:  # nobody calls advance(): a drawn batch counts as consumed
                self._count(1)
            yield list(zip(indices[lo:hi].tolist(), weights[lo:hi].tolist(), strict=True))

    def advance(self, batches: int = 1) -> None:
        """Tell the sampler that the training loop consumed ``batches`` more batches.

        :class:`ImportanceDataLoader` calls this; it keeps ``position`` (for resume) and
        the tags of delayed updates exact when batches are drawn ahead (prefetching).
        Without it, a batch counts as consumed when it is drawn (exact for
        ``torchdata``'s ``StatefulDataLoader`` and a single-process ``DataLoader``). The
        first call switches from counting draws to counting ``advance`` calls, so call
        ``advance(0)`` before the first draw when driving the sampler by hand.
        """
        if not self._tracked:  # first call: from now on only advance() moves the position
            self._tracked = True
        self._count(check_int(batches, "batches", "TableSampler.advance", minimum=0))

    def _count(self, batches: int) -> None:
        self._consumed += batches
        self.position += batches
        if self.position >= self.num_batches:
            self.epoch += 1
            self.position = 0
        horizon = self._consumed - self.delay
        while self._applied and self._applied[0][0] <= horizon:  # due for every later draw: keep
            self._applied.pop(0)

    # ------------------------------------------------------------------ draws
    @property
    def global_batch_size(self) -> int:
        """Indices per step over all replicas: ``num_replicas x batch_size``."""
        return self.num_replicas * self.batch_size

    def draw(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one global batch: (LongTensor indices (R b,), float32 weights (R b,)).

        ``R = num_replicas``; rank r's shard is positions ``[r b, (r + 1) b)``. A pure
        function of ``(seed, epoch, step)`` and the current table, hence the same on
        every rank.
        """
        b = self.global_batch_size
        n = self.num_samples
        g = step_generator(self.seed, epoch, step)
        u = torch.rand(3, b, generator=g, dtype=torch.float64).numpy()
        visited_total = self._tree.total
        all_visited = self._num_visited == n
        init = 0.0 if all_visited else self._initial_transformed()
        t_total = visited_total + (n - self._num_visited) * init
        share = self._share(t_total)
        if t_total <= 0 and share >= 1.0 and not self._warned_zero:
            self._warned_zero = True
            warnings.warn(
                "TableSampler: every score is zero; drawing uniformly until a positive score arrives.",
                RuntimeWarning,
                stacklevel=3,
            )
        idx = (u[1] * n).astype(np.int64)  # the uniform component
        np.minimum(idx, n - 1, out=idx)
        from_scores = u[0] >= share
        if from_scores.any():
            target = u[2][from_scores] * t_total
            if all_visited:
                chosen = self._tree.find(target, check=False)  # targets lie in [0, total)
            else:
                in_tree = target < visited_total
                chosen = np.empty(target.shape[0], dtype=np.int64)
                if in_tree.any():
                    chosen[in_tree] = self._tree.find(target[in_tree], check=False)
                if not in_tree.all():
                    chosen[~in_tree] = self._uniform_unvisited(int((~in_tree).sum()), g)
            idx[from_scores] = chosen
        t = self._tree.get(idx) if all_visited else np.where(self._visited[idx], self._tree.get(idx), init)
        p = share / n + (1.0 - share) * (t / t_total) if t_total > 0 else np.full(b, share / n)
        w = weights_array(p, n, self.bias_exponent, self.max_weight, self.normalize)
        return torch.from_numpy(idx), torch.from_numpy(w.astype(np.float32))

    def _uniform_unvisited(self, count: int, g: torch.Generator) -> np.ndarray:
        """``count`` indices uniform over unvisited examples, by vectorised rejection."""
        n = self.num_samples
        out = np.empty(0, dtype=np.int64)
        while out.size < count:
            need = count - out.size
            ratio = n / max(n - self._num_visited, 1)
            cand = torch.randint(0, n, (int(need * ratio * 1.2) + 8,), generator=g).numpy()
            out = np.concatenate([out, cand[~self._visited[cand]][:need]])
        return out

    def _initial_transformed(self) -> float:
        if self.initial_score is not None:
            return float(self.policy.transform(torch.tensor(self.initial_score, dtype=torch.float64)))
        if self._num_visited == 0:
            return 1.0
        return self._tree.total / self._num_visited

    def _share(self, t_total: float) -> float:
        share = self.policy.uniform_share(t_total, self.num_samples)
        return share if self.mixer is None else self.mixer.share(share)

    @property
    def mixing_level(self) -> float:
        """The uniform mixing level lambda in use (self-tuned with ``mixing="auto"``)."""
        return self.policy.mixing if self.mixer is None else self.mixer.level

    def probabilities(self) -> torch.Tensor:
        """The current draw distribution over all N examples: float64 Tensor (N,), sum 1. O(N)."""
        n = self.num_samples
        init = self._initial_transformed()
        t = np.where(self._visited, self._tree.values(), init)
        t_total = float(t.sum())
        share = self._share(t_total)
        p = share / n + (1.0 - share) * (t / t_total if t_total > 0 else np.zeros_like(t))
        return torch.from_numpy(np.asarray(p, dtype=np.float64))

    def scores(self) -> torch.Tensor:
        """Latest raw score of every example (NaN where never updated): float64 Tensor (N,)."""
        t = np.where(self._visited, self._tree.values(), np.nan)
        s = t if self.policy.power == 1.0 else np.power(t, 1.0 / self.policy.power)
        return torch.from_numpy(np.asarray(s, dtype=np.float64))

    # ------------------------------------------------------------------ feedback
    def update(self, indices: Any, scores: Any) -> None:
        """Set the scores of ``indices`` (last write wins for repeated indices).

        With several replicas this buffers the update and, at every ``sync_every``-th
        call, runs :meth:`sync` (a collective: every rank must call :meth:`update`
        equally often, like ``backward`` under DDP).

        Args:
            indices: LongTensor / array of shape (k,), values in [0, N).
            scores: Tensor / array of shape (k,), >= 0. NaN and inf entries are skipped
                with a warning; the table keeps their previous values.
        """
        idx, val = self._check_update(indices, scores)
        if self.num_replicas == 1:
            self._receive(idx, val, stacklevel=3)
            return
        self._unsynced.append((idx.copy(), val.copy()))
        self._updates_since_sync += 1
        if self._updates_since_sync >= self.sync_every:
            self.sync()

    def _check_update(self, indices: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        idx = _as_numpy(indices, "indices").astype(np.int64, copy=False).ravel()
        val = _as_numpy(scores, "scores").astype(np.float64, copy=False).ravel()
        if idx.shape[0] != val.shape[0]:
            raise ValueError(
                f"TableSampler.update got {idx.shape[0]} indices and {val.shape[0]} scores; "
                "lengths must match."
            )
        if idx.size and (idx.view(np.uint64) >= self.num_samples).any():  # negatives wrap to huge
            bad = idx[(idx < 0) | (idx >= self.num_samples)][0]
            raise IndexError(f"TableSampler.update got index {int(bad)} outside [0, {self.num_samples}).")
        # False for NaN and +inf: those are skipped with a warning later
        out_of_range = (val < 0) | ((val > self._max_score) & (val != np.inf))
        if out_of_range.any():
            bad = val[out_of_range]
            if bad.min() < 0:
                raise ValueError(
                    f"TableSampler.update got negative scores (min {bad.min():.4g}); scores must be >= 0."
                )
            raise ValueError(
                f"TableSampler.update got scores up to {bad.max():.4g}; scores above {self._max_score:.3g} "
                "would overflow the table's float64 sum."
            )
        return idx, val

    def sync(self) -> None:
        """Gather every rank's buffered updates and apply them, in rank order, on every rank.

        A collective over the default process group (no-op with one replica). NaN and
        inf entries are dropped after the gather, so every rank drops the same ones and
        the tables stay bit-identical.

        Raises:
            RuntimeError: several replicas but ``torch.distributed`` is not initialised.
        """
        if self.num_replicas == 1:
            return
        if not _dist.is_initialized():
            raise RuntimeError(
                f"TableSampler with num_replicas={self.num_replicas} shares score updates through "
                "torch.distributed, which is not initialised (call init_process_group first)."
            )
        local_idx = np.concatenate([np.zeros(0, np.int64)] + [i for i, _ in self._unsynced])
        local_val = np.concatenate([np.zeros(0, np.float64)] + [v for _, v in self._unsynced])
        idx, val = _dist.all_gather_updates(local_idx, local_val)
        self._unsynced = []
        self._updates_since_sync = 0
        self._receive(idx, val, stacklevel=4)

    def _receive(self, idx: np.ndarray, val: np.ndarray, stacklevel: int) -> None:
        """Drop non-finite entries (with a warning) and apply or queue the rest."""
        finite = np.isfinite(val)
        if not finite.all():
            warnings.warn(
                f"TableSampler.update skipped {int((~finite).sum())} NaN or infinite score(s); "
                "those examples keep their previous scores.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
            idx, val = idx[finite], val[finite]
        if self.delay:
            self._pending.append((self._consumed, idx.copy(), val.copy()))
        else:
            self._set(idx, val)

    def _apply_pending(self, upto: float) -> None:
        while self._pending and self._pending[0][0] <= upto:
            tag, idx, val = self._pending.pop(0)
            if tag > self._consumed - self.delay:  # applied ahead of consumption (prefetch): keep undo
                previous = np.array(self._tree.get(idx), dtype=np.float64)
                mixer = None if self.mixer is None else self.mixer.state_dict()
                self._applied.append((tag, idx, val, previous, self._visited[idx].copy(), mixer))
            self._set(idx, val)

    def flush(self) -> None:
        """Apply every delayed update now."""
        self._apply_pending(float("inf"))
        self._applied = []

    def _set(self, idx: np.ndarray, val: np.ndarray) -> None:
        if idx.size == 0:
            return
        t = val if self.policy.power == 1.0 else np.power(val, self.policy.power)
        if self.mixer is not None:  # fresh scores vs the stale values they were drawn with
            init = self._initial_transformed()
            total = self._tree.total + (self.num_samples - self._num_visited) * init
            stale = np.where(self._visited[idx], self._tree.get(idx), init)
            full = idx.size == self.num_samples and np.unique(idx).size == idx.size
            observe = self.mixer.observe_full if full else self.mixer.observe
            observe(stale, val, total, self.num_samples, self.policy.uniform_share(total, self.num_samples))
        self._tree.set(idx, t, check=False)  # validated by _check_update / _receive
        if self._num_visited == self.num_samples:
            return
        new = np.unique(idx[~self._visited[idx]])
        self._visited[new] = True
        self._num_visited += int(new.size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything for an exact continuation from the last consumed batch.

        Returns:
            A dict of ints, floats, lists and tensors (loadable with
            ``torch.load(weights_only=True)``): the table (float64 (N,), transformed
            scores) and visited mask (bool (N,)) as of the consumption point, the
            delayed updates still to apply (tagged with the step they were given at),
            this rank's updates not yet synchronised, seed, epoch, position in the
            epoch, batches consumed, and the replica layout. Updates that a prefetched
            draw already applied ahead of the consumption point are reverted here and
            stored as delayed updates, so batches in flight are redrawn identically.
        """
        table = np.array(self._tree.values(), dtype=np.float64)
        visited = self._visited.copy()
        horizon = self._consumed - self.delay
        redo = []
        mixer = None if self.mixer is None else self.mixer.state_dict()
        for tag, idx, val, previous, was_visited, mixer_before in reversed(self._applied):
            if tag > horizon:
                table[idx] = previous
                visited[idx] = was_visited
                redo.append((tag, idx, val))
                mixer = mixer_before
        pending = list(reversed(redo)) + self._pending
        return {
            "version": self.STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self._consumed,
            "table": torch.from_numpy(table),
            "visited": torch.from_numpy(visited),
            "pending": [[tag, _tensor(i), _tensor(v)] for tag, i, v in pending],
            "unsynced": [[_tensor(i), _tensor(v)] for i, v in self._unsynced],
            "updates_since_sync": self._updates_since_sync,
            **({} if mixer is None else {"mixer": mixer}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Each rank restores its own view. The table is global (identical on every rank),
        so a state saved on another rank loads too, provided it holds no unsynchronised
        updates (always true with ``sync_every=1``; call :meth:`sync` before saving
        otherwise).

        Raises:
            KeyError: a required key is missing.
            ValueError: the state was saved for another dataset size, batch size or
                number of replicas (the position inside an epoch counts per-replica
                steps; start a fresh sampler and restore only the scores with
                :meth:`update` to change the world size), or it holds another rank's
                unsynchronised updates.
        """
        for key in ("num_samples", "table", "visited", "seed", "epoch", "position"):
            if key not in state:
                raise KeyError(f"TableSampler state is missing '{key}'.")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"TableSampler state was saved for a dataset of {state['num_samples']} examples; "
                f"this sampler has num_samples={self.num_samples}."
            )
        replicas = int(state.get("num_replicas", 1))
        if replicas != self.num_replicas:
            raise ValueError(
                f"TableSampler state was saved with num_replicas={replicas}; this sampler has "
                f"num_replicas={self.num_replicas}. Epoch positions count per-replica steps, so a "
                "state cannot be resumed exactly under another world size; to re-shard, build a "
                "fresh sampler and restore the scores with sampler.update(indices, scores) from "
                "state['table'] and state['visited']."
            )
        if "batch_size" in state and int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"TableSampler state was saved with batch_size={state['batch_size']}; this sampler has "
                f"batch_size={self.batch_size}."
            )
        unsynced = state.get("unsynced", [])
        if unsynced and int(state.get("rank", 0)) != self.rank:
            raise ValueError(
                f"TableSampler state of rank {state.get('rank')} holds unsynchronised updates and cannot "
                f"be loaded on rank {self.rank}; load each rank's own state, or call sync() before saving."
            )
        table = np.asarray(state["table"], dtype=np.float64)
        visited = np.asarray(state["visited"], dtype=bool)
        if table.shape != (self.num_samples,) or visited.shape != (self.num_samples,):
            raise ValueError("TableSampler state has a table or visited mask of the wrong shape.")
        self._tree.fill(table)
        self._visited = visited.copy()
        self._num_visited = int(visited.sum())
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._consumed = int(state.get("consumed", 0))
        self._pending = [
            (int(t), np.asarray(i, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for t, i, v in state.get("pending", [])
        ]
        self._applied = []
        self._unsynced = [
            (np.asarray(i, dtype=np.int64), np.asarray(v, dtype=np.float64)) for i, v in unsynced
        ]
        self._updates_since_sync = int(state.get("updates_since_sync", 0))
        if self.mixer is not None:
            if "mixer" not in state:
                raise KeyError("TableSampler state is missing 'mixer' (saved without mixing='auto').")
            self.mixer.load_state_dict(state["mixer"])


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(
        f"The '{name}' parameter of TableSampler.update must be a Tensor, array or list. Got {value!r}."
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))
