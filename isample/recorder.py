"""Exact per-example gradient norms of ``nn.Linear`` layers as a by-product of a backward pass.

:class:`GradNormRecorder` hooks the selected linear layers while the user's own training
step runs: a forward hook keeps each layer's input ``h`` and puts a gradient hook on its
output ``z`` (a pre-hook on ``z``'s autograd node, or a tensor hook on ``z`` when the
outputs are targets of ``torch.autograd.grad``); the backward pass then hands over
``delta = dL/dz``, whose row ``i`` is
``(w_i / b) d l_i / d z_i`` for the loss ``(w * losses).mean()``. From ``(h, delta)`` the
per-example gradient norm (plain or in an adaptive optimizer's geometry) follows in closed
form (:mod:`isample._linear_norms`), with no extra forward or backward pass.

The hook machinery here is shared with :class:`isample.LinearGradNormScorer`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._linear_norms import (
    DEFAULT_MAX_ELEMENTS,
    compiled_flat_grad_norms,
    concat_calls,
    linear_sq_grad_norms,
    stacked_flat_sq_grad_norms,
)
from ._validation import check_choice, check_int, param_error
from .preconditioner import (
    SUPPORTED_OPTIMIZERS,
    NoOptimizerStateError,
    is_identity_geometry,
    preconditioner_diagonal,
)

__all__ = ["GradNormRecorder"]

_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, *SUPPORTED_OPTIMIZERS)
_REDUCTIONS = ("mean", "sum")

LayerSpec = Sequence[nn.Module | str] | nn.Linear | str | None


# --------------------------------------------------------------------------- arguments


def check_layers_arg(layers: Any, owner: str) -> list[nn.Module | str] | None:
    """Validate the ``layers`` argument (without a model) and return it as a list or None."""
    if layers is None:
        return None
    if isinstance(layers, (str, nn.Linear)):
        return [layers]
    if isinstance(layers, nn.Module) or not isinstance(layers, (list, tuple)):
        raise param_error(
            "layers", owner, "None or a list of nn.Linear modules or module names", layers, TypeError
        )
    if not layers:
        raise param_error(
            "layers", owner, "None or a non-empty list of nn.Linear modules or module names", layers
        )
    for layer in layers:
        if not isinstance(layer, (str, nn.Module)):
            raise param_error(
                "layers", owner, "None or a list of nn.Linear modules or module names", layers, TypeError
            )
    return list(layers)


def check_optimizer_arg(optimizer: Any, owner: str) -> torch.optim.Optimizer | None:
    """Validate the ``optimizer`` argument: None, SGD (identity) or one with a known preconditioner."""
    if optimizer is None or isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
        return optimizer
    raise param_error(
        "optimizer",
        owner,
        "None or a torch.optim SGD, Adam, AdamW, RMSprop or Adagrad, "
        "or an isample.optim BRMSprop or BAdam optimizer",
        type(optimizer).__name__ if isinstance(optimizer, torch.optim.Optimizer) else optimizer,
        TypeError,
    )


@dataclass
class LayerInfo:
    """One selected linear layer and which of its parameters are trainable."""

    name: str
    module: nn.Linear
    weight: bool
    bias: bool

    @property
    def params(self) -> list[nn.Parameter]:
        out = [self.module.weight] if self.weight else []
        if self.bias:
            out.append(self.module.bias)
        return out


def resolve_layers(model: nn.Module, layers: list[nn.Module | str] | None, owner: str) -> list[LayerInfo]:
    """Resolve ``layers`` against ``model`` into the trainable linear layers to hook.

    ``None`` selects every ``nn.Linear`` submodule except those owned by an
    ``nn.MultiheadAttention`` (which uses their weights through ``F.linear`` without calling
    them). Parameters with ``requires_grad=False`` are left out; a layer with none left is
    skipped.

    Raises:
        ValueError: the model has no ``nn.Linear`` layer, a layer is not part of the model,
            two selected layers share a parameter, or no selected parameter is trainable.
        TypeError: a selected module is not an ``nn.Linear``.
    """
    names = {module: name for name, module in model.named_modules()}
    if layers is None:
        skip = set()
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                skip.update(module.modules())
        chosen = [m for m in names if isinstance(m, nn.Linear) and m not in skip]
        if not chosen:
            raise ValueError(
                f"{owner} computes gradient norms of nn.Linear layers, but the {type(model).__name__} model "
                "has no nn.Linear layer. Use GradNormScorer (per-example autograd) or UpperBoundScorer "
                "instead."
            )
    else:
        chosen = []
        for layer in layers:
            if isinstance(layer, str):
                try:
                    module = model.get_submodule(layer)
                except AttributeError:
                    raise ValueError(
                        f"The 'layers' parameter of {owner} names {layer!r}, which is not a submodule of the "
                        f"{type(model).__name__} model."
                    ) from None
            else:
                module = layer
                if module not in names:
                    raise ValueError(
                        f"The 'layers' parameter of {owner} holds a {type(module).__name__} that is not a "
                        f"submodule of the {type(model).__name__} model."
                    )
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"The 'layers' parameter of {owner} must list nn.Linear layers; {names[module]!r} is a "
                    f"{type(module).__name__}."
                )
            if module not in chosen:
                chosen.append(module)
    infos = []
    seen: dict[nn.Parameter, str] = {}
    for module in chosen:
        info = LayerInfo(
            name=names[module],
            module=module,
            weight=module.weight.requires_grad,
            bias=module.bias is not None and module.bias.requires_grad,
        )
        for p in info.params:
            if p in seen:
                raise ValueError(
                    f"{owner}: layers {seen[p]!r} and {info.name!r} share a parameter; the per-example "
                    "norm of shared (tied) weights is not supported. Select only one of them."
                )
            seen[p] = info.name
        if info.params:
            infos.append(info)
    if not infos:
        raise ValueError(
            f"{owner}: none of the selected nn.Linear layers has a parameter with requires_grad=True."
        )
    return infos


Scales = list[tuple[torch.Tensor | None, torch.Tensor | None]]


def read_scales(optimizer: torch.optim.Optimizer | None, infos: list[LayerInfo]) -> Scales | None:
    """``(D_W^2, D_c^2)`` per layer from the optimizer's current state; None for the identity geometry.

    Raises:
        NoOptimizerStateError: the adaptive optimizer has not taken a step yet.
    """
    if is_identity_geometry(optimizer):
        return None
    params = [p for info in infos for p in info.params]
    with torch.no_grad():
        diags = preconditioner_diagonal(optimizer, params)
        diags = iter(torch._foreach_mul(diags, diags))
        out = []
        for info in infos:
            w = next(diags) if info.weight else None
            c = next(diags) if info.bias else None
            out.append((w, c))
    return out


def check_managed(optimizer: torch.optim.Optimizer | None, infos: list[LayerInfo], owner: str) -> None:
    """Raise a clear error when a selected trainable parameter is not managed by ``optimizer``."""
    if is_identity_geometry(optimizer):
        return
    managed = {p for group in optimizer.param_groups for p in group["params"]}
    for info in infos:
        for p in info.params:
            if p not in managed:
                raise ValueError(
                    f"The 'optimizer' parameter of {owner} does not manage the parameters of layer "
                    f"{info.name!r}; pass the optimizer that trains the model (or select layers it manages)."
                )


# --------------------------------------------------------------------------- capture


class _Call:
    """One call of a selected layer: its input ``h`` and, after the backward, its output gradient."""

    __slots__ = ("h", "delta", "output", "version", "_live")

    def __init__(self, h: torch.Tensor, live: list[bool]) -> None:
        self.h = h
        self.delta: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.version = 0
        self._live = live  # shared with the capture: [False] once it stopped (late backward passes)

    def on_grad(self, grad: torch.Tensor) -> None:
        """Tensor hook on the call's output: accumulate ``delta``."""
        if self._live[0]:
            if grad.requires_grad:
                grad = grad.detach()
            self.delta = grad if self.delta is None else self.delta + grad

    def on_grad_outputs(self, grad_outputs: tuple) -> None:
        """Pre-hook on the output's autograd node (cheaper than a tensor hook): ``delta`` is its input."""
        grad = grad_outputs[0]
        if grad is not None and self._live[0]:
            if grad.requires_grad:
                grad = grad.detach()
            self.delta = grad if self.delta is None else self.delta + grad


