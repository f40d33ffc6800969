"""The TableSampler step (draw b = 256 + update 256 scores) against plain-PyTorch baselines.

Measured in one process, one torch thread, variants interleaved round by round so that
load on a shared machine hits them alike; every figure is a ratio against a baseline
timed in the same round, reported as median [min, max] over rounds.

* ``step``: ``next(iter(sampler))`` + the index tensor a loop gets + ``update(indices,
  scores)`` on a fully visited table, N = 1e6 and 1e7. Baselines: a steady ``next()`` of
  ``BatchSampler(RandomSampler(range(N)), 256, False)`` (and the same amortised over an
  epoch, i.e. plus ``randperm(N) / (N / 256)``), and ``torch.multinomial(p, 256, True)``
  over N. With ``--old FILE`` (a ``table_sampler.py`` of another version, e.g.
  ``git show main:isample/table_sampler.py > /tmp/old.py``) the old sampler is timed in
  the same rounds.
* ``unvisited``: one draw when 5 unvisited examples hold almost all the mass
  (``initial_score=1e6``, every other example visited with score 1e-6), N = 1e6 and 4e6:
  time and peak scratch memory (peak RSS growth during the draw, in a fresh process).
* ``draw_ahead``: a loop over ``ImportanceDataLoader`` (N = 1e6 rows, b = 256, scores fed
  back every step) whose training step is simulated by a 2 ms wait that releases the GIL
  (as a CPU waiting on an accelerator does), with and without ``draw_ahead=True`` (same
  delay, 1): time per step and the loader's share above the wait.
* ``profile``: cProfile of 300 new steps at N = 1e6, top functions by own time.

Run ``python benchmarks/bench_table_step.py [--old /tmp/old.py] [--quick]``; writes
``benchmarks/results/table_step.json`` (or ``--out``) and prints Markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler

import isample
from isample import TableSampler

B = 256


def load_old(path: str) -> type:
    """Another version's ``TableSampler``: from its ``table_sampler.py`` (imported as a module of
    this package), or from a whole package directory (imported as ``isample_before``, e.g.
    ``git archive OLD isample | tar -x -C /tmp/before`` then ``--old /tmp/before/isample``)."""
    if os.path.isdir(path):
        init = os.path.join(path, "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "isample_before", init, submodule_search_locations=[path]
        )
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["isample_before"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.TableSampler
    spec = importlib.util.spec_from_file_location("isample._bench_old_table_sampler", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.TableSampler


def visited_sampler(cls: type, n: int) -> Any:
    s = cls(n, B, seed=0, num_batches=10**9, power=0.5)
    g = torch.Generator().manual_seed(1)
    chunk = n if n <= 10**7 else 1 << 23  # bounded temporaries at N = 1e8
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        s.update(torch.arange(lo, hi), torch.rand(hi - lo, generator=g, dtype=torch.float64) + 0.01)
    return s


def step_fn(sampler: Any) -> Any:
    it = iter(sampler)
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(B, generator=g)

    def step() -> None:
        batch = next(it)
        if hasattr(batch, "indices"):
            idx = batch.indices
        else:  # the old list of (index, weight) tuples, as the old collate built it
            idx = torch.tensor([i for i, _ in batch], dtype=torch.long)
        sampler.update(idx, scores)

    return step


def time_per_call(fn: Any, calls: int) -> tuple[float, float]:
    """Seconds per call: (wall clock, this thread's CPU time: leaves out time spent descheduled)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls, (time.thread_time() - c0) / calls


def bench_step(n: int, rounds: int, calls: int, old: type | None) -> dict[str, Any]:
    variants: dict[str, Any] = {"new": step_fn(visited_sampler(TableSampler, n))}
    if old is not None:
        variants["old"] = step_fn(visited_sampler(old, n))
    batch_iter = iter(
        BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(0)), B, False)
    )
    variants["batchsampler"] = lambda: next(batch_iter)
    if n <= 1 << 24:  # torch.multinomial refuses more categories
        p = torch.rand(n, dtype=torch.float32) + 0.01
        variants["multinomial"] = lambda: torch.multinomial(p, B, replacement=True)
    t0 = time.perf_counter()
    torch.randperm(n)
    perm = time.perf_counter() - t0
    for fn in variants.values():
        fn()  # warm-up
    out: dict[str, Any] = {"n": n, "randperm_s": perm}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            k = max(calls // 50, 2) if name == "multinomial" else calls
            w, c = time_per_call(fn, k)
            wall[name].append(w)
            cpu[name].append(c)
    out["us"] = {k: statistics.median(v) * 1e6 for k, v in wall.items()}
    out["cpu_us"] = {k: statistics.median(v) * 1e6 for k, v in cpu.items()}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        amortised = [t + perm / (n / B) for t in times["batchsampler"]]
        ratios = {}
        for name in ("new", "old"):
            if name not in times:
                continue
            t = times[name]
            ratios[f"{name} / batchsampler"] = [a / b for a, b in zip(t, times["batchsampler"], strict=True)]
            ratios[f"{name} / batchsampler (epoch-amortised)"] = [
                a / b for a, b in zip(t, amortised, strict=True)
            ]
            if "multinomial" in times:
                ratios[f"multinomial / {name}"] = [
                    b / a for a, b in zip(t, times["multinomial"], strict=True)
                ]
        if "old" in times:
            ratios["old / new"] = [a / b for a, b in zip(times["old"], times["new"], strict=True)]
        out["ratios" if clock == "wall" else "cpu_ratios"] = {k: summary(v) for k, v in ratios.items()}
    out["new_us_range"] = summary([t * 1e6 for t in wall["new"]])
    return out


def step_parts(n: int, steps: int = 2000) -> dict[str, float]:
    """Median wall time (us) of the step's parts, timed call by call (per-call medians drop preemptions)."""
    s = visited_sampler(TableSampler, n)
    it = iter(s)
    scores = torch.rand(B, generator=torch.Generator().manual_seed(2))
    parts: dict[str, list[float]] = {"next (draw)": [], "update": [], "step": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        s.update(batch.indices, scores)
        t2 = time.perf_counter()
        parts["next (draw)"].append(t1 - t0)
        parts["update"].append(t2 - t1)
        parts["step"].append(t2 - t0)
    bi = iter(BatchSampler(RandomSampler(range(n)), B, False))
    bs = []
    for _ in range(min(steps, n // B - 1)):
        t0 = time.perf_counter()
        next(bi)
        bs.append(time.perf_counter() - t0)
    out = {k: statistics.median(v[100:]) * 1e6 for k, v in parts.items()}
    out["batchsampler next"] = statistics.median(bs[100:]) * 1e6
    return out


def memory_child(n: int) -> dict[str, float]:
    """Memory of a visited TableSampler (whole sampler) and the transient of state_dict().

    NumPy allocations are traced (tracemalloc): ``sampler_bytes`` is what the sampler holds
    after the fill (its tree, visited mask, ...), ``state_dict_peak_bytes`` the peak of new
    allocations during ``state_dict()`` (the copies it returns included). RSS growth is
    reported beside them.
    """
    import gc
    import tracemalloc

    warm = TableSampler(1000, B, seed=0)  # load the compiled kernels before measuring
    warm.update(torch.arange(1000), torch.rand(1000))
    next(iter(warm))
    base_rss = _status("VmRSS")
    tracemalloc.start()
    s = visited_sampler(TableSampler, n)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    rss = _status("VmRSS") - base_rss
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    state = s.state_dict()
    peak = tracemalloc.get_traced_memory()[1] - before
    tensors = sum(v.nbytes for v in state.values() if isinstance(v, torch.Tensor))
    tracemalloc.stop()
    return {
        "n": n,
        "sampler_bytes": held,
        "sampler_rss_growth_bytes": rss,
        "tree_bytes": s._tree.nbytes,
        "state_dict_peak_bytes": peak,
        "state_dict_tensor_bytes": tensors,
    }


def summary(values: list[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


def unvisited_child(which: str, n: int, old_path: str | None) -> dict[str, float]:
    cls = load_old(old_path) if which == "old" else TableSampler  # type: ignore[arg-type]
    s = cls(n, B, seed=0, initial_score=1e6, mixing=0.0, num_batches=10**9)
    heavy = np.linspace(0, n - 1, 5).astype(np.int64)
    rest = np.setdiff1d(np.arange(n), heavy)
    s.update(torch.from_numpy(rest), torch.full((rest.size,), 1e-6, dtype=torch.float64))
    s.draw(0, 0)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM)
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    idx, _ = s.draw(0, 1)
    elapsed = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {
        "seconds": elapsed,
        "scratch_bytes": max(peak - before, 0),
        "heavy_share": float(np.isin(idx, heavy).mean()),
    }


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _child_json(extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, *extra], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_unvisited(sizes: list[int], old_path: str | None) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for which in ("new", "old") if old_path else ("new",):
            cmd = [sys.executable, __file__, "--child", which, str(n)] + (
                ["--old", old_path] if old_path else []
            )
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rows.append({"n": n, "version": which, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def bench_draw_ahead(n: int, rounds: int, steps: int, wait_s: float = 0.002) -> dict[str, Any]:
    from torch.utils.data import TensorDataset

    from isample import ImportanceDataLoader

    ds = TensorDataset(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))
    loaders = {}
    for ahead in (False, True):
        sampler = TableSampler(n, B, seed=0, power=0.5, num_batches=10**9)
        sampler.update(torch.arange(n), torch.rand(n, dtype=torch.float64) + 0.01)
        loaders[ahead] = ImportanceDataLoader(ds, sampler, draw_ahead=ahead, delay=1)
    its = {k: iter(v) for k, v in loaders.items()}
    scores = torch.rand(B)

    def run(ahead: bool) -> float:
        it, loader = its[ahead], loaders[ahead]
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(it)
            time.sleep(wait_s)  # the training step, on the device
            loader.update(batch.indices, scores)
        return (time.perf_counter() - t0) / steps

    run(False), run(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for ahead in (False, True):
            times[ahead].append(run(ahead))
    plain, ahead = times[False], times[True]
    return {
        "n": n,
        "wait_us": wait_s * 1e6,
        "step_us": {"plain": statistics.median(plain) * 1e6, "draw_ahead": statistics.median(ahead) * 1e6},
        "plain / draw_ahead": summary([a / b for a, b in zip(plain, ahead, strict=True)]),
        "loader share above the wait, draw_ahead / plain": summary(
            [(b - wait_s) / (a - wait_s) for a, b in zip(plain, ahead, strict=True)]
        ),
    }


def profile_step(n: int, calls: int) -> str:
    step = step_fn(visited_sampler(TableSampler, n))
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=None, help="another version's table_sampler.py to time alongside")
    parser.add_argument("--quick", action="store_true", help="N = 1e5 only, few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "table_step.json"))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        if args.child[0] == "memory":
            print(json.dumps(memory_child(int(float(args.child[1])))))
        else:
            print(json.dumps(unvisited_child(args.child[0], int(float(args.child[1])), args.old)))
        return
    old = load_old(args.old) if args.old else None
    sizes = [100_000] if args.quick else [1_000_000, 10_000_000]
    rounds = 3 if args.quick else args.rounds
    steps = [bench_step(n, rounds, 100 if args.quick else 300, old) for n in sizes]
    big = 10**6 if args.quick else 10**8
    if not args.quick:  # N = 1e8: the new sampler only (no multinomial: torch refuses N > 2**24)
        steps.append(bench_step(big, rounds, 300, None))
    parts = {n: step_parts(n) for n in sizes + ([] if args.quick else [big])}
    memory = _child_json(["--child", "memory", str(big)])
    unvisited = bench_unvisited([100_000] if args.quick else [1_000_000, 4_000_000], args.old)
    ahead = bench_draw_ahead(sizes[0], rounds, 50 if args.quick else 200)
    profile = profile_step(sizes[0], 300)
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "isample": isample.__version__,
        },
        "load_average": os.getloadavg(),
        "batch_size": B,
        "step": steps,
        "parts_us": {str(k): v for k, v in parts.items()},
        "memory": memory,
        "unvisited": unvisited,
        "draw_ahead": ahead,
        "profile_new_step": profile,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"load average {os.getloadavg()}")
    print("| N | new step (us, wall / CPU) | ratio | wall: median [min, max] | CPU: median [min, max] |")
    print("|---:|---:|---|---|---|")
    for row in steps:
        for name, (med, lo, hi) in row["ratios"].items():
            cm, cl, ch = row["cpu_ratios"][name]
            print(
                f"| {row['n']:.0e} | {row['us']['new']:.0f} / {row['cpu_us']['new']:.0f} | {name} "
                f"| {med:.2f} [{lo:.2f}, {hi:.2f}] | {cm:.2f} [{cl:.2f}, {ch:.2f}] |"
            )
    print("\nper-call medians (us):")
    for n, row in parts.items():
        print(f"  N = {n:.0e}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(
        f"\nmemory at N = {memory['n']:.0e}: sampler {memory['sampler_bytes'] / 1e6:.0f} MB traced "
        f"(tree {memory['tree_bytes'] / 1e6:.0f} MB; RSS growth "
        f"{memory['sampler_rss_growth_bytes'] / 1e6:.0f} MB), state_dict transient peak "
        f"{memory['state_dict_peak_bytes'] / 1e6:.0f} MB "
        f"(its tensors {memory['state_dict_tensor_bytes'] / 1e6:.0f} MB)"
    )
    print("\n| N | version | draw time (s) | scratch (MB) | share on heavy |\n|---:|---|---:|---:|---:|")
    for row in unvisited:
        print(
            f"| {row['n']:.0e} | {row['version']} | {row['seconds']:.4f} | {row['scratch_bytes'] / 1e6:.1f} "
            f"| {row['heavy_share']:.3f} |"
        )
    print(f"\ndraw-ahead (N = {ahead['n']:.0e}, simulated {ahead['wait_us']:.0f} us device step):")
    print(f"  step us {ahead['step_us']}")
    for key in ("plain / draw_ahead", "loader share above the wait, draw_ahead / plain"):
        med, lo, hi = ahead[key]
        print(f"  {key}: {med:.2f} [{lo:.2f}, {hi:.2f}]")
    print("\n```\n" + profile + "```")


if __name__ == "__main__":
    main()
