"""Per-example importance scores from batched forward passes.

Every scorer is a callable ``scorer(model, inputs, targets) -> Tensor`` of shape (b,),
float32, >= 0, on the model's device, with no autograd graph attached. Scoring runs the
model in eval mode (BatchNorm running statistics and Dropout would corrupt the scores)
and restores the previous mode afterwards; inputs are moved to the model's device.

``loss_fn(outputs, targets)`` must return per-example losses (``reduction="none"``):
a tensor of shape (b,), or of shape (b, ...) which is averaged over the trailing
dimensions (so ``nn.MSELoss(reduction="none")`` gives the per-example mean squared error).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ._validation import check_int, param_error
from .batch import move_to, split_batch

__all__ = [
    "Scorer",
    "LossScorer",
    "UpperBoundScorer",
    "GradNormScorer",
    "score_dataset",
    "per_example_losses",
    "model_device",
    "scoring_mode",
    "upper_bound_closed_form",
]

LossFn = Callable[[Any, Any], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore every submodule's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def per_example_losses(loss_fn: LossFn, outputs: Any, targets: Any, owner: str = "the scorer") -> torch.Tensor:
    """Call ``loss_fn`` and return per-example losses of shape (b,).

    Raises:
        ValueError: the loss is a scalar (a reduced loss) or its first dimension is not b.
    """
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn of {owner} must return a tensor of per-example losses; got {type(losses).__name__}.")
    b = _rows(outputs)
    if losses.dim() == 0:
        raise ValueError(
            f"loss_fn of {owner} returned a scalar; it must return per-example losses of shape ({b},). "
            "Use reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))."
        )
    if losses.shape[0] != b:
        raise ValueError(
            f"loss_fn of {owner} returned losses of shape {tuple(losses.shape)} for a batch of {b} outputs; "
            f"expected per-example losses of shape ({b},)."
        )
    if losses.dim() > 1:
        losses = losses.flatten(1).mean(1)
    return losses


def _rows(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    from .batch import batch_size_of

    return batch_size_of(data)


def _check_reduction(loss_fn: LossFn, owner: str) -> None:
    reduction = getattr(loss_fn, "reduction", "none")
    if isinstance(loss_fn, nn.modules.loss._Loss) and reduction != "none":
        raise ValueError(
            f"The 'loss_fn' parameter of {owner} must return per-example losses. Got "
            f"{type(loss_fn).__name__}(reduction={reduction!r}); use reduction='none'."
        )


class Scorer:
    """Base class: holds ``loss_fn`` and runs the model in scoring mode on its device.

    Subclasses implement :meth:`score`, which receives inputs and targets already on the
    model's device with the model in eval mode.

    Attributes:
        name: short name used in reports.
        extra_backward: whether scoring needs a backward pass through the model (cost).
    """

    name = "scorer"
    extra_backward = False

    def __init__(self, loss_fn: LossFn) -> None:
        if not callable(loss_fn):
            raise param_error("loss_fn", type(self).__name__, "a callable (outputs, targets) -> losses", loss_fn, TypeError)
        _check_reduction(loss_fn, type(self).__name__)
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Return the scores of the batch: float32 Tensor of shape (b,), >= 0, no grad."""
        if not isinstance(model, nn.Module):
            raise param_error("model", type(self).__name__, "a torch.nn.Module", model, TypeError)
        device = model_device(model)
        inputs = move_to(inputs, device, non_blocking=True)
        targets = move_to(targets, device, non_blocking=True)
        with scoring_mode(model):
            scores = self.score(model, inputs, targets)
        scores = scores.detach().to(torch.float32)
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            warnings.warn(
                f"{type(self).__name__} produced {int(bad.sum())} non-finite score(s); they are passed on as NaN "
                "and samplers skip them.",
                RuntimeWarning,
                stacklevel=2,
            )
        return scores

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.loss_fn!r})"


class LossScorer(Scorer):
    """Score = the per-example loss, from one no-grad forward pass.

    Args:
        loss_fn: ``(outputs, targets) -> losses`` of shape (b,) (``reduction="none"``).

    Raises ``ValueError`` when a loss is negative (scores must be >= 0).

    Example:
        >>> scorer = LossScorer(nn.CrossEntropyLoss(reduction="none"))
        >>> scores = scorer(model, x, y)  # Tensor of shape (b,)
    """

    name = "loss"

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        with torch.inference_mode():
            losses = per_example_losses(self.loss_fn, model(inputs), targets, type(self).__name__)
        if bool((losses < 0).any()):
            raise ValueError(
                "LossScorer got negative per-example losses; importance scores must be >= 0. "
                "Shift the loss or use UpperBoundScorer."
            )
        return losses


