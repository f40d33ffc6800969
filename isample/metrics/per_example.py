"""Exact per-example gradients with ``torch.func`` (``vmap`` of ``grad``), chunked."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._model_io import CalledModel, ForwardHook, LogitsHook, ModelCall, per_example_error
from .._validation import check_int, param_error
from ..batch import batch_size_of, slice_rows
from ..scorers import model_device, per_example_losses, scoring_mode

__all__ = ["per_example_gradients", "select_parameters"]


def select_parameters(
    model: nn.Module, params: Iterable[nn.Parameter | str] | None = None, owner: str = "per_example_gradients"
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs differentiated, in ``model.named_parameters()`` order.

    Args:
        model: the model.
        params: ``None`` (every parameter with ``requires_grad``), or parameters of
            ``model`` given as tensors or as names.

    Returns:
        list of ``(name, parameter)``; this order is the column order of
        :func:`per_example_gradients` and of :func:`isample.metrics.flat_preconditioner`.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(k, v) for k, v in named if v.requires_grad]
    else:
        wanted = list(params)
        ids = {id(v) for v in wanted if isinstance(v, torch.Tensor)}
        names = {v for v in wanted if isinstance(v, str)}
        for v in wanted:
            if not isinstance(v, (torch.Tensor, str)):
                raise param_error(
                    "params", owner, "an iterable of parameters or parameter names", v, TypeError
                )
        known_ids = {id(v) for _, v in named}
        known_names = {k for k, _ in named}
        missing = [n for n in names if n not in known_names]
        if missing or any(i not in known_ids for i in ids):
            raise ValueError(
                f"The 'params' parameter of {owner} must name parameters of the model. Unknown: "
                f"{missing if missing else 'a tensor that is not a parameter of the model'}."
            )
        chosen = [(k, v) for k, v in named if k in names or id(v) in ids]
    if not chosen:
        raise ValueError(f"{owner} needs at least one parameter to differentiate; the selection is empty.")
    return chosen


def _unsqueeze(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.unsqueeze(0)
    if isinstance(data, dict):
        return {k: _unsqueeze(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_unsqueeze(v) for v in data)
    return data


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    chunk_size: int = 32,
    params: Iterable[nn.Parameter | str] | None = None,
    *,
    forward: ForwardHook | None = None,
    logits: LogitsHook | None = None,
) -> torch.Tensor:
    """Flattened per-example gradients ``g_i = d l_i / d theta``, a Tensor of shape (b, P).

    Computed with ``torch.func.functional_call`` + ``vmap(grad(...))`` over chunks of
    ``chunk_size`` examples, so the working memory beyond the (b, P) result is about
    ``chunk_size x P`` values. The model runs in eval mode (BatchNorm uses its running
    statistics, Dropout is off; see :func:`isample.scorers.scoring_mode`) and its previous
    mode is restored afterwards; nothing is written to ``.grad``.

    Args:
        model: the model (its parameters' device is used for inputs and targets).
        loss_fn: ``(outputs, targets) -> per-example losses`` (``reduction="none"``).
        inputs: a tensor (or nested tuple/list/dict of tensors) with b rows.
        targets: the targets with b rows (or ``None``).
        chunk_size: examples per vectorised chunk (>= 1).
        params: restrict to these parameters (tensors or names; default: every trainable
            parameter). The columns follow :func:`select_parameters` order. A subset (e.g.
            the last layer) is cheaper but its norms understate the full norms, and the
            sampler that is optimal for the subset is only optimal for that subset.
        forward, logits: how the model is called and its logits read, as for the scorers
            (:class:`isample.Scorer`): dict inputs as ``model(**inputs)``; the loss receives
            the ``.logits`` / ``"logits"`` / element-0 part of the output by default.

    Raises:
        RuntimeError: ``vmap`` cannot batch an operation of the model; for the nested tensors
            of ``nn.TransformerEncoder`` the message says to pass ``enable_nested_tensor=False``.

    Returns:
        Tensor of shape (b, P) in the parameters' dtype (float32 for a float32 model;
        the metric functions convert to float64), on the model's device; P is the total
        number of elements of the selected parameters.
    """
    owner = "per_example_gradients"
    if not isinstance(model, nn.Module):
        raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
    if not callable(loss_fn):
        raise param_error(
            "loss_fn", owner, "a callable (outputs, targets) -> per-example losses", loss_fn, TypeError
        )
    chunk = check_int(chunk_size, "chunk_size", owner, minimum=1)
    call = ModelCall(forward, logits, owner)
    chosen = select_parameters(model, params, owner)
    from torch.func import functional_call, grad, vmap

    device = model_device(model)
    from ..batch import move_to

    inputs = move_to(inputs, device)
    targets = move_to(targets, device)
    b = batch_size_of(inputs)
    if targets is not None and batch_size_of(targets) != b:
        raise ValueError(
            f"The 'targets' parameter of {owner} must have as many rows as inputs ({b}). "
            f"Got {batch_size_of(targets)}."
        )
    chosen_names = {k for k, _ in chosen}
    called = CalledModel(model, call)  # parameters named "model." + name
    diff = {"model." + k: v.detach() for k, v in chosen}
    rest = {"model." + k: v.detach() for k, v in model.named_parameters() if k not in chosen_names}
    buffers = {"model." + k: v.detach() for k, v in model.named_buffers()}

    def one_loss(p: dict, x: Any, y: Any) -> torch.Tensor:
        out = functional_call(called, (p, rest, buffers), (_unsqueeze(x),))
        return per_example_losses(loss_fn, out, _unsqueeze(y) if y is not None else None, owner).sum()

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0 if targets is not None else None))
    width = sum(v.numel() for _, v in chosen)
    dtype = chosen[0][1].dtype if chosen else torch.float32
    out = torch.empty(b, width, dtype=dtype, device=device)  # preallocated: peak = result + one chunk
    with scoring_mode(model), torch.enable_grad():
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            x = slice_rows(inputs, start, stop)
            y = slice_rows(targets, start, stop) if targets is not None else None
            try:
                grads = per_example(diff, x, y)
            except RuntimeError as exc:
                clearer = per_example_error(exc, owner)
                if clearer is None:
                    raise
                raise clearer from exc
            col = 0
            for k, _ in chosen:
                flat = grads["model." + k].flatten(1)
                out[start:stop, col : col + flat.shape[1]] = flat
                col += flat.shape[1]
            del grads
    return out
