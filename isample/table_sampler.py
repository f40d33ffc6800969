"""``TableSampler``: importance sampling from a table of one (stale) score per example.

The table holds the latest score of every example (typically its training loss, fed
back by the loop, so no extra forward pass). Each step draws b indices from the whole
dataset in O(b log N) with a sum tree, computes their weights at draw time, and yields
one :class:`WeightedIndices` per batch (an int64 index array and a float32 weight array);
:class:`ImportanceDataLoader` unpacks it inside the worker so weights can never be
mismatched with their rows by prefetching.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from . import distributed as _dist
from ._feedback import drop_nonfinite, feedback_arrays
from ._random import step_generator
from ._validation import check_choice, check_float, check_int, param_error
from .engine import SumTree
from .policies import ScorePolicy
from .staleness import AdaptiveMixing, compiled_observe
from .weighting import NORMALIZATIONS, weights_array

__all__ = ["TableSampler", "WeightedIndices"]

_BLOCK = 64  # examples per block of the unvisited index
_TINY = float(np.finfo(np.float64).tiny)  # smallest normal float64, 2**-1022
_ULP0 = 2.0**-1074  # smallest subnormal: the spacing of float64 below _TINY


class WeightedIndices:
    """One batch of a batch sampler: int64 indices and their float32 importance weights.

    What :class:`TableSampler` yields per step (arrays in, arrays out: no per-example
    Python objects). :class:`isample.WeightedDataset` reads the rows of a whole batch
    from it. For code written against the older list form it also iterates, indexes
    and compares as a list of ``(index, weight)`` pairs, and ``+`` concatenates.

    Attributes:
        indices: LongTensor of shape (b,), dataset indices.
        weights: float32 Tensor of shape (b,), the weight of every index.
    """

    __slots__ = ("indices", "weights")

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.indices = indices
        self.weights = weights

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return zip(self.indices.tolist(), self.weights.tolist(), strict=True)

    def __getitem__(self, k: int) -> tuple[int, float]:
        return int(self.indices[k]), float(self.weights[k])

    def __add__(self, other: WeightedIndices) -> WeightedIndices:
        if not isinstance(other, WeightedIndices):
            return NotImplemented
        return WeightedIndices(
            torch.cat([self.indices, other.indices]), torch.cat([self.weights, other.weights])
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WeightedIndices):
            return torch.equal(self.indices, other.indices) and torch.equal(self.weights, other.weights)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices, self.weights

    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.indices, self.weights = state

    def __repr__(self) -> str:
        return f"WeightedIndices(indices={self.indices.tolist()}, weights={self.weights.tolist()})"


class _Unvisited:
    """Uniform draws among the unvisited examples in O(b log N) time and O(b) scratch.

    A sum tree over blocks of :data:`_BLOCK` examples holds the number of unvisited
    examples of every block (exact small integers in float64). A draw picks a block with
    probability ``count_B / U`` by a tree descent, then the ``r``-th unvisited example of
    the block, ``r = floor(v count_B)`` for a second uniform ``v``: ``P(i) = 1 / U``
    exactly. Memory: ``8.5 N / 64`` bytes beside the visited mask.
    """

    def __init__(self, padded_visited: np.ndarray) -> None:
        self.blocks = padded_visited.reshape(-1, _BLOCK)  # a view: marks made by the sampler show here
        self.tree = SumTree(self.blocks.shape[0])
        self.tree.fill(_BLOCK - np.count_nonzero(self.blocks, axis=1).astype(np.float64))

    def select(self, block_targets: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Indices for targets in [0, U] (block choice) and uniforms ``v`` in [0, 1) (rank in block)."""
        block = self.tree.find(block_targets, check=False)
        free = ~self.blocks.take(block, axis=0)  # (m, _BLOCK) True where unvisited
        ranks = np.cumsum(free, axis=1)  # 1..count at the unvisited positions
        count = ranks[:, -1]
        r = np.minimum((v * count).astype(np.int64), count - 1)
        offset = np.argmax(ranks > r[:, None], axis=1)
        return block * _BLOCK + offset

    def visit(self, new: np.ndarray) -> None:
        """Count newly visited examples (distinct, previously unvisited, sorted) out of their blocks."""
        blocks = new // _BLOCK  # sorted: equal blocks are runs
        starts = _run_starts(blocks)
        counts = np.diff(np.append(starts, blocks.size))
        blocks = blocks[starts]
        self.tree.set(blocks, self.tree.get(blocks) - counts, check=False)


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    # Positions where a run of equal values starts in a sorted array.
    change = np.empty(ordered.shape[0], dtype=bool)
    if change.size:
        change[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=change[1:])
    return np.flatnonzero(change)