def upper_bound_closed_form(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """The Katharopoulos-Fleuret bound ``||d l_i / d z_i||_2`` in closed form, or ``None``.

    Known forms (z = outputs, float32 result of shape (b,)):

    * ``nn.CrossEntropyLoss`` (no class weights), class-index targets, label smoothing e:
      ``|| softmax(z) - q ||`` with ``q = (1 - e) onehot(y) + e / C``; rows equal to
      ``ignore_index`` score 0.
    * ``nn.CrossEntropyLoss`` with probability targets t:
      ``|| softmax(z) * sum(t') - t' ||``, ``t' = (1 - e) t + e / C``.
    * ``nn.MSELoss``: per-example mean over D output values, ``2 || z - y || / D``.

    Returns ``None`` for any other loss (the caller falls back to autograd).
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and outputs.dim() == 2:
        eps = float(loss_fn.label_smoothing)
        num_classes = outputs.shape[1]
        probs = torch.softmax(outputs.float(), dim=1)
        if targets.dim() == 1 and not targets.is_floating_point():
            valid = targets != loss_fn.ignore_index
            safe = torch.where(valid, targets, torch.zeros_like(targets))
            if bool(((safe < 0) | (safe >= num_classes)).any()):
                raise ValueError(
                    f"Class-index targets must lie in [0, {num_classes}); got min {int(safe.min())}, max {int(safe.max())}."
                )
            q = torch.full_like(probs, eps / num_classes)
            q.scatter_add_(1, safe.unsqueeze(1), torch.full_like(probs[:, :1], 1.0 - eps))
            return (probs - q).norm(dim=1) * valid.to(probs.dtype)
        if targets.shape == outputs.shape and targets.is_floating_point():
            t = (1.0 - eps) * targets.float() + eps / num_classes
            return (probs * t.sum(1, keepdim=True) - t).norm(dim=1)
        raise ValueError(
            f"CrossEntropyLoss targets of shape {tuple(targets.shape)} do not match outputs of shape "
            f"{tuple(outputs.shape)}: expected class indices of shape ({outputs.shape[0]},) or probabilities "
            f"of shape {tuple(outputs.shape)}."
        )
    if isinstance(loss_fn, nn.MSELoss):
        if targets.shape != outputs.shape:
            raise ValueError(
                f"MSELoss targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)}."
            )
        diff = (outputs.float() - targets.float()).flatten(1)
        return 2.0 * diff.norm(dim=1) / diff.shape[1]
    return None


class UpperBoundScorer(Scorer):
    """Score = ``|| d l_i / d z_i ||_2``, the Katharopoulos-Fleuret gradient-norm upper bound.

    ``z`` is the model output (last-layer pre-activation). For a network whose last
    layer is ``z = W h + c`` the per-example gradient norm over all parameters is at most
    a constant (the same for every example) times this score, so after normalisation it
    is a tight, cheap proxy for the optimal sampler ``p_i ∝ ||g_i||``.

    .. math::

        s_i = \\Big\\| \\frac{\\partial \\ell(z_i, y_i)}{\\partial z_i} \\Big\\|_2,
        \\qquad \\text{softmax CE: } s_i = \\| \\mathrm{softmax}(z_i) - e_{y_i} \\|_2 .

    Closed forms exist for cross-entropy and MSE (see :func:`upper_bound_closed_form`);
    any other per-example loss uses one batched backward pass that stops at the outputs
    (the model's forward runs without a graph).

    Args:
        loss_fn: ``(outputs, targets) -> losses`` of shape (b,) (``reduction="none"``).
        closed_form: use the closed form when one is known (default True).

    References:
        Katharopoulos and Fleuret, "Not All Samples Are Created Equal: Deep Learning with
        Importance Sampling", ICML 2018 (arXiv:1803.00942).

    Example:
        >>> scorer = UpperBoundScorer(nn.CrossEntropyLoss(reduction="none"))
        >>> scores = scorer(model, x, y)  # Tensor of shape (b,), in [0, sqrt(2)]
    """

    name = "upper_bound"

    def __init__(self, loss_fn: LossFn, closed_form: bool = True) -> None:
        super().__init__(loss_fn)
        self.closed_form = bool(closed_form)
        self._warned_activation = False

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        self._warn_fused_activation(model)
        with torch.no_grad():
            outputs = model(inputs)
        if self.closed_form and isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            scores = upper_bound_closed_form(self.loss_fn, outputs, targets)
            if scores is not None:
                return scores
        return output_gradient_norms(self.loss_fn, outputs, targets, type(self).__name__)

    def _warn_fused_activation(self, model: nn.Module) -> None:
        if self._warned_activation:
            return
        last = None
        for module in model.modules():
            if not list(module.children()):
                last = module
        if isinstance(last, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)):
            self._warned_activation = True
            warnings.warn(
                f"The model ends with {type(last).__name__}: UpperBoundScorer differentiates the loss with respect "
                "to the model output, which should be the last layer's pre-activation (logits).",
                UserWarning,
                stacklevel=3,
            )


def output_gradient_norms(loss_fn: LossFn, outputs: torch.Tensor, targets: Any, owner: str) -> torch.Tensor:
    """``|| d l_i / d outputs_i ||`` for every row, by one backward pass of the loss alone."""
    with torch.enable_grad():
        z = outputs.detach().clone().requires_grad_(True)
        losses = per_example_losses(loss_fn, z, targets, owner)
        (grad,) = torch.autograd.grad(losses.sum(), z)
    return grad.flatten(1).norm(dim=1)


class GradNormScorer(Scorer):
    """Score = the exact per-example gradient norm over all trainable parameters.

    .. math::

        s_i = \\| \\nabla_\\theta \\ell(f_\\theta(x_i), y_i) \\|_2

    Computed with ``torch.func`` (``vmap`` of ``grad``) in chunks of ``chunk_size``
    examples, so peak memory is about ``chunk_size x (number of parameters)`` floats.
    This is the reference the metrics compare cheaper scores against; it costs roughly
    one backward pass per example.

    Args:
        loss_fn: ``(outputs, targets) -> losses`` of shape (b,) (``reduction="none"``).
        chunk_size: examples per vectorised chunk (default 32).
    """

    name = "grad_norm"
    extra_backward = True

    def __init__(self, loss_fn: LossFn, chunk_size: int = 32) -> None:
        super().__init__(loss_fn)
        self.chunk_size = check_int(chunk_size, "chunk_size", "GradNormScorer", minimum=1)

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        if not params:
            raise ValueError("GradNormScorer needs a model with at least one trainable parameter.")
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        loss_fn = self.loss_fn

        def one_loss(p: dict, x: Any, y: Any) -> torch.Tensor:
            x1 = _unsqueeze(x)
            y1 = _unsqueeze(y)
            out = functional_call(model, (p, buffers), (x1,))
            return per_example_losses(loss_fn, out, y1, "GradNormScorer").sum()

        per_example = vmap(grad(one_loss), in_dims=(None, 0, 0 if targets is not None else None))
        b = _rows(inputs)
        norms = []
        for start in range(0, b, self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, b), device=model_device(model))
            from .batch import index_rows

            x = index_rows(inputs, rows)
            y = index_rows(targets, rows) if targets is not None else None
            with torch.enable_grad():
                grads = per_example(params, x, y)
            sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
            norms.append(sq.sqrt())
        return torch.cat(norms)


def _unsqueeze(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return data.unsqueeze(0)
    if isinstance(data, dict):
        return {k: _unsqueeze(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_unsqueeze(v) for v in data)
    return data


def score_dataset(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    scorer: Callable[[nn.Module, Any, Any], torch.Tensor],
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool = False,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> torch.Tensor:
    """Score every example of ``dataset`` in large batches.

    Args:
        model: the model to score with (moved to ``device`` when one is given).
        dataset: a map-style dataset yielding ``(input, target)`` pairs or dicts.
        scorer: a scorer, ``scorer(model, inputs, targets) -> Tensor[b]``.
        batch_size: scoring batch size (independent of the training batch size).
        device: where to run the model; default: where it already is.
        progress: show a tqdm progress bar.
        num_workers: DataLoader workers for reading the dataset.
        collate_fn: optional collate function for the DataLoader.

    Returns:
        float32 CPU Tensor of shape (N,), the score of example i at position i.
    """
    batch_size = check_int(batch_size, "batch_size", "score_dataset", minimum=1)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("score_dataset got an empty dataset (len 0); there is nothing to score.")
    if device is not None:
        model = model.to(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=model_device(model).type == "cuda",
    )
    from tqdm.auto import tqdm

    out = []
    for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        inputs, targets = split_batch(batch)
        out.append(scorer(model, inputs, targets).to("cpu", torch.float32))
    return torch.cat(out)
