"""A picture of what a sampler does: scores, draw probabilities, weights and the switch.

Needs matplotlib (``pip install 'isample[bench]'``); importing :mod:`isample` does not
import it. Example::

    import isample.plotting
    weights = []
    for x, y, w in loader:
        ...
        weights.append(w.detach().cpu())
    isample.plotting.plot_sampling(loader, weights, path="sampling.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["plot_sampling"]


def _inner(loader: Any) -> Any:
    """The scheme loader behind an :class:`isample.DataLoader` (or the object itself)."""
    return getattr(loader, "loader", loader) if hasattr(loader, "scheme") else loader


def _table(loader: Any) -> Any:
    inner = _inner(loader)
    sampler = getattr(inner, "sampler", None)
    return sampler if sampler is not None and hasattr(sampler, "probabilities") else None


def _history(loader: Any) -> list[dict[str, Any]]:
    inner = _inner(loader)
    history = getattr(getattr(inner, "pool", inner), "tau_history", None)
    return list(history) if history is not None else []


def plot_sampling(
    loader: Any,
    weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
    path: str | Path | None = None,
    bins: int = 40,
) -> Any:
    """Plot the score and weight distributions of a sampler, and its switch over time.

    Panels (those that apply): the latest score of every scored example (table schemes);
    ``N p_i``, each example's draw probability relative to uniform (table schemes; the
    weight of an example is ``1 / (N p_i)``); the importance weights of the batches in
    ``weights``, with their mean and maximum; tau and its EMA against the switch threshold
    over the steps, with the steps where importance sampling was on shaded (pool schemes).

    Args:
        loader: an :class:`isample.DataLoader`, a scheme loader, a :class:`isample.PoolLoader`
            or a :class:`isample.TableSampler`.
        weights: the weights of batches seen in training: a Tensor of shape (k,) or a
            list of them (concatenated), or None.
        path: write the figure there as PNG (None: only return it).
        bins: histogram bins.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: there is nothing to plot (no table, no weights, no switch history).
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised without matplotlib
        raise ImportError("isample.plotting needs matplotlib: pip install 'isample[bench]'.") from error
    panels: list[tuple[str, Any]] = []
    is_table = all(hasattr(loader, a) for a in ("scores", "probabilities", "num_samples"))
    table = loader if is_table else _table(loader)
    if table is not None and hasattr(table, "scores"):
        scores = table.scores().numpy()
        seen = scores[np.isfinite(scores)]
        if seen.size:
            panels.append(("scores", seen))
        n = int(table.num_samples)
        panels.append(("relative", table.probabilities().numpy() * n))
    if weights is not None:
        w = torch.cat([t.reshape(-1) for t in weights]) if isinstance(weights, (list, tuple)) else weights
        w = torch.as_tensor(w).detach().to(torch.float64).reshape(-1).cpu().numpy()
        if w.size:
            panels.append(("weights", w))
    history = _history(loader)
    if history:
        panels.append(("switch", history))
    if not panels:
        raise ValueError(
            "plot_sampling found nothing to plot: pass the weights of some batches, or a loader with "
            "a score table or a switch history."
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (kind, data) in zip(axes[0], panels, strict=True):
        if kind == "scores":
            ax.hist(data, bins=bins, color="tab:blue")
            ax.set_title(f"latest scores ({data.size} examples)", fontsize=9)
            ax.set_xlabel("score")
        elif kind == "relative":
            positive = data[data > 0]
            edges = np.geomspace(max(positive.min(), 1e-6), max(positive.max(), 1.0 + 1e-9), bins)
            ax.hist(positive, bins=edges, color="tab:green")
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8, ls="--")
            ax.set_title("N p_i (1 = uniform; weight = 1 / (N p_i))", fontsize=9)
            ax.set_xlabel("N p_i")
        elif kind == "weights":
            ax.hist(data, bins=bins, color="tab:orange")
            ax.axvline(float(data.mean()), color="k", lw=0.8, ls="--", label=f"mean {data.mean():.2f}")
            ax.set_title(f"batch weights (max {data.max():.2f})", fontsize=9)
            ax.set_xlabel("w")
            ax.legend(fontsize=8)
        else:
            steps = np.array([e.get("step", i) for i, e in enumerate(data)], dtype=float)
            tau = np.array([np.nan if e.get("tau") is None else e["tau"] for e in data], dtype=float)
            ema = np.array([np.nan if e.get("ema") is None else e["ema"] for e in data], dtype=float)
            on = np.array([bool(e.get("on")) for e in data])
            ax.plot(steps, tau, lw=0.6, alpha=0.5, label="tau")
            ax.plot(steps, ema, lw=1.5, label="tau EMA")
            threshold = getattr(getattr(_inner(loader), "switch", None), "threshold", None)
            if isinstance(threshold, (int, float)) and np.isfinite(threshold):
                ax.axhline(threshold, color="k", lw=0.8, ls="--", label="threshold")
            if on.any():
                ax.fill_between(
                    steps,
                    0,
                    1,
                    where=on,
                    color="tab:red",
                    alpha=0.12,
                    transform=ax.get_xaxis_transform(),
                    label="IS on",
                )
            ax.set_title(f"switch: IS on {on.mean():.0%} of steps", fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        ax.set_ylabel("count" if kind != "switch" else "tau")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
