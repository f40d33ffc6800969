"""What an integration logs about one batch: framework-free, shared by every integration."""

from __future__ import annotations

from typing import Any

import torch

from ..metrics.functional import effective_sample_size

__all__ = ["batch_statistics"]


def batch_statistics(weights: torch.Tensor, loader: Any = None) -> dict[str, float]:
    """Summary of one batch's importance weights and, when the loader exposes it, its switch.

    Args:
        weights: Tensor of shape (b,), the batch's importance weights.
        loader: the isample loader (optional). A ``tau_history`` entry with ``"on"`` and
            ``"tau"`` keys (pool schemes) adds ``is_on`` and ``tau``.

    Returns:
        dict with ``ess`` (normalised Kish effective sample size of the weights, in (0, 1]),
        ``max_weight`` and ``mean_weight``, plus ``is_on`` (1.0 / 0.0) and ``tau`` when known.
    """
    w = weights.detach().to(torch.float64).flatten().cpu()
    stats = {
        "ess": float(effective_sample_size(w)) if w.numel() else float("nan"),
        "max_weight": float(w.max()) if w.numel() else float("nan"),
        "mean_weight": float(w.mean()) if w.numel() else float("nan"),
    }
    history = getattr(loader, "tau_history", None)
    if history is None:
        history = getattr(getattr(loader, "pool", None), "tau_history", None)
    if history:
        last = history[-1]
        if "on" in last:
            stats["is_on"] = 1.0 if last["on"] else 0.0
        tau = last.get("tau")
        if tau is not None:
            stats["tau"] = float(tau)
    return stats
