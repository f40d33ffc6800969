"""Compiled kernels of :class:`isample.engine.SumTree` (optional: needs numba).

Importing this module imports numba; :mod:`isample.engine` imports it lazily, the first time a
tree with the compiled backend is built, and every kernel is compiled on its first call
(``cache=True``: later processes load the machine code from numba's cache instead of
compiling again). Each kernel does, operation for operation, the float64 arithmetic of the
NumPy path in :mod:`isample.engine`, so both give the same results bit for bit:

* :func:`descend` / :func:`descend_by_level`: the search of :func:`isample.engine.descend`:
  sequential prefix sums of the root level and a right-sided binary search in them, then per
  level the sequential prefix sums ``s_{k+1} = s_k + c_k`` of the current node's children and
  the first child with ``s_{k+1} > t``; a target at or past a node's end goes to its last
  positive child with ``t = inf``.
* :func:`write_and_propagate` / :func:`propagate`: leaf writes in call order (the last write
  wins) and every touched parent recomputed as the sum of its children in the order of
  ``numpy.add.reduce`` over a contiguous row (:func:`row_sum`, NumPy's pairwise summation:
  eight interleaved partial sums in blocks of at most 128, halves above that).

All kernels take the tree's single float64 buffer with the start and length of every level
(leaves first, root last) as int64 arrays.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "descend",
    "descend_by_level",
    "write_and_propagate",
    "propagate",
    "row_sum",
    "NUMBA_VERSION",
]

NUMBA_VERSION = numba.__version__


def _jit(func):
    # cache=True writes the machine code next to this file, or to numba's user-wide cache
    # directory (NUMBA_CACHE_DIR overrides both). Where neither is writable numba refuses
    # cache=True when the function is decorated: compile in memory on each first call then.
    try:
        return numba.njit(cache=True, nogil=True)(func)
    except RuntimeError:
        return numba.njit(cache=False, nogil=True)(func)


@_jit
def _block_sum(buf, start, n):  # pragma: no cover - compiled
    # NumPy's pairwise summation of n <= 128 contiguous values (its unrolled base case).
    if n < 8:
        res = 0.0
        for i in range(n):
            res += buf[start + i]
        return res
    r0 = buf[start]
    r1 = buf[start + 1]
    r2 = buf[start + 2]
    r3 = buf[start + 3]
    r4 = buf[start + 4]
    r5 = buf[start + 5]
    r6 = buf[start + 6]
    r7 = buf[start + 7]
    stop = n - n % 8
    i = 8
    while i < stop:
        r0 += buf[start + i]
        r1 += buf[start + i + 1]
        r2 += buf[start + i + 2]
        r3 += buf[start + i + 3]
        r4 += buf[start + i + 4]
        r5 += buf[start + i + 5]
        r6 += buf[start + i + 6]
        r7 += buf[start + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += buf[start + i]
        i += 1
    return res


@_jit
def row_sum(buf, start, n):  # pragma: no cover - compiled
    """``numpy.add.reduce`` of ``buf[start : start + n]`` (n <= 256), bit for bit.

    Above 128 values NumPy splits at ``n2 = n // 2 - (n // 2) % 8`` and adds the two halves'
    sums; for n <= 256 each half then needs at most one more split.
    """
    if n <= 128:
        return 0.0 + _block_sum(buf, start, n)
    n2 = n // 2
    n2 -= n2 % 8
    rest = n - n2
    if rest <= 128:
        right = _block_sum(buf, start + n2, rest)
    else:
        m2 = rest // 2
        m2 -= m2 % 8
        right = _block_sum(buf, start + n2, m2) + _block_sum(buf, start + n2 + m2, rest - m2)
    return 0.0 + (_block_sum(buf, start, n2) + right)


@_jit
def _root_bounds(buf, root_start, width):  # pragma: no cover - compiled
    bounds = np.empty(width + 1, dtype=np.float64)
    bounds[0] = 0.0
    acc = buf[root_start]
    bounds[1] = acc
    for k in range(1, width):
        acc += buf[root_start + k]
        bounds[k + 1] = acc
    return bounds


@_jit
def _search_root(bounds, width, t):  # pragma: no cover - compiled
    # (node, remaining target): bounds[node] <= t < bounds[node + 1], as
    # numpy.searchsorted(bounds, t, "right") - 1; past the end: the last positive node, t = inf.
    # A branch-free binary search (the comparison picks the half, no jump to mispredict).
    base = 0
    n = width + 1
    while n > 1:
        half = n >> 1
        if bounds[base + half] <= t:
            base += half
        n -= half
    node = base - 1
    if bounds[base] <= t:
        node += 1
    if node < width:
        return node, t - bounds[node]
    end = bounds[width]
    lo = 0
    hi = width + 1
    while lo < hi:  # first index with bounds[index] >= end
        mid = (lo + hi) >> 1
        if bounds[mid] < end:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1, np.inf


@_jit
def _pick(buf, start, fanout, t):  # pragma: no cover - compiled
    # The child of the node whose children start at buf[start]: the first k with
    # s_{k+1} > t (sequential prefix sums s, which never decrease, so k is the number of
    # ends <= t and s_k the last of them); none: the last positive child with t = inf.
    s = 0.0
    count = 0
    before = 0.0
    for k in range(fanout):
        s += buf[start + k]
        if s <= t:
            count += 1
            before = s
    if count < fanout:
        return count, t - before
    for k in range(fanout - 1, -1, -1):
        if buf[start + k] > 0.0:
            return k, np.inf
    return fanout - 1, np.inf


@_jit
def _touch_blocks(buf, start, nodes, fanout):  # pragma: no cover - compiled
    # Load pass: one read per cache line (8 float64) of the children of each node, so that
    # the cache misses of all nodes overlap before any of them is needed.
    touched = 0.0
    for j in range(nodes.shape[0]):
        first = start + nodes[j] * fanout
        for k in range(0, fanout, 8):
            touched += buf[first + k]
        touched += buf[first + fanout - 1]
    return touched


@_jit
def descend(buf, starts, lengths, fanout, targets):  # pragma: no cover - compiled
    """Leaf of every target, one target at a time from the root to its leaf (int64 (b,))."""
    top = starts.shape[0] - 1
    width = lengths[top]
    bounds = _root_bounds(buf, starts[top], width)
    b = targets.shape[0]
    out = np.empty(b, dtype=np.int64)
    for i in range(b):
        node, t = _search_root(bounds, width, targets[i])
        for depth in range(top - 1, -1, -1):
            start = starts[depth] + node * fanout
            child, t = _pick(buf, start, fanout, t)
            node = node * fanout + child
        out[i] = node
    return out


@_jit
def descend_by_level(buf, starts, lengths, fanout, targets):  # pragma: no cover - compiled
    """Same results as :func:`descend`, all targets one level at a time.

    Every level starts with a load pass that touches each target's block of children: the
    loads are independent, so the processor overlaps their cache misses instead of waiting
    for each in turn (a win when the tree is much larger than the caches).
    """
    top = starts.shape[0] - 1
    width = lengths[top]
    bounds = _root_bounds(buf, starts[top], width)
    b = targets.shape[0]
    node = np.empty(b, dtype=np.int64)
    rest = np.empty(b, dtype=np.float64)
    for i in range(b):
        node[i], rest[i] = _search_root(bounds, width, targets[i])
    touched = 0.0
    for depth in range(top - 1, -1, -1):
        base = starts[depth]
        touched += _touch_blocks(buf, base, node, fanout)
        for i in range(b):
            child, rest[i] = _pick(buf, base + node[i] * fanout, fanout, rest[i])
            node[i] = node[i] * fanout + child
    if touched < 0.0:  # never (values are >= 0): keeps the load pass from being optimised away
        node[0] = -1
    return node


@_jit
def propagate(buf, starts, lengths, fanout, leaves):  # pragma: no cover - compiled
    """Recompute every ancestor of ``leaves`` as the sum of its children (in place).

    Returns the load passes' sum of touched values (only there so the loads are kept).
    """
    top = starts.shape[0] - 1
    u = leaves.shape[0]
    node = np.empty(u, dtype=np.int64)
    for j in range(u):
        node[j] = leaves[j] // fanout
    touched = 0.0
    for depth in range(top):
        child_start = starts[depth]
        parent_start = starts[depth + 1]
        touched += _touch_blocks(buf, child_start, node, fanout)
        last = -1
        for j in range(u):
            p = node[j]
            if p != last:  # a repeated parent in a row would get the same sum again
                buf[parent_start + p] = row_sum(buf, child_start + p * fanout, fanout)
                last = p
            node[j] = p // fanout
    return touched


@_jit
def write_and_propagate(buf, starts, lengths, fanout, leaves, values):  # pragma: no cover - compiled
    """Write ``values`` at ``leaves`` in order (the last write wins), then :func:`propagate`."""
    touched = 0.0
    if starts.shape[0] > 1:  # the leaves are padded to whole blocks (a lone root level is not)
        touched = _touch_blocks(buf, 0, leaves // fanout, fanout)  # the writes then hit the cache
    for j in range(leaves.shape[0]):
        buf[leaves[j]] = values[j]
    return touched + propagate(buf, starts, lengths, fanout, leaves)
