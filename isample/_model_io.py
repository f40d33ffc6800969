"""One convention for calling a model on a batch and reading its logits.

Every scorer, the per-example metrics and the loaders' start-up check call the model
through :class:`ModelCall`, so a model that works with one works with all of them:

* **Calling.** ``Mapping`` inputs (a dict batch, e.g. a Hugging Face tokenizer's output
  without its labels) are passed as keyword arguments, ``model(**inputs)``; anything else
  as one positional argument, ``model(inputs)``. ``forward=`` replaces both: a callable
  ``forward(model, inputs) -> outputs``.
* **Reading.** The outputs handed to the loss function are the *logits*: a tensor output
  as it is; an object with a ``.logits`` attribute (a Hugging Face ``ModelOutput``, a
  dataclass, a named tuple with a ``logits`` field) gives that attribute; a ``Mapping``
  gives its ``"logits"`` entry; a tuple or list gives its first element. ``logits=``
  replaces this rule: a key (str) of a mapping output or an attribute name, an index (int)
  into a tuple or list output, or a callable ``logits(outputs) -> logits`` (whose result is
  passed to the loss function as it is, tensor or not; ``logits=lambda out: out`` hands the
  loss function the raw outputs).

An output that none of these rules can read raises a ``TypeError`` that names both hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._validation import param_error

__all__ = [
    "ModelCall",
    "DEFAULT_MODEL_CALL",
    "model_call_of",
    "call_model",
    "CalledModel",
    "per_example_error",
]

ForwardHook = Callable[[nn.Module, Any], Any]
LogitsHook = Callable[[Any], Any] | str | int

#: The key (or attribute) read from a mapping (or object) output when no ``logits=`` is given.
LOGITS_KEY = "logits"


class ModelCall:
    """How to call a model on a batch and which part of its output is the logits.

    Args:
        forward: None (default: ``model(**inputs)`` for a ``Mapping``, ``model(inputs)``
            otherwise) or a callable ``forward(model, inputs) -> outputs``.
        logits: None (default rule: tensor as is, ``.logits`` attribute, ``"logits"`` key,
            element 0 of a tuple or list), a str (key of a mapping output, else attribute
            name), an int (index into a tuple or list output) or a callable
            ``logits(outputs) -> logits``.
        owner: the class named in error messages.

    Calling the object, ``model_call(model, inputs)``, runs the model and returns the logits.
    It adds nothing to the model's own cost: a type check or two per call.

    Example:
        >>> call = ModelCall(logits="start_logits")
        >>> logits = call(model, {"input_ids": ids, "attention_mask": mask})
    """

    __slots__ = ("forward", "logits", "owner")

    def __init__(
        self, forward: ForwardHook | None = None, logits: LogitsHook | None = None, owner: str = "ModelCall"
    ) -> None:
        if forward is not None and not callable(forward):
            raise param_error(
                "forward", owner, "None or a callable (model, inputs) -> outputs", forward, TypeError
            )
        if logits is not None and (isinstance(logits, bool) or not isinstance(logits, (str, int))):
            if not callable(logits):
                raise param_error(
                    "logits",
                    owner,
                    "None, a key (str), an index (int) or a callable outputs -> logits",
                    logits,
                    TypeError,
                )
        self.forward = forward
        self.logits = logits
        self.owner = owner

    @property
    def is_default(self) -> bool:
        """Whether both hooks are unset (the default convention)."""
        return self.forward is None and self.logits is None

    def run(self, model: nn.Module, inputs: Any) -> Any:
        """Call the model on ``inputs``: the raw outputs, before the logits are read."""
        if self.forward is not None:
            return self.forward(model, inputs)
        if isinstance(inputs, Mapping):
            try:
                return model(**inputs)
            except TypeError as exc:
                if "argument" not in str(exc):
                    raise
                raise TypeError(
                    f"{exc}. {self.owner} calls a model on dict inputs as model(**inputs) (keys "
                    f"{list(inputs)[:8]}); for a model that takes the dict as one argument, pass "
                    f"forward=lambda model, inputs: model(inputs) to {self.owner}."
                ) from exc
        return model(inputs)

    def __call__(self, model: nn.Module, inputs: Any) -> Any:
        """Run the model and return the logits (see :meth:`read`)."""
        return self.read(self.run(model, inputs))

    def read(self, outputs: Any) -> Any:
        """The logits in ``outputs``, by the ``logits=`` hook or the default rule.

        Raises:
            TypeError: the default rule found no tensor, or the hook does not fit the output.
        """
        if isinstance(outputs, torch.Tensor) and self.logits is None:
            return outputs
        hook = self.logits
        if hook is None:
            found = _default_logits(outputs)
            if not isinstance(found, torch.Tensor):
                raise TypeError(
                    f"{self.owner} cannot read the logits from a model output of type {_kind(outputs)}: "
                    f"expected a tensor, an object with a '.logits' tensor, a mapping with a 'logits' "
                    f"tensor, or a tuple/list whose first element is a tensor. Pass logits= (a key, an "
                    f"index or a callable outputs -> logits) or forward= (a callable (model, inputs) -> "
                    f"outputs) to {self.owner}."
                )
            return found
        if callable(hook) and not isinstance(hook, (str, int)):
            return hook(outputs)
        try:
            if isinstance(hook, str):
                if isinstance(outputs, Mapping):
                    return outputs[hook]
                return getattr(outputs, hook)
            if isinstance(outputs, Mapping):
                raise TypeError("an index into a mapping")
            return outputs[hook]
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise TypeError(
                f"The 'logits' hook of {self.owner} ({hook!r}) cannot read a model output of type "
                f"{_kind(outputs)} ({type(exc).__name__}: {exc}). Pass logits= as a key of the output "
                "mapping, an attribute name, an index into the output tuple, or a callable outputs -> logits."
            ) from None

    def __repr__(self) -> str:
        return f"ModelCall(forward={self.forward!r}, logits={self.logits!r})"


def _default_logits(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, LOGITS_KEY, None)  # ModelOutput, dataclasses, named tuples
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping):
        return outputs.get(LOGITS_KEY)
    if isinstance(outputs, (tuple, list)) and len(outputs):
        return outputs[0]
    return None


def _kind(outputs: Any) -> str:
    kind = type(outputs).__name__
    if isinstance(outputs, Mapping):
        keys = list(outputs)[:8]
        return f"{kind} with keys {keys}"
    if isinstance(outputs, (tuple, list)):
        return f"{kind} of {len(outputs)} element(s)"
    return kind


#: The default convention (no hooks).
DEFAULT_MODEL_CALL = ModelCall()


def model_call_of(obj: Any) -> ModelCall:
    """The :class:`ModelCall` of a scorer (its ``model_call`` attribute), else the default convention."""
    call = getattr(obj, "model_call", None)
    return call if isinstance(call, ModelCall) else DEFAULT_MODEL_CALL


def call_model(
    model: nn.Module, inputs: Any, forward: ForwardHook | None = None, logits: LogitsHook | None = None
) -> Any:
    """Call ``model`` on ``inputs`` by the convention of this module and return the logits."""
    if forward is None and logits is None:
        return DEFAULT_MODEL_CALL(model, inputs)
    return ModelCall(forward, logits, owner="call_model")(model, inputs)


class CalledModel(nn.Module):
    """``model`` behind a :class:`ModelCall`: ``CalledModel(model, call)(inputs) == call(model, inputs)``.

    For ``torch.func.functional_call``, which calls a module with positional arguments: the
    wrapped model's parameters and buffers are named ``"model." + name``.
    """

    def __init__(self, model: nn.Module, call: ModelCall) -> None:
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, inputs: Any) -> Any:
        return self.call(self.model, inputs)


_NESTED_TENSOR_OPS = ("_nested_tensor_from_mask", "_nested_tensor_from_tensor_list", "nested_tensor")


def per_example_error(exc: RuntimeError, owner: str) -> RuntimeError | None:
    """A clearer error for a ``torch.func`` (``vmap``) failure with a known cause, or None.

    ``nn.TransformerEncoder`` (with ``enable_nested_tensor=True``, the default) turns a
    padding mask into a nested tensor in eval mode, which ``vmap`` cannot batch.
    """
    text = str(exc)
    if "Batching rule not implemented" in text and any(op in text for op in _NESTED_TENSOR_OPS):
        return RuntimeError(
            f"{owner} computes per-example gradients with torch.func.vmap, which cannot batch nested "
            f"tensors ({text.splitlines()[0]}). nn.TransformerEncoder builds one from a padding mask in "
            "eval mode: construct it with nn.TransformerEncoder(..., enable_nested_tensor=False) (same "
            "results, no nested tensors), or score with UpperBoundScorer / LinearGradNormScorer instead."
        )
    return None
