"""Exact (and optimizer-aware) per-example gradient norms of ``nn.Linear`` layers, batched.

:class:`LinearGradNormScorer` runs one batched forward and one batched backward pass and
returns, for every example, the exact norm of its gradient over the parameters of the
selected linear layers; with an adaptive optimizer, the norm of the preconditioned step
``D g_i`` whose noise Adam and RMSprop actually feel. See
``docs/methods/optimizer-aware.md`` for the derivation and costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._linear_norms import DEFAULT_MAX_ELEMENTS
from ._model_io import ForwardHook, LogitsHook
from ._validation import check_int
from .preconditioner import NoOptimizerStateError
from .recorder import (
    LayerSpec,
    LinearCapture,
    Scales,
    check_layers_arg,
    check_managed,
    check_not_compiled,
    check_optimizer_arg,
    read_scales,
    resolve_layers,
    warn_no_state,
    warn_uncalled,
)
from .scorers import LossFn, Scorer, per_example_losses

__all__ = ["LinearGradNormScorer"]


class LinearGradNormScorer(Scorer):
    """Score = the exact per-example gradient norm over the ``nn.Linear`` layers, optionally preconditioned.

    Forward hooks keep each selected layer's input ``h_i``; one backward pass of
    ``sum_i l_i`` (taken with ``torch.autograd.grad`` towards the layer outputs, so no
    parameter's ``.grad`` changes) gives the output gradients ``delta_i = d l_i / d z_i``,
    row by row since examples are independent. Then, per layer,

    .. math::

        \\|g_i\\|^2 = \\sum_{\\text{layers}} \\|h_i\\|^2 \\|\\delta_i\\|^2 + \\|\\delta_i\\|^2
        \\qquad\\text{and}\\qquad
        \\|D g_i\\|^2 = \\sum_{\\text{layers}} (\\delta_i^2)^\\top D_W^2 \\, (h_i^2)
                        + (\\delta_i^2)^\\top D_c^2 ,

    with ``D = diag(1 / (sqrt(v_hat) + eps))`` read from the optimizer
    (:func:`isample.preconditioner.preconditioner_diagonal`). Inputs with extra dimensions
    (sequences, shape (b, T, in)) are exact too: the weight gradient is
    ``sum_t delta_t h_t^T``, whose squared norm comes from the two (T, T) Gram matrices
    ``sum_{t,s} (delta_t . delta_s)(h_t . h_s)`` when ``T (in + out) <= in * out`` and from the
    materialised per-example gradient (in chunks) otherwise or with a preconditioner. A
    layer called several times in one forward is handled as one longer sequence.

    For an MLP made only of linear layers and parameter-free activations the result is the
    exact norm of the full per-example gradient, at the cost of one forward and one
    backward pass (``GradNormScorer`` costs about one backward per example).

    Before an adaptive optimizer has taken its first step it has no ``v_hat``: the scorer
    then returns the plain norm and warns once (``UserWarning``).

    Args:
        loss_fn: ``(outputs, targets) -> losses`` of shape (b,) (``reduction="none"``).
        layers: the ``nn.Linear`` layers to cover, as modules or names of submodules of the
            scored model; default every ``nn.Linear`` except those inside
            ``nn.MultiheadAttention``. Parameters with ``requires_grad=False`` are excluded;
            parameters of other module kinds are never covered.
        optimizer: None or SGD (identity geometry: the plain norm), Adam, AdamW, RMSprop
            (or Adagrad): the norm of ``D g_i``.
        max_elements: chunk bound (floats) for materialised per-example gradients.
        forward, logits: how the model is called and its logits read (see :class:`isample.Scorer`:
            dict inputs as ``model(**inputs)``, the ``.logits`` / ``"logits"`` / element-0 rule).

    References:
        Goodfellow, "Efficient Per-Example Gradient Computations", arXiv:1510.01799 (2015);
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942) for gradient-norm sampling.

    Example:
        >>> scorer = LinearGradNormScorer(nn.CrossEntropyLoss(reduction="none"), optimizer=opt)
        >>> scores = scorer(model, x, y)  # Tensor of shape (b,): ||D g_i||
    """

    name = "linear_grad_norm"
    extra_backward = True

    def __init__(
        self,
        loss_fn: LossFn,
        layers: LayerSpec = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        *,
        forward: ForwardHook | None = None,
        logits: LogitsHook | None = None,
    ) -> None:
        super().__init__(loss_fn, forward=forward, logits=logits)
        owner = type(self).__name__
        self.layers = check_layers_arg(layers, owner)
        self.optimizer = check_optimizer_arg(optimizer, owner)
        self.max_elements = check_int(max_elements, "max_elements", owner, minimum=1)
        self._warned_state = False
        self._warned_uncalled = False

    def score(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        owner = type(self).__name__
        infos = resolve_layers(model, self.layers, owner)
        check_managed(self.optimizer, infos, owner)
        scales = self._read_scales(infos)
        capture = LinearCapture(infos, keep_outputs=True)
        capture.start()
        try:
            with torch.enable_grad():
                outputs = self.model_call(model, inputs)
                losses = per_example_losses(self.loss_fn, outputs, targets, owner)
                grad_targets = capture.grad_targets()
                if grad_targets and losses.requires_grad:
                    torch.autograd.grad(losses.sum(), grad_targets, allow_unused=True)
        finally:
            capture.stop()
        rows = int(losses.shape[0])
        if capture.rows() is None:  # no hook fired: a compiled model (hooks skipped) is the known cause
            check_not_compiled(model, owner)
        sq, uncalled = capture.squared_norms(rows, scales, owner, self.max_elements)
        if uncalled and not self._warned_uncalled:
            self._warned_uncalled = True
            warn_uncalled(owner, uncalled, stacklevel=4)
        if sq is None:
            return torch.zeros(rows, device=losses.device)
        return sq.clamp_min(0).sqrt()

    def _read_scales(self, infos: list) -> Scales | None:
        try:
            return read_scales(self.optimizer, infos)
        except NoOptimizerStateError:
            if not self._warned_state:
                self._warned_state = True
                warn_no_state(type(self).__name__, self.optimizer, stacklevel=5)
            return None

    def __repr__(self) -> str:
        optimizer = None if self.optimizer is None else type(self.optimizer).__name__
        return f"{type(self).__name__}({self.loss_fn!r}, layers={self.layers!r}, optimizer={optimizer})"
