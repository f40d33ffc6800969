"""PNG plots of a sweep (matplotlib, Agg backend; from the ``bench`` extra).

Six figures, one panel per optimizer, one colour per scheme; thin lines are single
seeds, the thick line is the median over seeds on a common grid (log-linear
interpolation, see :func:`isample.bench.curves.interpolate`); the legend says so:

* ``loss_vs_seconds.png``: training loss against training wall-clock seconds,
* ``loss_vs_cpu_seconds.png``: against process CPU seconds,
* ``loss_vs_steps.png``: against optimizer steps,
* ``loss_vs_compute.png``: against compute (forward + r x backward examples, r measured),
* ``test_accuracy_vs_cpu_seconds.png``: test accuracy against process CPU seconds,
* ``kappa.png``: kappa of each scheme's sampler on the probe over training (log scale).

Margins are set in inches, so a single-optimizer figure keeps its axis labels; x axes
use at most five ticks with compact labels (``20k``).

Without matplotlib, :func:`matplotlib_available` is False and :func:`write_plots`
returns no files; the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .curves import interpolate

__all__ = ["matplotlib_available", "write_plots", "PLOT_FILES"]

#: The files :func:`write_plots` writes.
PLOT_FILES = (
    "loss_vs_seconds.png",
    "loss_vs_cpu_seconds.png",
    "loss_vs_steps.png",
    "loss_vs_compute.png",
    "test_accuracy_vs_cpu_seconds.png",
    "kappa.png",
)


def matplotlib_available() -> bool:
    """True when ``matplotlib`` can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _median_curve(
    runs: Sequence[dict[str, Any]], key: str, metric: str = "train_loss"
) -> tuple[np.ndarray, np.ndarray]:
    ends = [r["curve"][-1][key] for r in runs]
    grid = np.linspace(0.0, float(min(ends)), 60)
    log = metric != "test_accuracy"
    vals = []
    for x in grid:
        ys = []
        for r in runs:
            xs = [p[key] for p in r["curve"]]
            ls = [
                p[metric] if p.get(metric) is not None and math.isfinite(p[metric]) else math.inf
                for p in r["curve"]
            ]
            if not log and not all(math.isfinite(v) for v in ls):
                ys.append(math.nan)
                continue
            ys.append(interpolate(xs, ls, x, log=log) if x >= xs[0] else math.nan)
        ys = [y for y in ys if not math.isnan(y)]
        vals.append(float(np.median(ys)) if ys else math.nan)
    return grid, np.asarray(vals)


_PANEL_W, _PANEL_H = 4.6, 3.6  # inches per panel
_LEFT, _RIGHT, _GAP, _BOTTOM, _TOP = 0.85, 0.2, 0.85, 0.6, 0.4  # margins in inches


def _figure(plt: Any, panels: int) -> tuple[Any, Any]:
    width = _LEFT + _RIGHT + panels * _PANEL_W + (panels - 1) * _GAP
    height = _PANEL_H + _BOTTOM + _TOP
    fig, axes = plt.subplots(1, panels, figsize=(width, height), squeeze=False)
    # fixed margins in inches (tight_layout measures every text box and costs seconds per figure):
    # the y label keeps its room whatever the number of panels
    fig.subplots_adjust(
        left=_LEFT / width,
        right=1 - _RIGHT / width,
        bottom=_BOTTOM / height,
        top=1 - _TOP / height,
        wspace=_GAP / _PANEL_W,
    )
    return fig, axes


def _x_ticks(ax: Any) -> None:
    from matplotlib import ticker

    def compact(v: float, _pos: Any = None) -> str:
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:g}M"
        if a >= 1e3:
            return f"{v / 1e3:g}k"
        return f"{v:g}"

    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5, min_n_ticks=3))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(compact))


def _log_y(ax: Any, values: Sequence[float] = ()) -> None:
    # log axis with plain "%g" labels at 1-2-5 steps: the default mathtext labels are slow to
    # lay out, and a narrow range (kappa near 1) would otherwise show no labelled tick at all
    from matplotlib import ticker

    ax.set_yscale("log")
    finite = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    if finite:
        lo, hi = min(finite), max(finite)
        if hi / lo < 4:  # widen to at least two labelled ticks
            mid = math.sqrt(lo * hi)
            lo, hi = min(lo, mid / 2.2), max(hi, mid * 2.2)
            ax.set_ylim(lo, hi)
        if hi / lo < 10:  # less than a decade: label more steps
            subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=subs, numticks=12))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos=None: f"{v:g}"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())