def _distinct_sorted(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` for int64 arrays: sorted distinct values, by one sort.

    NumPy 2.3+ ``np.unique`` takes a hash path that is far slower than a sort on large
    int64 arrays (16 s instead of 0.7 s for 8M indices here); same result.
    """
    ordered = np.sort(values)
    return ordered[_run_starts(ordered)]


class _EpochIterator:
    """One pass over one epoch of a :class:`TableSampler`: holds its own cursor."""

    def __init__(self, sampler: TableSampler, epoch: int, start: int, owner: bool = True) -> None:
        self.sampler = sampler
        self.owner = owner  # moves the sampler's resume point (position) as it is consumed
        self.epoch = epoch
        self.num_batches = sampler.num_batches
        self.step = start  # next step to draw
        self.consumed = start  # batches of this epoch consumed
        self.base = sampler._consumed - start  # global consumption count at step 0 of this epoch
        self._ahead: tuple[int, Future] | None = None  # (step, its draw running in the background)

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> WeightedIndices:
        if self.step >= self.num_batches:
            raise StopIteration
        s = self.sampler
        step = self.step
        self.step += 1
        if s._latest is self:
            s._resume = False
            s._next_owner = True
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            indices, weights = ahead[1].result()
        else:
            indices, weights = self._draw(step)
        if s.draw_ahead and s._tracked and self.step < self.num_batches:
            # The next draw needs no update given after this point (delay >= 1): start it now,
            # so it runs while the training step does.
            s._settle()
            future = s._pool().submit(self._draw, self.step)
            s._inflight = future
            self._ahead = (self.step, future)
        if s.num_replicas > 1:
            lo, hi = s.rank * s.batch_size, (s.rank + 1) * s.batch_size
            indices, weights = indices[lo:hi].clone(), weights[lo:hi].clone()
        if not s._tracked:  # nobody calls advance(): a drawn batch counts as consumed
            self.advance(1)
        return WeightedIndices(indices, weights)

    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sampler
        if s._pending:
            s._apply_pending(self.base + step - s.delay)
        return s.draw(self.epoch, step)

    def advance(self, batches: int) -> None:
        """The loop consumed ``batches`` more batches of this iterator."""
        self.consumed = min(self.consumed + batches, self.num_batches)
        self.sampler._consumed_by(self, batches)


class TableSampler(Sampler[WeightedIndices]):
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
        draw_ahead: draw the next batch in a background thread as soon as the current one
            is handed out, so the draw leaves the critical path of a training step that
            waits on an accelerator. Needs ``delay >= 1`` (the next batch must not depend
            on the current batch's scores) and a loop that reports consumption
            (:class:`ImportanceDataLoader`, or :meth:`advance`); the batches are the
            same as without it. Default False.

    Distributed estimator: the averaged DDP gradient of the rank shards is

    .. math::

        \\frac{1}{R}\\sum_{r=1}^{R} \\frac{1}{b}\\sum_{j \\in \\mathrm{shard}_r} w_{i_j} g_{i_j}
        = \\frac{1}{R b}\\sum_{j=1}^{R b} w_{i_j} g_{i_j},

    the single-process weighted gradient of the global batch, unbiased for the full
    gradient because the weights ``1 / (N p_i)`` use the global distribution.

    Epochs and iterators (as in torch): every ``iter(sampler)`` is an independent pass
    over one epoch with its own cursor, so two live iterators, or a :meth:`set_epoch`
    in the middle of an epoch, never truncate each other. The epoch of a new iterator
    is :attr:`epoch`; it starts at step 0, except the first iterator after
    :meth:`load_state_dict`, which resumes at the saved position. When an iterator of
    the current epoch has handed out its last batch, :attr:`epoch` moves on by one.
    ``set_epoch`` with the current epoch changes nothing (a resumed position stays).

    Yields:
        One :class:`WeightedIndices` per batch: b int64 indices and their float32
        weights (it also iterates as ``(index, weight)`` pairs). Use
        :class:`isample.WeightedDataset` and :func:`isample.weighted_collate` to plug
        the sampler into a ``torch.utils.data.DataLoader`` as its ``batch_sampler``.

    Raises:
        ValueError: on negative scores or mismatched lengths in :meth:`update` (NaN and
            inf entries are skipped with a warning instead; with several replicas they
            are dropped after the gather, identically on every rank).
        IndexError: an updated index outside [0, N).
        TypeError: bool or float indices, or non-real scores, in :meth:`update` (see
            :mod:`isample._feedback` for the one set of conversion rules).

    Example:
        >>> sampler = TableSampler(len(ds), batch_size=64, seed=0)   # DDP: same call on every rank
        >>> loader = ImportanceDataLoader(ds, sampler)
    """

    STATE_VERSION = 3

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
        draw_ahead: bool = False,
    ) -> None:
        owner = "TableSampler"
        self.num_samples = check_int(num_samples, "num_samples", owner, minimum=1)
        self.batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _dist.resolve_world(num_replicas, rank, owner)
        self.sync_every = check_int(sync_every, "sync_every", owner, minimum=1)
        self._num_batches_arg = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True)
        self.num_batches = self._default_num_batches()
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
        if not isinstance(draw_ahead, bool):
            raise param_error("draw_ahead", owner, "a bool", draw_ahead, TypeError)
        self.draw_ahead = draw_ahead
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self._allocate(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool))
        if self.initial_score is not None and self.initial_score > self._max_score:  # N x it overflows
            raise param_error("initial_score", owner, f"a float in [0, {self._max_score:.4g}]", initial_score)
        self.epoch = 0
        self.position = 0  # batches of the current epoch consumed by the training loop
        self._resume = False  # the next iterator starts at ``position`` (set by load_state_dict)
        self._next_owner = True  # the next iterator owns the resume point (see ImportanceDataLoader)
        self._consumed = 0  # batches consumed over the sampler's life (tags of updates)
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        # pending updates already applied by a prefetched draw, with the values they replaced
        # (reverted in state_dict() while not yet due at the consumption point)
        self._applied: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]] = []
        self._unsynced: list[tuple[np.ndarray, np.ndarray]] = []  # this rank's updates awaiting sync
        self._updates_since_sync = 0
        self._warned_zero = False
        self._tracked = False
        self._latest: _EpochIterator | None = None

    def _default_num_batches(self) -> int:
        if self._num_batches_arg is not None:
            return self._num_batches_arg
        step_size = self.batch_size * self.num_replicas
        n = self.num_samples
        return max(n // step_size if self.drop_last else math.ceil(n / step_size), 1)

    def _allocate(self, table: np.ndarray, visited: np.ndarray) -> None:
        """(Re)build the table for ``num_samples`` examples from a prefix of old leaves."""
        n = self.num_samples
        # largest raw score whose transformed value keeps the float64 sum of N finite
        limit = math.log(np.finfo(np.float64).max / (2 * n)) / self.policy.power  # 2x margin
        self._max_score = math.exp(limit) if limit < 709.0 else math.inf
        tree = SumTree(n)
        keep = min(n, table.shape[0])
        if keep:
            values = np.zeros(n, dtype=np.float64)
            values[:keep] = table[:keep]
            tree.fill(values)
        padded = np.ones(-(-n // _BLOCK) * _BLOCK, dtype=bool)  # padding counts as visited
        padded[:n] = False
        padded[:keep] = visited[:keep]
        self._tree = tree
        self._padded_visited = padded
        self._visited = padded[:n]
        self._num_visited = int(np.count_nonzero(self._visited))
        self._unvisited = _Unvisited(padded) if self._num_visited < n else None

    def __getstate__(self) -> dict[str, Any]:
        # ``_visited`` and the unvisited index are views of ``_padded_visited``: pickle the
        # buffer once and rebuild the views (a copied view would silently stop tracking it).
        self._settle()
        state = self.__dict__.copy()
        for key in ("_visited", "_unvisited", "_latest", "_executor", "_inflight"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._visited = self._padded_visited[: self.num_samples]
        self._unvisited = _Unvisited(self._padded_visited) if self._num_visited < self.num_samples else None
        self._latest = None
        self._executor = None
        self._inflight = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isample-draw-ahead")
        return self._executor

    def _settle(self) -> None:
        """Wait for a draw running ahead (it may touch the table) before reading or changing state."""
        if self._inflight is not None:
            wait([self._inflight])
            self._inflight = None

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iterator: draws are a pure function of (seed, epoch, step, table).

        With the current epoch this changes nothing, so a position restored by
        :meth:`load_state_dict` survives (Lightning calls ``set_epoch(current)`` on resume).
        With another epoch the next iterator starts it at step 0. Iterators already
        running keep their own epoch and cursor.
        """
        epoch = check_int(epoch, "epoch", "TableSampler.set_epoch", minimum=0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._resume = False

    def __iter__(self) -> Iterator[WeightedIndices]:
        if self.draw_ahead and self.delay < 1:
            raise ValueError(
                "TableSampler(draw_ahead=True) needs delay >= 1: the next batch is drawn before the "
                "current one's scores come back."
            )
        self._settle()
        _dist.check_configuration(self, "TableSampler")  # every rank: same N, b, seed, ... (DDP)
        # The resume point holds until an iterator draws from it: torch's DataLoader creates
        # and drops one sampler iterator before the one it uses.
        owner = self._next_owner
        if owner:
            start = self.position if self._resume and self.position < self.num_batches else 0
            self.position = start
        else:  # an extra pass while another iterator owns the resume point: a whole epoch of its own
            start = 0
        self._latest = _EpochIterator(self, self.epoch, start, owner)
        return self._latest

    def advance(self, batches: int = 1) -> None:
        """Tell the sampler that the training loop consumed ``batches`` more batches.

        Counts for the most recent iterator. :class:`ImportanceDataLoader` tells its own
        iterator instead; either keeps ``position`` (for resume) and the tags of delayed
        updates exact when batches are drawn ahead (prefetching). Without it, a batch
        counts as consumed when it is drawn (exact for ``torchdata``'s
        ``StatefulDataLoader`` and a single-process ``DataLoader``). The first call
        switches from counting draws to counting ``advance`` calls, so call
        ``advance(0)`` before the first draw when driving the sampler by hand.
        """
        batches = check_int(batches, "batches", "TableSampler.advance", minimum=0)
        self._tracked = True
        if self._latest is not None:
            self._latest.advance(batches)

    def _consumed_by(self, it: _EpochIterator, batches: int) -> None:
        self._consumed += batches
        if it.owner and it.epoch == self.epoch:  # others (set_epoch while running, extra passes) do not
            self.position = it.consumed
            if it.consumed >= it.num_batches:
                self.epoch += 1
                self.position = 0
                self._resume = False
        horizon = self._consumed - self.delay
        while self._applied and self._applied[0][0] <= horizon:  # due for every later draw: keep
            self._applied.pop(0)

    # ------------------------------------------------------------------ size
    def resize(self, num_samples: int) -> None:
        """Adapt to a dataset whose length changed: new examples are unvisited, a shrink drops the tail.

        Examples ``[0, min(N, M))`` keep their scores; new ones count with the unvisited
        prior (``initial_score`` or the running mean); scores and queued updates of
        removed indices are dropped. ``num_batches`` is recomputed unless it was given.
        Call it between epochs (:class:`ImportanceDataLoader` does, at the start of each
        epoch, when ``len(dataset)`` changed); under DDP every rank must resize alike.

        Raises:
            ValueError: in the middle of a resumed epoch (``position > 0``).
        """
        m = check_int(num_samples, "num_samples", "TableSampler.resize", minimum=1)
        self._settle()
        if m == self.num_samples:
            return
        if self.position:
            raise ValueError(
                f"TableSampler.resize({m}) in the middle of an epoch (position {self.position} of "
                f"{self.num_batches}): the dataset length may change only between epochs."
            )
        self.flush()
        table = np.array(self._tree.values(), dtype=np.float64)
        visited = self._visited.copy()
        self.num_samples = m
        self._allocate(table, visited)
        self.num_batches = self._default_num_batches()
        keep = [(t, i, v) for t, i, v in self._pending]
        self._pending = [(t, i[i < m], v[i < m]) for t, i, v in keep]
        self._unsynced = [(i[i < m], v[i < m]) for i, v in self._unsynced]
        self._latest = None

    # ------------------------------------------------------------------ draws
    @property
    def global_batch_size(self) -> int:
        """Indices per step over all replicas: ``num_replicas x batch_size``."""
        return self.num_replicas * self.batch_size

    def draw(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one global batch: (LongTensor indices (R b,), float32 weights (R b,)).

        ``R = num_replicas``; rank r's shard is positions ``[r b, (r + 1) b)``. A pure
        function of ``(seed, epoch, step)`` and the current table, hence the same on
        every rank. Three uniforms per draw: ``u0`` picks the uniform component or the
        scores, ``u1`` the uniform index (or the rank inside a block of unvisited
        examples), ``u2`` the position in the score mass. O(b log N) time and O(b)
        scratch whatever the scores; exact for a subnormal score total too.
        """
        b = self.global_batch_size
        n = self.num_samples
        g = step_generator(self.seed, epoch, step)
        u = torch.rand(3, b, generator=g, dtype=torch.float64).numpy()
        visited_total = self._tree.total
        all_visited = self._num_visited == n
        init = 0.0 if all_visited else self._initial_transformed()
        unvisited = n - self._num_visited
        t_total = visited_total + unvisited * init
        share = self._share(t_total)
        if t_total <= 0 and share >= 1.0 and not self._warned_zero:
            self._warned_zero = True
            warnings.warn(
                "TableSampler: every score is zero; drawing uniformly until a positive score arrives.",
                RuntimeWarning,
                stacklevel=3,
            )
        if all_visited and t_total >= _TINY:
            fused = self._tree._draw_mixture(u, n, share, t_total)  # one compiled call, same arrays
            if fused is not None:
                idx, p = fused
                w = weights_array(p, n, self.bias_exponent, self.max_weight, self.normalize)
                return torch.from_numpy(idx), torch.from_numpy(w.astype(np.float32))
        idx = (u[1] * n).astype(np.int64)  # the uniform component
        np.minimum(idx, n - 1, out=idx)
        from_scores = u[0] >= share
        if from_scores.any():
            if t_total >= _TINY:
                target = u[2][from_scores] * t_total
            else:  # subnormal total: every sum is an exact multiple of 2**-1074; draw one exactly
                units = t_total * 2.0**1000 * 2.0**74  # an integer below 2**52
                target = np.floor(u[2][from_scores] * units) * _ULP0
            if all_visited:
                chosen = self._tree.find(target, check=False)  # targets lie in [0, total]
            else:
                in_tree = target < visited_total
                chosen = np.empty(target.shape[0], dtype=np.int64)
                if in_tree.any():
                    chosen[in_tree] = self._tree.find(target[in_tree], check=False)
                if not in_tree.all():
                    rest = ~in_tree
                    # position inside the unvisited mass, in units of one unvisited example
                    k = np.clip((target[rest] - visited_total) / init, 0.0, float(unvisited))
                    chosen[rest] = self._unvisited.select(k, u[1][from_scores][rest])  # type: ignore[union-attr]
            idx[from_scores] = chosen
        leaves = self._tree.values()  # idx is valid by construction: no checked get()
        t = leaves.take(idx) if all_visited else np.where(self._visited[idx], leaves.take(idx), init)
        p = share / n + (1.0 - share) * (t / t_total) if t_total > 0 else np.full(b, share / n)
        w = weights_array(p, n, self.bias_exponent, self.max_weight, self.normalize)
        return torch.from_numpy(idx), torch.from_numpy(w.astype(np.float32))

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
        self._settle()
        n = self.num_samples
        init = self._initial_transformed()
        t = np.where(self._visited, self._tree.values(), init)
        t_total = float(t.sum())
        share = self._share(t_total)
        p = share / n + (1.0 - share) * (t / t_total if t_total > 0 else np.zeros_like(t))
        return torch.from_numpy(np.asarray(p, dtype=np.float64))

    def scores(self) -> torch.Tensor:
        """Latest raw score of every example (NaN where never updated): float64 Tensor (N,)."""
        self._settle()
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
            indices: integer Tensor / array / list of shape (k,), values in [0, N)
                (bool and float indices are a ``TypeError``).
            scores: real Tensor / array / list of shape (k,), any float dtype
                (bfloat16 and float16 included), >= 0. NaN and inf entries are skipped
                with a warning; the table keeps their previous values.
        """
        several = self.num_replicas > 1
        idx, val = feedback_arrays(
            indices,
            scores,
            self.num_samples,
            "TableSampler",
            max_score=self._max_score,
            keep_nonfinite=several,
        )
        if not several:
            if idx.size:
                self._receive(idx, val, stacklevel=3, checked=True)
            return
        self._unsynced.append((idx, val))
        self._updates_since_sync += 1
        if self._updates_since_sync >= self.sync_every:
            self.sync()

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
        idx, val = _dist.all_gather_updates(local_idx, local_val, self._consumed if self._tracked else None)
        self._unsynced = []
        self._updates_since_sync = 0
        self._receive(idx, val, stacklevel=4)

    def _receive(self, idx: np.ndarray, val: np.ndarray, stacklevel: int, checked: bool = False) -> None:
        """Drop non-finite entries (with a warning) and apply or queue the rest."""
        if not checked:
            idx, val = drop_nonfinite(idx, val, "TableSampler.update", stacklevel)
        if self.delay:
            self._pending.append((self._consumed, idx, val))
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
        self._settle()
        self._apply_pending(float("inf"))
        self._applied = []

    def _set(self, idx: np.ndarray, val: np.ndarray) -> None:
        if idx.size == 0:
            return
        t = val if self.policy.power == 1.0 else np.power(val, self.policy.power)
        n = self.num_samples
        all_visited = self._num_visited == n
        if self.mixer is not None:  # fresh scores vs the stale values they were drawn with
            if all_visited:  # no unvisited mass: the stale values are the leaves (same floats)
                total = self._tree.total
                stale = self._tree.get(idx, check=False)
            else:
                init = self._initial_transformed()
                total = self._tree.total + (n - self._num_visited) * init
                stale = np.where(self._visited[idx], self._tree.get(idx, check=False), init)
            full = idx.size == n and _distinct_sorted(idx).size == idx.size
            observe = self.mixer.observe_full if full else self.mixer.observe
            kernel = compiled_observe(self._tree.backend)  # the table engine's backend, same results
            observe(stale, val, total, n, self.policy.uniform_share(total, n), _kernel=kernel)
        self._tree.set(idx, t, check=False)  # validated by feedback_arrays / _receive
        if all_visited:
            return
        fresh = idx[~self._visited[idx]]
        if fresh.size == 0:
            return
        new = _distinct_sorted(fresh)
        self._visited[new] = True
        self._num_visited += int(new.size)
        if self._num_visited == self.num_samples:
            self._unvisited = None  # every example visited: the index is no longer needed
        else:
            self._unvisited.visit(new)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything for an exact continuation from the last consumed batch.

        Returns:
            A dict of ints, floats, lists and tensors (loadable with
            ``torch.load(weights_only=True)``): the table (float64 (N,), transformed
            scores) and visited mask (bool (N,)) as of the consumption point, the
            delayed updates still to apply (tagged with the step they were given at)
            and the update delay, this rank's updates not yet synchronised, seed,
            epoch, position in the epoch, batches consumed, the epoch layout
            (``num_batches``, ``drop_last``) and the replica layout. Updates that a
            prefetched draw already applied ahead of the consumption point are reverted
            here and stored as delayed updates, so batches in flight are redrawn
            identically.
        """
        self._settle()
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
            "num_batches": self.num_batches,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self._consumed,
            "delay": self.delay,
            "table": torch.from_numpy(table),
            "visited": torch.from_numpy(visited),
            "pending": [[tag, _tensor(i), _tensor(v)] for tag, i, v in pending],
            "unsynced": [[_tensor(i), _tensor(v)] for i, v in self._unsynced],
            "updates_since_sync": self._updates_since_sync,
            **({} if mixer is None else {"mixer": mixer}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, after validating every field (nothing changes on error).

        Each rank restores its own view. The table is global (identical on every rank),
        so a state saved on another rank loads too, provided it holds no unsynchronised
        updates (always true with ``sync_every=1``; call :meth:`sync` before saving
        otherwise). The saved update ``delay`` is restored, so the continuation is the
        same whatever this process's prefetch depth (see :class:`ImportanceDataLoader`).
        The next iterator resumes at the saved position.

        Raises:
            KeyError: a required key is missing.
            TypeError: a field has the wrong type (e.g. a float position, float indices).
            ValueError: the state does not fit this sampler (another dataset size, batch
                size, number of batches per epoch, ``drop_last`` or number of replicas:
                the position inside an epoch counts per-replica steps; start a fresh
                sampler and restore only the scores with :meth:`update` to change them),
                it holds another rank's unsynchronised updates, or a field is out of
                range (a position past the epoch, a negative epoch or seed, a table
                entry that is negative, NaN, infinite or set for an unvisited example,
                a queued update with an index outside [0, N) or a NaN / negative score).
        """
        self._settle()
        parsed = _parse_state(self, state)
        if self.mixer is not None:  # the staleness estimator (isample.staleness), validated by its own load
            if "mixer" not in state:
                raise KeyError("TableSampler state is missing 'mixer' (saved without mixing='auto').")
            self.mixer.load_state_dict(state["mixer"])
        self._tree.fill(parsed["table"])
        np.copyto(self._visited, parsed["visited"])
        self._num_visited = int(np.count_nonzero(self._visited))
        self._unvisited = _Unvisited(self._padded_visited) if self._num_visited < self.num_samples else None
        self.seed = parsed["seed"]
        self.epoch = parsed["epoch"]
        self.position = parsed["position"]
        self._resume = True
        self._consumed = parsed["consumed"]
        if parsed["delay"] is not None:
            self.delay = parsed["delay"]
        self._pending = parsed["pending"]
        self._applied = []
        self._unsynced = parsed["unsynced"]
        self._updates_since_sync = parsed["updates_since_sync"]
        self._latest = None


def _parse_state(sampler: TableSampler, state: Any) -> dict[str, Any]:
    """Validate a :meth:`TableSampler.state_dict` against ``sampler``; return its fields as arrays."""
    where = "TableSampler state"
    if not isinstance(state, dict):
        raise TypeError(
            f"{where} must be a dict (from TableSampler.state_dict()). Got {type(state).__name__}."
        )
    for key in ("num_samples", "table", "visited", "seed", "epoch", "position"):
        if key not in state:
            raise KeyError(f"{where} is missing '{key}'.")

    def integer(key: str, default: Any = None, minimum: int = 0, maximum: int | None = None) -> int:
        value = state.get(key, default)
        if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where} field '{key}' must be an int. Got {value!r}.")
        value = int(value)
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and <= {maximum}"
            raise ValueError(f"{where} field '{key}' must be >= {minimum}{upper}. Got {value}.")
        return value

    version = integer("version", 1, minimum=1)
    if version > TableSampler.STATE_VERSION:
        raise ValueError(
            f"{where} has version {version}; this isample reads versions up to {TableSampler.STATE_VERSION}."
        )
    n = integer("num_samples", minimum=1)
    if n != sampler.num_samples:
        raise ValueError(
            f"{where} was saved for a dataset of {n} examples; "
            f"this sampler has num_samples={sampler.num_samples}."
        )
    replicas = integer("num_replicas", 1, minimum=1)
    if replicas != sampler.num_replicas:
        raise ValueError(
            f"{where} was saved with num_replicas={replicas}; this sampler has "
            f"num_replicas={sampler.num_replicas}. Epoch positions count per-replica steps, so a "
            "state cannot be resumed exactly under another world size; to re-shard, build a "
            "fresh sampler and restore the scores with sampler.update(indices, scores) from "
            "state['table'] and state['visited']."
        )
    batch_size = integer("batch_size", sampler.batch_size, minimum=1)
    if batch_size != sampler.batch_size:
        raise ValueError(
            f"{where} was saved with batch_size={batch_size}; "
            f"this sampler has batch_size={sampler.batch_size}."
        )
    if "num_batches" in state:
        num_batches = integer("num_batches", minimum=1)
        if num_batches != sampler.num_batches:
            raise ValueError(
                f"{where} was saved with {num_batches} batches per epoch; this sampler has "
                f"num_batches={sampler.num_batches} (check num_batches, drop_last and the dataset size)."
            )
    if "drop_last" in state:
        drop_last = state["drop_last"]
        if isinstance(drop_last, torch.Tensor) and drop_last.ndim == 0:
            drop_last = drop_last.item()
        if not isinstance(drop_last, (bool, np.bool_)):
            raise TypeError(f"{where} field 'drop_last' must be a bool. Got {drop_last!r}.")
        if bool(drop_last) != sampler.drop_last:
            raise ValueError(
                f"{where} was saved with drop_last={bool(drop_last)}; "
                f"this sampler has drop_last={sampler.drop_last}."
            )
    saved_rank = integer("rank", 0, maximum=replicas - 1)
    seed = integer("seed", maximum=2**64 - 1)
    epoch = integer("epoch", maximum=2**63 - 1)  # hashed into the step seeds (64-bit parts)
    position = integer("position", maximum=sampler.num_batches - 1)
    consumed = integer("consumed", position, minimum=position)
    delay = integer("delay") if "delay" in state else None
    since = integer("updates_since_sync", 0)  # >= sync_every: the next update synchronises

    table = _float_array(state["table"], f"{where} field 'table'")
    visited = _array(state["visited"], f"{where} field 'visited'")
    if visited.dtype != np.bool_:
        raise TypeError(f"{where} field 'visited' must be a bool tensor. Got dtype {visited.dtype}.")
    if table.shape != (n,) or visited.shape != (n,):
        raise ValueError(
            f"{where} has a table of shape {table.shape} and a visited mask of shape {visited.shape}; "
            f"expected ({n},)."
        )
    cap = float(np.finfo(np.float64).max) / n
    if n and not (table.min() >= 0 and table.max() <= cap):
        raise ValueError(
            f"{where} field 'table' must hold finite values in [0, {cap:.3g}] (no NaN). "
            f"Got values in [{table.min()!r}, {table.max()!r}]."
        )
    if table[~visited].any():
        raise ValueError(
            f"{where} field 'table' has nonzero scores for examples the visited mask marks unvisited."
        )

    def update_arrays(idx: Any, val: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        i = _array(idx, what + " indices")
        v = _float_array(val, what + " scores")
        if i.dtype == np.bool_ or not np.issubdtype(i.dtype, np.integer):
            raise TypeError(f"{what} indices must be an integer tensor. Got dtype {i.dtype}.")
        i = i.astype(np.int64).ravel()
        v = v.ravel()
        if i.shape != v.shape:
            raise ValueError(f"{what} has {i.shape[0]} indices and {v.shape[0]} scores; lengths must match.")
        if i.size and not (i.min() >= 0 and i.max() < n):
            raise ValueError(f"{what} has an index outside [0, {n}): {int(i[(i < 0) | (i >= n)][0])}.")
        return i, v

    pending = []
    last_tag = -1
    entries = state.get("pending", [])
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"{where} field 'pending' must be a list. Got {type(entries).__name__}.")
    for k, entry in enumerate(entries):
        what = f"{where} pending update {k}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise TypeError(f"{what} must be a [tag, indices, scores] triple. Got {entry!r}.")
        tag = entry[0]
        if isinstance(tag, bool) or not isinstance(tag, numbers.Integral) or not 0 <= int(tag) <= consumed:
            raise ValueError(f"{what} has tag {tag!r}; tags are ints in [0, consumed={consumed}].")
        if int(tag) < last_tag:
            raise ValueError(f"{what} has tag {int(tag)} after tag {last_tag}; tags must not decrease.")
        last_tag = int(tag)
        i, v = update_arrays(entry[1], entry[2], what)
        if v.size and not (v.min() >= 0 and v.max() <= sampler._max_score):
            raise ValueError(
                f"{what} has scores outside [0, {sampler._max_score:.3g}] or NaN; "
                "they would corrupt the table."
            )
        pending.append((int(tag), i, v))
    unsynced = []
    entries = state.get("unsynced", [])
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"{where} field 'unsynced' must be a list. Got {type(entries).__name__}.")
    for k, entry in enumerate(entries):
        what = f"{where} unsynchronised update {k}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise TypeError(f"{what} must be an [indices, scores] pair. Got {entry!r}.")
        i, v = update_arrays(entry[0], entry[1], what)
        if v.size and ((v < 0).any() or (np.isfinite(v) & (v > sampler._max_score)).any()):
            raise ValueError(f"{what} has negative scores or scores above {sampler._max_score:.3g}.")
        unsynced.append((i, v))  # NaN / inf allowed: dropped after the gather, on every rank alike
    if unsynced and saved_rank != sampler.rank:
        raise ValueError(
            f"{where} of rank {saved_rank} holds unsynchronised updates and cannot be loaded on rank "
            f"{sampler.rank}; load each rank's own state, or call sync() before saving."
        )
    return {
        "seed": seed,
        "epoch": epoch,
        "position": position,
        "consumed": consumed,
        "delay": delay,
        "updates_since_sync": since,
        "table": table,
        "visited": visited,
        "pending": pending,
        "unsynced": unsynced,
    }


def _array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        return np.asarray(value)
    raise TypeError(f"{what} must be a tensor or array. Got {type(value).__name__}.")


def _float_array(value: Any, what: str) -> np.ndarray:
    arr = _array(value, what)
    if arr.size and (
        arr.dtype == np.bool_
        or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer))
    ):
        raise TypeError(f"{what} must be a real tensor. Got dtype {arr.dtype}.")
    return np.asarray(arr, dtype=np.float64)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))
