"""Per-example importance scores from batched forward passes.

Every scorer is a callable ``scorer(model, inputs, targets) -> Tensor`` of shape (b,),
float32, >= 0, on the model's device, with no autograd graph attached. Scoring runs the
model in eval mode (BatchNorm running statistics and Dropout would corrupt the scores)
and restores the previous mode afterwards; inputs are moved to the model's device.

The model is called by one convention shared with the metrics and the loaders
(:class:`ModelCall`): dict inputs as ``model(**inputs)``; ``loss_fn`` receives the logits
(a tensor output, else its ``.logits``, its ``"logits"`` entry or its element 0), and
``forward=`` / ``logits=`` hooks on every scorer cover other models.

``loss_fn(outputs, targets)`` must return per-example losses (``reduction="none"``):
a tensor of shape (b,), or of shape (b, ...) which is averaged over the trailing
dimensions (so ``nn.MSELoss(reduction="none")`` gives the per-example mean squared error).

Throughput: forward passes that need no gradient run in ``torch.inference_mode``; with
``autocast`` (default: on for a CUDA model, bf16) the forward runs in reduced precision
while the loss and the scores are computed in float32; inputs are copied with
``non_blocking=True`` (overlapping with compute when they come from pinned memory); the
per-call bookkeeping (eval-mode switch, non-finite check, the check for a model ending in
a softmax, done once per model) costs a few small operations. The scoring batch size is
the caller's: :func:`score_dataset` and ``PoolLoader(scoring_batch_size=...)`` choose it
independently of the training batch size.

Non-finite scores are passed on as NaN/inf with a ``RuntimeWarning``; samplers skip them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._model_io import CalledModel, ForwardHook, LogitsHook, ModelCall, model_call_of, per_example_error
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
    "ModelCall",
    "model_call_of",
]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Reduced-precision dtypes accepted for ``autocast_dtype``.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _walk_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model.modules()`` (depth-first, each module once), without building the names."""
    seen = {id(model)}
    stack = [model]
    while stack:
        module = stack.pop()
        yield module
        children = module._modules
        if children:
            for child in reversed(children.values()):
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)


