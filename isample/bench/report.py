"""Summaries of a sweep and the files written to ``--out``: report.md, results.json, results.csv.

The summary (``results["summary"]``) is computed here from the raw runs with the pure
functions of :mod:`isample.bench.curves`; the JSON schema is documented in
``docs/bench.md`` and versioned by :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .curves import interpolate, smooth, smoothed_final, spread, time_to_accuracy, time_to_target

__all__ = [
    "SCHEMA_VERSION",
    "CSV_COLUMNS",
    "summarize",
    "write_json",
    "write_csv",
    "write_report",
    "ratio",
    "jsonable",
    "upper_median",
    "verdicts",
]

#: Version of the results.json layout (bump on any incompatible change).
SCHEMA_VERSION = 2

#: Columns of results.csv, one row per (scheme, optimizer, seed, evaluation point).
CSV_COLUMNS = (
    "dataset",
    "scheme",
    "optimizer",
    "seed",
    "lr",
    "step",
    "seconds",
    "cpu_seconds",
    "forward_examples",
    "backward_examples",
    "compute",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "kappa",
    "kappa_optimizer",
    "q_log",
    "diverged",
)

AXES = {"steps": "step", "seconds": "seconds", "cpu_seconds": "cpu_seconds", "compute": "compute"}


def ratio(baseline: float, value: float) -> float:
    """``baseline / value`` with the conventions of the report.

    ``> 1`` means the scheme needs less (time to target) or reaches a lower loss. ``inf /
    inf`` and anything with ``nan`` is ``nan``; ``x / inf`` is 0; ``inf / x`` is ``inf``.
    """
    a, b = float(baseline), float(value)
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)):
        return math.nan
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def _curve(run: dict[str, Any], axis: str, metric: str = "train_loss") -> tuple[list[float], list[float]]:
    key = AXES[axis]
    points = run["curve"]
    xs = [float(p[key]) for p in points]
    ys = [float(p[metric]) if p.get(metric) is not None else math.inf for p in points]
    return xs, ys


def _final(run: dict[str, Any], metric: str, window: int) -> float:
    """The run's smoothed final value of ``metric`` (inf / nan for a diverged run)."""
    if run["diverged"]:
        return math.nan if metric == "test_accuracy" else math.inf
    values = [p.get(metric) for p in run["curve"]]
    if any(v is None for v in values):
        return math.nan
    return smoothed_final([float(v) for v in values], window)


def _loss_at(run: dict[str, Any], axis: str, at: float) -> float:
    xs, ys = _curve(run, axis)
    if run["diverged"] and at > xs[-1]:
        return math.inf
    return interpolate(xs, ys, at)


def _ttt(run: dict[str, Any], axis: str, target: float, window: int = 1, metric: str = "train_loss") -> float:
    """Time to target on the run's smoothed curve (:func:`isample.bench.curves.smooth`)."""
    if not math.isfinite(target):
        return math.nan
    xs, ys = _curve(run, axis, metric)
    if metric == "test_accuracy":  # non-finite points (divergence) never reach an accuracy
        return time_to_accuracy(xs, smooth(ys, window).tolist(), target)
    return time_to_target(xs, smooth(ys, window).tolist(), target)


def _run_quality(run: dict[str, Any]) -> dict[str, float]:
    rows = run.get("quality") or []
    later = [r for r in rows if r["step"] > 0] or rows
    out = {}
    for key, pick in (("kappa", lambda g: g == "identity"), ("kappa_optimizer", lambda g: g != "identity")):
        vals = [r["kappa"] for r in later if pick(r["geometry"]) and r["kappa"] is not None]
        out[key] = float(np.median(vals)) if vals else math.nan
    vals = [r["q_log"] for r in later if r["geometry"] == "identity" and r["q_log"] is not None]
    vals = [v for v in vals if not math.isnan(v)]
    out["q_log"] = float(np.median(vals)) if vals else math.nan
    return out


