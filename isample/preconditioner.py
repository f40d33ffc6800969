"""The diagonal preconditioner of a live ``torch.optim`` optimizer.

Adam, AdamW and RMSprop step along ``D g`` rather than ``g``, with

.. math::

    D = \\operatorname{diag}\\big(1 / (\\sqrt{\\hat v} + \\epsilon)\\big),

so the gradient noise that matters for them is the noise of ``D g``. The Bayesian filtering
optimizers of :mod:`isample.optim` (BRMSprop, BAdam) step along ``s^2 g``, with ``s^2``
their posterior variance; with Adam's convention (``D`` excludes the learning rate, the
update is ``lr D g``) their ``D`` is ``s^2 / lr``, which tends to Adam's
``1 / sqrt(v_hat)`` in their Adam limit. This module reads
``D`` from the optimizer's state exactly as the optimizer's own step computes it (bias
correction included). Metrics and optimizer-aware scorers share this one function.

The read is fused: the parameters are grouped by param group and each group is processed
with a handful of ``torch._foreach_*`` calls rather than several tensor operations per
parameter (Adam's step counters are read from the host once per device). Within a group
the arithmetic is the same, operation for operation, as the optimizer's own (non-fused,
non-capturable) step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .optim import BAdam, BRMSprop

__all__ = ["NoOptimizerStateError", "preconditioner_diagonal", "is_identity_geometry"]


class NoOptimizerStateError(ValueError):
    """Raised when an adaptive optimizer has not taken a step yet, so ``D`` is undefined."""


_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)
_BAYESIAN = (BRMSprop, BAdam)
_SUPPORTED = (*_ADAM_LIKE, torch.optim.RMSprop, torch.optim.Adagrad, *_BAYESIAN)
#: The adaptive optimizers whose diagonal preconditioner is known (SGD is the identity).
SUPPORTED_OPTIMIZERS = _SUPPORTED


def is_identity_geometry(optimizer: torch.optim.Optimizer | None) -> bool:
    """Return True when the optimizer steps along the raw gradient (``None`` or SGD).

    SGD with momentum also counts: momentum averages gradients over time but does not
    rescale coordinates, so the per-step noise geometry is the identity.
    """
    return optimizer is None or isinstance(optimizer, torch.optim.SGD)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when float32 or wider; a float32 copy for half / bfloat16 state."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _step_values(steps: list[torch.Tensor | float]) -> list[float]:
    """Per-parameter step counters as Python floats; one host read per accelerator device."""
    values: list[float] = [0.0] * len(steps)
    on_device: dict[torch.device, list[int]] = {}
    for k, s in enumerate(steps):
        if isinstance(s, torch.Tensor) and s.device.type != "cpu":
            on_device.setdefault(s.device, []).append(k)
        else:
            values[k] = float(s)
    for positions in on_device.values():
        read = torch.stack([steps[k].reshape(()).to(torch.float64) for k in positions]).tolist()
        for k, value in zip(positions, read, strict=True):
            values[k] = value
    return values


def _adam_inverse(group: dict, states: list[dict]) -> list[torch.Tensor]:
    """``1 / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` for one Adam/AdamW param group.

    Each parameter uses its own step count t (a parameter that missed steps has a smaller one).
    """
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    v = [_at_least_float32(st[key]) for st in states]
    _, beta2 = group["betas"]
    beta2 = float(beta2)
    steps = _step_values([st["step"] for st in states])
    out = torch._foreach_sqrt(v)
    torch._foreach_div_(out, [math.sqrt(1.0 - beta2**step) for step in steps])
    torch._foreach_add_(out, float(group["eps"]))
    torch._foreach_reciprocal_(out)
    return list(out)


def _rmsprop_inverse(group: dict, states: list[dict]) -> list[torch.Tensor]:
    """``1 / (sqrt(v - [centred] m^2) + eps)`` for one RMSprop param group."""
    v = [_at_least_float32(st["square_avg"]) for st in states]
    if group.get("centered", False):
        m = [_at_least_float32(st["grad_avg"]) for st in states]
        v = torch._foreach_addcmul(v, m, m, value=-1)
        torch._foreach_sqrt_(v)
        out = v
    else:
        out = torch._foreach_sqrt(v)
    torch._foreach_add_(out, float(group["eps"]))
    torch._foreach_reciprocal_(out)
    return list(out)


def _adagrad_inverse(group: dict, states: list[dict]) -> list[torch.Tensor]:
    """``1 / (sqrt(sum) + eps)`` for one Adagrad param group.

    Adagrad creates its state (``step = 0``, ``sum = initial_accumulator_value``) in its
    constructor; before the first step that ``sum`` holds no gradient, so D is undefined
    just as for Adam and RMSprop.
    """
    steps = _step_values([st["step"] for st in states])
    for step, st in zip(steps, states, strict=True):
        if step == 0:
            raise NoOptimizerStateError(
                f"The Adagrad optimizer has not taken a step for a parameter of shape "
                f"{tuple(st['sum'].shape)}: take at least one optimizer step before reading its "
                "preconditioner."
            )
    out = torch._foreach_sqrt([_at_least_float32(st["sum"]) for st in states])
    torch._foreach_add_(out, float(group["eps"]))
    torch._foreach_reciprocal_(out)
    return list(out)


def _bayesian_inverse(group: dict, states: list[dict]) -> list[torch.Tensor]:
    """``s^2 / lr`` for one BRMSprop / BAdam param group (the last step moved by ``lr D g``).

    ``s^2`` (``posterior_variance``) is the variance the last step used; dividing by the
    group's learning rate follows Adam's convention, in which ``D`` excludes ``lr``.
    """
    out = [_at_least_float32(st["posterior_variance"]).clone() for st in states]
    torch._foreach_div_(out, float(group["lr"]))
    return out


def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer | None,
    params: Iterable[torch.nn.Parameter],
) -> list[torch.Tensor]:
    """Return ``D`` for each parameter: a tensor of the parameter's shape (float32 or wider).

    Supported: ``None`` and SGD (identity: tensors of ones), Adam, AdamW (``exp_avg_sq``,
    or ``max_exp_avg_sq`` with amsgrad, bias-corrected), RMSprop (``square_avg``, centred
    variant included), Adagrad (``sum``), and :class:`isample.optim.BRMSprop` /
    :class:`isample.optim.BAdam` (``posterior_variance / lr``).

    .. math::

        \\text{Adam: } D = \\frac{1}{\\sqrt{v_t} / \\sqrt{1 - \\beta_2^t} + \\epsilon}; \\quad
        \\text{RMSprop: } D = \\frac{1}{\\sqrt{v_t - [\\text{centred}]\\, m_t^2} + \\epsilon}; \\quad
        \\text{Adagrad: } D = \\frac{1}{\\sqrt{s_t} + \\epsilon}; \\quad
        \\text{BRMSprop, BAdam: } D = s^2_t / \\eta

    The returned tensors are new (never views of the optimizer's state), on the state's
    device, in the state's dtype (float32 for half / bfloat16 state); the list follows the
    order of ``params``.

    Raises:
        TypeError: the optimizer type is not supported, or a parameter is not managed by it.
        NoOptimizerStateError: an adaptive optimizer has no state for a parameter yet
            (no step taken; for Adagrad, whose state exists from construction, a step
            count of 0).

    References:
        Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015
        (arXiv:1412.6980); Malladi et al., NeurIPS 2022 (arXiv:2205.10287).
    """
    params = list(params)
    if is_identity_geometry(optimizer):
        return [torch.ones_like(p, dtype=torch.float32) for p in params]
    if not isinstance(optimizer, _SUPPORTED):
        raise TypeError(
            f"isample does not know the preconditioner of {type(optimizer).__name__}; "
            "supported: SGD, Adam, AdamW, RMSprop, Adagrad, BRMSprop, BAdam."
        )
    # id() keys: hashing a Tensor goes through Python-level torch function checks
    group_index: dict[int, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_index[id(p)] = index
    # distinct parameters of ``params`` bucketed by param group, with their positions
    buckets: dict[int, dict[int, tuple[dict, list[int]]]] = {}
    for position, p in enumerate(params):
        index = group_index.get(id(p))
        if index is None:
            raise TypeError(
                f"A parameter of shape {tuple(p.shape)} is not managed by the given "
                f"{type(optimizer).__name__}."
            )
        state = optimizer.state.get(p)
        if not state:
            raise NoOptimizerStateError(
                f"The {type(optimizer).__name__} optimizer has no state for a parameter of shape "
                f"{tuple(p.shape)}: take at least one optimizer step before reading its preconditioner."
            )
        members = buckets.setdefault(index, {})
        if id(p) in members:
            members[id(p)][1].append(position)
        else:
            members[id(p)] = (state, [position])
    if isinstance(optimizer, _ADAM_LIKE):
        inverse = _adam_inverse
    elif isinstance(optimizer, torch.optim.RMSprop):
        inverse = _rmsprop_inverse
    elif isinstance(optimizer, _BAYESIAN):
        inverse = _bayesian_inverse
    else:
        inverse = _adagrad_inverse
    out: list[torch.Tensor | None] = [None] * len(params)
    for index, members in buckets.items():
        distinct = list(members.values())
        diags = inverse(optimizer.param_groups[index], [st for st, _ in distinct])
        for (_, positions), d in zip(distinct, diags, strict=True):
            out[positions[0]] = d
            for position in positions[1:]:
                out[position] = d.clone()
    return out  # type: ignore[return-value]
