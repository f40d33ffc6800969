"""Speed and memory of the table engine (:class:`isample.engine.SumTree`) against torch's samplers.

For each table size N (float64 values, uniform in [0.5, 1.5)), one *step* of the engine is
``idx = tree.sample(256, rng)`` followed by ``tree.set(idx, scores)`` with 256 fresh
scores (drawn before timing). Baselines, measured in the same run, interleaved with the
engine (methods take turns, order rotated every repeat) so machine load affects all alike:

* ``multinomial``: ``torch.multinomial(probs, 256, replacement=True)`` over all N, probs a
  float32 tensor (torch's default dtype; float64 is slower). torch refuses N > 2**24.
* ``weighted_random_sampler``: one batch ``list(WeightedRandomSampler(weights, 256))``
  (float64 weights inside; the same 2**24 limit).
* ``batch_sampler``: ``next(it)`` on ``iter(BatchSampler(RandomSampler(range(N)), 256,
  False))``: plain uniform shuffling. Skipped at N = 1e8: its first batch materialises a
  Python list of N ints (about 4 GB).
* ``table_sampler``: :class:`isample.table_sampler.TableSampler` (when importable):
  ``next(it)`` then ``sampler.update(idx, scores)``.

Backends (``--kernels``, or part of the full run): ``find`` of 256 targets, ``set`` of 256
values at random indices, and the engine's part of a table step (``find``, ``get`` and ``set``
of the found indices) on the same table with the pure NumPy path (``backend="numpy"``) and the compiled
kernels (``backend="numba"``, both descents: target by target and level by level with a load
pass), interleaved with ``torch.multinomial`` over all N where torch allows it; and the start-up
costs of the compiled path, each in a fresh subprocess: ``import numba``, the first tree built
with a cold cache (compiles the kernels) and with a warm one (loads them from numba's cache).

Every figure is the median over ``repeats`` blocks (after warm-up) of the mean time per call
inside a block. Build time is ``SumTree(N)`` plus ``fill(values)``; peak memory is the
tracemalloc peak of everything the engine allocates during build and 50 steps (NumPy
reports its buffers to tracemalloc), next to the table itself (8 N bytes).

Run ``python benchmarks/bench_engine.py`` (full: N = 1e4 ... 1e8, several minutes, ~2-3 GB)
or ``--quick`` (N <= 1e6, seconds); ``--kernels`` runs only the backend comparison (N = 1e6,
1e7, 1e8 unless ``--sizes``) and the start-up costs. Writes JSON to ``benchmarks/results/engine.json``
(``engine_quick.json`` for ``--quick``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, WeightedRandomSampler

from isample.engine import ROOT_WIDTH, SumTree, compiled_available

BATCH = 256
MULTINOMIAL_LIMIT = 2**24
RESULTS = Path(__file__).resolve().parent / "results"


def _block_time(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per call over ``calls`` calls."""
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls


def _calls_per_block(fn: Callable[[], object], budget_s: float) -> int:
    """Calls per block so that a block takes about ``budget_s`` (at least 1)."""
    one = _block_time(fn, 1)[0]
    return max(1, min(2000, int(budget_s / max(one, 1e-7))))


def time_interleaved(
    methods: dict[str, Callable[[], object]], repeats: int, budget_s: float
) -> dict[str, dict[str, float]]:
    """Median (and spread) over ``repeats`` interleaved blocks of the mean seconds per call."""
    calls = {}
    for name, fn in methods.items():
        for _ in range(3):  # warm-up
            fn()
        calls[name] = _calls_per_block(fn, budget_s)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            samples[name].append(_block_time(methods[name], calls[name]))
    out = {}
    for name, vals in samples.items():
        wall = [w for w, _ in vals]
        cpu = [c for _, c in vals]
        out[name] = {
            "median_s": statistics.median(wall),
            "min_s": min(wall),
            "max_s": max(wall),
            "cpu_median_s": statistics.median(cpu),
            "calls_per_block": calls[name],
            "blocks": len(vals),
        }
    return out


