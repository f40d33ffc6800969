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
* :func:`mixing_observe`: one update of :class:`isample.staleness.AdaptiveMixing` (the
  second-moment estimates of :func:`isample.staleness.mixing_second_moments`, their moving
  averages and the level choice) in one call, with NumPy's element-wise float64 operations
  in the same order and its pairwise summation for the mean (:func:`pairwise_sum`).
* :func:`write_and_propagate` / :func:`propagate`: leaf writes in call order (the last write
  wins) and every touched parent recomputed as the sum of its children in the order of
  ``numpy.add.reduce`` over a contiguous row (:func:`row_sum`, NumPy's pairwise summation:
  eight interleaved partial sums in blocks of at most 128, halves above that).

All kernels take the tree's single float64 buffer with the start and length of every level
(leaves first, root last) as int64 arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "descend",
    "descend_by_level",
    "write_and_propagate",
    "propagate",
    "row_sum",
    "pairwise_sum",
    "mixing_observe",
    "draw_visited",
    "write_propagate_total",
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


@_jit
def pairwise_sum(buf, start, n):  # pragma: no cover - compiled
    """``numpy.add.reduce`` of ``buf[start : start + n]`` (a contiguous row, any n), bit for bit.

    NumPy's pairwise summation: blocks of at most 128 values (:func:`_block_sum`), above
    that the halves split at ``n2 = n // 2 - (n // 2) % 8`` and added.
    """
    if n <= 256:
        return row_sum(buf, start, n)
    return 0.0 + _pairwise(buf, start, n)


@_jit
def _pairwise(buf, start, n):  # pragma: no cover - compiled
    # The recursion of NumPy's pairwise_sum, run on an explicit stack (numba's cache does
    # not handle recursive functions): a node of n > 128 values is the sum of its left half
    # (n2 values) and its right half, each evaluated completely, left first.
    if n <= 128:
        return _block_sum(buf, start, n)
    first = np.empty(64, dtype=np.int64)
    count = np.empty(64, dtype=np.int64)
    left = np.empty(64, dtype=np.float64)
    state = np.empty(64, dtype=np.int64)  # 0: left half pending, 1: right half pending
    sp = 0
    first[0] = start
    count[0] = n
    state[0] = 0
    while True:
        m = count[sp]
        if m > 128:  # descend into the left half
            m2 = m // 2
            m2 -= m2 % 8
            first[sp + 1] = first[sp]
            count[sp + 1] = m2
            state[sp + 1] = 0
            sp += 1
            continue
        val = _block_sum(buf, first[sp], m)
        sp -= 1
        while sp >= 0:  # hand the finished sum to its parents
            if state[sp] == 0:  # it was the left half: keep it, evaluate the right half
                left[sp] = val
                state[sp] = 1
                m2 = count[sp] // 2
                m2 -= m2 % 8
                first[sp + 1] = first[sp] + m2
                count[sp + 1] = count[sp] - m2
                state[sp + 1] = 0
                sp += 1
                break
            val = left[sp] + val
            sp -= 1
        if sp < 0:
            return val