def upper_median(values: Sequence[float]) -> float:
    """The median, taking the upper of the two middle values for an even count.

    Used for the target loss: with it at least half of uniform's seeds reach the target
    within the budget, so uniform's median time-to-target is finite.
    """
    v = np.sort(np.asarray([float(u) for u in values if not math.isnan(float(u))], dtype=np.float64))
    if v.size == 0:
        return math.nan
    return float(v[v.size // 2])


def summarize(
    runs: Sequence[dict[str, Any]], tuning: dict[str, dict[str, Any]], smooth: int = 1
) -> dict[str, Any]:
    """Per optimizer: reference points, targets, and per-scheme medians, spreads and ratios.

    * targets (robust to one noisy evaluation): per run the *smoothed* final value, the mean
      of the last ``smooth`` evaluations (:func:`isample.bench.curves.smoothed_final`), then
      over uniform's seeds the upper median (:func:`upper_median`) for the training loss
      (``target_loss``) and the test loss (``target_test_loss``), and the matching lower
      median for the test accuracy (``target_test_accuracy``: at least half of uniform's
      seeds reach it).
    * reference points: ``steps`` = the fewest steps any run of this optimizer made (the
      budget, for a steps budget), ``seconds`` / ``cpu_seconds`` / ``compute`` = the smallest
      final training wall-clock seconds / CPU seconds / compute of any run of this optimizer
      (so every curve covers them).
    * ``loss_at_<axis>``: training loss read off each run's curve at the reference point
      (log-linear interpolation), median / min / max over seeds; ``ratio_at_<axis>`` =
      uniform's median / the scheme's median (> 1: the scheme is lower), with
      ``ratio_at_<axis>_range`` = uniform's median / the scheme's max and min.
    * ``<axis>_to_target``: first crossing of the training-loss target on the run's
      trailing-mean curve (window ``smooth``; ``inf`` = never), over seeds; ``speedup_<axis>``
      = uniform's median / the scheme's median (> 1: faster). ``<axis>_to_test_accuracy``,
      ``speedup_test_accuracy_<axis>``, ``<axis>_to_test_loss``, ``speedup_test_loss_<axis>``:
      the same for the test targets.
    * ``test_accuracy_at_<axis>``: test accuracy read off the curve at the reference point
      (linear interpolation), over seeds.
    * ``overhead_share``: (loader + feedback seconds) / training seconds, over seeds.
    * ``kappa`` / ``kappa_optimizer`` / ``q_log``: per run the median over probe points
      (after step 0), then median / min / max over seeds.

    Returns:
        ``{optimizer: {"target_loss", "reference": {...}, "schemes": {scheme: {...}}}}``.
    """
    out: dict[str, Any] = {}
    optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
    for opt in optimizers:
        mine = [r for r in runs if r["optimizer"] == opt]
        schemes = list(dict.fromkeys(r["scheme"] for r in mine))
        by_scheme = {s: [r for r in mine if r["scheme"] == s] for s in schemes}
        base = by_scheme.get("uniform", by_scheme[schemes[0]])
        target = upper_median([_final(r, "train_loss", smooth) for r in base])
        target_test_loss = upper_median([_final(r, "test_loss", smooth) for r in base])
        errors = [1.0 - _final(r, "test_accuracy", smooth) for r in base]
        target_acc = 1.0 - upper_median([e if math.isfinite(e) else math.inf for e in errors])
        targets = {"train_loss": target, "test_loss": target_test_loss, "test_accuracy": target_acc}
        reference = {axis: float(min(r["curve"][-1][key] for r in mine)) for axis, key in AXES.items()}
        table: dict[str, Any] = {}
        for s in schemes:
            rs = by_scheme[s]
            entry: dict[str, Any] = {
                "lr": tuning.get(opt, {}).get(s, {}).get("chosen", rs[0]["lr"]),
                "seeds": [r["seed"] for r in rs],
                "diverged": int(sum(r["diverged"] for r in rs)),
                "steps": spread([r["steps"] for r in rs]),
                "final_train_loss": spread(
                    [math.inf if r["diverged"] else r["curve"][-1]["train_loss"] for r in rs]
                ),
                "final_test_accuracy": spread(
                    [math.nan if r["diverged"] else r["curve"][-1]["test_accuracy"] for r in rs]
                ),
                "smoothed_train_loss": spread([_final(r, "train_loss", smooth) for r in rs]),
                "smoothed_test_loss": spread([_final(r, "test_loss", smooth) for r in rs]),
                "smoothed_test_accuracy": spread([_final(r, "test_accuracy", smooth) for r in rs]),
                "train_seconds": spread([r["train_seconds"] for r in rs]),
                "seconds_per_step": spread([r["train_seconds"] / max(r["steps"], 1) for r in rs]),
                "cpu_seconds_per_step": spread([r["train_cpu_seconds"] / max(r["steps"], 1) for r in rs]),
                "compute_per_step": spread([r["compute"] / max(r["steps"], 1) for r in rs]),
                "overhead_share": spread([r["overhead_share"] for r in rs]),
                "loader_share": spread([r["loader_seconds"] / r["train_seconds"] for r in rs]),
                "feedback_share": spread([r["feedback_seconds"] / r["train_seconds"] for r in rs]),
                "is_on_share": spread([r.get("is_on_share", math.nan) for r in rs]),
            }
            for axis, at in reference.items():
                entry[f"loss_at_{axis}"] = spread([_loss_at(r, axis, at) for r in rs])
                entry[f"test_accuracy_at_{axis}"] = spread([_accuracy_at(r, axis, at) for r in rs])
                for metric, suffix in (
                    ("train_loss", "target"),
                    ("test_accuracy", "test_accuracy"),
                    ("test_loss", "test_loss"),
                ):
                    goal = targets[metric]
                    if math.isfinite(goal) and all(metric in p for r in rs for p in r["curve"][:1]):
                        entry[f"{axis}_to_{suffix}"] = spread(
                            [_ttt(r, axis, goal, smooth, metric) for r in rs]
                        )
                    else:
                        entry[f"{axis}_to_{suffix}"] = spread([math.nan])
            q = [_run_quality(r) for r in rs]
            for key in ("kappa", "kappa_optimizer", "q_log"):
                entry[key] = spread([v[key] for v in q])
            table[s] = entry
        ref = table.get("uniform", table[schemes[0]])
        for entry in table.values():
            for axis in reference:
                at = entry[f"loss_at_{axis}"]
                entry[f"ratio_at_{axis}"] = ratio(ref[f"loss_at_{axis}"]["median"], at["median"])
                entry[f"ratio_at_{axis}_range"] = [
                    ratio(ref[f"loss_at_{axis}"]["median"], at["max"]),
                    ratio(ref[f"loss_at_{axis}"]["median"], at["min"]),
                ]
                entry[f"speedup_{axis}"] = ratio(
                    ref[f"{axis}_to_target"]["median"], entry[f"{axis}_to_target"]["median"]
                )
                for suffix in ("test_accuracy", "test_loss"):
                    entry[f"speedup_{suffix}_{axis}"] = ratio(
                        ref[f"{axis}_to_{suffix}"]["median"], entry[f"{axis}_to_{suffix}"]["median"]
                    )
            for key in ("seconds_per_step", "cpu_seconds_per_step"):
                entry[f"relative_{key}"] = ratio(entry[key]["median"], ref[key]["median"])
        out[opt] = {
            "target_loss": target,
            "target_test_loss": target_test_loss,
            "target_test_accuracy": target_acc,
            "smooth": int(smooth),
            "reference": reference,
            "schemes": table,
        }
    return out


def _accuracy_at(run: dict[str, Any], axis: str, at: float) -> float:
    xs, ys = _curve(run, axis, "test_accuracy")
    if run["diverged"] and at > xs[-1]:
        return math.nan
    if not all(math.isfinite(v) for v in ys):
        return math.nan
    return interpolate(xs, ys, at, log=False)


def verdicts(summary: dict[str, Any], axis: str = "cpu_seconds") -> dict[str, str]:
    """One sentence per optimizer: which scheme won at equal CPU time and by how much, or none.

    A scheme *won* when its median training loss at the equal-CPU-time point is lower than
    uniform's median (loss ratio > 1) on every seed (the worst seed's ratio > 1) and none of
    its runs diverged; among winners the largest median ratio is named. Otherwise the
    sentence names the best scheme and says it did not win on every seed, or (median ratio
    below 1.005, which prints as 1.00x or less) that no scheme beat uniform.

    Returns:
        ``{optimizer: sentence}``.
    """
    out: dict[str, str] = {}
    for opt, s in summary.items():
        table = s["schemes"]
        others = {k: v for k, v in table.items() if k != "uniform"}
        if "uniform" not in table or not others:
            out[opt] = f"{opt}: nothing to compare (uniform and at least one other scheme are needed)."
            continue
        uni = table["uniform"]

        def key(item: tuple[str, dict[str, Any]]) -> float:
            v = item[1][f"ratio_at_{axis}"]
            return v if not math.isnan(v) else -math.inf

        winners = [
            (k, e)
            for k, e in others.items()
            if e["diverged"] == 0 and e[f"ratio_at_{axis}"] > 1 and e[f"ratio_at_{axis}_range"][0] > 1
        ]
        acc_u = uni[f"test_accuracy_at_{axis}"]["median"]
        if winners:
            name, e = max(winners, key=key)
            lo, hi = e[f"ratio_at_{axis}_range"]
            acc = e[f"test_accuracy_at_{axis}"]["median"]
            sentence = (
                f"{opt}: **{name}** won at equal CPU time: its training loss was "
                f"{e[f'ratio_at_{axis}']:.2f}x lower than uniform's (every seed, {lo:.2f}-{hi:.2f}x), "
                f"with test accuracy "
                f"{_fmt(acc)} vs {_fmt(acc_u)}"
            )
            sp = e["speedup_test_accuracy_cpu_seconds"]
            if math.isfinite(sp):
                sentence += f"; it reached uniform's final test accuracy {sp:.2f}x sooner"
            out[opt] = sentence + "."
            continue
        name, e = max(others.items(), key=key)
        best = e[f"ratio_at_{axis}"]
        if math.isnan(best) or best < 1.005:  # a ratio that rounds to 1.00x is no win
            out[opt] = (
                f"{opt}: no scheme beat uniform at equal CPU time; the closest, {name}, reached a "
                f"{_ratio_text(best)} loss ratio (test accuracy "
                f"{_fmt(e[f'test_accuracy_at_{axis}']['median'])} vs {_fmt(acc_u)})."
            )
        else:
            why = "a run diverged" if e["diverged"] else "not on every seed"
            out[opt] = (
                f"{opt}: no clear winner at equal CPU time: {name}'s median training loss was "
                f"{best:.2f}x lower than uniform's, but {why} "
                f"(range {_ratio_text(e[f'ratio_at_{axis}_range'][0])} to "
                f"{_ratio_text(e[f'ratio_at_{axis}_range'][1])})."
            )
    return out


# --------------------------------------------------------------------------- JSON / CSV


def jsonable(value: Any) -> Any:
    """Recursively convert to strict-JSON values: non-finite floats become "inf", "-inf", "nan"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as strict JSON (see :func:`jsonable`)."""
    Path(path).write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v


def write_csv(runs: Sequence[dict[str, Any]], path: Path) -> int:
    """One row per (scheme, optimizer, seed, evaluation point); returns the number of rows.

    ``kappa`` (identity geometry), ``kappa_optimizer`` (the optimizer's preconditioned
    geometry, adaptive optimizers only) and ``q_log`` are filled at the steps where the
    quality probe ran, empty elsewhere.
    """
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for run in runs:
            quality: dict[int, dict[str, Any]] = {}
            for q in run.get("quality") or []:
                slot = quality.setdefault(q["step"], {})
                if q["geometry"] == "identity":
                    slot["kappa"] = q["kappa"]
                    slot["q_log"] = q["q_log"]
                else:
                    slot["kappa_optimizer"] = q["kappa"]
            for point in run["curve"]:
                row = {k: point.get(k) for k in CSV_COLUMNS}
                row.update(scheme=run["scheme"], optimizer=run["optimizer"], seed=run["seed"], lr=run["lr"])
                row["dataset"] = run.get("dataset", "")
                row.update(quality.get(point["step"], {}))
                row["diverged"] = int(run["diverged"])
                writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
                rows += 1
    return rows


# --------------------------------------------------------------------------- Markdown


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    v = float(v)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "never" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e7):
        return f"{v:.{digits - 1}e}"
    if abs(v) >= 10**digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _spread_text(s: dict[str, float], digits: int = 3) -> str:
    if s["n"] == 0:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _fmt(s["median"], digits)
    return f"{_fmt(s['median'], digits)} [{_fmt(s['min'], digits)}, {_fmt(s['max'], digits)}]"


def _ratio_text(value: float, rng: Sequence[float] | None = None) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    text = f"{value:.2f}x"
    if rng is not None and all(math.isfinite(float(r)) for r in rng) and rng[0] != rng[1]:
        text += f" [{rng[0]:.2f}, {rng[1]:.2f}]"
    return text


def headline_table(summary_opt: dict[str, Any]) -> str:
    """The Markdown headline table of one optimizer."""
    head = (
        "| scheme | lr | final train loss | loss ratio @ equal steps | @ equal wall time | @ equal CPU time "
        "| @ equal compute | to train-loss target (steps / wall / CPU / compute) | to test-accuracy target "
        "(wall / CPU) | test acc @ equal CPU time | final test acc | IS on | overhead | kappa |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, e in summary_opt["schemes"].items():
        kappa = _spread_text(e["kappa"])
        if e["kappa_optimizer"]["n"]:
            kappa += f" (D: {_spread_text(e['kappa_optimizer'])})"
        if name == "uniform":
            kappa = "1 (baseline)"
        speed = " / ".join(_speed_text(e, a, "target", "speedup_{a}") for a in AXES)
        acc_speed = " / ".join(
            _speed_text(e, a, "test_accuracy", "speedup_test_accuracy_{a}")
            for a in ("seconds", "cpu_seconds")
        )
        diverged = f" ({e['diverged']} diverged)" if e["diverged"] else ""
        lines.append(
            f"| {name}{diverged} | {_fmt(e['lr'], 2)} | {_spread_text(e['final_train_loss'])} "
            f"| {_ratio_text(e['ratio_at_steps'], e['ratio_at_steps_range'])} "
            f"| {_ratio_text(e['ratio_at_seconds'], e['ratio_at_seconds_range'])} "
            f"| {_ratio_text(e['ratio_at_cpu_seconds'], e['ratio_at_cpu_seconds_range'])} "
            f"| {_ratio_text(e['ratio_at_compute'], e['ratio_at_compute_range'])} "
            f"| {speed} | {acc_speed} | {_spread_text(e.get('test_accuracy_at_cpu_seconds', _NONE))} "
            f"| {_spread_text(e['final_test_accuracy'])} | {_pct(e['is_on_share']['median'])} "
            f"| {_pct(e['overhead_share']['median'])} | {kappa} |"
        )
    return head + "\n".join(lines) + "\n"


_NONE = {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}


def _speed_text(e: dict[str, Any], axis: str, suffix: str, speed_key: str) -> str:
    reach = e.get(f"{axis}_to_{suffix}", _NONE)
    if reach["n"] and reach["median"] == math.inf:
        return "never"
    return _ratio_text(e.get(speed_key.format(a=axis), math.nan))


def noise_table(summary_opt: dict[str, Any]) -> str:
    """Clean test accuracy of every scheme trained on noisy labels, and its gap to uniform."""
    head = (
        "| scheme | lr | final clean test acc | vs uniform (points) | smoothed train loss (noisy labels) "
        "| CPU time to uniform's test acc | IS on |\n|---|---|---|---|---|---|---|\n"
    )
    table = summary_opt["schemes"]
    ref = table.get("uniform", next(iter(table.values())))["final_test_accuracy"]["median"]
    lines = []
    for name, e in table.items():
        acc = e["final_test_accuracy"]
        gap = 100 * (acc["median"] - ref) if acc["n"] else math.nan
        flag = " **(loses >= 1 point)**" if math.isfinite(gap) and gap <= -1 else ""
        gap_text = "-" if math.isnan(gap) else f"{gap:+.1f}{flag}"
        diverged = f" ({e['diverged']} diverged)" if e["diverged"] else ""
        lines.append(
            f"| {name}{diverged} | {_fmt(e['lr'], 2)} | {_spread_text(acc)} | {gap_text} "
            f"| {_spread_text(e['smoothed_train_loss'])} "
            f"| {_speed_text(e, 'cpu_seconds', 'test_accuracy', 'speedup_test_accuracy_{a}')} "
            f"| {_pct(e['is_on_share']['median'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.0f}%"


def details_table(summary_opt: dict[str, Any]) -> str:
    """Absolute per-step costs, shares, time-to-target values and Q_log of one optimizer."""
    head = (
        "| scheme | wall ms / step | vs uniform | CPU ms / step | vs uniform | compute / step "
        "| loader share | feedback share | IS on | Q_log | steps to target | wall s to target "
        "| compute to target |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, e in summary_opt["schemes"].items():
        ms, cpu = dict(e["seconds_per_step"]), dict(e["cpu_seconds_per_step"])
        for d in (ms, cpu):
            d.update({k: 1000 * d[k] for k in ("median", "min", "max")})
        lines.append(
            f"| {name} | {_spread_text(ms)} | {_ratio_text(e['relative_seconds_per_step'])} "
            f"| {_spread_text(cpu)} | {_ratio_text(e['relative_cpu_seconds_per_step'])} "
            f"| {_fmt(e['compute_per_step']['median'], 4)} | {_pct(e['loader_share']['median'])} "
            f"| {_pct(e['feedback_share']['median'])} | {_pct(e['is_on_share']['median'])} "
            f"| {_spread_text(e['q_log'], 2)} | {_spread_text(e['steps_to_target'])} "
            f"| {_spread_text(e['seconds_to_target'])} | {_spread_text(e['compute_to_target'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _tuning_table(tuning: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| optimizer | scheme | grid: final validation loss (chosen in bold) | chosen lr |",
        "|---|---|---|---|",
    ]
    for opt, per_scheme in tuning.items():
        for scheme, t in per_scheme.items():
            cells = []
            for i, (lr, loss) in enumerate(zip(t["grid"], t["val_loss"], strict=True)):
                text = f"{_fmt(lr, 2)}: {'diverged' if t['diverged'][i] else _fmt(loss, 4)}"
                cells.append(f"**{text}**" if i == t["index"] else text)
            note = (
                " (all diverged: smallest lr)"
                if t["all_diverged"]
                else ("" if t["tuned"] else " (not tuned)")
            )
            lines.append(f"| {opt} | {scheme} | {'; '.join(cells)} | {_fmt(t['chosen'], 2)}{note} |")
    return "\n".join(lines) + "\n"


def _cost_text(results: dict[str, Any]) -> str:
    c = results.get("costs") or {}
    if not c:
        return ""
    return (
        f"Measured cost model ({c.get('clock', 'clock')}, median of 7 rounds, batch {c['batch_size']}): "
        f"forward {1000 * c['forward_seconds']:.2f} ms, backward {1000 * c['backward_seconds']:.2f} ms, "
        f"so a backward costs r = {c['backward_cost']:.2f} forwards; *equal compute* counts forward + "
        f"{c['backward_cost']:.2f} x backward examples.\n"
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write the Markdown report (verdicts, headline tables, label noise, tuned learning rates, plots)."""
    cfg = results["config"]
    m = results["machine"]
    d = results["dataset"]
    budget = results["budget"]["text"]
    summary = results["summary"]
    parts = ["# isample bench report\n"]
    said = verdicts(summary)
    if said:
        parts.append("**Verdict** (equal CPU time, medians over seeds):\n")
        parts.append("\n".join(f"- {v}" for v in said.values()) + "\n")
    noise = results.get("noise_summary") or {}
    for opt, ns in noise.items():
        table = ns["schemes"]
        if "uniform" not in table:
            continue
        ref = table["uniform"]["final_test_accuracy"]["median"]
        losers = [
            f"{k} ({100 * (e['final_test_accuracy']['median'] - ref):+.1f} points)"
            for k, e in table.items()
            if k != "uniform"
            and e["final_test_accuracy"]["n"]
            and e["final_test_accuracy"]["median"] - ref <= -0.01
        ]
        nd = results.get("noise_dataset") or {}
        parts.append(
            f"- label noise ({nd.get('name', 'noisy labels')}, {opt}): "
            + (
                "clean test accuracy at least 1 point below uniform's for " + ", ".join(losers) + "."
                if losers
                else "no scheme lost a point of clean test accuracy against uniform."
            )
            + "\n"
        )
    parts += [
        f"Command: `{results['command']}`  \nCreated: {results['created']} (wall time "
        f"{results['wall_seconds']:.1f} s, CPU time {results['cpu_seconds']:.1f} s, isample "
        f"{results['isample_version']})\n",
        f"Dataset: **{d['name']}** ({d['description']}); train / val / test = {d['n_train']} / "
        f"{d['n_val']} / {d['n_test']}. Model: **{cfg['model']}**. Batch size {cfg['batch_size']}, "
        f"budget {budget} per run (tuning runs: {_tuning_budget(cfg, results)}), learning-rate "
        f"schedule **{cfg.get('schedule', 'constant')}** in every run, seeds {cfg['seeds']}, evaluation "
        f"every {cfg['eval_every']} steps (training loss on {_eval_size(cfg, d)} training examples), "
        f"kappa probe of {cfg['probe_size']} examples every {cfg['quality_every']} steps.\n",
        _cost_text(results),
        "## Machine\n",
        f"- CPU: {m['cpu']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores; torch "
        f"threads {m['torch_threads']})\n- torch {m['torch']}, Python {m['python']}, {m['platform']}\n"
        f"- device: {m['device']}{' (' + m['device_name'] + ')' if m.get('device_name') else ''}\n"
        f"- load average (1/5/15 min) at start {m.get('load_average_start')}, at end "
        f"{m.get('load_average_end')}: above the core count, other processes shared the CPUs and "
        "wall-clock figures are noisier than CPU-time ones\n",
        "## Headline\n",
        "Ratios are uniform / scheme: a **loss ratio > 1** means the scheme reached a *lower* training "
        "loss than uniform at the same number of steps, wall-clock seconds, process CPU seconds (less "
        "sensitive than wall-clock to other processes on a shared machine) or compute (forward + r x "
        "backward examples, r measured above); a **speed-up > 1** means it reached the target sooner. "
        f"Targets are robust: per run the mean of the last {cfg.get('smooth', 1)} evaluations, then "
        "uniform's median over seeds, for the training loss and the test accuracy; times to a target "
        "are read on each run's trailing mean of the same window; 'never' = not within the budget. "
        "Values are medians over seeds with [min, max]. *IS on* = share of steps with importance "
        "sampling switched on (switched schemes; '-' = not reported); *overhead* = time in the loader "
        "(sampling, scoring) and feedback as a share of the training step; *kappa* = V_uniform / "
        "V_scheme on the probe (identity geometry; D: in the optimizer's preconditioned geometry). "
        "Curves are read off with log-linear interpolation.\n",
    ]
    for opt, s in summary.items():
        ref = s["reference"]
        parts.append(
            f"### {opt}\n\nTargets: training loss {_fmt(s['target_loss'], 4)}, test accuracy "
            f"{_fmt(s.get('target_test_accuracy'), 4)}, test loss {_fmt(s.get('target_test_loss'), 4)}; "
            f"equal steps = {ref['steps']:.0f}, equal wall time = {ref['seconds']:.3g} s, equal CPU "
            f"time = {ref['cpu_seconds']:.3g} s, equal compute = {ref['compute']:.0f} forward-equivalent "
            "examples.\n\n" + headline_table(s) + "\nDetails:\n\n" + details_table(s)
        )
    if noise:
        nd = results.get("noise_dataset") or {}
        parts.append(
            f"## Label noise: {nd.get('name', '')}\n\n{nd.get('description', '')}. Every scheme reuses its "
            "learning rate tuned on the clean workload; same budget, schedule and seeds. A scheme that "
            "concentrates on high-loss examples trains on the mislabelled ones and loses clean test "
            "accuracy.\n"
        )
        for opt, ns in noise.items():
            parts.append(f"### {opt}\n\n" + noise_table(ns))
    parts.append(
        "## Tuned learning rates\n\nEach (scheme, optimizer) ran every grid value with "
        f"{_tuning_budget(cfg, results)} and the {cfg.get('schedule', 'constant')} schedule (seed "
        f"{10000 + cfg['seeds'][0]}); lowest smoothed validation loss (mean of the last "
        f"{cfg.get('smooth', 1)} evaluations) wins, losses within a relative {cfg['tie_rtol']:g} of the "
        "best tie and the smallest tied learning rate is taken; diverged runs are excluded; a choice "
        f"at an edge extends the grid (up to {cfg.get('max_grid', '-')} points).\n\n"
        + _tuning_table(results["tuning"])
    )
    parts.append("## Plots\n")
    if results["plots"]:
        parts.append("\n".join(f"![{Path(p).stem}]({p})" for p in results["plots"]) + "\n")
    for note in results.get("notes", []):
        parts.append(f"> Note: {note}\n")
    parts.append(
        "\nFiles: `results.json` (schema version "
        f"{results['schema_version']}), `results.csv` (one row per scheme x optimizer x seed x "
        "evaluation point; label-noise runs have dataset = the noisy workload). See docs/bench.md for "
        "every field.\n"
    )
    Path(path).write_text("\n".join(p for p in parts if p), encoding="utf-8")


def _tuning_budget(cfg: dict[str, Any], results: dict[str, Any]) -> str:
    frac = float(cfg.get("tune_fraction", 1.0))
    if frac >= 1:
        return "the same budget"
    kind, amount = results["budget"]["kind"], results["budget"]["amount"]
    if kind == "steps":
        return f"{max(1, int(round(amount * frac)))} steps"
    return f"{amount * frac:g} s"


def _eval_size(cfg: dict[str, Any], d: dict[str, Any]) -> str:
    size = cfg.get("train_eval_size")
    return (
        str(d["n_train"])
        if size is None or size >= d["n_train"]
        else f"{size} (a fixed subset) of {d['n_train']}"
    )
