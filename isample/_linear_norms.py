"""Per-example gradient norms of ``nn.Linear`` layers from captured ``(h, delta)`` pairs.

A linear layer ``z = h W^T + c`` applied to an example's inputs ``h_t`` (one row per
position ``t`` of a sequence; ``T = 1`` for a plain batch) receives the output gradient
``delta_t = d l / d z_t`` in the backward pass. The example's parameter gradient is

.. math::

    \\frac{\\partial \\ell}{\\partial W} = \\sum_t \\delta_t h_t^\\top, \\qquad
    \\frac{\\partial \\ell}{\\partial c} = \\sum_t \\delta_t ,

so its squared norm, plain or in a diagonal preconditioner's geometry
(``A = D^2`` of the weight's shape, ``A_c = D_c^2`` of the bias's shape), follows from
the captured ``h`` and ``delta`` alone:

.. math::

    \\Big\\| \\sum_t \\delta_t h_t^\\top \\Big\\|_F^2
        = \\sum_{t,s} (\\delta_t \\cdot \\delta_s)(h_t \\cdot h_s), \\qquad
    \\Big\\| D \\odot \\sum_t \\delta_t h_t^\\top \\Big\\|_F^2
        = \\sum_{o,i} A_{oi} \\Big(\\sum_t \\delta_{to} h_{ti}\\Big)^2
        \\overset{T=1}{=} (\\delta^2)^\\top A \\, (h^2).

Everything here is a pure function on tensors; the hooks that capture ``h`` and
``delta`` live in :mod:`isample.recorder`.

Cost per example and layer (``in``, ``out`` the layer's sizes, ``T`` positions):

=================  =============================  ==========================
method             multiply-adds                  extra memory
=================  =============================  ==========================
``"outer"`` T = 1  ``in + out`` (``in * out``      none (``b * in`` with a
                   with a preconditioner)         preconditioner)
``"gram"``         ``T^2 (in + out)``             ``2 T^2`` per example
``"materialise"``  ``T in out``                   ``chunk * in * out`` floats
=================  =============================  ==========================

The plain norm uses ``"gram"`` when ``T (in + out) <= in * out`` and ``"materialise"``
otherwise; the preconditioned norm with ``T > 1`` always materialises the per-example
gradient, in chunks of at most ``max_elements`` floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "as_sequence",
    "concat_calls",
    "weight_norm_method",
    "linear_weight_sq_norms",
    "linear_bias_sq_norms",
    "linear_sq_grad_norms",
    "stacked_flat_sq_grad_norms",
    "compiled_flat_grad_norms",
]

#: Largest number of floats a chunk of materialised per-example gradients may hold (64 MiB in float32).
DEFAULT_MAX_ELEMENTS = 1 << 24

_METHODS = ("outer", "gram", "materialise")


_WIDE = (torch.float32, torch.float64)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    first = tensors[0].dtype
    if first in _WIDE and all(t.dtype == first for t in tensors):  # the common case: no promotion
        return first
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """View a linear layer's input or output of shape (b, ..., f) as (b, T, f).

    ``T`` is the product of the middle dimensions (1 for a tensor of shape (b, f)).

    Raises:
        ValueError: ``x`` has fewer than two dimensions (no batch dimension).
    """
    if x.dim() < 2:
        raise ValueError(
            f"A linear layer's input must have a batch dimension, shape (b, ..., features); got shape "
            f"{tuple(x.shape)}."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


def concat_calls(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Join the ``(h, delta)`` pairs of several calls of one layer along the position axis.

    A layer called ``K`` times in one forward pass gets the gradient
    ``sum_k sum_t delta_kt h_kt^T``: exactly the gradient of one call on the
    concatenated positions. Returns ``(h, delta)`` of shapes (b, T_total, in) and
    (b, T_total, out); a single call of shape (b, in) is returned unchanged.
    """
    if len(pairs) == 1 and pairs[0][0].dim() == 2:
        return pairs[0]
    hs = [as_sequence(h) for h, _ in pairs]
    ds = [as_sequence(d) for _, d in pairs]
    return torch.cat(hs, dim=1), torch.cat(ds, dim=1)


