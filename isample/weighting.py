"""Importance weights from draw probabilities.

For b i.i.d. draws from p over M candidates, the weight

.. math::

    w_i = \\Big(\\frac{1}{M p_i}\\Big)^{k}

with bias exponent k = 1 makes the weighted minibatch mean
``(1/b) sum_j w_{i_j} g_{i_j}`` an unbiased estimate of the mean gradient over the M
candidates. ``k < 1`` trades bias for smaller weights (k = 0: no reweighting).

Normalisation (``normalize``) and what it does to each optimizer (DESIGN.md):

* ``"none"`` (default): unbiased. The mean weight is 1 in expectation.
* ``"mean"``: divide by the batch mean weight (LaBER's "mean" variant when the weights
  are taken relative to the pool). A per-batch rescale: not cancelled by any optimizer;
  slightly biased.
* ``"max"``: divide by the batch max weight (prioritised replay style); all weights
  <= 1, so SGD sees a smaller effective learning rate that changes from batch to batch.

A constant rescale of all weights is a learning-rate change for SGD and cancels in
Adam / RMSprop (up to eps); a per-batch rescale is cancelled by neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._validation import check_choice, check_float

__all__ = ["importance_weights", "weights_array", "NORMALIZATIONS"]

NORMALIZATIONS = ("none", "mean", "max")


def importance_weights(
    probabilities: torch.Tensor,
    num_candidates: int,
    bias_exponent: float = 1.0,
    max_weight: float | None = None,
    normalize: str = "none",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Importance weights of drawn examples, float32 Tensor of the same shape.

    Args:
        probabilities: draw probability p_i (> 0) of each drawn example, shape (b,).
        num_candidates: M, the size of the set drawn from (N for a table, B for a pool).
        bias_exponent: k in [0, 1]; 1 = unbiased.
        max_weight: clip weights at this value (> 0) before normalising; None = no clip.
        normalize: ``"none"``, ``"mean"`` or ``"max"`` (see module docstring).
        dtype: output dtype (computed in float64, then cast; float32 by default).

    Returns:
        Tensor of shape (b,): ``min((1 / (M p_i)) ** k, max_weight)``, normalised.
    """
    check_float(bias_exponent, "bias_exponent", "importance_weights", minimum=0.0, maximum=1.0)
    check_float(
        max_weight, "max_weight", "importance_weights", minimum=0.0, min_inclusive=False, allow_none=True
    )
    check_choice(normalize, "normalize", "importance_weights", NORMALIZATIONS)
    p = probabilities.to(torch.float64)
    if bool((p <= 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("importance_weights needs finite probabilities > 0 for every drawn example.")
    return weights_array(p, num_candidates, bias_exponent, max_weight, normalize).to(dtype)


def weights_array(
    p: Any, num_candidates: int, bias_exponent: float, max_weight: float | None, normalize: str
) -> Any:
    """The weight formula on an already validated float64 array (NumPy or torch), same type out.

    The single implementation behind :func:`importance_weights`; samplers that validated
    their configuration once call it directly on their hot path.
    """
    w = 1.0 / (num_candidates * p)
    if bias_exponent != 1.0:
        w = w**bias_exponent
    if max_weight is not None:
        w = w.clip(None, max_weight) if isinstance(w, np.ndarray) else w.clamp(max=max_weight)
    if normalize == "mean" and len(w):
        w = w / w.mean()
    elif normalize == "max" and len(w):
        w = w / w.max()
    return w
