"""What a variance multiplier kappa means for each optimizer's hyperparameters and steps.

A sampler with effective batch multiplier ``kappa`` makes the gradient noise of a batch
of b look like that of a uniform batch of ``kappa b``. The SDE scaling rules say how to
change the hyperparameters for a batch ``kappa`` times larger:

* SGD: ``lr -> kappa lr`` (linear scaling).
* Adam, AdamW, RMSprop (square-root scaling rule): ``lr -> sqrt(kappa) lr``,
  ``1 - beta -> kappa (1 - beta)`` for each beta (RMSprop's ``alpha``),
  ``eps -> eps / sqrt(kappa)``. This needs ``kappa < 1 / (1 - beta)``.
* BRMSprop, BAdam (:mod:`isample.optim`): the square-root rule for ``lr`` and the betas, and
  ``prior_variance -> kappa prior_variance``. Their SGD-limit learning rate is
  ``prior_variance``, so it follows SGD's linear rule, while the Adam limit follows the
  square-root rule; their implied Adam ``eps = lr / prior_variance`` then scales as
  ``eps / sqrt(kappa)``, as Adam's does, and the prior decay
  ``a = 1 - lr^2 / (2 prior_variance)`` is unchanged. Their ``eps`` (a precision floor, not
  Adam's eps) is left as it is.

Caveat (REFERENCES.md): in a preliminary measurement, scaling the learning rate by the
estimated kappa (tau^2) looked like a 3-6x gain, but uniform sampling with the same larger
learning rate did better. Tune learning rates per scheme before crediting the sampler;
these functions only *propose* a change, and :func:`apply_scaled_hyperparameters` is opt-in.

References:
    Malladi, Lyu, Panigrahi and Arora, "On the SDEs and Scaling Rules for Adaptive
    Gradient Algorithms", NeurIPS 2022 (arXiv:2205.10287).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .._validation import check_choice, check_float, param_error
from ..optim import BAdam, BRMSprop

__all__ = [
    "NormalisationEffect",
    "apply_scaled_hyperparameters",
    "normalisation_effect",
    "scaled_hyperparameters",
]

_ADAM = (torch.optim.Adam, torch.optim.AdamW)
_NAMES = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def _scaled_beta(beta: Any, k: float, what: str, group_index: int) -> Any:
    new = 1.0 - k * (1.0 - beta)
    # 1e-12 absorbs rounding: 1 - 10 * (1 - 0.9) is 2e-16, not 0, in floating point
    if not 1e-12 < float(new) < 1.0:
        limit = math.inf if float(beta) >= 1.0 else 1.0 / (1.0 - float(beta))
        raise ValueError(
            f"The 'kappa' parameter of scaled_hyperparameters must be < 1 / (1 - {what}) = {limit:.6g} for "
            f"param group {group_index} ({what} = {float(beta)!r}); kappa = {k!r} would set {what} to "
            f"{float(new)!r}, outside (0, 1)."
        )
    return new


def scaled_hyperparameters(optimizer: torch.optim.Optimizer, kappa: float) -> list[dict[str, Any]]:
    """Propose the hyperparameters that turn a batch-size multiplier ``kappa`` into speed.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``, or an
            :class:`isample.optim.BRMSprop` / :class:`isample.optim.BAdam`.
        kappa: effective batch multiplier (> 0, finite), e.g. from :func:`quality` or ``tau**2``.

    Returns:
        One dict per param group with the changed keys only: ``{"lr"}`` for SGD;
        ``{"lr", "betas", "eps"}`` for Adam/AdamW; ``{"lr", "alpha", "eps"}`` for RMSprop;
        ``{"lr", "beta2", "prior_variance"}`` for BRMSprop; ``{"lr", "betas",
        "prior_variance"}`` for BAdam.

    .. math::

        \\text{SGD: } \\eta \\to \\kappa\\eta; \\qquad
        \\text{Adam/RMSprop: } \\eta \\to \\sqrt{\\kappa}\\,\\eta,\\;
        1-\\beta \\to \\kappa(1-\\beta),\\; \\epsilon \\to \\epsilon/\\sqrt{\\kappa}; \\qquad
        \\text{BRMSprop/BAdam: as Adam, and } \\sigma^2 \\to \\kappa\\sigma^2

    Momentum of SGD / RMSprop and weight decay are left unchanged.

    Raises:
        ValueError: kappa would push a beta to <= 0 or >= 1 (needs ``kappa < 1/(1-beta)``).
        TypeError: another optimizer type.

    References:
        Malladi et al., NeurIPS 2022 (arXiv:2205.10287).
    """
    owner = "scaled_hyperparameters"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise param_error("optimizer", owner, "a torch.optim.Optimizer", optimizer, TypeError)
    k = check_float(kappa, "kappa", owner, minimum=0.0, min_inclusive=False)
    if math.isinf(k):
        raise param_error("kappa", owner, "a finite float > 0", kappa)
    root = math.sqrt(k)
    out = []
    for index, group in enumerate(optimizer.param_groups):
        if isinstance(optimizer, _ADAM):
            beta1, beta2 = group["betas"]
            out.append(
                {
                    "lr": group["lr"] * root,
                    "betas": (_scaled_beta(beta1, k, "beta1", index), _scaled_beta(beta2, k, "beta2", index)),
                    "eps": group["eps"] / root,
                }
            )
        elif isinstance(optimizer, torch.optim.RMSprop):
            out.append(
                {
                    "lr": group["lr"] * root,
                    "alpha": _scaled_beta(group["alpha"], k, "alpha", index),
                    "eps": group["eps"] / root,
                }
            )
        elif isinstance(optimizer, BAdam):
            beta1, beta2 = group["betas"]
            out.append(
                {
                    "lr": group["lr"] * root,
                    "betas": (_scaled_beta(beta1, k, "beta1", index), _scaled_beta(beta2, k, "beta2", index)),
                    "prior_variance": group["prior_variance"] * k,
                }
            )
        elif isinstance(optimizer, BRMSprop):
            out.append(
                {
                    "lr": group["lr"] * root,
                    "beta2": _scaled_beta(group["beta2"], k, "beta2", index),
                    "prior_variance": group["prior_variance"] * k,
                }
            )
        elif isinstance(optimizer, torch.optim.SGD):
            out.append({"lr": group["lr"] * k})
        else:
            raise TypeError(
                f"scaled_hyperparameters knows the scaling rule of SGD, Adam, AdamW, RMSprop, BRMSprop "
                f"and BAdam; "
                f"got {type(optimizer).__name__}."
            )
    return out


def apply_scaled_hyperparameters(optimizer: torch.optim.Optimizer, kappa: float) -> list[dict[str, Any]]:
    """Apply :func:`scaled_hyperparameters` to ``optimizer`` in place (all groups or none).

    Returns:
        The previous values of the changed keys, one dict per param group, so that
        ``for g, old in zip(optimizer.param_groups, previous): g.update(old)`` undoes it.
    """
    new = scaled_hyperparameters(optimizer, kappa)
    previous = [
        {key: group[key] for key in change} for group, change in zip(optimizer.param_groups, new, strict=True)
    ]
    for group, change in zip(optimizer.param_groups, new, strict=True):
        group.update(change)
    return previous


class NormalisationEffect(NamedTuple):
    """Per-step effect of a weight normalisation on an optimizer's update.

    Attributes:
        scales: float64 Tensor of shape (T,), ``c_t``, the factor the normalisation
            applies to batch t's weights (and hence to its gradient).
        multipliers: float64 Tensor of shape (T,), the optimizer's update at step t with
            the normalised weights divided by its update with the raw weights, for a
            gradient that is the same at every step (eps = 0, no weight decay).
    """

    scales: torch.Tensor
    multipliers: torch.Tensor


NORMALISATIONS = ("none", "constant", "mean", "max")


def normalisation_effect(
    optimizer: str | torch.optim.Optimizer,
    weights_batches: Sequence[torch.Tensor],
    normalize: str = "max",
    constant: float = 1.0,
) -> NormalisationEffect:
    """How a weight normalisation rescales each step of SGD, Adam, AdamW or RMSprop.

    Normalising batch t's weights multiplies its gradient by ``c_t``: ``"none"`` ``c_t = 1``,
    ``"constant"`` ``c_t = constant``, ``"mean"`` ``c_t = 1 / mean(w_t)``, ``"max"``
    ``c_t = 1 / max(w_t)``. The multiplier is measured by running the optimizer's own
    update rule (a fresh optimizer of the same class and hyperparameters, with ``eps = 0``
    and no weight decay) on one scalar parameter whose gradient is ``c_t`` at step t,
    against the same run with gradient 1. For a constant gradient direction this is exact:

    .. math::

        \\text{SGD: } m_t = c_t; \\qquad
        \\text{Adam: } m_t = \\frac{\\sum_s (1-\\beta_1)\\beta_1^{t-s} c_s / (1-\\beta_1^t)}
        {\\sqrt{\\sum_s (1-\\beta_2)\\beta_2^{t-s} c_s^2 / (1-\\beta_2^t)}}; \\qquad
        \\text{RMSprop: } m_t = \\frac{c_t}{\\sqrt{\\sum_s (1-\\alpha)\\alpha^{t-s} c_s^2 / (1-\\alpha^t)}}

    So a constant rescale is a learning-rate change for SGD (``m_t = c``) and cancels for
    Adam / RMSprop (``m_t = 1``, up to eps), while a per-batch rescale (``"mean"``,
    ``"max"``) changes Adam's and RMSprop's steps from batch to batch.

    Args:
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` (torch defaults), or an
            optimizer instance whose first param group's hyperparameters are used.
        weights_batches: sequence of T weight tensors, each of shape (b_t,), > 0.
        normalize: one of ``"none"``, ``"constant"``, ``"mean"``, ``"max"``.
        constant: the factor for ``"constant"`` (> 0).

    Returns:
        :class:`NormalisationEffect` with ``scales`` and ``multipliers``, each of shape (T,).
    """
    owner = "normalisation_effect"
    check_choice(normalize, "normalize", owner, NORMALISATIONS)
    c = check_float(constant, "constant", owner, minimum=0.0, min_inclusive=False)
    if isinstance(optimizer, str):
        if optimizer.lower() not in _NAMES:
            raise param_error(
                "optimizer", owner, "one of 'sgd', 'adam', 'adamw', 'rmsprop' or an optimizer", optimizer
            )
        cls = _NAMES[optimizer.lower()]
        hyper: dict[str, Any] = {"lr": 1.0}
    elif isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        cls = type(optimizer)
        group = optimizer.param_groups[0]
        hyper = {
            k: group[k] for k in ("lr", "momentum", "dampening", "nesterov", "betas", "alpha") if k in group
        }
    else:
        raise param_error(
            "optimizer",
            owner,
            "one of 'sgd', 'adam', 'adamw', 'rmsprop' or such an optimizer",
            optimizer,
            TypeError,
        )
    if cls is not torch.optim.SGD:
        hyper["eps"] = 0.0
    hyper["weight_decay"] = 0.0
    batches = list(weights_batches)
    if not batches:
        raise ValueError(f"The 'weights_batches' parameter of {owner} must hold at least one batch.")
    scales = []
    for t, w in enumerate(batches):
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() == 0:
            raise ValueError(
                f"The 'weights_batches' parameter of {owner} must hold 1-D non-empty tensors; "
                f"batch {t} is {w!r:.60}."
            )
        w = w.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(
                f"The 'weights_batches' parameter of {owner} must hold finite weights > 0 (batch {t})."
            )
        scale = {"none": 1.0, "constant": c, "mean": 1.0 / float(w.mean()), "max": 1.0 / float(w.max())}[
            normalize
        ]
        scales.append(scale)
    scaled = _scalar_steps(cls, hyper, scales)
    raw = _scalar_steps(cls, hyper, [1.0] * len(scales))
    return NormalisationEffect(
        torch.tensor(scales, dtype=torch.float64),
        torch.tensor(scaled, dtype=torch.float64) / torch.tensor(raw, dtype=torch.float64),
    )


def _scalar_steps(cls: type, hyper: dict[str, Any], grads: list[float]) -> list[float]:
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = cls([param], **hyper)
    steps = []
    for value in grads:
        before = param.detach().clone()
        param.grad = torch.full_like(param, value)
        opt.step()
        steps.append(float((before - param.detach())[0]))
    return steps