def _iter_modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` without building the names (it runs on every scorer call)."""
    return list(_walk_modules(model))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model.

    Walks the modules in ``model.modules()`` order and stops at the first parameter (it runs
    on every batch a scheme yields), without listing the whole model first.
    """
    for module in _walk_modules(model):
        for tensor in module._parameters.values():
            if tensor is not None:
                return tensor.device
    return _first_device(_iter_modules(model))  # no parameter: the first buffer, else CPU


def _first_device(modules: Iterable[nn.Module]) -> torch.device:
    modules = modules if isinstance(modules, list) else list(modules)
    for module in modules:
        for tensor in module._parameters.values():
            if tensor is not None:
                return tensor.device
    for module in modules:
        for tensor in module._buffers.values():
            if tensor is not None:
                return tensor.device
    return torch.device("cpu")


def scoring_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """Put ``model`` in eval mode for the block and restore every submodule's mode after.

    Cheap when it can be: a model already in eval mode is left alone, and modules whose
    class does not override ``nn.Module.train`` are switched by setting the flag directly
    (what ``model.eval()`` would do, without its recursive call overhead). A module that
    overrides ``train`` makes it fall back to ``model.eval()``.
    """
    return _ScoringMode(model, _iter_modules(model))


class _ScoringMode:
    """``scoring_mode`` over an already collected module list (a class: cheaper than a generator)."""

    __slots__ = ("model", "modes")

    def __init__(self, model: nn.Module, modules: list[nn.Module]) -> None:
        self.model = model
        self.modes = [(module, module.training) for module in modules]

    def __enter__(self) -> None:
        modes = self.modes
        if not any(mode for _, mode in modes):
            self.modes = []  # nothing to switch, nothing to restore
            return
        if all(type(module).train is _MODULE_TRAIN for module, _ in modes):
            for module, mode in modes:
                if mode:
                    _set_training(module, False)
        else:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            if module.training != mode:
                _set_training(module, mode)


_MODULE_TRAIN = nn.Module.train
_MODULE_SETATTR = nn.Module.__setattr__


def _set_training(module: nn.Module, mode: bool) -> None:
    # nn.Module.__setattr__ stores a plain bool exactly like object.__setattr__, only slower.
    if type(module).__setattr__ is _MODULE_SETATTR:
        object.__setattr__(module, "training", mode)
    else:
        module.training = mode


def per_example_losses(
    loss_fn: LossFn, outputs: Any, targets: Any, owner: str = "the scorer"
) -> torch.Tensor:
    """Call ``loss_fn`` and return per-example losses of shape (b,).

    Raises:
        ValueError: the loss is a scalar (a reduced loss) or its first dimension is not b.
    """
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"loss_fn of {owner} must return a tensor of per-example losses; got {type(losses).__name__}."
        )
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


def _check_autocast(autocast: Any, autocast_dtype: Any, owner: str) -> tuple[bool | None, torch.dtype]:
    if autocast is not None and not isinstance(autocast, bool):
        raise param_error("autocast", owner, "True, False or None", autocast, TypeError)
    expected = "torch.bfloat16 or torch.float16"
    if not isinstance(autocast_dtype, torch.dtype):
        raise param_error("autocast_dtype", owner, expected, autocast_dtype, TypeError)
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise param_error("autocast_dtype", owner, expected, autocast_dtype)
    return autocast, autocast_dtype


def _outputs_to_float32(data: Any) -> Any:
    """Cast every reduced-precision floating tensor in (nested) outputs to float32."""
    if isinstance(data, torch.Tensor):
        reduced = data.is_floating_point() and data.element_size() < 4
        return data.float() if reduced else data
    if isinstance(data, Mapping):
        return type(data)({k: _outputs_to_float32(v) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_outputs_to_float32(v) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_outputs_to_float32(v) for v in data)
    return data


def _to_device(data: Any, device: torch.device) -> Any:
    """``move_to(data, device, non_blocking=True)`` with a no-op fast path for a tensor already there."""
    if isinstance(data, torch.Tensor) and data.device == device:
        return data
    return move_to(data, device, non_blocking=True)


def _warn_non_finite(scores: torch.Tensor, owner: str, stacklevel: int = 2) -> None:
    """Warn (``RuntimeWarning``) when ``scores`` holds NaN or inf; the scores are left as they are.

    One reduction and one device synchronisation when every score is finite (the sum is
    finite); the exact count is computed only when the sum is not.
    """
    if scores.numel() == 0:
        return
    if math.isfinite(float(scores.sum())):
        return
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        warnings.warn(
            f"{owner} produced {bad} non-finite score(s); they are passed on as NaN and samplers skip them.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


class Scorer:
    """Base class: holds ``loss_fn`` and runs the model in scoring mode on its device.

    Subclasses implement :meth:`score`, which receives inputs and targets already on the
    model's device with the model in eval mode, and may call :meth:`forward` for a
    graph-free forward pass under the configured autocast.

    The model is called and its output read by one convention (:class:`ModelCall`): dict
    inputs as ``model(**inputs)``, others as ``model(inputs)``; the loss function receives
    the logits: a tensor output as it is, else the ``.logits`` attribute, the ``"logits"``
    entry of a mapping or element 0 of a tuple. ``forward=`` and ``logits=`` override it.

    Args:
        loss_fn: ``(logits, targets) -> losses`` of shape (b,) (``reduction="none"``).
        forward: None or a callable ``forward(model, inputs) -> outputs`` that runs the model.
        logits: None (default rule), a key or attribute name (str), an index (int) or a
            callable ``logits(outputs) -> logits`` that picks what ``loss_fn`` receives.
        autocast: run the scoring forward under ``torch.autocast`` with ``autocast_dtype``.
            None (default) = on for a CUDA model, off otherwise. The loss and the scores are
            always computed in float32 from the (possibly reduced-precision) outputs.
        autocast_dtype: ``torch.bfloat16`` (default) or ``torch.float16``.

    Attributes:
        name: short name used in reports.
        extra_backward: whether scoring needs a backward pass through the model (cost).
        model_call: the :class:`ModelCall` (calling convention and logits reader).
    """

    name = "scorer"
    extra_backward = False
    #: the default convention; instances set their own in ``__init__`` (kept for old pickles)
    model_call = ModelCall(owner="Scorer")
    #: what ``autocast=None`` resolves to on a CUDA model
    autocast_default_cuda = True

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        forward: ForwardHook | None = None,
        logits: LogitsHook | None = None,
        autocast: bool | None = None,
        autocast_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        owner = type(self).__name__
        if not callable(loss_fn):
            raise param_error("loss_fn", owner, "a callable (outputs, targets) -> losses", loss_fn, TypeError)
        _check_reduction(loss_fn, owner)
        self.loss_fn = loss_fn
        self.model_call = ModelCall(forward, logits, owner)
        self.autocast, self.autocast_dtype = _check_autocast(autocast, autocast_dtype, owner)

    def __call__(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Return the scores of the batch: float32 Tensor of shape (b,), >= 0 (NaN passed on), no grad.

        Inputs and targets are moved to the model's device (``non_blocking``, so pinned
        CPU batches overlap with compute); non-finite scores raise a ``RuntimeWarning``
        and are returned as they are (samplers skip them).
        """
        if not isinstance(model, nn.Module):
            raise param_error("model", type(self).__name__, "a torch.nn.Module", model, TypeError)
        modules = _iter_modules(model)
        device = _first_device(modules)
        inputs = _to_device(inputs, device)
        targets = _to_device(targets, device)
        with _ScoringMode(model, modules):
            scores = self.score(model, inputs, targets)
        if scores.requires_grad:
            scores = scores.detach()
        if scores.dtype != torch.float32:
            scores = scores.to(torch.float32)
        if scores.is_inference():  # a normal tensor: callers may modify it in place
            scores = scores.clone()
        _warn_non_finite(scores, type(self).__name__, stacklevel=2)
        return scores

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:  # pragma: no cover
        """Scores of a batch already on the model's device, model in eval mode: Tensor of shape (b,)."""
        raise NotImplementedError

    def autocast_enabled(self, device: torch.device) -> bool:
        """Whether the scoring forward runs under autocast on ``device``."""
        if self.autocast is None:
            return device.type == "cuda" and self.autocast_default_cuda
        return self.autocast

    def autocast_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast(device.type, autocast_dtype)`` when enabled, else a null context."""
        if not self.autocast_enabled(device):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's logits without a graph, under autocast when enabled.

        The model is called and its logits read by :attr:`model_call` (``model(**inputs)``
        for dict inputs; the ``.logits``/``"logits"``/element-0 rule, or the hooks). Call
        it inside ``torch.inference_mode()`` (as the built-in scorers do) to skip version
        counters and view tracking too; keep the work on its outputs inside the same
        block, where it is cheapest.

        Returns:
            the logits, with reduced-precision floating tensors cast to float32.
        """
        if self.autocast is False:
            amp: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            device = inputs.device if isinstance(inputs, torch.Tensor) else model_device(model)
            amp = self.autocast_context(device)
        graph_free = contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.no_grad()
        with graph_free, amp:
            outputs = self.model_call(model, inputs)
        return _outputs_to_float32(outputs)

    def __repr__(self) -> str:
        extra = "" if self.autocast is None else f", autocast={self.autocast}"
        if self.model_call.forward is not None:
            extra += f", forward={self.model_call.forward!r}"
        if self.model_call.logits is not None:
            extra += f", logits={self.model_call.logits!r}"
        return f"{type(self).__name__}({self.loss_fn!r}{extra})"


class LossScorer(Scorer):
    """Score = the per-example loss, from one no-grad forward pass.

    Args:
        loss_fn: ``(logits, targets) -> losses`` of shape (b,) (``reduction="none"``).
        forward, logits: how the model is called and its logits read (see :class:`Scorer`).
        autocast, autocast_dtype: see :class:`Scorer` (default: bf16 forward on CUDA).

    Raises ``ValueError`` when a loss is negative (scores must be >= 0).

    Example:
        >>> scorer = LossScorer(nn.CrossEntropyLoss(reduction="none"))
        >>> scores = scorer(model, x, y)  # Tensor of shape (b,)
    """

    name = "loss"

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        with torch.inference_mode():
            outputs = self.forward(model, inputs)
            losses = fast_cross_entropy(self.loss_fn, outputs, targets)
            if losses is not None:
                return losses  # a cross-entropy: >= 0 (an inference tensor: __call__ clones it)
        with torch.no_grad():  # outside inference mode: the user's loss gets ordinary tensors
            losses = per_example_losses(self.loss_fn, outputs, targets, type(self).__name__)
            negative = bool((losses < 0).any())
        if negative:
            raise ValueError(
                "LossScorer got negative per-example losses; importance scores must be >= 0. "
                "Shift the loss or use UpperBoundScorer."
            )
        return losses


#: Below this many classes the CPU softmax over the last dimension takes a slow kernel (torch 2.x:
#: 5-10x slower at 4-15 classes than at 16); the softmax of the transposed logits along dim 0 does not.
SMALL_CLASSES = 16


def _is_plain(loss_fn: Any, cls: type) -> bool:
    """``loss_fn`` is an instance of ``cls`` whose ``forward`` is ``cls.forward`` (not overridden)."""
    return isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward


def fast_cross_entropy(loss_fn: LossFn, outputs: Any, targets: Any) -> torch.Tensor | None:
    """Per-example ``nn.CrossEntropyLoss`` on CPU without torch's slow cases, or None.

    The same values (to float rounding) as ``per_example_losses(loss_fn, outputs, targets)``
    for a plain ``nn.CrossEntropyLoss`` (no class weights) on float32 CPU logits with class-index
    targets, in two cases where the loss itself is slow:

    * logits (b, C) with C < 16: the log-softmax runs along dim 0 of the transposed logits
      (the CPU kernel over a last dimension of 4-15 elements is several times slower);
    * per-token logits (b, C, T...) whose class dimension is contiguous in memory (a (b, T, C)
      head output seen as (b, C, T)): one log-softmax over rows of C, no copy to (b, C, T).
      The per-example loss is the mean over the T positions (ignored positions count 0).

    Anything else, and targets the CPU gather rejects (out of range), returns None: the caller
    then calls ``loss_fn`` itself (and gets its errors).

    Returns:
        float32 Tensor of shape (b,) (per-example losses) or None.
    """
    if not (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.dim() >= 2
        and outputs.dtype == torch.float32
        and outputs.device.type == "cpu"
        and targets.dtype == torch.int64
        and targets.shape == outputs.shape[:1] + outputs.shape[2:]
        and outputs.numel() > 0
        and _is_plain(loss_fn, nn.CrossEntropyLoss)
        and loss_fn.weight is None
    ):
        return None
    b, num_classes = outputs.shape[0], outputs.shape[1]
    per_token = outputs.dim() > 2
    if per_token:
        rows = outputs.movedim(1, -1)
        if not rows.is_contiguous():
            return None
        rows = rows.reshape(-1, num_classes)
    elif num_classes < SMALL_CLASSES:
        rows = outputs
    else:
        return None
    index = targets.reshape(-1)
    ignore = int(loss_fn.ignore_index)
    valid = None
    if per_token or 0 <= ignore < num_classes:
        valid = index != ignore
        index = torch.where(valid, index, 0)
    small = num_classes < SMALL_CLASSES
    log_probs = torch.log_softmax(rows.T, dim=0) if small else torch.log_softmax(rows, dim=1)
    cdim = 0 if small else 1
    try:  # the CPU gather checks its indices: an ignored or invalid target leaves it to loss_fn
        picked = log_probs.gather(cdim, index.unsqueeze(cdim)).squeeze(cdim)
    except RuntimeError:
        return None
    eps = float(loss_fn.label_smoothing)
    losses = picked.neg_() if not eps else picked.mul_(eps - 1.0).sub_(log_probs.mean(cdim), alpha=eps)
    if valid is not None:
        losses = losses * valid
    if per_token:
        return losses.reshape(b, -1).mean(1)
    return losses


def upper_bound_closed_form(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The Katharopoulos-Fleuret bound ``||d l_i / d z_i||_2`` in closed form, or ``None``.

    Known forms (z = outputs, computed in float32 whatever the dtype of z; result of shape (b,)):

    * ``nn.CrossEntropyLoss`` (no class weights), class-index targets, label smoothing e:
      ``|| softmax(z) - q ||`` with ``q = (1 - e) onehot(y) + e / C``; rows equal to
      ``ignore_index`` score 0.
    * ``nn.CrossEntropyLoss`` with probability targets t:
      ``|| softmax(z) * sum(t') - t' ||``, ``t' = (1 - e) t + e / C``.
    * Per-token cross-entropy: logits of shape (b, C, d1, ...) with targets of shape
      (b, d1, ...) (or probabilities of the logits' shape). The loss returns (b, d1, ...) and
      the per-example loss is its mean over the ``T = d1 * ...`` positions (as in
      :func:`per_example_losses`), ``l_i = (1/T) sum_t m_it ce_it``, so the score is the norm of
      the gradient over the whole sequence's logits:

      .. math::

          s_i = \\frac{1}{T} \\Big( \\sum_t m_{it}^2 \\, [y_{it} \\ne \\text{ignore}] \\,
                \\| \\mathrm{softmax}(z_{it}) - q_{it} \\|_2^2 \\Big)^{1/2},

      with ``m`` the optional ``mask`` (shape (b, d1, ...), 1 where absent; a 0 drops the
      position like ``ignore_index``; T counts every position, masked or not).
    * ``nn.MSELoss`` (no mask): per-example mean over D output values, ``2 || z - y || / D``.

    .. math::

        s_i = \\| \\mathrm{softmax}(z_i) - (1 - \\epsilon) e_{y_i} - \\epsilon / C \\|_2

    On CPU with fewer than 16 classes the softmax runs over dim 0 of the transposed logits
    (the small-last-dimension kernel is several times slower); the results agree to float
    rounding.

    Returns ``None`` for any other loss (the caller falls back to autograd).

    Raises:
        ValueError: targets or mask of the wrong shape, or class indices outside ``[0, C)``
            (checked before indexing: on CUDA an out-of-range index would be a device assert).
    """
    if _is_plain(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and outputs.dim() >= 2:
        if (  # the common case first, with the fewest checks
            mask is None
            and outputs.dim() == 2
            and targets.dim() == 1
            and targets.dtype == torch.int64
            and outputs.dtype == torch.float32
            and outputs.device.type == "cpu"
            and targets.shape[0] == outputs.shape[0] > 0
        ):
            scores = _flat_cross_entropy_bound(
                outputs, targets, float(loss_fn.label_smoothing), int(loss_fn.ignore_index)
            )
            if scores is not None:
                return scores
        return _cross_entropy_bound(loss_fn, outputs, targets, mask)
    if _is_plain(loss_fn, nn.MSELoss) and mask is None:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"MSELoss targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)}."
            )
        diff = (outputs.float() - targets.float()).flatten(1)
        return 2.0 * torch.linalg.vector_norm(diff, dim=1) / diff.shape[1]
    return None


def _cross_entropy_bound(
    loss_fn: nn.CrossEntropyLoss, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    eps = float(loss_fn.label_smoothing)
    b, num_classes = outputs.shape[0], outputs.shape[1]
    rest = tuple(outputs.shape[2:])
    positions = math.prod(rest)
    logits = outputs if outputs.dtype == torch.float32 else outputs.float()
    index_targets = not targets.is_floating_point() and tuple(targets.shape) == (b, *rest)
    if not index_targets and not (targets.shape == outputs.shape and targets.is_floating_point()):
        expected = f"class indices of shape {(b, *rest)}"
        raise ValueError(
            f"CrossEntropyLoss targets of shape {tuple(targets.shape)} do not match outputs of shape "
            f"{tuple(outputs.shape)}: expected {expected} or probabilities of shape {tuple(outputs.shape)}."
        )
    if mask is not None and tuple(mask.shape) != (b, *rest):
        raise ValueError(
            f"The token mask of shape {tuple(mask.shape)} does not match outputs of shape "
            f"{tuple(outputs.shape)}: expected shape {(b, *rest)}."
        )
    if b == 0 or positions == 0:
        return logits.new_zeros(b)
    # Rows of class scores: class dimension `cdim` of `probs`; the other dimension(s) index positions.
    if not rest:
        rows = logits
    else:
        moved = logits.movedim(1, -1)  # (b, *rest, C): a view; contiguous for (b, T, C)-major logits
        rows = moved.reshape(-1, num_classes) if moved.is_contiguous() else None

    def softmax() -> tuple[torch.Tensor, int]:
        if rows is not None and rows.device.type == "cpu" and num_classes < SMALL_CLASSES:
            return torch.softmax(rows.T, dim=0), 0  # (C, R), contiguous
        if rows is not None:
            return torch.softmax(rows, dim=1), 1  # (R, C)
        return torch.softmax(logits.reshape(b, num_classes, positions), dim=1), 1  # (b, C, T)

    probs, cdim = softmax()

    def flat(t: torch.Tensor) -> torch.Tensor:
        """(b, *rest) -> the position layout of `probs` with a size-1 class dimension."""
        if probs.dim() == 3:
            return t.reshape(b, 1, positions)
        return t.reshape(1, -1) if cdim == 0 else t.reshape(-1, 1)

    valid = None
    if index_targets:
        if eps:
            probs.sub_(eps / num_classes)
        ignore = int(loss_fn.ignore_index)
        index = flat(targets)
        if index.dtype != torch.int64:
            index = index.long()
        src = probs.new_full((1, 1, 1)[: probs.dim()], -(1.0 - eps)).expand(index.shape)
        scattered = False
        if probs.device.type == "cpu" and not 0 <= ignore < num_classes:
            # The CPU scatter checks its indices: try the common case (every target a class, none
            # ignored) without a separate range check; otherwise take the checked path below.
            try:
                probs.scatter_add_(cdim, index, src)
                scattered = True
            except RuntimeError:  # an index out of range (ignored or invalid): start again, checked
                probs, cdim = softmax()
                if eps:
                    probs.sub_(eps / num_classes)
        if not scattered:
            lo, hi = (int(v) for v in torch.aminmax(index))
            if lo <= ignore <= hi:  # some positions may be ignored: mask them
                valid = index != ignore
                index = torch.where(valid, index, torch.zeros_like(index))
                lo, hi = (int(v) for v in torch.aminmax(index))
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"Class-index targets must lie in [0, {num_classes}); got min {lo}, max {hi}."
                )
            if valid is None:
                probs.scatter_add_(cdim, index, src)
            else:
                probs.scatter_add_(cdim, index, src * valid.to(probs.dtype))
    else:
        t = targets.float().movedim(1, -1).reshape(-1, num_classes) if rest else targets.float()
        if cdim == 0:
            t = t.T
        elif probs.dim() == 3:
            t = targets.float().reshape(b, num_classes, positions)
        t = (1.0 - eps) * t + eps / num_classes
        probs.mul_(t.sum(cdim, keepdim=True)).sub_(t)
    # squared norm per position, (R,) or (b, T), without a second (R, C) buffer: fresh large buffers
    # cost page faults on every call
    if cdim == 1 and probs.dim() == 2:
        sq = torch.linalg.vector_norm(probs, dim=1).square_()
    else:
        sq = probs.square_().sum(cdim)
    if not rest and valid is None and mask is None:
        return sq.sqrt_()
    sq = sq.reshape(b, positions)
    if valid is not None:
        sq = sq * valid.reshape(b, positions).to(sq.dtype)
    if mask is not None:
        m = mask.reshape(b, positions).to(device=sq.device, dtype=sq.dtype)
        sq = sq * m.square()
    return sq.sum(1).sqrt_().div_(positions)


def _flat_cross_entropy_bound(
    logits: torch.Tensor, targets: torch.Tensor, eps: float, ignore: int
) -> torch.Tensor | None:
    """Fast path of :func:`_cross_entropy_bound` on CPU for logits (b, C) and class indices (b,).

    Few operations and no range check: the CPU scatter checks its indices itself, so an
    ignored or invalid target makes it fail and returns None (the general path then masks
    the ignored rows or raises). Needs ``ignore_index`` outside ``[0, C)``.
    """
    num_classes = logits.shape[1]
    if 0 <= ignore < num_classes:
        return None
    small = num_classes < SMALL_CLASSES
    probs = torch.softmax(logits.T, dim=0) if small else torch.softmax(logits, dim=1)
    cdim = 0 if small else 1
    if eps:
        probs.sub_(eps / num_classes)
    try:
        probs.scatter_(cdim, targets.unsqueeze(cdim), -(1.0 - eps), reduce="add")
    except RuntimeError:
        return None
    if small:  # a norm over dim 0 of (C, b) takes a slow strided kernel; square-and-sum does not
        return probs.square_().sum(0).sqrt_()
    return torch.linalg.vector_norm(probs, dim=1)


class UpperBoundScorer(Scorer):
    """Score = ``|| d l_i / d z_i ||_2``, the Katharopoulos-Fleuret gradient-norm upper bound.

    ``z`` is the model output (last-layer pre-activation). For a network whose last
    layer is ``z = W h + c`` the per-example gradient norm over all parameters is at most
    a constant (the same for every example) times this score, so after normalisation it
    is a tight, cheap proxy for the optimal sampler ``p_i ∝ ||g_i||``.

    .. math::

        s_i = \\Big\\| \\frac{\\partial \\ell(z_i, y_i)}{\\partial z_i} \\Big\\|_2,
        \\qquad \\text{softmax CE: } s_i = \\| \\mathrm{softmax}(z_i) - e_{y_i} \\|_2 .

    Closed forms exist for cross-entropy (also per token, logits of shape (b, C, T)) and
    MSE (see :func:`upper_bound_closed_form`); any other per-example loss uses one batched
    backward pass of the loss alone that stops at the outputs (the model's forward runs
    without a graph). The forward runs in inference mode, under autocast when enabled; the
    bound is computed in float32 from the outputs. ``z`` is what the model call's logits
    reader returns (see :class:`Scorer`): it must be one tensor.

    Per-token models: ``l_i`` is the mean of the per-token losses over the ``T`` positions
    (times the optional ``mask``), and the score is the norm of the gradient over all of
    the sequence's logits, ``(1/T) (sum_t m_t^2 ||softmax(z_t) - q_t||^2)^(1/2)``.

    Args:
        loss_fn: ``(logits, targets) -> losses`` of shape (b,) or (b, T...) (``reduction="none"``).
        closed_form: use the closed form when one is known (default True).
        mask: None, a key of the (dict) inputs, or a callable ``mask(inputs, targets)``,
            giving a tensor of the per-token losses' shape (b, T...) that multiplies them
            (0 drops a position, e.g. ``"attention_mask"``).
        forward, logits: how the model is called and its logits read (see :class:`Scorer`).
        autocast, autocast_dtype: see :class:`Scorer` (default: bf16 forward on CUDA).

    References:
        Katharopoulos and Fleuret, "Not All Samples Are Created Equal: Deep Learning with
        Importance Sampling", ICML 2018 (arXiv:1803.00942).

    Example:
        >>> scorer = UpperBoundScorer(nn.CrossEntropyLoss(reduction="none"))
        >>> scores = scorer(model, x, y)  # Tensor of shape (b,), in [0, sqrt(2)]
    """

    name = "upper_bound"

    def __init__(
        self,
        loss_fn: LossFn,
        closed_form: bool = True,
        *,
        mask: str | Callable[[Any, Any], torch.Tensor] | None = None,
        forward: ForwardHook | None = None,
        logits: LogitsHook | None = None,
        autocast: bool | None = None,
        autocast_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(
            loss_fn, forward=forward, logits=logits, autocast=autocast, autocast_dtype=autocast_dtype
        )
        if not isinstance(closed_form, bool):
            raise param_error("closed_form", "UpperBoundScorer", "a bool", closed_form, TypeError)
        if mask is not None and not isinstance(mask, str) and not callable(mask):
            expected = "None, a key of the inputs (str) or a callable (inputs, targets) -> mask"
            raise param_error("mask", "UpperBoundScorer", expected, mask, TypeError)
        self.closed_form = closed_form
        self.mask = mask
        self._checked_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        if model not in self._checked_models:
            self._checked_models.add(model)
            _warn_fused_activation(model, stacklevel=3)
        owner = type(self).__name__
        with torch.inference_mode():  # the closed form too: cheaper on inference tensors (__call__ clones)
            outputs = self.forward(model, inputs)
            if not isinstance(outputs, torch.Tensor):
                raise TypeError(
                    f"{owner} differentiates the loss with respect to the logits, which must be one tensor; "
                    f"the model call gave a {type(outputs).__name__}. Pass logits= (a key, an index or a "
                    f"callable outputs -> logits tensor) or forward= to {owner}."
                )
            mask = self._mask(inputs, targets)
            if self.closed_form and isinstance(targets, torch.Tensor):
                scores = upper_bound_closed_form(self.loss_fn, outputs, targets, mask)
                if scores is not None:
                    return scores
        loss_fn = self.loss_fn if mask is None else _masked_loss(self.loss_fn, mask, owner)
        return output_gradient_norms(loss_fn, outputs, targets, owner)

    def _mask(self, inputs: Any, targets: Any) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if isinstance(self.mask, str):
            if not isinstance(inputs, Mapping) or self.mask not in inputs:
                keys = list(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
                raise ValueError(
                    f"The 'mask' parameter of UpperBoundScorer names the input {self.mask!r}, which the "
                    f"batch does not hold (inputs: {keys})."
                )
            mask = inputs[self.mask]
        else:
            mask = self.mask(inputs, targets)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"The mask of UpperBoundScorer must be a tensor; got {type(mask).__name__}.")
        return mask

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_checked_models"] = None  # weak references do not pickle; re-checked after loading
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("mask", None)
        self.__dict__.update(state)
        self._checked_models = weakref.WeakSet()


def _masked_loss(loss_fn: LossFn, mask: torch.Tensor, owner: str) -> LossFn:
    """``loss_fn`` with its per-token losses multiplied by ``mask`` (same shape required)."""

    def masked(outputs: Any, targets: Any) -> torch.Tensor:
        losses = loss_fn(outputs, targets)
        if not isinstance(losses, torch.Tensor) or losses.shape != mask.shape:
            shape = getattr(losses, "shape", type(losses).__name__)
            raise ValueError(
                f"{owner}: the token mask of shape {tuple(mask.shape)} does not match the per-token losses "
                f"of shape {tuple(shape)}."
            )
        return losses * mask.to(device=losses.device, dtype=losses.dtype)

    return masked


def _warn_fused_activation(model: nn.Module, stacklevel: int) -> None:
    """Warn when the model's last leaf module is a probability map (the bound needs logits)."""
    last = None
    for module in model.modules():
        if next(module.children(), None) is None:
            last = module
    if isinstance(last, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)):
        warnings.warn(
            f"The model ends with {type(last).__name__}: UpperBoundScorer differentiates the loss with "
            "respect to the model output, which should be the last layer's pre-activation (logits).",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def output_gradient_norms(loss_fn: LossFn, outputs: torch.Tensor, targets: Any, owner: str) -> torch.Tensor:
    """``|| d l_i / d outputs_i ||`` for every row, by one backward pass of the loss alone (in float32).

    Returns:
        float32 Tensor of shape (b,).
    """
    with torch.inference_mode(False), torch.enable_grad():
        z = outputs.detach().to(torch.float32, copy=True).requires_grad_(True)
        losses = per_example_losses(loss_fn, z, targets, owner)
        (grad,) = torch.autograd.grad(losses.sum(), z)
    return torch.linalg.vector_norm(grad.flatten(1), dim=1)


class GradNormScorer(Scorer):
    """Score = the exact per-example gradient norm over all trainable parameters.

    .. math::

        s_i = \\| \\nabla_\\theta \\ell(f_\\theta(x_i), y_i) \\|_2

    Computed with ``torch.func`` (``vmap`` of ``grad``) in chunks of ``chunk_size``
    examples, so the extra peak memory is about ``chunk_size x (number of parameters)``
    floats plus one chunk's activations, whatever the batch size. This is the reference
    the metrics compare cheaper scores against; it costs roughly one backward pass per
    example.

    Args:
        loss_fn: ``(outputs, targets) -> losses`` of shape (b,) (``reduction="none"``).
        chunk_size: examples per vectorised chunk (int >= 1, default 32).
        forward, logits: how the model is called and its logits read (see :class:`Scorer`).
        autocast, autocast_dtype: see :class:`Scorer`. Unlike the other scorers,
            ``autocast=None`` means off on every device: this scorer is the exact reference.
    """

    name = "grad_norm"
    extra_backward = True
    autocast_default_cuda = False

    def __init__(
        self,
        loss_fn: LossFn,
        chunk_size: int = 32,
        *,
        forward: ForwardHook | None = None,
        logits: LogitsHook | None = None,
        autocast: bool | None = None,
        autocast_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(
            loss_fn, forward=forward, logits=logits, autocast=autocast, autocast_dtype=autocast_dtype
        )
        self.chunk_size = check_int(chunk_size, "chunk_size", "GradNormScorer", minimum=1)

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        if not params:
            raise ValueError("GradNormScorer needs a model with at least one trainable parameter.")
        called = CalledModel(model, self.model_call)
        params = {"model." + k: v for k, v in params.items()}
        buffers = {"model." + k: v.detach() for k, v in model.named_buffers()}
        loss_fn = self.loss_fn
        device = model_device(model)

        def one_loss(p: dict, x: Any, y: Any) -> torch.Tensor:
            with self.autocast_context(device):
                out = functional_call(called, (p, buffers), (_unsqueeze(x),))
            out = _outputs_to_float32(out)
            return per_example_losses(loss_fn, out, _unsqueeze(y), "GradNormScorer").sum()

        per_example = vmap(grad(one_loss), in_dims=(None, 0, 0 if targets is not None else None))
        b = _rows(inputs)
        norms = []
        for start in range(0, b, self.chunk_size):
            stop = min(start + self.chunk_size, b)
            x = _slice_rows(inputs, start, stop)
            y = _slice_rows(targets, start, stop) if targets is not None else None
            with torch.enable_grad():
                try:
                    grads = per_example(params, x, y)
                except RuntimeError as exc:
                    clearer = per_example_error(exc, type(self).__name__)
                    if clearer is None:
                        raise
                    raise clearer from exc
            sq = None
            for name in list(grads):  # a reduction per tensor: no squared copy of the gradients
                g = grads.pop(name).flatten(1)
                part = torch.linalg.vector_norm(g, dim=1, dtype=torch.float32).square()
                sq = part if sq is None else sq + part
            norms.append(sq.sqrt())
        return torch.cat(norms)


def _slice_rows(data: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` (dim 0) of every tensor in nested tuples, lists and dicts, as views."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, Mapping):
        return type(data)({k: _slice_rows(v, start, stop) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_slice_rows(v, start, stop) for v in data))
    if isinstance(data, (list, tuple)):
        if len(data) and not isinstance(data[0], (torch.Tensor, Mapping, list, tuple)):
            return type(data)(data[start:stop])
        return type(data)(_slice_rows(v, start, stop) for v in data)
    return data


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
    pin_memory: bool | None = None,
) -> torch.Tensor:
    """Score every example of ``dataset`` in large batches.

    Batches are read by a DataLoader (with ``num_workers`` workers the next batches load
    while the current one is scored) and copied to the model's device without blocking
    from pinned memory. Scores stay on the device until the end (one transfer).

    Args:
        model: the model to score with (moved to ``device`` when one is given).
        dataset: a map-style dataset yielding ``(input, target)`` pairs or dicts.
        scorer: a scorer, ``scorer(model, inputs, targets) -> Tensor[b]``.
        batch_size: scoring batch size (independent of the training batch size).
        device: where to run the model; default: where it already is.
        progress: show a tqdm progress bar.
        num_workers: DataLoader workers for reading the dataset.
        collate_fn: optional collate function for the DataLoader.
        pin_memory: pin the batches (default: when the model is on CUDA).

    Returns:
        float32 CPU Tensor of shape (N,), the score of example i at position i.
    """
    batch_size = check_int(batch_size, "batch_size", "score_dataset", minimum=1)
    num_workers = check_int(num_workers, "num_workers", "score_dataset", minimum=0)
    if not callable(scorer):
        expected = "a callable scorer(model, inputs, targets)"
        raise param_error("scorer", "score_dataset", expected, scorer, TypeError)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("score_dataset got an empty dataset (len 0); there is nothing to score.")
    if device is not None:
        model = model.to(device)
    on_cuda = model_device(model).type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=on_cuda if pin_memory is None else bool(pin_memory),
    )
    from tqdm.auto import tqdm

    out = []
    for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        inputs, targets = split_batch(batch)
        out.append(scorer(model, inputs, targets).to(torch.float32))
    return torch.cat(out).cpu()