def engine_methods(tree: SumTree, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    pool = [rng.random(BATCH) + 0.5 for _ in range(64)]
    state = {"k": 0}

    def scores() -> np.ndarray:
        state["k"] = (state["k"] + 1) % len(pool)
        return pool[state["k"]]

    def step() -> None:
        idx = tree.sample(BATCH, rng)
        tree.set(idx, scores())

    def draw() -> None:
        tree.sample(BATCH, rng)

    fixed_idx = [rng.integers(0, tree.size, BATCH) for _ in range(64)]

    def update() -> None:
        tree.set(fixed_idx[state["k"]], scores())

    return {"sumtree_step": step, "sumtree_draw": draw, "sumtree_set": update}


def baseline_methods(n: int, values: np.ndarray, seed: int) -> tuple[dict[str, Callable[[], object]], dict]:
    methods: dict[str, Callable[[], object]] = {}
    notes: dict[str, str] = {}
    gen = torch.Generator().manual_seed(seed)
    if n <= MULTINOMIAL_LIMIT:
        probs = torch.from_numpy(values).to(torch.float32)
        methods["multinomial"] = lambda: torch.multinomial(probs, BATCH, replacement=True, generator=gen)
        wrs = WeightedRandomSampler(torch.from_numpy(values), BATCH, replacement=True, generator=gen)
        methods["weighted_random_sampler"] = lambda: list(wrs)
    else:
        notes["multinomial"] = f"skipped: torch.multinomial refuses more than 2**24 categories (N = {n})"
        notes["weighted_random_sampler"] = "skipped: uses torch.multinomial (2**24 limit)"
    if n <= 10**7:
        batches = BatchSampler(RandomSampler(range(n), generator=gen), BATCH, False)
        holder = {"it": iter(batches)}

        def uniform() -> list[int]:
            try:
                return next(holder["it"])
            except StopIteration:
                holder["it"] = iter(batches)
                return next(holder["it"])

        methods["batch_sampler"] = uniform
    else:
        notes["batch_sampler"] = (
            "skipped: its first batch materialises a list of N Python ints (~4 GB at 1e8)"
        )
    try:
        from isample.table_sampler import TableSampler
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        notes["table_sampler"] = f"skipped: isample.table_sampler does not import ({exc!r})"
    else:
        sampler = TableSampler(n, BATCH, seed=seed)
        it_holder = {"it": iter(sampler)}
        rng = np.random.default_rng(seed + 1)
        scores = [rng.random(BATCH) + 0.5 for _ in range(64)]
        k = {"k": 0}

        def table_step() -> None:
            try:
                batch = next(it_holder["it"])
            except StopIteration:
                it_holder["it"] = iter(sampler)
                batch = next(it_holder["it"])
            k["k"] = (k["k"] + 1) % len(scores)
            sampler.update([i for i, _ in batch], scores[k["k"]])

        methods["table_sampler"] = table_step
    return methods, notes


def kernel_comparison(n: int, fanout: int, repeats: int, budget_s: float, seed: int) -> dict:
    """find(256) and set(256) per backend on one table of size ``n``, plus torch.multinomial."""
    rng = np.random.default_rng(seed)
    values = rng.random(n) + 0.5
    trees = {"numpy": SumTree(n, fanout, backend="numpy")}
    if compiled_available():
        trees["numba"] = SumTree(n, fanout, backend="numba")
    for tree in trees.values():
        tree.fill(values)
    total = trees["numpy"].total
    targets = [rng.random(BATCH) * total for _ in range(64)]
    indices = [rng.integers(0, n, BATCH) for _ in range(64)]
    scores = [rng.random(BATCH) + 0.5 for _ in range(64)]
    k = {"k": 0}

    def nxt() -> int:
        k["k"] = (k["k"] + 1) % 64
        return k["k"]

    methods: dict[str, Callable[[], object]] = {}
    for name, tree in trees.items():
        if name == "numpy":
            methods["find_numpy"] = lambda tree=tree: tree.find(targets[nxt()], check=False)
        else:

            def find_depth_first(tree: SumTree = tree) -> object:
                tree._by_level = False  # noqa: SLF001 - pick the descent to time
                return tree.find(targets[nxt()], check=False)

            def find_by_level(tree: SumTree = tree) -> object:
                tree._by_level = True  # noqa: SLF001
                return tree.find(targets[nxt()], check=False)

            methods["find_numba"] = find_depth_first
            methods["find_numba_by_level"] = find_by_level
        methods[f"set_{name}"] = lambda tree=tree: tree.set(indices[nxt()], scores[k["k"]], check=False)

        def step(tree: SumTree = tree) -> None:  # the engine's part of a table step
            idx = tree.find(targets[nxt()], check=False)
            tree.get(idx, check=False)
            tree.set(idx, scores[k["k"]], check=False)

        methods[f"step_{name}"] = step
    if n <= MULTINOMIAL_LIMIT:
        probs = torch.from_numpy(values).to(torch.float32)
        gen = torch.Generator().manual_seed(seed)
        methods["multinomial"] = lambda: torch.multinomial(probs, BATCH, replacement=True, generator=gen)
    load_start = os.getloadavg()[0]
    timings = time_interleaved(methods, repeats, budget_s)
    load_end = os.getloadavg()[0]
    ratios = {}
    med = {name: entry["median_s"] for name, entry in timings.items()}
    base = med["find_numpy"]
    for name in ("find_numba", "find_numba_by_level"):
        if name in timings:
            ratios[f"find_numpy_over_{name}"] = base / timings[name]["median_s"]
    if "set_numba" in timings:
        ratios["set_numpy_over_set_numba"] = med["set_numpy"] / med["set_numba"]
        ratios["step_numpy_over_step_numba"] = med["step_numpy"] / med["step_numba"]
    if "multinomial" in timings:
        for name in ("find_numpy", "find_numba", "find_numba_by_level"):
            if name in timings:
                ratios[f"multinomial_over_{name}"] = med["multinomial"] / med[name]
    del trees, values, methods
    gc.collect()
    return {"n": n, "loadavg_1min": [load_start, load_end], "timings": timings, "ratios": ratios}


_STARTUP = """
import json, os, sys, time
start = time.perf_counter()
import isample.engine as engine
imported = time.perf_counter()
out = {"import_isample_engine_s": imported - start, "numba_in_modules": "numba" in sys.modules}
if engine.compiled_available():
    ready = time.perf_counter()
    out["import_numba_s"] = ready - imported
    tree = engine.SumTree(1000, backend="numba")
    built = time.perf_counter()
    tree.fill([1.0] * 1000)
    tree.set(tree.sample(256, __import__("numpy").random.default_rng(0)), [2.0] * 256)
    out["first_tree_s"] = built - ready
    out["first_tree_draw_set_s"] = time.perf_counter() - built
print(json.dumps(out))
"""


def startup_costs() -> dict:
    """Import and first-use costs of the compiled path, in fresh subprocesses (cold, then warm cache)."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        for label in ("cold_cache", "warm_cache"):
            done = subprocess.run(
                [sys.executable, "-c", _STARTUP], capture_output=True, text=True, env=env, check=True
            )
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def state_dict_memory(n: int, fanout: int, seed: int) -> dict:
    """Bytes of a SumTree of size ``n`` and the transient (tracemalloc peak) of its state_dict."""
    tree = SumTree(n, fanout)
    tree.fill(np.random.default_rng(seed).random(n) + 0.5)
    gc.collect()
    tracemalloc.start()
    state = tree.state_dict()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "n": n,
        "tree_nbytes": tree.nbytes,
        "tree_over_8n": tree.nbytes / (8 * n),
        "state_dict_peak_bytes": peak,
        "state_dict_peak_over_8n": peak / (8 * n),
        "state_values_nbytes": int(state[SumTree.STATE_VALUES].nbytes),
    }
    del tree, state
    gc.collect()
    return out


def build_and_memory(n: int, fanout: int, seed: int, steps: int = 50) -> dict:
    """Build time (construct + fill) and tracemalloc peak of the engine at size ``n``."""
    rng = np.random.default_rng(seed)
    values = rng.random(n) + 0.5  # the caller's array, allocated before tracing starts
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    tree = SumTree(n, fanout=fanout)
    constructed = time.perf_counter()
    tree.fill(values)
    built = time.perf_counter()
    for _ in range(steps):
        tree.set(tree.sample(BATCH, rng), rng.random(BATCH) + 0.5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "n": n,
        "construct_s": constructed - start,
        "fill_s": built - constructed,
        "build_s": built - start,
        "tree_nbytes": tree.nbytes,
        "memory_estimate": SumTree.memory_estimate(n, fanout),
        "tracemalloc_peak_bytes": peak,
        "peak_over_8n": peak / (8 * n),
        "process_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    del tree, values
    gc.collect()
    return out


def run_size(n: int, fanout: int, repeats: int, budget_s: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    values = rng.random(n) + 0.5
    start = time.perf_counter()
    tree = SumTree(n, fanout=fanout)
    tree.fill(values)
    build_s = time.perf_counter() - start
    methods = engine_methods(tree, rng)
    base, notes = baseline_methods(n, values, seed)
    methods.update(base)
    load_start = os.getloadavg()[0]
    timings = time_interleaved(methods, repeats, budget_s)
    load_end = os.getloadavg()[0]
    step = timings["sumtree_step"]["median_s"]
    cpu_step = timings["sumtree_step"]["cpu_median_s"]
    ratios = {}
    for name in ("multinomial", "weighted_random_sampler"):
        if name in timings:
            ratios[f"{name}_over_sumtree_step"] = timings[name]["median_s"] / step
    for name in ("batch_sampler",):
        if name in timings:
            ratios[f"sumtree_step_over_{name}"] = step / timings[name]["median_s"]
    for name in ("multinomial", "batch_sampler"):
        if name in timings:
            ratios[f"cpu_{name}_over_sumtree_step"] = timings[name]["cpu_median_s"] / cpu_step
            ratios[f"cpu_sumtree_step_over_{name}"] = cpu_step / timings[name]["cpu_median_s"]
    if "table_sampler" in timings:
        ratios["table_sampler_over_sumtree_step"] = timings["table_sampler"]["median_s"] / step
        if "batch_sampler" in timings:
            ratios["table_sampler_over_batch_sampler"] = (
                timings["table_sampler"]["median_s"] / timings["batch_sampler"]["median_s"]
            )
    levels = [int(level.shape[0]) for level in tree._levels]  # noqa: SLF001 - reported layout
    del tree, methods, base, values
    gc.collect()
    return {
        "n": n,
        "levels": levels,
        "build_s": build_s,
        "loadavg_1min": [load_start, load_end],
        "timings": timings,
        "ratios": ratios,
        "notes": notes,
    }


def _us(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['median_s'] * 1e6:,.1f}"


def _ratio(ratios: dict, key: str) -> str:
    return f"{ratios[key]:,.1f}x" if key in ratios else "-"


def markdown(results: list[dict], memory: list[dict]) -> str:
    lines = [
        "| N | SumTree draw+set (us) | draw (us) | set (us) | multinomial (us) | multinomial / SumTree"
        " | WeightedRandomSampler (us) | WRS / SumTree | BatchSampler (us) | SumTree / BatchSampler"
        " | TableSampler draw+update (us) | TableSampler / BatchSampler |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        t, r = res["timings"], res["ratios"]
        cells = [f"{res['n']:.0e}"]
        cells += [_us(t.get(k)) for k in ("sumtree_step", "sumtree_draw", "sumtree_set", "multinomial")]
        cells += [_ratio(r, "multinomial_over_sumtree_step"), _us(t.get("weighted_random_sampler"))]
        cells += [_ratio(r, "weighted_random_sampler_over_sumtree_step"), _us(t.get("batch_sampler"))]
        cells += [_ratio(r, "sumtree_step_over_batch_sampler"), _us(t.get("table_sampler"))]
        cells += [_ratio(r, "table_sampler_over_batch_sampler")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Process CPU time per call (not wall-clock; torch may use several threads):",
        "",
        "| N | SumTree draw+set CPU (us) | multinomial CPU (us) | multinomial / SumTree"
        " | BatchSampler CPU (us) | SumTree / BatchSampler | load avg (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        t, r = res["timings"], res["ratios"]

        def cpu(name: str, timings: dict = t) -> str:
            return f"{timings[name]['cpu_median_s'] * 1e6:,.1f}" if name in timings else "-"

        load = "{:.1f} -> {:.1f}".format(*res["loadavg_1min"])
        lines.append(
            f"| {res['n']:.0e} | {cpu('sumtree_step')} | {cpu('multinomial')}"
            f" | {_ratio(r, 'cpu_multinomial_over_sumtree_step')} | {cpu('batch_sampler')}"
            f" | {_ratio(r, 'cpu_sumtree_step_over_batch_sampler')} | {load} |"
        )
    if memory:
        lines += [
            "",
            "| N | build (construct + fill) s | tree bytes | tree bytes / 8N | tracemalloc peak"
            " | peak / 8N |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for mem in memory:
            tree_mib = mem["tree_nbytes"] / 2**20
            peak_mib = mem["tracemalloc_peak_bytes"] / 2**20
            lines.append(
                f"| {mem['n']:.0e} | {mem['build_s']:.2f} | {tree_mib:,.1f} MiB"
                f" | {mem['tree_nbytes'] / (8 * mem['n']):.3f} | {peak_mib:,.1f} MiB"
                f" | {mem['peak_over_8n']:.3f} |"
            )
    notes = sorted({f"{k}: {v}" for res in results for k, v in res["notes"].items()})
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def kernels_markdown(kernels: list[dict], startup: dict, state_memory: list[dict]) -> str:
    lines = [
        "| N | find NumPy (us) | find numba (us) | find numba by level (us) | NumPy / numba"
        " | NumPy / by level | set NumPy (us) | set numba (us) | NumPy / numba | step NumPy (us)"
        " | step numba (us) | NumPy / numba | multinomial (us) | multinomial / best numba find"
        " | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in kernels:
        t, r = res["timings"], res["ratios"]
        best = min(
            (t[name]["median_s"] for name in ("find_numba", "find_numba_by_level") if name in t), default=None
        )
        multi = "-"
        if "multinomial" in t and best is not None:
            multi = f"{t['multinomial']['median_s'] / best:,.0f}x"
        cells = [
            f"{res['n']:.0e}",
            _us(t.get("find_numpy")),
            _us(t.get("find_numba")),
            _us(t.get("find_numba_by_level")),
            _ratio(r, "find_numpy_over_find_numba"),
            _ratio(r, "find_numpy_over_find_numba_by_level"),
            _us(t.get("set_numpy")),
            _us(t.get("set_numba")),
            _ratio(r, "set_numpy_over_set_numba"),
            _us(t.get("step_numpy")),
            _us(t.get("step_numba")),
            _ratio(r, "step_numpy_over_step_numba"),
            _us(t.get("multinomial")),
            multi,
            "{:.1f} -> {:.1f}".format(*res["loadavg_1min"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Process CPU time per call, median (us; excludes time the process waited for a core):", ""]
    for res in kernels:
        cpu = ", ".join(f"{name} {v['cpu_median_s'] * 1e6:,.1f}" for name, v in res["timings"].items())
        lines.append(f"- N = {res['n']:.0e}: {cpu}")
    lines += ["", "Spread (min, max) of the ratios' terms, us:", ""]
    for res in kernels:
        spread = ", ".join(
            f"{name} {v['min_s'] * 1e6:,.1f}-{v['max_s'] * 1e6:,.1f}" for name, v in res["timings"].items()
        )
        lines.append(f"- N = {res['n']:.0e}: {spread}")
    if startup:
        lines += ["", "| start-up (fresh process) | cold cache (s) | warm cache (s) |", "|---|---:|---:|"]
        for key in ("import_isample_engine_s", "import_numba_s", "first_tree_s", "first_tree_draw_set_s"):
            cold, warm = startup["cold_cache"].get(key), startup["warm_cache"].get(key)
            if cold is not None:
                lines.append(f"| {key} | {cold:.3f} | {warm:.3f} |")
    if state_memory:
        lines += ["", "| N | tree bytes / 8N | state_dict transient / 8N |", "|---:|---:|---:|"]
        for mem in state_memory:
            lines.append(
                f"| {mem['n']:.0e} | {mem['tree_over_8n']:.4f} | {mem['state_dict_peak_over_8n']:.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N <= 1e6, few repeats (seconds)")
    parser.add_argument("--sizes", type=float, nargs="*", help="override the table sizes")
    parser.add_argument("--fanout", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--kernels", action="store_true", help="only the NumPy / compiled comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.kernels:
        return main_kernels(args)
    if args.sizes:
        sizes = [int(s) for s in args.sizes]
    elif args.quick:
        sizes = [10**4, 10**5, 10**6]
    else:
        sizes = [10**4, 10**5, 10**6, 10**7, 10**8]
    repeats = args.repeats or (5 if args.quick else 15)
    budget = 0.01 if args.quick else 0.05
    out = args.out or RESULTS / ("engine_quick.json" if args.quick else "engine.json")

    results = []
    for n in sizes:
        print(f"N = {n:.0e} ...", file=sys.stderr, flush=True)
        results.append(run_size(n, args.fanout, repeats, budget, args.seed))
    kernel_sizes = [n for n in sizes if n >= 10**6]
    kernels = [kernel_comparison(n, args.fanout, max(repeats, 7), budget, args.seed) for n in kernel_sizes]
    memory = [build_and_memory(n, args.fanout, args.seed) for n in sizes if n >= 10**7]
    if args.quick and not memory:
        memory = [build_and_memory(sizes[-1], args.fanout, args.seed)]
    report = {
        "benchmark": "engine",
        "batch": BATCH,
        "fanout": args.fanout,
        "root_width": ROOT_WIDTH,
        "profile": "quick" if args.quick else "full",
        "repeats": repeats,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_end": os.getloadavg(),
        },
        "backend": SumTree(1).backend,
        "results": results,
        "memory": memory,
        "kernels": kernels,
    }
    table = markdown(results, memory) + "\n\n" + kernels_markdown(kernels, {}, [])
    report["markdown"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table)
    print(f"\nwrote {out}", file=sys.stderr)
    return report


def main_kernels(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes] if args.sizes else [10**6, 10**7, 10**8]
    repeats = max(args.repeats or 9, 7)
    kernels = []
    for n in sizes:
        print(f"kernels N = {n:.0e} ...", file=sys.stderr, flush=True)
        kernels.append(kernel_comparison(n, args.fanout, repeats, 0.05, args.seed))
    startup = startup_costs() if compiled_available() else {}
    state_memory = [state_dict_memory(max(sizes), args.fanout, args.seed)]
    report = {
        "benchmark": "engine_kernels",
        "batch": BATCH,
        "fanout": args.fanout,
        "repeats": repeats,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "numba": _numba_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_end": os.getloadavg(),
        },
        "kernels": kernels,
        "startup": startup,
        "state_dict_memory": state_memory,
    }
    table = kernels_markdown(kernels, startup, state_memory)
    report["markdown"] = table
    out = args.out or RESULTS / "engine_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table)
    print(f"\nwrote {out}", file=sys.stderr)
    return report


def _numba_version() -> str | None:
    if not compiled_available():
        return None
    from isample import _engine_kernels

    return _engine_kernels.NUMBA_VERSION


if __name__ == "__main__":
    main()