def _seed_legend(ax: Any, fontsize: int = 7) -> None:
    """Scheme colours plus two grey entries: thin = one seed, thick = median over seeds."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", alpha=0.35, linewidth=0.8),
        Line2D([], [], color="grey", linewidth=2.0),
    ]
    labels += ["thin: one seed", "thick: median over seeds"]
    ax.legend(handles, labels, fontsize=fontsize)


def write_plots(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    """Draw the figures into ``out_dir``; returns the file names written ([] without matplotlib)."""
    if not matplotlib_available():
        return []
    plt = _pyplot()
    out_dir = Path(out_dir)
    optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
    schemes = list(dict.fromkeys(r["scheme"] for r in runs))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(schemes)}
    written = []
    labels = {
        "seconds": "training wall-clock seconds",
        "cpu_seconds": "training CPU seconds",
        "step": "optimizer steps",
        "compute": "forward-equivalent examples",
    }
    figures = (
        ("seconds", "train_loss", PLOT_FILES[0]),
        ("cpu_seconds", "train_loss", PLOT_FILES[1]),
        ("step", "train_loss", PLOT_FILES[2]),
        ("compute", "train_loss", PLOT_FILES[3]),
        ("cpu_seconds", "test_accuracy", PLOT_FILES[4]),
    )
    for key, metric, fname in figures:
        fig, axes = _figure(plt, len(optimizers))
        for ax, opt in zip(axes[0], optimizers, strict=True):
            values: list[float] = []
            for s in schemes:
                mine = [r for r in runs if r["optimizer"] == opt and r["scheme"] == s]
                if not mine:
                    continue
                for r in mine:
                    xs = [p[key] for p in r["curve"]]
                    ys = [p.get(metric) for p in r["curve"]]
                    values += [v for v in ys if v is not None]
                    ax.plot(xs, ys, color=colours[s], alpha=0.25, linewidth=0.8)
                gx, gy = _median_curve(mine, key, metric)
                ax.plot(gx, gy, color=colours[s], linewidth=2.0, label=s)
            if metric == "test_accuracy":
                ax.set_ylabel("test accuracy")
            else:
                _log_y(ax, values)
                ax.set_ylabel("training loss")
            _x_ticks(ax)
            ax.set_title(opt)
            ax.set_xlabel(labels[key])
            ax.grid(True, alpha=0.3)
            _seed_legend(ax, 7)
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        written.append(fname)
    fig, axes = _figure(plt, len(optimizers))
    for ax, opt in zip(axes[0], optimizers, strict=True):
        drawn = False
        values = [1.0]
        for s in schemes:
            for i, r in enumerate(r for r in runs if r["optimizer"] == opt and r["scheme"] == s):
                for geometry, style in (("identity", "-"), ("other", "--")):
                    rows = [
                        q
                        for q in r.get("quality") or []
                        if (q["geometry"] == "identity") == (geometry == "identity")
                    ]
                    rows = [
                        q
                        for q in rows
                        if q["kappa"] is not None and math.isfinite(q["kappa"]) and q["kappa"] > 0
                    ]
                    if not rows:
                        continue
                    label = None
                    if i == 0:
                        label = s if geometry == "identity" else f"{s} (optimizer geometry)"
                    values += [q["kappa"] for q in rows]
                    ax.plot(
                        [q["step"] for q in rows],
                        [q["kappa"] for q in rows],
                        style,
                        color=colours[s],
                        alpha=0.7,
                        label=label,
                    )
                    drawn = True
        ax.axhline(1.0, color="grey", linewidth=0.8)
        _log_y(ax, values)
        _x_ticks(ax)
        ax.set_title(opt)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("kappa = V_uniform / V_scheme")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, title="one line per seed", title_fontsize=7)
    fig.savefig(out_dir / PLOT_FILES[5], dpi=100)
    plt.close(fig)
    written.append(PLOT_FILES[5])
    return written
