"""The diagonal preconditioner of a live ``torch.optim`` optimizer.

Adam, AdamW and RMSprop step along ``D g`` rather than ``g``, with

.. math::

    D = \\operatorname{diag}\\big(1 / (\\sqrt{\\hat v} + \\epsilon)\\big),

so the gradient noise that matters for them is the noise of ``D g``. This module reads
``D`` from the optimizer's state exactly as the optimizer's own step computes it (bias
correction included). Metrics and optimizer-aware scorers share this one function.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NoOptimizerStateError", "preconditioner_diagonal", "is_identity_geometry"]


class NoOptimizerStateError(ValueError):
    """Raised when an adaptive optimizer has not taken a step yet, so ``D`` is undefined."""


_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


def is_identity_geometry(optimizer: torch.optim.Optimizer | None) -> bool:
    """Return True when the optimizer steps along the raw gradient (``None`` or SGD).

    SGD with momentum also counts: momentum averages gradients over time but does not
    rescale coordinates, so the per-step noise geometry is the identity.
    """
    return optimizer is None or isinstance(optimizer, torch.optim.SGD)


def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer | None,
    params: Iterable[torch.nn.Parameter],
) -> list[torch.Tensor]:
    """Return ``D`` for each parameter: a tensor of the parameter's shape (float32 or wider).

    Supported: ``None`` and SGD (identity: tensors of ones), Adam, AdamW (``exp_avg_sq``,
    or ``max_exp_avg_sq`` with amsgrad, bias-corrected), RMSprop (``square_avg``, centred
    variant included), Adagrad (``sum``).

    Raises:
        NoOptimizerStateError: an adaptive optimizer has no state for a parameter yet
            (no step taken).
        TypeError: the optimizer type is not supported, or a parameter is not managed by it.
    """
    params = list(params)
    if is_identity_geometry(optimizer):
        return [torch.ones_like(p, dtype=torch.float32) for p in params]
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    out = []
    for p in params:
        if p not in group_of:
            raise TypeError(
                f"A parameter of shape {tuple(p.shape)} is not managed by the given {type(optimizer).__name__}."
            )
        group = group_of[p]
        state = optimizer.state.get(p, {})
        if not state:
            raise NoOptimizerStateError(
                f"The {type(optimizer).__name__} optimizer has no state for a parameter of shape "
                f"{tuple(p.shape)}: take at least one optimizer step before reading its preconditioner."
            )
        eps = group["eps"]
        if isinstance(optimizer, _ADAM_LIKE):
            _, beta2 = group["betas"]
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
            bias_correction2 = 1.0 - beta2**step
            denom = (v / bias_correction2).sqrt() + eps
        elif isinstance(optimizer, torch.optim.RMSprop):
            v = state["square_avg"]
            if group.get("centered", False):
                v = v - state["grad_avg"] ** 2
            denom = v.sqrt() + eps
        elif isinstance(optimizer, torch.optim.Adagrad):
            denom = state["sum"].sqrt() + eps
        else:
            raise TypeError(
                f"isample does not know the preconditioner of {type(optimizer).__name__}; "
                "supported: SGD, Adam, AdamW, RMSprop, Adagrad."
            )
        out.append(1.0 / denom)
    return out
