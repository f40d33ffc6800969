"""PNG plots of a sweep (matplotlib, Agg backend; from the ``bench`` extra).

Four figures, one panel per optimizer, one colour per scheme; thin lines are single
seeds, the thick line is the median over seeds on a common grid (log-linear
interpolation, see :func:`isample.bench.curves.interpolate`):

* ``loss_vs_seconds.png``: full training loss against training wall-clock seconds,
* ``loss_vs_steps.png``: against optimizer steps,
* ``loss_vs_compute.png``: against compute (forward + 2 x backward examples),
* ``kappa.png``: kappa of each scheme's sampler on the probe over training (log scale).

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
PLOT_FILES = ("loss_vs_seconds.png", "loss_vs_steps.png", "loss_vs_compute.png", "kappa.png")


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


def _median_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    ends = [r["curve"][-1][key] for r in runs]
    grid = np.linspace(0.0, float(min(ends)), 60)
    vals = []
    for x in grid:
        ys = []
        for r in runs:
            xs = [p[key] for p in r["curve"]]
            ls = [
                p["train_loss"]
                if p["train_loss"] is not None and math.isfinite(p["train_loss"])
                else math.inf
                for p in r["curve"]
            ]
            ys.append(interpolate(xs, ls, x) if x >= xs[0] else math.nan)
        ys = [y for y in ys if not math.isnan(y)]
        vals.append(float(np.median(ys)) if ys else math.nan)
    return grid, np.asarray(vals)


def _layout(fig: Any) -> None:
    # fixed margins: tight_layout measures every text box and costs seconds per figure
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.3)


def _log_y(ax: Any) -> None:
    # log axis with plain "%g" labels: the default mathtext labels are slow to lay out
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


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
        "seconds": "training seconds",
        "step": "optimizer steps",
        "compute": "forward-equivalent examples",
    }
    for key, fname in (("seconds", PLOT_FILES[0]), ("step", PLOT_FILES[1]), ("compute", PLOT_FILES[2])):
        fig, axes = plt.subplots(1, len(optimizers), figsize=(4.5 * len(optimizers), 3.6), squeeze=False)
        for ax, opt in zip(axes[0], optimizers, strict=True):
            for s in schemes:
                mine = [r for r in runs if r["optimizer"] == opt and r["scheme"] == s]
                if not mine:
                    continue
                for r in mine:
                    xs = [p[key] for p in r["curve"]]
                    ys = [p["train_loss"] for p in r["curve"]]
                    ax.plot(xs, ys, color=colours[s], alpha=0.25, linewidth=0.8)
                gx, gy = _median_curve(mine, key)
                ax.plot(gx, gy, color=colours[s], linewidth=2.0, label=s)
            _log_y(ax)
            ax.set_title(opt)
            ax.set_xlabel(labels[key])
            ax.set_ylabel("training loss")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        _layout(fig)
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        written.append(fname)
    fig, axes = plt.subplots(1, len(optimizers), figsize=(4.5 * len(optimizers), 3.6), squeeze=False)
    for ax, opt in zip(axes[0], optimizers, strict=True):
        drawn = False
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
        _log_y(ax)
        ax.set_title(opt)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("kappa = V_uniform / V_scheme")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    _layout(fig)
    fig.savefig(out_dir / PLOT_FILES[3], dpi=100)
    plt.close(fig)
    written.append(PLOT_FILES[3])
    return written
