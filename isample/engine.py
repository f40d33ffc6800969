"""Weighted draws over a table of N non-negative values in O(b log N) per batch of draws and updates.

:class:`SumTree` keeps one float64 value per example in a wide sum tree: every internal node
holds the sum of its ``fanout`` F children, the nodes of one level lie in one contiguous
array, and all levels share one buffer. Levels shrink by F until one has at most
``root_width`` nodes (:data:`ROOT_WIDTH`, 4096): that root level is searched with one prefix
sum over its nodes, which replaces the few small top levels (each a fixed cost of NumPy
calls) by one short sequential pass.

A batch of b draws then descends the remaining ``ceil(log_F(N / W))`` levels together: at
every level it gathers the ``(b, F)`` block of child sums of the current nodes (one row
gather, contiguous rows), forms the sequential row prefix sums (``np.add.accumulate``), and
takes per row the first child whose prefix end exceeds the target (``argmax`` on a boolean
block). A batch of u updates writes the leaves and recomputes the u touched parents of every
level from their children (gather, row sum, scatter). Both cost ``O(b F log_F N)`` work in a
fixed number of vectorised NumPy calls per level; there is no per-example Python loop.

Two backends run these operations with the same results bit for bit (see
:func:`descend` for the exact definition of the search, and ``docs/performance.md``):
``numpy``, the vectorised functions of this module, and ``numba``, compiled loops in
:mod:`isample._engine_kernels` (optional: used when numba is installed, never imported by
``import isample``). :func:`resolve_backend` picks one; the environment variable
``ISAMPLE_ENGINE`` (``auto``, ``numpy`` or ``numba``) forces it.

Memory: ``8 (N + N / (F - 1) + F log_F N)`` bytes, about ``8.5 N`` for F = 16 (the
constructor refuses, before allocating, a table larger than the available memory); a binary
tree padded to a power of two needs up to ``32 N``. The buffer starts on a 64-byte boundary,
so the 16 children of a node (128 bytes) span two cache lines, not three.

Sums never accumulate rounding drift: an update recomputes each touched parent as the float64
sum of its children (it never adds a delta), with the reduction :meth:`SumTree.rebuild` uses,
so the tree after any sequence of updates is bit-for-bit the tree rebuilt from its leaves. A
full rebuild still runs every ``rebuild_every`` leaf writes as a safeguard.

The pure functions :func:`tree_layout`, :func:`descend` and :func:`propagate` hold the
algorithm; :class:`SumTree` holds the buffer and validates input.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

from ._validation import check_choice, check_int, param_error

__all__ = [
    "SumTree",
    "tree_layout",
    "descend",
    "propagate",
    "available_memory",
    "compiled_available",
    "resolve_backend",
    "BACKENDS",
    "ENGINE_ENV",
]

_OWNER = "SumTree"
_MAX_FANOUT = 256

_CHUNK = 1 << 16  # targets / updates per vectorised pass: scratch stays O(_CHUNK * F)

#: Largest root level: the first level with at most this many nodes is searched directly.
ROOT_WIDTH = 4096

#: Environment variable read when a :class:`SumTree` is built without ``backend``: one of
#: :data:`BACKENDS` (``numpy`` forces the pure NumPy path, e.g. to test it where numba is
#: installed).
ENGINE_ENV = "ISAMPLE_ENGINE"

#: Backends of :class:`SumTree`: ``auto`` (the compiled kernels when numba imports, else
#: NumPy), ``numpy`` and ``numba`` (an error without numba).
BACKENDS = ("auto", "numpy", "numba")

#: Compiled backend: trees with at least this many leaves descend level by level with a load
#: pass (:func:`isample._engine_kernels.descend_by_level`), smaller ones target by target.
BY_LEVEL_MIN = 1 << 17


def tree_layout(size: int, fanout: int, root_width: int | None = None) -> list[int]:
    """Lengths of the level arrays of a sum tree, leaves first, root last.

    Level 0 holds the ``size`` leaves; each higher level holds one node per row of ``fanout``
    nodes below. Every level but the root is zero-padded to a multiple of ``fanout`` so that
    it reshapes to rows of children. The first level with at most ``root_width`` nodes is the
    root level: it is searched with one prefix sum over all its nodes instead of more levels.

    .. math::

        n_0 = N, \\qquad n_{l+1} = \\lceil n_l / F \\rceil \\ \\text{while } n_l > W,
        \\qquad \\mathrm{len}_l = F \\lceil n_l / F \\rceil \\ (\\text{root: } n_l).

    Args:
        size: number of leaves N (>= 1).
        fanout: children per node F (>= 2).
        root_width: largest root level W (>= 1); ``None`` for :data:`ROOT_WIDTH`.

    Returns:
        list of ints, the length of each level (leaves first, root last; one entry when
        N <= W).
    """
    width = ROOT_WIDTH if root_width is None else root_width
    lengths = []
    n = size
    while n > width:
        rows = -(-n // fanout)
        lengths.append(rows * fanout)
        n = rows
    lengths.append(n)
    return lengths


def _last_positive(block: np.ndarray) -> np.ndarray:
    # Column of the last positive entry of each row of ``block`` (the last column if none).
    fanout = block.shape[1]
    return fanout - 1 - np.argmax(block[:, ::-1] > 0, axis=1)


def _search_root(root: np.ndarray, t: np.ndarray) -> np.ndarray:
    # Node of the root level holding each target; t is reduced in place to the offset inside it.
    bounds = np.empty(root.shape[0] + 1, dtype=np.float64)
    bounds[0] = 0.0
    np.cumsum(root, out=bounds[1:])  # sequential, so monotone: zero nodes have empty intervals
    node = np.searchsorted(bounds, t, side="right")  # 1 + node: bounds[node] <= t < bounds[node + 1]
    node -= 1
    t -= bounds.take(node)
    if node.max() >= root.shape[0]:  # t >= the sum of the root: the last positive node
        past = node >= root.shape[0]
        node[past] = np.searchsorted(bounds, bounds[-1], side="left") - 1
        t[past] = np.inf
    return node


@functools.lru_cache(maxsize=64)
def _row_starts(count: int, width: int) -> np.ndarray:
    # Flat index of element 0 of each row of a (count, width) array.
    offsets = np.arange(count, dtype=np.int64) * width
    offsets.flags.writeable = False
    return offsets


def _descend(levels: list[np.ndarray], fanout: int, t: np.ndarray) -> np.ndarray:
    pos = _search_root(levels[-1], t)
    b = t.shape[0]
    prefix = np.empty((b, fanout + 1), dtype=np.float64)  # column k: s_k, the sum of children < k
    prefix[:, 0] = 0.0
    ends = prefix[:, 1:]
    flat = prefix.ravel()
    rows = _row_starts(b, fanout + 1)
    for depth in range(len(levels) - 2, -1, -1):
        block = levels[depth].reshape(-1, fanout).take(pos, axis=0)  # (b, F) child sums
        np.add.accumulate(block, axis=1, out=ends)  # sequential s_{k+1} = s_k + c_k: monotone
        child = np.argmax(ends > t[:, None], axis=1)  # first k with s_{k+1} > t; 0 if none
        past = ends[:, -1] <= t
        if depth:  # the leaf level needs no remaining target
            t -= flat.take(rows + child)  # s_k <= t, so t stays >= 0
        if past.any():  # t >= s_F (the node's end, or a rounding gap above it): last positive child
            child[past] = _last_positive(block[past])
            t[past] = np.inf
        pos *= fanout
        pos += child
    return pos


def descend(levels: list[np.ndarray], fanout: int, targets: np.ndarray) -> np.ndarray:
    """Prefix-sum search in a sum tree, vectorised over targets.

    For each target ``t`` returns the leaf ``i`` with

    .. math::

        \\sum_{j < i} v_j \\le t < \\sum_{j \\le i} v_j ,

    evaluated top-down with sequential float64 prefix sums (each
    :math:`s_{k+1} = s_k + c_k`, left to right, so they never decrease): one right-sided
    sorted search in the prefix sums of the root level, then, per level, the ``(b, F)``
    block of child sums of the current nodes is gathered, its row prefix sums formed, and
    each row takes the first child ``k`` with :math:`s_{k+1} > t`; the remaining target
    becomes :math:`t - s_k`. A target at or past the end of a node's children
    (:math:`t \\ge s_F`: ``t = total``, or a rounding gap between a parent's stored sum and
    the sequential sum of its children) goes to the node's last positive child, and to the
    last positive leaf below it (the remaining target becomes ``inf``). Every step is a
    fixed sequence of float64 operations, so the result is defined bit for bit, and the
    compiled kernels (:mod:`isample._engine_kernels`) reproduce it exactly. The returned
    leaf always has a positive value: a child picked by :math:`s_k \\le t < s_{k+1}` has
    :math:`c_k > 0`, so zero values have empty intervals and no zero or padding leaf is
    ever returned.

    Args:
        levels: the level arrays, leaves first, root last (see :func:`tree_layout`); every
            internal node is the sum of its children (any order) and the total is positive.
        fanout: children per node F.
        targets: float64 array of shape (b,), values in [0, total] (not checked here).

    Returns:
        int64 array of shape (b,), the leaf indices.
    """
    targets = np.asarray(targets, dtype=np.float64).ravel()
    if targets.shape[0] > _CHUNK:  # bound the O(b F) scratch memory
        return np.concatenate(
            [descend(levels, fanout, targets[i : i + _CHUNK]) for i in range(0, targets.shape[0], _CHUNK)]
        )
    if targets.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return _descend(levels, fanout, targets.copy())


def propagate(levels: list[np.ndarray], fanout: int, leaf_indices: np.ndarray) -> None:
    """Recompute, in place, every ancestor of the given leaves from its children.

    Each touched parent becomes ``np.add.reduce`` of its ``F`` children, the reduction a
    full rebuild uses, so the tree stays bit-for-bit the tree rebuilt from its leaves:
    repeated parents are harmless and no rounding drift accumulates.

    .. math::

        s_{l+1}[r] = \\sum_{k < F} s_l[F r + k]

    Args:
        levels: the level arrays, leaves first, root last; leaves already written.
        fanout: children per node F.
        leaf_indices: int64 array of shape (u,), the written leaves.
    """
    if leaf_indices.shape[0] > _CHUNK:  # bound the O(u F) scratch memory
        for i in range(0, leaf_indices.shape[0], _CHUNK):
            propagate(levels, fanout, leaf_indices[i : i + _CHUNK])
        return
    node = leaf_indices // fanout
    top = len(levels) - 1
    for depth in range(top):
        sums = np.add.reduce(levels[depth].reshape(-1, fanout).take(node, axis=0), axis=1)
        levels[depth + 1][node] = sums
        if depth + 1 < top:
            node //= fanout


def _rebuild(levels: list[np.ndarray], fanout: int) -> None:
    for depth in range(len(levels) - 1):
        child = levels[depth].reshape(-1, fanout)
        np.add.reduce(child, axis=1, out=levels[depth + 1][: child.shape[0]])


def _aligned_zeros(count: int, align: int = 64) -> np.ndarray:
    # float64 zeros starting on a cache-line boundary: with F = 16 a node's children (128
    # bytes, at a multiple of 128 from the start) then span 2 cache lines instead of 3.
    raw = np.zeros(count + align // 8, dtype=np.float64)
    skip = (-raw.ctypes.data % align) // 8
    return raw[skip : skip + count]


def _total(levels: list[np.ndarray]) -> float:
    return float(np.add.reduce(levels[-1]))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or ``None`` where unknown.

    Reads ``MemAvailable`` from ``/proc/meminfo`` (Linux), else
    ``os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')``.

    Returns:
        int bytes, or None.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    if pages <= 0 or page <= 0:
        return None
    return int(pages) * int(page)


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    # The compiled kernels module, or None where numba does not import (not installed, or a
    # numba that refuses this NumPy). Imported on first use, never at ``import isample``.
    try:
        from . import _engine_kernels
    except ImportError:
        return None
    return _engine_kernels


def compiled_available() -> bool:
    """Whether the compiled kernels can be used (numba imports); imports numba on first call.

    Returns:
        bool.
    """
    return _kernels() is not None


@functools.cache
def _kernels_agree(fanout: int) -> bool:
    # One-off check per fanout, on a small random tree, that the compiled kernels give the
    # NumPy path's sums and leaves bit for bit (it also compiles them, or loads numba's cache).
    kernels = _kernels()
    rng = np.random.default_rng(fanout)
    size = 3 * fanout + 1
    lengths = tree_layout(size, fanout, 1)
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    bounds = np.array(lengths, dtype=np.int64)
    compiled = np.zeros(sum(lengths))
    reference = np.zeros(sum(lengths))
    levels = [reference[a : a + n] for a, n in zip(starts.tolist(), lengths, strict=True)]
    leaves = np.arange(size, dtype=np.int64)
    values = np.exp(rng.uniform(-30.0, 30.0, size)) * (rng.random(size) < 0.8)
    values[0] = 1.0
    total_kernel = kernels.write_propagate_total(compiled, starts, bounds, fanout, leaves, values)
    levels[0][:size] = values
    _rebuild(levels, fanout)
    if compiled.tobytes() != reference.tobytes() or total_kernel != _total(levels):
        return False
    total = float(np.add.reduce(levels[-1]))
    targets = np.concatenate([rng.random(64) * total, [0.0, total], np.cumsum(values)[:-1]])
    targets = np.minimum(targets, total)
    expected = descend(levels, fanout, targets)
    return bool(
        np.array_equal(kernels.descend(compiled, starts, bounds, fanout, targets), expected)
        and np.array_equal(kernels.descend_by_level(compiled, starts, bounds, fanout, targets), expected)
    )


def resolve_backend(backend: str | None = None, fanout: int = 16) -> str:
    """The backend a :class:`SumTree` will use: ``"numpy"`` or ``"numba"``.

    Args:
        backend: one of :data:`BACKENDS`, or ``None`` for the environment variable
            :data:`ENGINE_ENV` (``ISAMPLE_ENGINE``), itself ``auto`` when unset or empty.
        fanout: the tree's fanout; the compiled kernels are checked against the NumPy path
            once per fanout (``auto`` falls back to NumPy if they disagree).

    Returns:
        str, ``"numba"`` for the compiled kernels, ``"numpy"`` for the pure NumPy path.

    Raises:
        TypeError: ``backend`` is not a str (or None).
        ValueError: ``backend`` or the environment variable is not one of :data:`BACKENDS`.
        ImportError: ``numba`` was asked for and numba does not import.
        RuntimeError: ``numba`` was asked for and its kernels disagree with the NumPy path.
    """
    owner = "SumTree"
    if backend is None:
        raw = os.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
        if raw not in BACKENDS:
            raise ValueError(
                f"The environment variable {ENGINE_ENV} must be one of "
                + ", ".join(repr(c) for c in BACKENDS)
                + f" (or unset). Got {os.environ.get(ENGINE_ENV)!r}."
            )
        backend = raw
    elif not isinstance(backend, str):
        raise param_error("backend", owner, "a str (" + ", ".join(BACKENDS) + ") or None", backend, TypeError)
    check_choice(backend, "backend", owner, BACKENDS)
    if backend == "numpy":
        return "numpy"
    if _kernels() is None:
        if backend == "numba":
            raise ImportError(
                "SumTree(backend='numba') needs numba, which does not import here; install it with "
                "`pip install isample[fast]` (or numba), or use backend='numpy'."
            )
        return "numpy"
    if not _kernels_agree(fanout):
        if backend == "numba":
            raise RuntimeError(
                f"The compiled SumTree kernels disagree with the NumPy path for fanout {fanout} "
                f"(numba {_kernels().NUMBA_VERSION}, numpy {np.__version__}); use backend='numpy'."
            )
        return "numpy"
    return "numba"


class SumTree:
    """A table of ``size`` non-negative float64 values with O(b log N) weighted draws and updates.

    All values start at zero. Draws pick index ``i`` with probability

    .. math::

        p_i = \\frac{v_i}{\\sum_j v_j},

    and never return a zero-valued leaf. The tree is F-ary (``fanout`` children per node),
    level arrays stored contiguously in one float64 buffer, and its root level (at most
    :data:`ROOT_WIDTH` nodes) is searched with one prefix sum; see the module docstring for
    the algorithm, the memory bound and why sums do not drift.

    References:
        Schaul, Quan, Antonoglou and Silver, "Prioritized Experience Replay", ICLR 2016,
        arXiv 1511.05952 (the binary sum tree for proportional sampling; this is an F-ary,
        batch-vectorised variant).

    Args:
        size: number of leaves N (int >= 1).
        fanout: children per node F (int in [2, 256], default 16).
        rebuild_every: number of leaf writes between automatic full rebuilds (int >= 1), or
            ``None`` (default) for ``max(size, 2**16)``, an amortised O(1) cost per write.
        root_width: the first level with at most this many nodes is the root level, searched
            with one prefix sum over its nodes (int >= 1, default :data:`ROOT_WIDTH`); a
            table of at most ``root_width`` values is a single flat level.
        backend: ``"auto"``, ``"numpy"`` or ``"numba"`` (see :data:`BACKENDS` and
            :func:`resolve_backend`); ``None`` (default) reads the environment variable
            ``ISAMPLE_ENGINE``, else ``"auto"``: the compiled kernels when numba is installed.
            Both backends give the same draws and the same sums bit for bit.

    Raises:
        TypeError: ``size``, ``fanout``, ``rebuild_every`` or ``root_width`` is not an int
            (bool included), or ``backend`` not a str.
        ValueError: one of them is out of range.
        ImportError: ``backend="numba"`` without numba.
        MemoryError: the table (:meth:`memory_estimate` bytes) does not fit in the memory
            available now; raised before anything is allocated.

    Example::

        >>> tree = SumTree(5)
        >>> tree.fill([1.0, 0.0, 2.0, 0.0, 1.0])
        >>> tree.total
        4.0
        >>> idx = tree.sample(1000, np.random.default_rng(0))
        >>> sorted(set(idx.tolist()))  # never 1 or 3
        [0, 2, 4]
        >>> tree.set([2, 2], [5.0, 3.0])  # last write wins
        >>> tree.get([2]).tolist()
        [3.0]
    """

    #: Keys of :meth:`state_dict`.
    STATE_SIZE = "size"
    STATE_VALUES = "values"

    def __init__(
        self,
        size: int,
        fanout: int = 16,
        rebuild_every: int | None = None,
        *,
        root_width: int = ROOT_WIDTH,
        backend: str | None = None,
    ) -> None:
        size = check_int(size, "size", _OWNER, minimum=1)  # type: ignore[assignment]
        fanout = check_int(fanout, "fanout", _OWNER, minimum=2, maximum=_MAX_FANOUT)  # type: ignore[assignment]
        rebuild_every = check_int(rebuild_every, "rebuild_every", _OWNER, minimum=1, allow_none=True)
        root_width = check_int(root_width, "root_width", _OWNER, minimum=1)  # type: ignore[assignment]
        needed = self.memory_estimate(size, fanout, root_width=root_width)
        free = available_memory()
        if free is not None and needed > free:
            raise MemoryError(
                f"A SumTree of size {size} needs about {needed} bytes ({needed / 2**30:.2f} GiB) "
                f"but only {free} bytes ({free / 2**30:.2f} GiB) of memory are available."
            )
        self._size = size
        self._fanout = fanout
        self._rebuild_every_arg = rebuild_every
        self._rebuild_every = rebuild_every if rebuild_every is not None else max(size, 1 << 16)
        self._root_width = root_width
        self._backend_arg = backend
        self._backend = resolve_backend(backend, fanout)
        self._kernels = _kernels() if self._backend == "numba" else None
        self._by_level = size >= BY_LEVEL_MIN
        self._value_cap = float(np.finfo(np.float64).max) / size
        lengths = tree_layout(size, fanout, root_width)
        self._buf = _aligned_zeros(sum(lengths))
        self._levels: list[np.ndarray] = []
        start = 0
        for length in lengths:
            self._levels.append(self._buf[start : start + length])
            start += length
        self._starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)  # level offsets in the buffer
        self._lengths = np.array(lengths, dtype=np.int64)
        self._total = 0.0
        self._writes = 0

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """Number of leaves N."""
        return self._size

    @property
    def fanout(self) -> int:
        """Children per internal node F."""
        return self._fanout

    @property
    def backend(self) -> str:
        """``"numba"`` (compiled kernels) or ``"numpy"``: the path this tree's draws and updates take."""
        return self._backend

    @property
    def total(self) -> float:
        """Sum of all values (float)."""
        return self._total

    @property
    def nbytes(self) -> int:
        """Bytes held by the tree's buffer (leaves, padding and internal sums)."""
        return int(self._buf.nbytes)

    @staticmethod
    def memory_estimate(size: int, fanout: int = 16, *, root_width: int = ROOT_WIDTH) -> int:
        """Bytes a :class:`SumTree` of ``size`` leaves allocates: its buffer.

        Draws and updates add scratch of O(min(b, 65536) F) bytes (b targets or updates per
        call, processed in chunks of at most 65536), plus their own results. Whenever
        ``root_width >= fanout`` (always with the defaults) the buffer is at most ``24 N``
        bytes, three float64 words per leaf.

        .. math::

            8 \\sum_l \\mathrm{len}_l \\le 8 \\left(N + \\frac{N}{F - 1} + F \\log_F N\\right)
            \\ \\text{bytes (see :func:`tree_layout`)}.

        Args:
            size: number of leaves N (int >= 1).
            fanout: children per node F (int in [2, 256]).
            root_width: largest root level (int >= 1).

        Returns:
            int, bytes.
        """
        owner = f"{_OWNER}.memory_estimate"
        size = check_int(size, "size", owner, minimum=1)  # type: ignore[assignment]
        fanout = check_int(fanout, "fanout", owner, minimum=2, maximum=_MAX_FANOUT)  # type: ignore[assignment]
        root_width = check_int(root_width, "root_width", owner, minimum=1)  # type: ignore[assignment]
        return 8 * sum(tree_layout(size, fanout, root_width))

    # ------------------------------------------------------------------ reading

    def values(self) -> np.ndarray:
        """A read-only view of the N leaf values (float64 array of shape (N,))."""
        view = self._levels[0][: self._size].view()
        view.flags.writeable = False
        return view

    def get(self, indices: Any, check: bool = True) -> np.ndarray:
        """Leaf values at ``indices``.

        Args:
            indices: integer array-like of any shape, entries in [0, size).
            check: validate ``indices`` (default). ``False`` is for callers that guarantee
                int64 indices in [0, size) (a hot path); then nothing is checked.

        Returns:
            float64 array of the same shape as ``indices``.

        Raises:
            TypeError: ``indices`` is not integer.
            IndexError: an index is outside [0, size).
        """
        if not check:
            return self._levels[0].take(indices)
        return self._levels[0].take(self._check_indices(indices, "get"))

    def find(self, targets: Any, check: bool = True) -> np.ndarray:
        """Prefix-sum search: the index ``i`` with ``prefix(i) <= t < prefix(i + 1)`` per target.

        .. math::

            \\mathrm{prefix}(i) = \\sum_{j < i} v_j

        (float64 prefix sums, exact up to rounding). A target equal to :attr:`total` gives
        the last positive leaf. Zero-valued leaves have empty intervals and are never
        returned.

        Args:
            targets: real array-like, flattened to shape (b,), values in [0, total].

        Returns:
            int64 array of shape (b,), indices in [0, size).

        Raises:
            ValueError: a target is NaN, negative or above the total, or the total is 0.
        """
        t = np.asarray(targets, dtype=np.float64).ravel()
        if not check:  # the caller guarantees 0 <= t <= total and total > 0 (hot path)
            return self._descend(t)
        if t.size:
            lo, hi = t.min(), t.max()
            if not (lo >= 0) or not (hi <= self._total):
                raise ValueError(
                    f"The 'targets' parameter of SumTree.find must lie in [0, total={self._total!r}] "
                    f"(no NaN). Got values in [{lo!r}, {hi!r}]."
                )
        self._require_positive_total("find")
        return self._descend(t)

    def sample(self, count: int, rng: np.random.Generator, replacement: bool = True) -> np.ndarray:
        """Draw ``count`` indices with probability proportional to value.

        With ``replacement=True`` the draws are i.i.d., :math:`P(i) = v_i / \\sum_j v_j`.

        With ``replacement=False`` the result is a *successive* (sequential) sample without
        replacement: draw one index from :math:`p`, remove it, renormalise, draw again, and
        so on. An ordered outcome :math:`(i_1, \\dots, i_k)` has probability

        .. math::

            P(i_1, \\dots, i_k) = \\prod_{j=1}^{k}
                \\frac{v_{i_j}}{V - \\sum_{m < j} v_{i_m}}, \\qquad V = \\sum_i v_i ,

        and the inclusion probability :math:`\\pi_i = P(i \\in \\{i_1, \\dots, i_k\\})` is the
        sum of these over the ordered outcomes holding ``i``. It has no closed form; it
        satisfies :math:`\\sum_i \\pi_i = k`, :math:`p_i \\le \\pi_i \\le 1`, is ordered like
        :math:`v_i`, and for k > 1 is not proportional to :math:`v_i`: large values are
        included less often than :math:`k p_i`, small ones more often. So ``1 / (N p_i)``
        weights are not exactly unbiased for it. This is the scheme of
        ``numpy.random.Generator.choice(replace=False, p=...)``.

        It runs in rounds: draw the missing number of indices i.i.d. from the tree, keep the
        new distinct ones in order of first appearance (for i.i.d. draws this is exactly
        successive sampling), set their leaves to zero, repeat until ``count`` are kept,
        then restore the leaves. The tree is left bit-for-bit unchanged.

        References:
            Efraimidis and Spirakis, "Weighted random sampling with a reservoir", Information
            Processing Letters 97(5), 2006 (their algorithm A-ES draws from this same
            successive-sampling distribution).

        Args:
            count: number of indices (int >= 0).
            rng: the NumPy generator to draw from.
            replacement: i.i.d. draws (True, default) or distinct indices (False).

        Returns:
            int64 array of shape (count,), indices in [0, size) with positive values;
            distinct, in the order drawn, when ``replacement=False``.

        Raises:
            TypeError: ``rng`` is not a ``numpy.random.Generator``, ``count`` not an int, or
                ``replacement`` not a bool.
            ValueError: the total is 0 (and ``count`` > 0), or ``replacement=False`` and
                fewer than ``count`` values are positive.
        """
        owner = f"{_OWNER}.sample"
        if type(count) is not int or count < 0:
            count = check_int(count, "count", owner, minimum=0)  # type: ignore[assignment]
        if not isinstance(rng, np.random.Generator):
            raise param_error("rng", owner, "a numpy.random.Generator", rng, TypeError)
        if replacement is not True and replacement is not False and not isinstance(replacement, np.bool_):
            raise param_error("replacement", owner, "a bool", replacement, TypeError)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        self._require_positive_total("sample")
        if replacement:
            return self._descend(rng.random(count) * self._total)
        return self._sample_distinct(count, rng)

    def _sample_distinct(self, count: int, rng: np.random.Generator) -> np.ndarray:
        leaves = self._levels[0]
        chosen: list[np.ndarray] = []
        saved: list[np.ndarray] = []
        have = 0
        try:
            while have < count:
                if not self._total > 0:
                    raise ValueError(
                        f"SumTree.sample(replacement=False) needs at least count={count} positive "
                        f"values; only {have} are positive."
                    )
                draws = self._descend(rng.random(count - have) * self._total)
                uniq, first = np.unique(draws, return_index=True)
                new = uniq[np.argsort(first, kind="stable")]  # order of first appearance
                chosen.append(new)
                saved.append(leaves[new])
                have += new.shape[0]
                leaves[new] = 0.0
                self._propagate(new)
        finally:
            if chosen:
                drawn = np.concatenate(chosen)
                leaves[drawn] = np.concatenate(saved)
                self._propagate(drawn)
        return drawn

    # ------------------------------------------------------------------ writing

    def set(self, indices: Any, values: Any, check: bool = True) -> None:
        """Set leaves ``indices`` to ``values`` and update the sums in O(u F log_F N).

        Repeated indices in one call: the last write wins (the value at the last position
        where the index occurs), independent of NumPy's scatter order.

        Args:
            indices: integer array-like of shape (u,), entries in [0, size).
            values: real array-like of shape (u,), or a scalar for all; >= 0 and at most
                ``float64 max / size`` (so the total stays finite).

        Raises:
            TypeError: ``indices`` is not integer.
            IndexError: an index is outside [0, size).
            ValueError: the lengths differ, or a value is negative, NaN or infinite.
        """
        if not check:  # the caller guarantees int64 indices in range and finite values >= 0
            idx = np.asarray(indices, dtype=np.int64).ravel()
            val = np.asarray(values, dtype=np.float64).ravel()
            if idx.shape[0]:
                self._write_leaves(idx, val)
            return
        idx = self._check_indices(indices, "set").ravel()
        val = np.asarray(values, dtype=np.float64)
        if val.ndim == 0:
            val = np.full(idx.shape[0], float(val))
        val = val.ravel()
        if val.shape[0] != idx.shape[0]:
            raise ValueError(
                f"The 'values' parameter of SumTree.set must have one value per index "
                f"({idx.shape[0]}). Got {val.shape[0]} values."
            )
        if idx.shape[0] == 0:
            return
        self._check_values(val, "values", "set")
        self._write_leaves(idx, val)

    def _write_leaves(self, idx: np.ndarray, val: np.ndarray) -> None:
        """Write leaves (last write wins for repeated indices) and update the sums."""
        if self._kernels is not None:  # the total is np.add.reduce of the root, computed in the kernel
            self._total = self._kernels.write_propagate_total(
                self._buf, self._starts, self._lengths, self._fanout, idx, np.ascontiguousarray(val)
            )
            self._count_writes(idx.shape[0])
            return
        leaves = self._levels[0]
        leaves[idx] = val
        if not (leaves.take(idx) == val).all():
            # Repeated indices with different values: NumPy promises no order for repeated
            # fancy assignment, so write the last occurrence of each index explicitly.
            order = np.argsort(idx, kind="stable")  # equal indices keep their call order
            ordered = idx.take(order)
            last = np.empty(ordered.shape[0], dtype=bool)
            last[-1] = True
            np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
            leaves[ordered[last]] = val.take(order[last])
        self._propagate(idx)
        self._count_writes(idx.shape[0])

    def _count_writes(self, count: int) -> None:
        self._writes += count
        if self._writes >= self._rebuild_every:
            self.rebuild()

    def fill(self, values: Any) -> None:
        """Replace all N leaves and rebuild the sums in O(N), without a temporary copy of the table.

        Args:
            values: real array-like of shape (N,), >= 0 and at most ``float64 max / size``
                (any real dtype).

        Raises:
            TypeError: ``values`` is not real.
            ValueError: wrong shape, or a value is negative, NaN or infinite.
        """
        arr = np.asarray(values)
        if arr.ndim != 1 or arr.shape[0] != self._size:
            raise ValueError(
                f"The 'values' parameter of SumTree.fill must have shape ({self._size},). "
                f"Got shape {arr.shape}."
            )
        if arr.dtype == np.bool_ or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise param_error("values", "SumTree.fill", "a real array", arr.dtype, TypeError)
        self._check_values(arr, "values", "fill")
        np.copyto(self._levels[0][: self._size], arr, casting="unsafe")
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute every internal sum from the leaves, O(N)."""
        _rebuild(self._levels, self._fanout)
        self._total = _total(self._levels)
        self._writes = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The leaves (a float64 copy) and the size; internal sums are rebuilt on load.

        Returns:
            dict with keys :attr:`STATE_SIZE` (int) and :attr:`STATE_VALUES` (array (N,)).
        """
        return {self.STATE_SIZE: self._size, self.STATE_VALUES: self.values().copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load leaves saved by :meth:`state_dict` and rebuild the sums.

        Raises:
            KeyError: a key is missing.
            ValueError: the saved size differs from this tree's, or the values are invalid.
        """
        missing = [key for key in (self.STATE_SIZE, self.STATE_VALUES) if key not in state]
        if missing:
            raise KeyError(f"SumTree.load_state_dict: the state is missing the keys {missing}.")
        saved = int(state[self.STATE_SIZE])
        if saved != self._size:
            raise ValueError(
                f"SumTree.load_state_dict: the state holds {saved} values but this tree has "
                f"size {self._size}."
            )
        self.fill(np.asarray(state[self.STATE_VALUES]))

    def __getstate__(self) -> dict[str, Any]:
        # The level arrays are views of one buffer: pickle the leaves only and rebuild.
        return {
            "size": self._size,
            "fanout": self._fanout,
            "rebuild_every": self._rebuild_every_arg,
            "root_width": self._root_width,
            "backend": self._backend_arg,
            "values": self.values().copy(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["size"],
            state["fanout"],
            state["rebuild_every"],
            root_width=state["root_width"],
            backend=state.get("backend"),
        )
        self.fill(state["values"])

    def __repr__(self) -> str:
        return (
            f"SumTree(size={self._size}, fanout={self._fanout}, total={self._total!r}, "
            f"backend={self._backend!r})"
        )

    # ------------------------------------------------------------------ helpers

    def _descend(self, targets: np.ndarray) -> np.ndarray:
        # targets: float64 (b,), in [0, total], total > 0 (checked by the callers).
        if self._kernels is None:
            return descend(self._levels, self._fanout, targets)
        kernel = self._kernels.descend_by_level if self._by_level else self._kernels.descend
        return kernel(self._buf, self._starts, self._lengths, self._fanout, np.ascontiguousarray(targets))

    def _draw_mixture(self, u: np.ndarray, n: int, share: float, total: float) -> Any:
        # Compiled TableSampler draw over a fully visited table (see
        # isample._engine_kernels.draw_visited): (indices, probabilities), or None on the
        # NumPy backend (the caller runs its vectorised code, the same arrays bit for bit).
        if self._kernels is None:
            return None
        return self._kernels.draw_visited(
            self._buf, self._starts, self._lengths, self._fanout, self._by_level, u, n, share, total
        )

    def _propagate(self, idx: np.ndarray) -> None:
        if self._kernels is None:
            propagate(self._levels, self._fanout, idx)
        else:
            self._kernels.propagate(
                self._buf, self._starts, self._lengths, self._fanout, np.ascontiguousarray(idx, np.int64)
            )
        self._total = _total(self._levels)

    def _check_indices(self, indices: Any, method: str) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype != np.int64:
            if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
                if idx.size == 0:
                    return np.zeros(idx.shape, dtype=np.int64)
                raise param_error("indices", f"{_OWNER}.{method}", "an integer array", idx.dtype, TypeError)
            if idx.dtype == np.uint64 and idx.size and idx.max() > np.iinfo(np.int64).max:
                raise IndexError(
                    f"The 'indices' parameter of {_OWNER}.{method} must lie in [0, {self._size}). "
                    f"Got index {int(idx.max())}."
                )
            idx = idx.astype(np.int64)
        # One pass: as unsigned, a negative index is huge, so max < size checks both ends.
        if idx.size and not idx.view(np.uint64).max() < self._size:
            lo = int(idx.min())
            raise IndexError(
                f"The 'indices' parameter of {_OWNER}.{method} must lie in [0, {self._size}). "
                f"Got index {lo if lo < 0 else int(idx.max())}."
            )
        return idx

    def _check_values(self, val: np.ndarray, name: str, method: str) -> None:
        # Values up to DBL_MAX / N keep every sum finite. min >= 0 is False for NaN, and
        # max <= cap is False for NaN and inf: two passes, no temporaries, no warnings.
        if val.size == 0:
            return
        cap = self._value_cap
        lo, hi = val.min(), val.max()
        if lo >= 0 and hi <= cap:
            return
        where = f"The '{name}' parameter of {_OWNER}.{method}"
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{where} must not contain NaN.")
        if lo < 0:
            raise ValueError(f"{where} must be >= 0. Got a negative value {lo!r}.")
        if not math.isfinite(hi):
            raise ValueError(f"{where} must be finite. Got {hi!r}.")
        raise ValueError(
            f"{where} must be at most {cap!r} (the float64 maximum / size, so that the total stays "
            f"finite). Got {hi!r}."
        )

    def _require_positive_total(self, method: str) -> None:
        if not self._total > 0:
            raise ValueError(f"{_OWNER}.{method} needs a positive total; all {self._size} values are zero.")
