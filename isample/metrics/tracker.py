"""``SamplerQuality``: measure candidate samplers against exact gradients during training.

The tracker is thin: every ``every`` steps it computes exact per-example gradients on a
fixed probe subset (:func:`per_example_gradients`) and hands them to the pure functions
(:func:`quality`, :func:`tau`, :func:`effective_sample_size`, the preconditioned variants).
It has the torchmetrics shape (``update`` / ``compute`` / ``reset`` / ``state_dict`` /
``load_state_dict``) without depending on torchmetrics.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._validation import check_int, param_error
from ..batch import batch_size_of
from ..preconditioner import NoOptimizerStateError, is_identity_geometry
from ..weighting import weights_array
from .functional import bias, effective_sample_size, quality, tau
from .optimizer import flat_preconditioner
from .per_example import per_example_gradients, select_parameters

__all__ = ["SamplerQuality"]

Candidate = Callable[[nn.Module, Any, Any], torch.Tensor]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else math.nan


def _finite_or_text(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class SamplerQuality:
    """Time series of kappa, Q_lin, Q_log of candidate samplers on a fixed probe set.

    Every ``every`` steps of a real training run, :meth:`update` computes the exact
    per-example gradients ``G`` (shape (n, P)) of the probe and, for each candidate
    sampler p (a scorer's ``scores / sum(scores)``, or a probability function's output),
    appends one row per geometry with:

    ``step``, ``candidate``, ``geometry`` (``"identity"``, or the optimizer's class name
    in lower case for Adam/AdamW/RMSprop/Adagrad), ``kappa``, ``kappa_opt``, ``q_lin``,
    ``q_log``, ``v_p``, ``v_u``, ``v_opt``, ``degenerate`` (see :class:`Quality`),
    ``corr_grad_norm`` (Pearson correlation of the candidate's scores, or probabilities,
    with the exact gradient norms ``||g_i||``, or ``||D g_i||`` in the optimizer geometry),
    ``tau2`` (``tau(scores)**2``, the scorer's own estimate of kappa; ``None`` for
    probability candidates), ``ess`` (normalised Kish ESS of the weights ``1/(n p_i)``
    under p, a stability diagnostic), ``max_weight`` (``max_i 1/(n p_i)``), ``zero_p``
    (how many probe examples have ``p_i = 0`` but a non-zero gradient: such a sampler never
    draws them, so its variance is ``inf`` and kappa 0 by convention) and ``bias`` (the norm
    of the resulting bias of the unbiased-weight estimate, :func:`bias`; 0 when ``zero_p = 0``).

    The optimizer geometry (``D g`` with ``D`` from the optimizer's state) is added when
    an adaptive optimizer is given; at an update before its first step (empty state)
    only identity rows are written. SGD is the identity geometry.

    Args:
        inputs: probe inputs (a tensor or nested tensors with n rows), kept fixed.
        targets: probe targets with n rows (or ``None``).
        loss_fn: ``(outputs, targets) -> per-example losses`` (``reduction="none"``).
        scorers: named scorers ``scorer(model, inputs, targets) -> Tensor[n]`` (>= 0).
        probabilities: named functions ``f(model, inputs, targets) -> Tensor[n]`` summing to 1.
        optimizer: optional optimizer, for its geometry (default None: identity only).
        every: measure when ``step % every == 0`` (>= 1, default 100).
        chunk_size: per-example gradient chunk size (default 64).
        params: optional parameter subset (names or tensors); see :func:`per_example_gradients`.

    Example:
        >>> tracker = SamplerQuality(x_probe, y_probe, nn.CrossEntropyLoss(reduction="none"),
        ...                          scorers={"loss": LossScorer(ce)}, optimizer=opt, every=50)
        >>> for step, batch in enumerate(loader):
        ...     tracker.update(model, step)
        ...     ...
        >>> rows = tracker.compute()  # list of dicts
    """

    STATE_KEYS = ("every", "rows")

    def __init__(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        scorers: Mapping[str, Candidate] | None = None,
        probabilities: Mapping[str, Candidate] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 100,
        chunk_size: int = 64,
        params: Iterable[nn.Parameter | str] | None = None,
    ) -> None:
        owner = "SamplerQuality"
        if not callable(loss_fn):
            raise param_error(
                "loss_fn", owner, "a callable (outputs, targets) -> per-example losses", loss_fn, TypeError
            )
        self.num_probe = batch_size_of(inputs)
        if self.num_probe < 2:
            raise param_error("inputs", owner, "a probe set of at least 2 examples", self.num_probe)
        if targets is not None and batch_size_of(targets) != self.num_probe:
            raise ValueError(
                f"The 'targets' parameter of {owner} must have {self.num_probe} rows like inputs. "
                f"Got {batch_size_of(targets)}."
            )
        self.candidates: dict[str, tuple[str, Candidate]] = {}
        for kind, group in (("scores", scorers), ("probabilities", probabilities)):
            if group is None:
                continue
            if not isinstance(group, Mapping):
                raise param_error(
                    kind if kind == "probabilities" else "scorers",
                    owner,
                    "a mapping name -> callable",
                    group,
                    TypeError,
                )
            for name, fn in group.items():
                if not isinstance(name, str) or not callable(fn):
                    raise TypeError(
                        f"{owner} candidates must map str names to callables; got {name!r}: {fn!r}."
                    )
                if name in self.candidates:
                    raise ValueError(f"{owner} got the candidate name {name!r} twice.")
                self.candidates[name] = (kind, fn)
        if not self.candidates:
            raise ValueError(f"{owner} needs at least one candidate in 'scorers' or 'probabilities'.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise param_error("optimizer", owner, "a torch.optim.Optimizer or None", optimizer, TypeError)
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.every = check_int(every, "every", owner, minimum=1)
        self.chunk_size = check_int(chunk_size, "chunk_size", owner, minimum=1)
        self.params = list(params) if params is not None else None
        self._rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ torchmetrics shape

    def update(self, model: nn.Module, step: int) -> list[dict[str, Any]] | None:
        """Measure when ``step % every == 0``; return the new rows, or ``None`` (no work done)."""
        step = check_int(step, "step", "SamplerQuality.update", minimum=0)
        if step % self.every:
            return None
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """Measure now, whatever the step, append and return the new rows."""
        chosen = select_parameters(model, self.params, "SamplerQuality")
        G = per_example_gradients(
            model, self.loss_fn, self.inputs, self.targets, self.chunk_size, [v for _, v in chosen]
        ).to("cpu", torch.float64)
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"SamplerQuality found non-finite per-example gradients at step {step}.")
        geometries = [("identity", G)]
        if not is_identity_geometry(self.optimizer):
            try:
                d = flat_preconditioner(self.optimizer, [v for _, v in chosen])
                geometries.append((type(self.optimizer).__name__.lower(), G * d))
            except NoOptimizerStateError:
                pass
        new_rows = []
        for name, (kind, fn) in self.candidates.items():
            values = fn(model, self.inputs, self.targets)
            if not isinstance(values, torch.Tensor) or values.shape != (self.num_probe,):
                raise ValueError(
                    f"Candidate {name!r} of SamplerQuality must return a Tensor of shape "
                    f"({self.num_probe},); "
                    f"got {getattr(values, 'shape', type(values).__name__)}."
                )
            values = values.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                raise ValueError(
                    f"Candidate {name!r} of SamplerQuality returned negative or non-finite values."
                )
            total = float(values.sum())
            if total <= 0:
                raise ValueError(f"Candidate {name!r} of SamplerQuality returned all-zero values.")
            p = values / total
            support = p > 0
            w = torch.zeros_like(p)  # weights of the examples the candidate can draw (the one formula)
            w[support] = weights_array(p[support], self.num_probe, 1.0, None, "none")
            diag = {
                "tau2": tau(values) ** 2 if kind == "scores" else None,
                "ess": effective_sample_size(w, p),
                "max_weight": float(w.max()),
            }
            for geometry, grads in geometries:
                norms = grads.norm(dim=1)
                q = quality(grads, p)
                row = {"step": step, "candidate": name, "geometry": geometry}
                row.update(q.as_dict())
                row["corr_grad_norm"] = _pearson(values, norms)
                row["zero_p"] = int(((~support) & (norms > 0)).sum())
                row["bias"] = bias(grads, p)
                row.update(diag)
                new_rows.append(row)
        self._rows.extend(new_rows)
        return copy.deepcopy(new_rows)

    def compute(self) -> list[dict[str, Any]]:
        """All rows so far (a copy): a list of dicts of Python scalars and strings."""
        return copy.deepcopy(self._rows)

    def to_json(self, indent: int | None = None) -> str:
        """The rows as strict JSON text; non-finite floats are written as "inf", "-inf", "nan"."""
        rows = [{k: _finite_or_text(v) for k, v in row.items()} for row in self._rows]
        return json.dumps(rows, indent=indent, allow_nan=False)

    def reset(self) -> None:
        """Forget every row."""
        self._rows = []

    def state_dict(self) -> dict[str, Any]:
        """``{"every": int, "rows": list of dicts}`` (the configuration is not saved)."""
        return {"every": self.every, "rows": copy.deepcopy(self._rows)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the rows saved by :meth:`state_dict` (``every`` must match)."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(self.STATE_KEYS):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(
                f"SamplerQuality.load_state_dict expects the keys {list(self.STATE_KEYS)}; got {got}."
            )
        if state_dict["every"] != self.every:
            raise ValueError(
                f"SamplerQuality.load_state_dict: saved every={state_dict['every']!r} differs from this "
                f"tracker's every={self.every}."
            )
        rows = state_dict["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise ValueError("SamplerQuality.load_state_dict: 'rows' must be a list of dicts.")
        self._rows = [dict(r) for r in copy.deepcopy(rows)]

    def __repr__(self) -> str:
        return (
            f"SamplerQuality(num_probe={self.num_probe}, candidates={list(self.candidates)}, "
            f"every={self.every}, rows={len(self._rows)})"
        )
