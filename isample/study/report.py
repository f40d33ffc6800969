"""Outputs of ``isample study``: ``results.json``, ``results.csv``, ``report.md`` and ``plots/*.png``.

``results.csv`` has one row per analysed item, columns :data:`CSV_COLUMNS`:

* ``experiment = A``: one row per (optimizer, seed): ``kappa`` (median over the IS run's
  probes, optimizer geometry), ``batch_size`` (b), ``coupled_batch_size`` (round(kappa b)),
  ``lr`` / ``coupled_lr``, ``rule``, ``d_rule`` and ``d_control`` (median |log loss ratio| of
  the IS curve against the coupled and the control uniform curves), ``verdict`` (per optimizer);
  ``d_matched`` / ``d_matched_control`` / ``verdict_matched``: the same with the IS run itself
  given the scaled hyperparameters (and the control uniform at b with them).
* ``experiment = B``: one row per (workload, optimizer, scheme, seed, checkpoint): ``step``,
  ``kappa``, ``q_log``, ``tau2`` (predicted), ``realized_steps``, ``realized_cpu``, ``censored``.
* ``experiment = C``: one row per (optimizer, variant): ``stable_lr`` (empty: none stable),
  ``stable_factor`` (over the base lr), ``at_edge``.

Empty cells are "not applicable"; non-finite numbers are written ``nan`` / ``inf``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..bench.plots import matplotlib_available
from ..bench.report import write_json

__all__ = ["CSV_COLUMNS", "PLOT_FILES", "write_outputs", "write_csv", "write_report", "write_plots"]

CSV_COLUMNS = (
    "experiment",
    "workload",
    "optimizer",
    "family",
    "scheme",
    "seed",
    "step",
    "lr",
    "batch_size",
    "coupled_batch_size",
    "coupled_lr",
    "rule",
    "kappa",
    "kappa_probe",
    "kappa_pool",
    "q_log",
    "tau2",
    "d_rule",
    "d_control",
    "verdict",
    "d_matched",
    "d_matched_control",
    "verdict_matched",
    "realized_steps",
    "realized_cpu",
    "censored",
    "stable_lr",
    "stable_factor",
    "at_edge",
)

PLOT_FILES = {
    "A": "plots/effective_batch.png",
    "B": "plots/predicted_vs_realized.png",
    "C": "plots/stability.png",
}


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``results.csv`` (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    if "A" in results:
        a = results["A"]
        for r in a["rows"]:
            rows.append(
                {
                    "experiment": "A",
                    **{k: r.get(k) for k in CSV_COLUMNS if k in r},
                    "verdict": a["verdicts"][r["optimizer"]]["verdict"],
                    "verdict_matched": a["verdicts"][r["optimizer"]]["verdict_matched"],
                }
            )
    if "B" in results:
        for p in results["B"]["points"]:
            rows.append({"experiment": "B", **{k: p.get(k) for k in CSV_COLUMNS if k in p}})
    if "C" in results:
        c = results["C"]
        from .experiments import optimizer_family

        for opt, variants in c["table"].items():
            for variant, entry in variants.items():
                rows.append(
                    {
                        "experiment": "C",
                        "workload": c["workload"],
                        "optimizer": opt,
                        "family": optimizer_family(opt),
                        "scheme": variant,
                        "stable_lr": entry["lr"],
                        "stable_factor": entry["factor"],
                        "at_edge": entry["at_edge"],
                    }
                )
    return rows


def write_csv(results: dict[str, Any], path: Path) -> int:
    """Write ``results.csv``; returns the number of rows."""
    rows = csv_rows(results)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
    return len(rows)


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


def table_a(a: dict[str, Any]) -> str:
    """Markdown table of Experiment A's verdicts."""
    lines = [
        "| optimizer | rule | kappa (probe) | batch ratio | d(IS, coupled) | d(IS, control) | verdict | "
        "d(IS', coupled) | d(IS', control') | verdict, matched | d(seed 0, seed 1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for opt, v in a["verdicts"].items():
        lines.append(
            f"| {opt} | {v['rule'] or '-'} | {_f(v['kappa'])} ({_f(v['kappa_probe'])}) | "
            f"{_f(v['batch_ratio'])} | "
            f"{_f(v['d_rule'])} | {_f(v['d_control'])} | {v['verdict']} | {_f(v['d_matched'])} | "
            f"{_f(v['d_matched_control'])} | {v['verdict_matched']} | {_f(v.get('d_seed'))} |"
        )
    return "\n".join(lines)


def table_b(b: dict[str, Any], which: str = "spearman") -> str:
    """Markdown table of Experiment B's rank correlations per family (``which``: ``spearman``
    over all checkpoints or ``spearman_final`` over the last checkpoint of every run)."""
    keys = [
        "kappa~realized_steps",
        "kappa~realized_cpu",
        "kappa_pool~realized_steps",
        "kappa_pool~realized_cpu",
        "q_log~realized_steps",
        "tau2~realized_steps",
        "tau2~realized_cpu",
    ]
    head = "| family | " + " | ".join(k.replace("~", " vs ") for k in keys) + " |"
    lines = [head, "| --- |" + " --- |" * len(keys)]
    for family, entries in b[which].items():
        cells = []
        for k in keys:
            e = entries.get(k, {})
            if e and math.isfinite(float(e["rho"])):
                cells.append(f"{e['rho']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}] (n={e['n']})")
            else:
                cells.append(f"- (n={e.get('n', 0)})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_c(c: dict[str, Any]) -> str:
    """Markdown table of Experiment C: largest stable lr (x base lr) per optimizer and variant."""
    variants = list(next(iter(c["table"].values())).keys()) if c["table"] else []
    lines = ["| optimizer | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
    for opt, row in c["table"].items():
        cells = []
        for v in variants:
            e = row[v]
            if e["lr"] is None:
                cells.append("none stable")
            else:
                mark = (" >=" if e["at_edge"] else "") + (
                    "" if e.get("monotone", True) else " (non-monotone)"
                )
                if e.get("refused"):
                    mark += f" (lr >= {min(float(k) for k in e['refused']):.3g} refused)"
                cells.append(f"{e['lr']:.3g} (x{e['factor']:.3g}){mark}")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write ``report.md``."""
    cfg = results["config"]
    m = results["machine"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phase_seconds"].items())
    lrs = ", ".join(f"{o} {cfg['lrs'][o]:g}" for o in cfg["optimizers"])
    quick = "quick profile; " if cfg["quick"] else ""
    out = [
        "# isample study",
        "",
        f"isample {results['isample_version']}, {results['created']}; "
        f"command: `{results.get('command') or '-'}`.",
        f"Total {results['wall_seconds']:.1f} s wall, {results['cpu_seconds']:.1f} s CPU, "
        f"{results['n_runs']} training runs ({phases}); {quick}machine: {m.get('cpu')}, "
        f"{m.get('usable_cores')} usable cores, torch threads {cfg['threads']}, "
        f"load average {m.get('load_average')} at start, {results.get('load_average_end')} at end.",
        "",
        f"Runs: {cfg['steps']} steps at constant learning rate, batch {cfg['batch_size']}, "
        f"seeds {cfg['seeds']}, training loss on {cfg['train_eval_size']} fixed examples every "
        f"{cfg['eval_every']} steps, kappa probe ({cfg['probe_size']} examples) every "
        f"{cfg['quality_every']} steps. Base learning rates: {lrs}.",
        "",
    ]
    if "A" in results:
        a = results["A"]
        out += [
            f"## A. Effective batch ({a['workload']}, IS scheme {a['scheme']})",
            "",
            "IS at batch b against uniform at round(kappa b) (batch ratio) with the hyperparameters "
            "of `scaled_hyperparameters` (d(IS, coupled)) and against uniform at b with the same "
            "hyperparameters (d(IS, control)); d = median |log loss ratio| over the steps after the "
            "first evaluation. Matched: IS' = IS run with the scaled hyperparameters too, "
            "control' = uniform at b with them. "
            f"Verdict: *holds* when d(IS, coupled) <= {cfg['match_threshold']} and <= d(IS, control); "
            "*closer than control* when only the second; *fails* otherwise; *untestable* when "
            "round(kappa b) is within 10 % of b. kappa: the two-stage (pool) kappa for pool "
            "schemes, the probe kappa in brackets. d(seed 0, seed 1): the IS runs of two seeds, "
            "the noise floor.",
            "",
            table_a(a),
            "",
        ]
    if "B" in results:
        b = results["B"]
        n_cens = sum(1 for p in b["points"] if p["censored"])
        out += [
            f"## B. Does the metric predict the speed-up ({', '.join(cfg['workloads'])})",
            "",
            f"{len(b['points'])} checkpoints ({n_cens} censored: uniform never reached the IS loss, "
            f"the realized value is a lower bound; left out of rho) of schemes "
            f"{', '.join(cfg['b_schemes'])} x optimizers {', '.join(b['optimizers'])}. "
            "Spearman rho [95 % bootstrap interval] (n pairs) of predicted (mean kappa / Q_log in "
            "the optimizer's geometry, or mean tau^2, up to the checkpoint) against realized "
            "speed-up (uniform's steps or CPU seconds to the IS run's training loss at the "
            "checkpoint, over the IS run's).",
            "",
            table_b(b),
            "",
            "Between runs only (the last checkpoint of every run; no within-run time trend):",
            "",
            table_b(b, "spearman_final"),
            "",
        ]
    if "C" in results:
        c = results["C"]
        out += [
            f"## C. Stability ({c['workload']}, IS scheme {c['scheme']}, {cfg['c_steps']} steps)",
            "",
            f"Largest stable learning rate (stable for every seed) on the grid base x "
            f"{c['grid_factors']} ({cfg['c_search']} search; "
            f"unstable = a non-finite loss or one above {cfg['divergence_factor']} x the initial "
            f"loss). `is-clip`: weights clipped at {c['max_weight']}; `is-mean`: weights divided "
            f"by their batch mean; `table`: {c.get('table_scheme')} (weights up to 1 / (N p_min)); "
            "`table-clip`: the same clipped. `>=`: the grid's largest value was stable.",
            "",
            table_c(c),
            "",
        ]
    if results.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    else:
        out += ["No plots (matplotlib missing or --no-plots).", ""]
    Path(path).write_text("\n".join(out), encoding="utf-8")


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNG plots that matplotlib can draw; returns their paths relative to ``out``."""
    if not matplotlib_available():
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    if "A" in results and results["A"]["curves"]:
        curves = results["A"]["curves"]
        n = len(curves)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, (opt, c) in zip(axes.flat, curves.items(), strict=False):
            for key, style in (("control", "C7--"), ("coupled", "C1-"), ("is", "C0-"), ("is_scaled", "C2:")):
                if key in c:
                    ax.plot(
                        [p["step"] for p in c[key]],
                        [p["train_loss"] for p in c[key]],
                        style,
                        label=key,
                        lw=1.2,
                    )
            ax.set_yscale("log")
            v = results["A"]["verdicts"][opt]
            ax.set_title(f"{opt}: {v['verdict']}; matched: {v['verdict_matched']}", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.supxlabel("step", fontsize=8)
        fig.supylabel("training loss", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["A"], dpi=80)
        plt.close(fig)
        written.append(PLOT_FILES["A"])
    if "B" in results and results["B"]["points"]:
        pts = results["B"]["points"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        families = sorted({p["family"] for p in pts})
        for ax, target in zip(axes, ("realized_steps", "realized_cpu"), strict=True):
            for k, fam in enumerate(families):
                mine = [
                    p
                    for p in pts
                    if p["family"] == fam
                    and math.isfinite(p["kappa"])
                    and p["kappa"] > 0
                    and math.isfinite(p[target])
                    and p[target] > 0
                ]
                ax.scatter(
                    [p["kappa"] for p in mine],
                    [p[target] for p in mine],
                    s=10,
                    color=f"C{k}",
                    label=fam,
                    alpha=0.7,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1, color="0.6", lw=0.8)
            ax.set_xlabel("predicted: mean kappa (optimizer geometry)", fontsize=8)
            ax.set_ylabel(f"realized speed-up ({target.split('_')[1]})", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["B"], dpi=80)
        plt.close(fig)
        written.append(PLOT_FILES["B"])
    if "C" in results and results["C"]["table"]:
        table = results["C"]["table"]
        opts = list(table)
        variants = list(next(iter(table.values())))
        fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(opts) + 2), 3.2))
        width = 0.8 / max(1, len(variants))
        for k, v in enumerate(variants):
            ys = [table[o][v]["factor"] or 0.0 for o in opts]
            ax.bar([i + k * width for i in range(len(opts))], ys, width, label=v, color=f"C{k}")
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(opts))])
        ax.set_xticklabels(opts, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("largest stable lr / base lr", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / PLOT_FILES["C"], dpi=80)
        plt.close(fig)
        written.append(PLOT_FILES["C"])
    return written


def write_outputs(results: dict[str, Any], out: Path, plots: bool = True) -> None:
    """Write ``results.json``, ``results.csv``, ``report.md`` (and plots) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(results, out) if plots else []
    write_json(results, out / "results.json")
    write_csv(results, out / "results.csv")
    write_report(results, out / "report.md")
