"""Sampler quality in the geometry of the optimizer's actual step.

Adam, AdamW and RMSprop step along ``D g`` with ``D = diag(1 / (sqrt(v_hat) + eps))`` read
from their state (:func:`isample.preconditioner.preconditioner_diagonal`), so the noise
that reaches the parameters is the noise of ``D g_hat``:

.. math::

    V_D(p) = \\operatorname{tr}\\operatorname{Cov}(D \\hat g)
           = \\sum_i \\frac{\\|D g_i\\|^2}{N^2 p_i} - \\|D g\\|^2, \\qquad
    p^{D}_i \\propto \\|D g_i\\|, \\qquad \\kappa_D = V_{D,u} / V_D(p).

``D`` is taken from the optimizer's *current* state (the state after its last step); the
next step first folds the new gradient into ``v``, a change of relative size ``1 - beta2``
per step. SGD (with or without momentum) and ``None`` are the identity geometry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..preconditioner import preconditioner_diagonal
from .functional import Quality, _gradients, gradient_variance, optimal_probabilities, quality

__all__ = [
    "flat_preconditioner",
    "preconditioned_gradients",
    "preconditioned_optimal_probabilities",
    "preconditioned_quality",
    "preconditioned_variance",
]


def flat_preconditioner(
    optimizer: torch.optim.Optimizer | None, params: Iterable[torch.nn.Parameter]
) -> torch.Tensor:
    """The diagonal of D for ``params``, flattened and concatenated: float64 Tensor of shape (P,).

    The order matches :func:`isample.metrics.per_example_gradients` when ``params`` are the
    parameters it differentiated, in the same order (see :func:`select_parameters`).

    Raises:
        isample.preconditioner.NoOptimizerStateError: (a ValueError) the adaptive
            optimizer has not taken a step, so its state is empty and D is undefined.
        TypeError: unsupported optimizer, or a parameter it does not manage.
    """
    params = list(params)
    if not params:
        raise ValueError("The 'params' parameter of flat_preconditioner must not be empty.")
    diag = preconditioner_diagonal(optimizer, params)
    return torch.cat([d.detach().reshape(-1).to("cpu", torch.float64) for d in diag])


def preconditioned_gradients(
    G: Any, optimizer: torch.optim.Optimizer | None, params: Iterable[torch.nn.Parameter]
) -> torch.Tensor:
    """Per-example steps ``D g_i``: float64 Tensor of shape (N, P).

    Args:
        G: Tensor of shape (N, P), per-example gradients of ``params`` (flattened, in order).
        optimizer: the optimizer whose state defines D (None or SGD: identity).
        params: the parameters the columns of G belong to.

    Raises:
        ValueError: P does not match the parameters' total size; NaN gradients; an
            adaptive optimizer with empty state.
    """
    g = _gradients(G, "preconditioned_gradients")
    d = flat_preconditioner(optimizer, params)
    if g.shape[1] != d.shape[0]:
        raise ValueError(
            f"The 'G' parameter of preconditioned_gradients must have one column per parameter element: "
            f"expected {d.shape[0]} columns, got {g.shape[1]}."
        )
    return g * d


def preconditioned_variance(
    G: Any, p: Any, optimizer: torch.optim.Optimizer | None, params: Iterable[torch.nn.Parameter]
) -> float:
    """``V_D(p)``, the one-draw variance (trace) of ``D g_hat`` (float; see module docstring)."""
    return gradient_variance(preconditioned_gradients(G, optimizer, params), p)


def preconditioned_optimal_probabilities(
    G: Any, optimizer: torch.optim.Optimizer | None, params: Iterable[torch.nn.Parameter]
) -> torch.Tensor:
    """The sampler optimal for the optimizer's step, ``p_i proportional to ||D g_i||``.

    Returns:
        float64 Tensor of shape (N,).
    """
    return optimal_probabilities(preconditioned_gradients(G, optimizer, params))


def preconditioned_quality(
    G: Any, p: Any, optimizer: torch.optim.Optimizer | None, params: Iterable[torch.nn.Parameter]
) -> Quality:
    """:func:`isample.metrics.quality` in the optimizer's geometry: kappa_D, kappa_D_opt, Q_D.

    A sampler that is optimal for SGD (``p proportional to ||g_i||``) can be far from
    optimal here: on digits early in training Adam's optimum was kappa 116 while the
    gradient-norm sampler reached 3.2 (REFERENCES.md).
    """
    return quality(preconditioned_gradients(G, optimizer, params), p)