def weight_norm_method(positions: int, in_features: int, out_features: int, preconditioned: bool) -> str:
    """Pick the cheapest exact method for the weight term: ``"outer"``, ``"gram"`` or ``"materialise"``.

    ``"outer"`` for one position; otherwise ``"gram"`` (cost ``T^2 (in + out)`` per example)
    when it is no more expensive than materialising the gradient (cost ``T in out``), that is
    when ``T (in + out) <= in * out``, and never for a preconditioned norm (the Gram identity
    needs the identity geometry).
    """
    if positions == 1:
        return "outer"
    if preconditioned:
        return "materialise"
    return "gram" if positions * (in_features + out_features) <= in_features * out_features else "materialise"


def linear_weight_sq_norms(
    h: torch.Tensor,
    delta: torch.Tensor,
    weight_scale: torch.Tensor | None = None,
    *,
    method: str | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Per-example squared norm of the weight gradient of a linear layer.

    .. math::

        s_b = \\sum_{o,i} A_{oi} \\Big(\\sum_t \\delta_{bto} h_{bti}\\Big)^2 ,

    with ``A`` all ones when ``weight_scale`` is None.

    Args:
        h: the layer's inputs, Tensor of shape (b, in) or (b, ..., in).
        delta: the gradient of the per-example losses' sum w.r.t. the layer's outputs,
            Tensor of shape (b, out) or (b, ..., out), same middle dimensions as ``h``.
        weight_scale: ``A = D^2``, Tensor of shape (out, in), or None for the plain norm.
        method: ``"outer"`` (one position only), ``"gram"`` (plain norm only),
            ``"materialise"``, or None to choose by cost (:func:`weight_norm_method`).
        max_elements: largest chunk of materialised per-example gradients, in floats.

    Returns:
        Tensor of shape (b,), float32 or wider, in squared gradient units.
    """
    h3, d3 = as_sequence(h), as_sequence(delta)
    if h3.shape[:2] != d3.shape[:2]:
        raise ValueError(
            f"h of shape {tuple(h.shape)} and delta of shape {tuple(delta.shape)} do not share their leading "
            "(batch and position) dimensions."
        )
    b, positions, n_in = h3.shape
    n_out = d3.shape[2]
    if weight_scale is not None and tuple(weight_scale.shape) != (n_out, n_in):
        raise ValueError(f"weight_scale must have shape {(n_out, n_in)}; got {tuple(weight_scale.shape)}.")
    if method is None:
        method = weight_norm_method(positions, n_in, n_out, weight_scale is not None)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS} or None; got {method!r}.")
    if method == "outer" and positions != 1:
        raise ValueError(f"method 'outer' needs one position per example; got {positions}.")
    if method == "gram" and weight_scale is not None:
        raise ValueError("method 'gram' computes the plain norm only; use 'materialise' with a weight_scale.")
    dtype = _compute_dtype(h3, d3)
    h3, d3 = h3.to(dtype), d3.to(dtype)
    scale = None if weight_scale is None else weight_scale.to(dtype)
    if method == "outer":
        h2, d2 = h3[:, 0].square(), d3[:, 0].square()
        if scale is None:
            return h2.sum(1) * d2.sum(1)
        return (d2 * (h2 @ scale.T)).sum(1)
    if method == "gram":
        gram_h = torch.bmm(h3, h3.transpose(1, 2))
        gram_d = torch.bmm(d3, d3.transpose(1, 2))
        return (gram_h * gram_d).sum((1, 2))
    chunk = max(1, int(max_elements) // max(1, n_in * n_out))
    out = []
    for start in range(0, b, chunk):
        grads = torch.bmm(d3[start : start + chunk].transpose(1, 2), h3[start : start + chunk])
        grads = grads.square()
        if scale is not None:
            grads = grads * scale
        out.append(grads.sum((1, 2)))
    if not out:
        return h3.new_zeros(0)
    return torch.cat(out)


def linear_bias_sq_norms(delta: torch.Tensor, bias_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example squared norm of the bias gradient ``sum_t delta_t``.

    .. math::

        s_b = \\sum_o A^c_o \\Big(\\sum_t \\delta_{bto}\\Big)^2

    Args:
        delta: Tensor of shape (b, out) or (b, ..., out).
        bias_scale: ``A_c = D_c^2``, Tensor of shape (out,), or None for the plain norm.

    Returns:
        Tensor of shape (b,), float32 or wider.
    """
    d3 = as_sequence(delta)
    summed = d3.to(_compute_dtype(d3)).sum(1).square()
    if bias_scale is not None:
        summed = summed * bias_scale.to(summed.dtype)
    return summed.sum(1)


def linear_sq_grad_norms(
    h: torch.Tensor,
    delta: torch.Tensor,
    *,
    weight: bool = True,
    bias: bool = True,
    weight_scale: torch.Tensor | None = None,
    bias_scale: torch.Tensor | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Per-example squared gradient norm of a linear layer over its weight and/or bias.

    .. math::

        s_b = \\Big\\| A^{1/2} \\odot \\sum_t \\delta_{bt} h_{bt}^\\top \\Big\\|_F^2
              + \\Big\\| A_c^{1/2} \\odot \\sum_t \\delta_{bt} \\Big\\|_2^2

    Args:
        h: inputs, Tensor of shape (b, in) or (b, ..., in).
        delta: output gradients, Tensor of shape (b, out) or (b, ..., out).
        weight: include the weight term (False for a frozen weight).
        bias: include the bias term (False for no bias or a frozen bias).
        weight_scale: ``D^2`` of the weight, shape (out, in), or None (identity).
        bias_scale: ``D^2`` of the bias, shape (out,), or None (identity).
        max_elements: chunk bound for materialised per-example gradients, in floats.

    Returns:
        Tensor of shape (b,), float32 or wider.
    """
    if h.dim() == 2 and delta.dim() == 2 and h.shape[0] == delta.shape[0]:
        return _flat_sq_grad_norms(h, delta, weight, bias, weight_scale, bias_scale)
    total = None
    if weight:
        total = linear_weight_sq_norms(h, delta, weight_scale, max_elements=max_elements)
    if bias:
        term = linear_bias_sq_norms(delta, bias_scale)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(delta.shape[0], dtype=_compute_dtype(delta), device=delta.device)
    return total


def _flat_sq_grad_norms(
    h: torch.Tensor,
    delta: torch.Tensor,
    weight: bool,
    bias: bool,
    weight_scale: torch.Tensor | None,
    bias_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Fast path of :func:`linear_sq_grad_norms` for one position (h: (b, in), delta: (b, out)).

    Shares ``delta^2`` between the weight and bias terms and skips the general validation;
    the result equals the general path (same formulas, ``T = 1``).
    """
    dtype = _compute_dtype(h, delta)
    if h.dtype != dtype:
        h = h.to(dtype)
    if delta.dtype != dtype:
        delta = delta.to(dtype)
    if weight_scale is None and bias_scale is None:
        d2_sum = torch.linalg.vecdot(delta, delta)
        if not weight:
            return d2_sum if bias else torch.zeros_like(d2_sum)
        h2_sum = torch.linalg.vecdot(h, h)
        return (h2_sum + 1.0) * d2_sum if bias else h2_sum * d2_sum
    d2 = delta.square()
    total = None
    if weight:
        if weight_scale is None:
            total = torch.linalg.vecdot(h, h) * d2.sum(1)
        else:
            total = torch.linalg.vecdot(d2, h.square() @ weight_scale.to(dtype).T)
    if bias:
        term = d2.sum(1) if bias_scale is None else d2 @ bias_scale.to(dtype)
        total = term if total is None else total + term
    if total is None:
        return d2.new_zeros(d2.shape[0])
    return total


def stacked_flat_sq_grad_norms(
    hs: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], bias: Sequence[bool]
) -> torch.Tensor:
    """Sum over layers of the plain per-example squared norms, one position per example.

    For layers ``l`` with a trainable weight (and a trainable bias where ``bias[l]``):

    .. math::

        s_b = \\sum_l \\big(\\|h_{lb}\\|^2 + [\\text{bias}_l]\\big) \\, \\|\\delta_{lb}\\|^2 ,

    computed with one ``vecdot`` per tensor, two ``stack`` and one final ``vecdot`` (instead of
    four small ops per layer: the per-op dispatch dominates at these sizes).

    Args:
        hs: the layers' inputs, Tensors of shape (b, in_l), one dtype (float32 or float64).
        deltas: their output gradients, Tensors of shape (b, out_l), same dtype.
        bias: per layer, whether its bias term is included.

    Returns:
        Tensor of shape (b,), in the inputs' dtype.
    """
    h2 = torch.stack([torch.linalg.vecdot(h, h) for h in hs], dim=1)
    d2 = torch.stack([torch.linalg.vecdot(d, d) for d in deltas], dim=1)
    if all(bias):
        h2.add_(1.0)
    elif any(bias):
        h2.add_(torch.tensor([float(x) for x in bias], dtype=h2.dtype, device=h2.device))
    return torch.linalg.vecdot(h2, d2)


def _flat_norms_loop(
    hs: tuple, deltas: tuple, bias: np.ndarray, weights: np.ndarray, scale: float, out: np.ndarray
) -> None:
    """Loop body of :func:`compiled_flat_grad_norms` (compiled by numba; plain Python otherwise).

    ``out[i] = sqrt(sum_l (||h_li||^2 + bias_l) ||delta_li||^2) / |w_i| * scale`` with float64
    sums, NaN where ``w_i == 0``; ``weights`` of length 0 means all 1.
    """
    b = out.shape[0]
    acc = np.zeros(b)
    for k in range(len(hs)):
        h = hs[k]
        d = deltas[k]
        c = bias[k]
        for i in range(b):
            sh = 0.0
            for j in range(h.shape[1]):
                sh += h[i, j] * h[i, j]
            sd = 0.0
            for j in range(d.shape[1]):
                sd += d[i, j] * d[i, j]
            acc[i] += (sh + c) * sd
    weighted = weights.shape[0] > 0
    for i in range(b):
        v = math.sqrt(acc[i])
        if weighted:
            f = abs(weights[i])
            v = v / f if f != 0 else math.nan  # f NaN: v / f is NaN
        out[i] = v * scale


@functools.lru_cache(maxsize=1)
def _flat_norms_kernel() -> Any:
    """:func:`_flat_norms_loop` compiled with numba (None where numba does not import).

    ``reassoc`` lets the compiler vectorise the sums of squares; the NaN and infinity
    semantics stay IEEE (no ``nnan`` / ``ninf``). Compiled once per number of layers and
    dtype, on first use (``cache=True``: later processes load the machine code).
    """
    try:
        import numba
    except ImportError:
        return None
    flags = {"reassoc", "contract"}
    try:
        return numba.njit(cache=True, nogil=True, fastmath=flags)(_flat_norms_loop)
    except RuntimeError:  # no writable cache location
        return numba.njit(cache=False, nogil=True, fastmath=flags)(_flat_norms_loop)


def compiled_flat_grad_norms(
    hs: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    bias: np.ndarray,
    weights: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """Unweighted per-example gradient norms over layers with one position per example, in one call.

    .. math::

        n_i = \\frac{\\text{scale}}{|w_i|} \\sqrt{\\sum_l \\big(\\|h_{li}\\|^2 + c_l\\big)
              \\|\\delta_{li}\\|^2}

    (NaN where ``w_i == 0``): the sum of :func:`stacked_flat_sq_grad_norms` and the division
    by the loss weights, in one compiled loop instead of a dozen small torch ops (whose
    dispatch dominates at training-batch sizes on the CPU).

    Args:
        hs: the layers' inputs, C-contiguous CPU Tensors of shape (b, in_l), one dtype.
        deltas: their output gradients, C-contiguous CPU Tensors of shape (b, out_l), same dtype.
        bias: float64 array (L,): 1.0 where the layer's bias term is included, else 0.0.
        weights: CPU Tensor of shape (b,), or None for all 1.
        scale: the factor ``b`` of a mean-reduced loss (1 for a sum).

    Returns:
        float32 Tensor of shape (b,), or None where numba is not installed (use the torch path).
    """
    kernel = _flat_norms_kernel()
    if kernel is None:
        return None
    out = np.empty(hs[0].shape[0], dtype=np.float32)
    w = _EMPTY if weights is None else weights.numpy()
    kernel(tuple(h.numpy() for h in hs), tuple(d.numpy() for d in deltas), bias, w, float(scale), out)
    return torch.from_numpy(out)


_EMPTY = np.zeros(0)