class LinearCapture:
    """Forward hooks that keep ``h`` and gradient hooks that keep ``delta`` for each layer call.

    Deltas are accepted only while the capture is active (between :meth:`start` and
    :meth:`stop`); several backward passes through the same call add up. With
    ``keep_outputs`` the layer outputs are kept too, as targets for ``torch.autograd.grad``
    (their gradient then arrives through a tensor hook, which ``torch.autograd.grad`` runs for
    the tensors it differentiates towards); otherwise a pre-hook on each output's autograd
    node receives it (one Python call less per layer than a tensor hook). A capture can be
    started again after :meth:`stop`; each start forgets the previous calls.
    """

    def __init__(self, infos: list[LayerInfo], keep_outputs: bool = False) -> None:
        self.infos = infos
        self.keep_outputs = keep_outputs
        self.calls: list[list[_Call]] = []
        self._handles: list[Any] = []
        self._live = [False]
        self._active = False
        #: all selected layers train their weight: the fused plain norm applies (see squared_norms)
        self._all_weights = all(info.weight for info in infos)
        self._bias = [info.bias for info in infos]
        self._bias_array = np.array([1.0 if b else 0.0 for b in self._bias])

    def start(self) -> None:
        self.calls = [[] for _ in self.infos]
        self._live = [True]  # a fresh flag: calls of an earlier start keep the old, stopped one
        self._active = True
        try:
            for slot, info in enumerate(self.infos):
                self._handles.append(
                    info.module.register_forward_hook(self._forward_hook(slot), with_kwargs=True)
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._active = False
        self._live[0] = False
        while self._handles:
            self._handles.pop().remove()

    def _forward_hook(self, slot: int) -> Any:
        calls = self.calls[slot]
        live = self._live
        keep_outputs = self.keep_outputs

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if not live[0] or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            h = args[0] if args else kwargs["input"]
            call = _Call(h.detach(), live)
            node = output.grad_fn
            if keep_outputs or node is None or output.output_nr != 0:
                if keep_outputs:
                    call.output = output
                    call.version = output._version
                output.register_hook(call.on_grad)
            else:
                node.register_prehook(call.on_grad_outputs)
            calls.append(call)

        return hook

    def grad_targets(self) -> list[torch.Tensor]:
        """Tensors to differentiate towards so that every captured call receives its delta.

        A call's output, when it is unchanged since the forward hook (the cheapest target: no
        weight gradient is formed); its layer's trainable parameters when it was modified in
        place afterwards (e.g. by ``nn.ReLU(inplace=True)``), since the gradient w.r.t. the
        modified tensor is not ``delta``.
        """
        targets: dict[int, torch.Tensor] = {}
        for info, calls in zip(self.infos, self.calls, strict=True):
            for call in calls:
                if call.output is not None and call.output._version == call.version:
                    targets[id(call.output)] = call.output
                else:
                    for p in info.params:
                        targets[id(p)] = p
        return list(targets.values())

    def rows(self) -> int | None:
        """Batch size seen by the first captured call (None when nothing was captured)."""
        for calls in self.calls:
            for call in calls:
                return int(call.h.shape[0]) if call.h.dim() else 0
        return None

    def received_gradients(self) -> bool:
        return any(call.delta is not None for calls in self.calls for call in calls)

    def squared_norms(
        self, rows: int, scales: Scales | None, owner: str, max_elements: int = DEFAULT_MAX_ELEMENTS
    ) -> tuple[torch.Tensor | None, list[str]]:
        """Sum over layers of the per-example squared norms; also the names of uncalled layers.

        Returns ``(Tensor of shape (rows,) or None when no layer was called, names)``; the
        squared norms are >= 0.
        """
        if scales is None and self._all_weights and len(self.infos) > 1:
            flat = self._flat_pairs(rows)
            if flat is not None:  # the common case: one (b, in) call per layer, plain norm
                return stacked_flat_sq_grad_norms(flat[0], flat[1], self._bias), []
        total = None
        uncalled = []
        for slot, (info, calls) in enumerate(zip(self.infos, self.calls, strict=True)):
            if not calls:
                uncalled.append(info.name)
                continue
            pairs = []
            for call in calls:
                if call.h.dim() < 2 or call.h.shape[0] != rows:
                    raise ValueError(
                        f"{owner}: layer {info.name!r} received an input of shape {tuple(call.h.shape)} "
                        f"for a batch of {rows} examples; per-example norms need batch-first inputs of "
                        f"shape ({rows}, ..., {info.module.in_features})."
                    )
                delta = call.delta
                if delta is None:
                    shape = (*call.h.shape[:-1], info.module.out_features)
                    delta = torch.zeros(shape, dtype=call.h.dtype, device=call.h.device)
                pairs.append((call.h, delta))
            h, delta = concat_calls(pairs)
            weight_scale, bias_scale = scales[slot] if scales is not None else (None, None)
            term = linear_sq_grad_norms(
                h,
                delta,
                weight=info.weight,
                bias=info.bias,
                weight_scale=weight_scale,
                bias_scale=bias_scale,
                max_elements=max_elements,
            )
            total = term if total is None else total + term.to(total.device)
        if total is not None:
            total = total.clamp_min(0)  # the Gram identity can round a zero norm below 0
        return total, uncalled

    def compiled_norms(self, rows: int, weights: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        """The recorder's unweighted norms in one compiled call (plain norm, CPU, one (b, in) call per
        layer, every weight trainable; see :func:`compiled_flat_grad_norms`); None otherwise."""
        if not self._all_weights:
            return None
        flat = self._flat_pairs(rows)
        if flat is None or flat[0][0].device.type != "cpu":
            return None
        if weights is not None and (weights.device.type != "cpu" or not weights.is_floating_point()):
            return None
        for t in (*flat[0], *flat[1]):
            if not t.is_contiguous():
                return None
        return compiled_flat_grad_norms(flat[0], flat[1], self._bias_array, weights, scale)

    def _flat_pairs(self, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """``(hs, deltas)`` when every layer ran once on a (rows, in) input, got its gradient, and
        all tensors share one float32 / float64 dtype and device; otherwise None."""
        hs, deltas = [], []
        dtype = device = None
        for calls in self.calls:
            if len(calls) != 1:
                return None
            call = calls[0]
            h, delta = call.h, call.delta
            if delta is None or h.dim() != 2 or delta.dim() != 2:
                return None
            if h.shape[0] != rows or delta.shape[0] != rows:
                return None
            if dtype is None:
                dtype, device = h.dtype, h.device
                if dtype not in (torch.float32, torch.float64):
                    return None
            if h.dtype != dtype or delta.dtype != dtype or h.device != device or delta.device != device:
                return None
            hs.append(h)
            deltas.append(delta)
        return hs, deltas


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of ``model`` (``""``) or its submodules that run through ``torch.compile``.

    Covers the wrapper returned by ``torch.compile(module)`` (it holds the original module as
    ``_orig_mod``) and modules compiled in place with ``module.compile()``.
    """
    out = []
    for name, module in model.named_modules():
        wrapped = type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), nn.Module
        )
        if wrapped or getattr(module, "_compiled_call_impl", None) is not None:
            out.append(name)
    return out


def compile_hint(owner: str) -> str:
    """What to do when the selected layers run inside a ``torch.compile`` graph."""
    return (
        f"{owner} reads each layer's input and output gradient through module forward hooks and tensor "
        "gradient hooks, which a torch.compile'd graph does not run. Record with the uncompiled model: "
        "build the recorder on the original module and run the recorded training steps with it "
        "(for m = torch.compile(model), that is model, also reachable as m._orig_mod; undo "
        "model.compile() by building the model again), or compile only submodules that contain no "
        "selected layer. Scorers without hooks (UpperBoundScorer, LossScorer) work with compiled models."
    )


def check_not_compiled(model: nn.Module, owner: str) -> None:
    """Raise a ``ValueError`` with :func:`compile_hint` when ``model`` runs through ``torch.compile``."""
    names = compiled_modules(model)
    if names:
        where = "the model" if names[0] == "" else f"submodule(s) {', '.join(repr(n) for n in names[:4])}"
        raise ValueError(f"{owner}: {where} is compiled with torch.compile. " + compile_hint(owner))


def warn_uncalled(owner: str, names: list[str], stacklevel: int) -> None:
    warnings.warn(
        f"{owner}: selected layer(s) {', '.join(repr(n) for n in names)} did not run their forward in this "
        "pass; their parameters count as zero. Weights used outside the module's own forward (for example "
        "nn.MultiheadAttention.out_proj) are not seen. This warning is shown once.",
        UserWarning,
        stacklevel=stacklevel,
    )


def warn_no_state(owner: str, optimizer: torch.optim.Optimizer, stacklevel: int) -> None:
    warnings.warn(
        f"{owner}: the {type(optimizer).__name__} optimizer has no state yet (no step taken), so its "
        "preconditioner is undefined; using the plain gradient norm until it has. This warning is shown "
        "once.",
        UserWarning,
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------------- recorder


class GradNormRecorder:
    """Per-example gradient norms of the ``nn.Linear`` layers from the training step's own backward.

    Inside :meth:`record` (or between :meth:`attach` and :meth:`detach`) forward hooks keep
    each selected layer's input ``h_i`` and gradient hooks catch its output gradient. For the
    loss ``L = (1/b) sum_i w_i l_i`` (``reduction="mean"``; ``sum_i w_i l_i`` for ``"sum"``)
    the backward gives rows ``delta_i = (w_i / b) d l_i / d z_i``; every term of the squared
    norm is quadratic in ``delta``, so the factor ``|w_i| / b`` is divided out and the result
    is the unweighted per-example norm:

    .. math::

        \\|D g_i\\|^2 = \\frac{b^2}{w_i^2} \\sum_{\\text{layers}}
            \\Big\\| D_W \\odot \\sum_t \\delta_{it} h_{it}^\\top \\Big\\|_F^2
            + \\Big\\| D_c \\odot \\sum_t \\delta_{it} \\Big\\|_2^2 ,

    with ``D`` the identity for ``optimizer=None`` or SGD and
    ``D = diag(1 / (sqrt(v_hat) + eps))`` for Adam, AdamW, RMSprop (and Adagrad). For an MLP
    made of linear layers this is the exact norm of the full per-example gradient.

    ``D`` is read when :meth:`record` is entered, i.e. the optimizer state before this
    step's ``opt.step()``: the state under which the backward pass happens, the same one
    :class:`isample.LinearGradNormScorer` sees on this batch. Before the optimizer's first
    step the plain norm is returned, with a one-time ``UserWarning``.

    Hooks exist only inside the block, so the model runs at full speed otherwise; they are
    removed on exit, also when the block raises. The recorder adds no forward or backward
    pass: its cost is keeping ``delta`` (``b x out`` floats per layer) and one product of
    the size of the layer's weight gradient (see ``docs/methods/optimizer-aware.md``). In
    the common case (plain norm, CPU, one ``(b, in)`` call per layer, every weight trained)
    the norms over all layers, the division by the weights included, are one compiled call
    when numba is installed (:func:`isample._linear_norms.compiled_flat_grad_norms`), else
    a handful of torch ops (:func:`isample._linear_norms.stacked_flat_sq_grad_norms`).

    Args:
        model: the model being trained.
        layers: the ``nn.Linear`` layers (modules or names) to cover; default every
            ``nn.Linear`` except those inside ``nn.MultiheadAttention``. Parameters with
            ``requires_grad=False`` are excluded; other parameter kinds are not covered.
        optimizer: None or SGD (plain norm), Adam, AdamW, RMSprop or Adagrad (norm of ``D g_i``).
        max_elements: chunk bound (floats) when per-example gradients must be materialised
            (inputs with a sequence dimension and an adaptive optimizer).

    Weights of 0 leave no trace in the gradient: their norm is NaN (samplers skip NaN scores).
    The block must contain one forward and its backward; the recorded batch must be batch-first.

    ``torch.compile``: compiled graphs skip the hooks the recorder needs, so a compiled model
    (``torch.compile(model)`` or ``model.compile()``, also on a submodule) is refused with a
    ``ValueError`` that says what to do: build the recorder on the uncompiled module and run
    the recorded steps with it.

    Example:
        >>> recorder = GradNormRecorder(model, optimizer=opt)
        >>> with recorder.record(batch.weights):
        ...     losses = loss_fn(model(batch.inputs), batch.targets)
        ...     (batch.weights * losses).mean().backward()
        >>> norms = recorder.norms()  # Tensor of shape (b,)
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
        self.model = model
        self.layers = check_layers_arg(layers, owner)
        self.optimizer = check_optimizer_arg(optimizer, owner)
        self.max_elements = check_int(max_elements, "max_elements", owner, minimum=1)
        check_not_compiled(model, owner)
        self._infos = resolve_layers(model, self.layers, owner)
        check_managed(self.optimizer, self._infos, owner)
        self._capture: LinearCapture | None = None
        self._capture_obj = LinearCapture(self._infos)  # reused by every recorded step
        self._identity = is_identity_geometry(self.optimizer)
        self._scales: Scales | None = None
        self._weights: torch.Tensor | None = None
        self._reduction = "mean"
        self._norms: torch.Tensor | None = None
        self._warned_state = False
        self._warned_uncalled = False

    @property
    def recording(self) -> bool:
        """Whether hooks are attached right now."""
        return self._capture is not None

    def attach(self, weights: torch.Tensor | None = None, reduction: str = "mean") -> GradNormRecorder:
        """Register the hooks and read the preconditioner; prefer :meth:`record`.

        Args:
            weights: Tensor of shape (b,) multiplying the per-example losses, or None (all 1).
            reduction: ``"mean"`` for ``(w * losses).mean()``, ``"sum"`` for ``(w * losses).sum()``.
        """
        return self._attach(weights, reduction, stacklevel=5)

    def _attach(self, weights: torch.Tensor | None, reduction: str, stacklevel: int) -> GradNormRecorder:
        if self._capture is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already recording; call detach() (or leave record()) first."
            )
        if reduction != "mean" and reduction != "sum":
            check_choice(reduction, "reduction", type(self).__name__, _REDUCTIONS)
        if weights is not None:
            if not isinstance(weights, torch.Tensor):
                raise param_error(
                    "weights", type(self).__name__, "a Tensor of shape (b,) or None", weights, TypeError
                )
            if weights.dim() != 1:
                raise param_error(
                    "weights", type(self).__name__, "a Tensor of shape (b,) or None", tuple(weights.shape)
                )
            if weights.requires_grad:
                weights = weights.detach()
        self._norms = None
        self._weights = weights
        self._reduction = reduction
        self._scales = None if self._identity else self._read_scales(stacklevel)
        capture = self._capture_obj
        capture.start()
        self._capture = capture
        return self

    def detach(self) -> torch.Tensor:
        """Remove the hooks and compute the norms of the recorded step; returns :meth:`norms`.

        Raises:
            RuntimeError: not recording, or no forward / backward of a selected layer happened.
        """
        return self._detach(stacklevel=4)

    def _detach(self, stacklevel: int) -> torch.Tensor:
        owner = type(self).__name__
        capture = self._capture
        if capture is None:
            raise RuntimeError(f"{owner} is not recording; call attach() or use record().")
        capture.stop()
        self._capture = None
        try:
            rows = capture.rows()
            if rows is None:
                check_not_compiled(self.model, owner)  # compiled after construction: say so
                raise RuntimeError(
                    f"{owner}: no selected layer ran a forward pass with gradients enabled inside record(). "
                    "Run the model's forward and backward inside the with-block, with gradients enabled. "
                    "If the step calls a torch.compile'd version of the model: " + compile_hint(owner)
                )
            if not capture.received_gradients():
                raise RuntimeError(
                    f"{owner}: no gradient reached the selected layers inside record(); call loss.backward() "
                    "inside the with-block."
                )
            if self._weights is not None and self._weights.shape[0] != rows:
                raise ValueError(
                    f"The 'weights' parameter of {owner} has {self._weights.shape[0]} entries but the "
                    f"recorded batch has {rows} rows."
                )
            scale = float(rows) if self._reduction == "mean" else 1.0
            norms = None if self._scales is not None else capture.compiled_norms(rows, self._weights, scale)
            if norms is None:
                sq, uncalled = capture.squared_norms(rows, self._scales, owner, self.max_elements)
                if uncalled and not self._warned_uncalled:
                    self._warned_uncalled = True
                    warn_uncalled(owner, uncalled, stacklevel=stacklevel)
                norms = _unweighted_norms(sq, self._weights, self._reduction, rows)
            self._norms = norms
        finally:
            self._scales = None
            self._weights = None
            capture.calls = []  # the step's tensors are not kept until the next one
        return self._norms

    def _abandon(self) -> None:
        """Leave a failed block: remove the hooks and forget the step (no norms)."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.stop()
            capture.calls = []
        self._scales = None
        self._weights = None

    def record(self, weights: torch.Tensor | None = None, reduction: str = "mean") -> _Recording:
        """Context manager around one training step's forward and backward.

        Args:
            weights: Tensor of shape (b,) multiplying the per-example losses in the loss, or
                None (unweighted).
            reduction: ``"mean"`` (loss ``(w * losses).mean()``, factor ``w_i / b``) or
                ``"sum"`` (loss ``(w * losses).sum()``, factor ``w_i``).

        Returns:
            A context manager yielding the recorder; after the block :meth:`norms` holds the
            batch's norms. (A small class rather than ``contextlib.contextmanager``: it runs
            every training step.)
        """
        return _Recording(self, weights, reduction)

    def norms(self) -> torch.Tensor:
        """Per-example gradient norms of the last recorded step: float32 Tensor of shape (b,).

        Unweighted (``||D grad l_i||`` in gradient units), on the model's device, no grad;
        NaN where the weight was 0.

        Raises:
            RuntimeError: no step has been recorded yet (or the last one failed).
        """
        if self._norms is None:
            raise RuntimeError(f"{type(self).__name__} has no norms yet: record a training step first.")
        return self._norms

    def _read_scales(self, stacklevel: int) -> Scales | None:
        try:
            return read_scales(self.optimizer, self._infos)
        except NoOptimizerStateError:
            if not self._warned_state:
                self._warned_state = True
                warn_no_state(type(self).__name__, self.optimizer, stacklevel=stacklevel)
            return None

    def __repr__(self) -> str:
        names = [info.name for info in self._infos]
        optimizer = None if self.optimizer is None else type(self.optimizer).__name__
        return f"{type(self).__name__}(layers={names}, optimizer={optimizer})"


class _Recording:
    """The context manager returned by :meth:`GradNormRecorder.record`."""

    __slots__ = ("recorder", "weights", "reduction")

    def __init__(self, recorder: GradNormRecorder, weights: torch.Tensor | None, reduction: str) -> None:
        self.recorder = recorder
        self.weights = weights
        self.reduction = reduction

    def __enter__(self) -> GradNormRecorder:
        # stack levels: warnings.warn <- warn_no_state <- _read_scales <- _attach <- here <- user
        return self.recorder._attach(self.weights, self.reduction, stacklevel=5)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.recorder._abandon()
            return
        self.recorder._detach(stacklevel=4)


def _unweighted_norms(
    sq: torch.Tensor, weights: torch.Tensor | None, reduction: str, rows: int
) -> torch.Tensor:
    """``sqrt(sq) / |factor|`` with ``factor = w_i / b`` (mean) or ``w_i`` (sum); NaN where it is 0.

    ``sq`` (>= 0) on the CPU goes through NumPy: for a batch of scores a NumPy ufunc costs a
    fraction of a torch op's dispatch, and this runs every training step.
    """
    scale = float(rows) if reduction == "mean" else 1.0
    if sq.device.type == "cpu":
        norms = np.sqrt(sq.numpy())
        if weights is not None:
            factor = np.abs(weights.cpu().numpy().astype(norms.dtype, copy=False))
            factor[factor == 0] = np.nan  # x / NaN is NaN, without the divide-by-zero warning
            norms /= factor
        if scale != 1.0:
            norms *= scale
        return torch.from_numpy(norms.astype(np.float32, copy=False))
    norms = sq.sqrt()
    if weights is not None:
        factor = weights.to(device=norms.device, dtype=norms.dtype).abs()
        norms.div_(factor).masked_fill_(factor == 0, float("nan"))
    if scale != 1.0:
        norms.mul_(scale)
    return norms.to(torch.float32)