@_jit
def mixing_observe(
    stale,
    fresh,
    total,
    n,
    base_share,
    draw_level,
    levels,
    moments,
    spread,
    momentum,
    decide,
    debias,
    n_eff,
    confidence,
    hysteresis,
    current,
):  # pragma: no cover - compiled
    """One :meth:`isample.staleness.AdaptiveMixing.observe` (``draw_level < 0``: ``observe_full``).

    Computes the estimate ``M(lambda)`` of every level as
    :func:`isample.staleness.mixing_second_moments` does (same float64 operations, same
    order, NumPy's pairwise mean); returns -2 when it is empty or not finite (nothing
    changes). Otherwise updates ``moments`` and ``spread`` in place (the moving averages)
    and, with ``decide``, returns the index of the level to use from now on (``current``
    if it stays; :meth:`isample.staleness.AdaptiveMixing.relative_change` and the
    hysteresis rule); -1 without ``decide``.
    """
    k = stale.shape[0]
    nl = levels.shape[0]
    if k == 0:
        return -2
    row = np.empty(k, dtype=np.float64)
    s2 = np.empty(k, dtype=np.float64)
    x = np.empty(k, dtype=np.float64)  # N t_j / T
    nd = np.empty(k, dtype=np.float64)  # N q of the draw
    est = np.empty(nl, dtype=np.float64)
    full = draw_level < 0.0
    ds = draw_level + (1.0 - draw_level) * base_share
    for j in range(k):
        s2[j] = fresh[j] * fresh[j]
        if total <= 0.0:
            x[j] = 0.0
            nd[j] = 1.0
        else:
            x[j] = n * (stale[j] / total)
            nd[j] = ds + (1.0 - ds) * x[j]
    for li in range(nl):
        lev = levels[li]
        share = lev + (1.0 - lev) * base_share
        for j in range(k):
            nq = 1.0 if total <= 0.0 else share + (1.0 - share) * x[j]
            row[j] = s2[j] / nq if full else s2[j] / (nd[j] * nq)
        e = pairwise_sum(row, 0, k) / k
        if not math.isfinite(e):
            return -2
        est[li] = e
    a = momentum
    for li in range(nl):
        moments[li] = a * moments[li] + (1.0 - a) * est[li]
        d = est[li] - est[0]
        spread[li] = a * spread[li] + (1.0 - a) * (d * d)
    if not decide:
        return -1
    mean0 = moments[0] / debias
    best = 0
    best_r = 0.0
    cur_r = 0.0
    for li in range(nl):
        if mean0 > 0:
            mean = moments[li] / debias
            diff = mean - mean0
            var = spread[li] / debias - diff * diff
            if var < 0.0:  # np.maximum(var, 0.0); NaN stays NaN
                var = 0.0
            r = (diff + confidence * math.sqrt(var / n_eff)) / mean0
        else:
            r = 0.0
        if li == 0:
            best_r = r
        elif best_r == best_r and (r < best_r or r != r):  # np.argmin: the first NaN, else the first minimum
            best = li
            best_r = r
        if li == current:
            cur_r = r
    margin = hysteresis if levels[best] < levels[current] else 0.0
    if best != current and best_r < cur_r - margin:
        return best
    return current


@_jit
def write_propagate_total(buf, starts, lengths, fanout, leaves, values):  # pragma: no cover - compiled
    """:func:`write_and_propagate`, then the new total: ``numpy.add.reduce`` of the root level."""
    touched = write_and_propagate(buf, starts, lengths, fanout, leaves, values)
    top = starts.shape[0] - 1
    total = pairwise_sum(buf, starts[top], lengths[top])
    return total if touched >= 0.0 else -1.0  # touched >= 0 always: keeps the load passes


@_jit
def draw_visited(buf, starts, lengths, fanout, by_level, u, n, share, t_total):  # pragma: no cover - compiled
    """The draw of :meth:`isample.TableSampler.draw` when every example is visited and T >= tiny.

    ``u``: (3, b) float64 uniforms. Index ``j`` comes from the uniform component,
    ``min(int(u1 n), n - 1)``, unless ``u0 >= share``: then from the tree at target
    ``u2 T`` (:func:`descend_by_level` or :func:`descend`). Returns the int64 indices and
    their float64 probabilities ``share / n + (1 - share) (t_i / T)``: the NumPy path's
    operations in its order, so the same arrays bit for bit.
    """
    b = u.shape[1]
    idx = np.empty(b, dtype=np.int64)
    m = 0
    for j in range(b):
        i = np.int64(u[1, j] * n)
        if i > n - 1:
            i = n - 1
        idx[j] = i
        if u[0, j] >= share:
            m += 1
    if m:
        targets = np.empty(m, dtype=np.float64)
        where = np.empty(m, dtype=np.int64)
        c = 0
        for j in range(b):
            if u[0, j] >= share:
                targets[c] = u[2, j] * t_total
                where[c] = j
                c += 1
        if by_level:
            chosen = descend_by_level(buf, starts, lengths, fanout, targets)
        else:
            chosen = descend(buf, starts, lengths, fanout, targets)
        for c in range(m):
            idx[where[c]] = chosen[c]
    p = np.empty(b, dtype=np.float64)
    base = share / n
    rest = 1.0 - share
    for j in range(b):
        p[j] = base + rest * (buf[idx[j]] / t_total)
    return idx, p
