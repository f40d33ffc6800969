"""Scheme objects: a sampling scheme as a small value (its registry name and its own hyperparameters).

::

    import isample
    from isample.schemes import HistoryIS

    loader = isample.DataLoader(train_set, batch_size=64, scheme=HistoryIS(mixing=0.2),
                                model=model, loss_fn=loss_fn, num_workers=2)

A scheme object holds no data and no state: :class:`isample.DataLoader` (or
:meth:`Scheme.build`) turns it into the scheme's loader for a dataset and a model. The
torch DataLoader options and the loader-level options (``drop_last``, ``num_batches``,
``scoring_batch_size``) are not scheme parameters: pass them to the DataLoader. The
loader classes themselves stay where they were (``isample.schemes.history_is.HistoryIS``
is the loader; :func:`isample.schemes.scheme_class` returns it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .._options import LOADER_OPTIONS
from .base import SchemeLoader
from .registry import LOADER_LEVEL, build, describe, scheme_class, scheme_parameters

__all__ = [
    "scheme_object",
    "Auto",
    "HistoryGradNorm",
    "HistoryIS",
    "InfoBatch",
    "KatharopoulosFleuret",
    "LaBER",
    "OnlineBatchSelection",
    "PoolLinearGradNorm",
    "RhoLoss",
    "Scheme",
    "SelectiveBackprop",
    "Uniform",
]


class Scheme:
    """Base class of the scheme objects: a registry ``name`` and the scheme's own parameters.

    Subclasses list their parameters (at most ten each) with the defaults of the paper
    (the same as the loader's; a test keeps them equal).

    Attributes:
        name: the registry name (see :func:`isample.schemes.available`).
        params: dict of every parameter of the scheme and its value.
    """

    name: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        if not self.name:
            raise TypeError("Scheme is a base class; use a scheme object such as isample.schemes.HistoryIS.")
        owner = type(self).__name__
        for key in params:  # subclasses list their parameters; this guards direct subclassing mistakes
            if key in LOADER_OPTIONS or key in LOADER_LEVEL:
                raise TypeError(
                    f"{key!r} is a loader option, not a parameter of the scheme {owner}: pass it to "
                    f"isample.DataLoader(..., {key}=...)."
                )
        self.params = dict(params)

    @property
    def loader_class(self) -> type[SchemeLoader]:
        """The loader class this scheme builds (imports its module)."""
        return scheme_class(self.name)

    def changed(self) -> dict[str, Any]:
        """The parameters whose value differs from the default."""
        defaults = {k: p.default for k, p in inspect.signature(type(self)).parameters.items()}
        return {k: v for k, v in self.params.items() if k not in defaults or not _same(v, defaults[k])}

    def describe(self) -> dict[str, Any]:
        """:func:`isample.schemes.describe` of the scheme, with ``params`` (this object's values)."""
        return {**describe(self.name), "params": dict(self.params)}

    def build(
        self,
        dataset: Dataset,
        model: nn.Module | None,
        loss_fn: Callable | None,
        batch_size: int,
        *,
        seed: int = 0,
        epochs: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **loader_options: Any,
    ) -> SchemeLoader:
        """The scheme's loader for ``dataset`` (see :func:`isample.schemes.build`).

        Returns:
            A :class:`isample.schemes.SchemeLoader`.
        """
        return build(
            self.name,
            dataset,
            model,  # type: ignore[arg-type]
            loss_fn,  # type: ignore[arg-type]
            batch_size,
            seed=seed,
            epochs=epochs,
            optimizer=optimizer,
            **self.params,
            **loader_options,
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.changed().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scheme):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.params.keys() == other.params.keys()
            and all(_same(v, other.params[k]) for k, v in self.params.items())
        )

    __hash__ = None  # type: ignore[assignment]  # parameters may be tensors or models


def _same(a: Any, b: Any) -> bool:
    """Equality that never asks a tensor for its truth value (tensors and models by identity)."""
    if isinstance(a, (torch.Tensor, nn.Module)) or isinstance(b, (torch.Tensor, nn.Module)):
        return a is b
    return type(a) is type(b) and a == b


def _arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A subclass constructor's arguments from its ``locals()`` (without ``self``)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class Uniform(Scheme):
    """Uniform sampling without replacement, weights 1 (a shuffled loader; no parameters).

    ``model`` and ``loss_fn`` are optional for this scheme. Card: ``docs/methods/uniform.md``.
    """

    name = "uniform"

    def __init__(self) -> None:
        super().__init__()


class KatharopoulosFleuret(Scheme):
    """Upper-bound importance sampling over presampled pools with the tau switch (``kf``).

    Args:
        presample: B / b (3.0).
        tau_threshold: switch-on threshold (default ``(B + 3b) / (3b)``).
        tau_momentum: EMA momentum of tau (0.9).
        always: importance sampling from the first step (no switch).
        power, additive, relative, mixing: score smoothing (:class:`isample.policies.ScorePolicy`).
        closed_form: closed-form upper bound for cross-entropy / MSE (True).
        max_weight: clip weights (None). The loader's ``replacement`` (True, the paper's
            rule) stays reachable through :func:`isample.schemes.build`.

    Card: ``docs/methods/kf.md``.
    """

    name = "kf"

    def __init__(
        self,
        *,
        presample: float = 3.0,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        always: bool = False,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        closed_form: bool = True,
        max_weight: float | None = None,
    ) -> None:
        super().__init__(**_arguments(locals()))


class LaBER(Scheme):
    """LaBER: the two-stage pool draw with LaBER's defaults (``laber``).

    Args:
        presample: B / b (4.0).
        power, additive, relative, mixing: score smoothing.
        closed_form: closed-form output-gradient norm for cross-entropy / MSE (True).

    Card: ``docs/methods/laber.md``.
    """

    name = "laber"

    def __init__(
        self,
        *,
        presample: float = 4.0,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        closed_form: bool = True,
    ) -> None:
        super().__init__(**_arguments(locals()))


class OnlineBatchSelection(Scheme):
    """Online batch selection by loss rank (``obs``).

    Args:
        selection_pressure: s_e at the start (100.0).
        final_selection_pressure: s_e at the end (1.0).
        rescore_every: re-score the dataset every k epochs (2).
        unbiased: weight by 1 / (N p_i) (False, as in the paper).

    Card: ``docs/methods/obs.md``.
    """

    name = "obs"

    def __init__(
        self,
        *,
        selection_pressure: float = 100.0,
        final_selection_pressure: float = 1.0,
        rescore_every: int | None = 2,
        unbiased: bool = False,
    ) -> None:
        super().__init__(**_arguments(locals()))


class SelectiveBackprop(Scheme):
    """Selective Backprop: keep examples with probability CDF(loss)^beta (``selective-backprop``).

    Args:
        beta: selectivity (3.0).
        s_min: floor of the keep probability (0.0).
        history_size: R, losses in the CDF history (1024).
        uniform_epochs: uniform epochs before selecting (1).
        chunk_size: candidates scored per forward (default b).
        staleness: reuse table losses up to this many epochs old (None = always re-score).

    Card: ``docs/methods/selective-backprop.md``.
    """

    name = "selective-backprop"

    def __init__(
        self,
        *,
        beta: float = 3.0,
        s_min: float = 0.0,
        history_size: int = 1024,
        uniform_epochs: int = 1,
        chunk_size: int | None = None,
        staleness: int | None = None,
    ) -> None:
        super().__init__(**_arguments(locals()))


class InfoBatch(Scheme):
    """InfoBatch: prune a random share of below-mean-loss examples each epoch, rescale (``infobatch``).

    Needs ``epochs`` (given to :class:`isample.DataLoader`).

    Args:
        prune_ratio: r (0.5).
        delta: stop pruning after this share of the epochs (0.875).
        initial_score: score of unseen examples (3.0).
        min_keep: lower bound of the kept share (0.1).

    Card: ``docs/methods/infobatch.md``.
    """

    name = "infobatch"

    def __init__(
        self,
        *,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        initial_score: float = 3.0,
        min_keep: float = 0.1,
    ) -> None:
        super().__init__(**_arguments(locals()))


class RhoLoss(Scheme):
    """RHO-LOSS: train on the top share of a pool by reducible holdout loss (``rho-loss``).

    Exactly one of ``irreducible_losses``, ``irreducible_model`` or ``holdout`` is needed.

    Args:
        ratio: n_b / n_B (0.1).
        irreducible_losses: precomputed holdout-model losses, Tensor of shape (N,).
        irreducible_model: a model trained on holdout data.
        holdout: a holdout dataset to train the irreducible-loss model on.
        holdout_epochs, holdout_lr, holdout_batch_size: its training (10, 1e-3, 64).

    Card: ``docs/methods/rho-loss.md``.
    """

    name = "rho-loss"

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        irreducible_losses: torch.Tensor | None = None,
        irreducible_model: nn.Module | None = None,
        holdout: Dataset | None = None,
        holdout_epochs: int = 10,
        holdout_lr: float = 1e-3,
        holdout_batch_size: int = 64,
    ) -> None:
        super().__init__(**_arguments(locals()))


class HistoryIS(Scheme):
    """Importance sampling from a table of stale training losses, no extra forward (``history-is``).

    Args:
        score: ``"loss"`` (default) or ``"upper_bound"`` (needs ``update(losses, outputs=...)``).
        mixing: uniform mixing lambda (weights <= 1 / lambda), or ``"auto"`` (default):
            lambda tuned from the measured staleness of the scores (:mod:`isample.staleness`).
        rescore_every: re-score the whole dataset every k epochs (None = never).
        power, additive, relative: score smoothing.
        bias_exponent: k in [0, 1] (1 = unbiased).
        max_weight: clip weights (None).
        initial_score: score of unseen examples (None = the running mean).

    Card: ``docs/methods/history-is.md``.
    """

    name = "history-is"

    def __init__(
        self,
        *,
        score: str = "loss",
        mixing: float | str = "auto",
        rescore_every: int | None = None,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        bias_exponent: float = 1.0,
        max_weight: float | None = None,
        initial_score: float | None = None,
    ) -> None:
        super().__init__(**_arguments(locals()))


class HistoryGradNorm(Scheme):
    """A table of per-example gradient norms recorded during the training backward (``history-gradnorm``).

    Args:
        layers: the Linear layers to record (default all).
        mixing, rescore_every, power, additive, relative, bias_exponent, max_weight,
            initial_score: as for :class:`HistoryIS`.

    Card: ``docs/methods/history-gradnorm.md``.
    """

    name = "history-gradnorm"

    def __init__(
        self,
        *,
        layers: Any = None,
        mixing: float | str = "auto",
        rescore_every: int | None = None,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        bias_exponent: float = 1.0,
        max_weight: float | None = None,
        initial_score: float | None = None,
    ) -> None:
        super().__init__(**_arguments(locals()))


class PoolLinearGradNorm(Scheme):
    """Pool importance sampling by exact Linear-layer gradient norms (``pool-linear-gradnorm``).

    Args:
        layers: the Linear layers (default all).
        presample: B / b (4.0).
        always, tau_threshold, tau_momentum: the tau switch (as for :class:`KatharopoulosFleuret`).
        power, additive, relative, mixing: score smoothing.

    Card: ``docs/methods/pool-linear-gradnorm.md``.
    """

    name = "pool-linear-gradnorm"

    def __init__(
        self,
        *,
        layers: Any = None,
        presample: float = 4.0,
        always: bool = False,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
    ) -> None:
        super().__init__(**_arguments(locals()))


class Auto(Scheme):
    """Algorithm 1 pools switched on only when the measured gain pays for the scoring (``auto``).

    Args:
        presample: B / b, rounded to a whole number (3.0).
        hysteresis: h >= 0: on when gain > R (1 + h), off when gain < R (0.1).
        gain: ``"auto"`` (from the optimizer), ``"kappa"`` or ``"sqrt-kappa"``.
        tau_momentum: EMA momentum of tau and of the measured times (0.9).
        probe_every: steps between timed scoring probes while off (500).
        efficiency: initial share alpha of the predicted excess speed-up trusted (0.1).
        window: steps per realized-progress fit (30).
        settle: pool steps skipped after switching on before the fit (10).
        cooldown: steps off after the first failed realized-progress check, doubled after each (200).
        closed_form: closed-form upper bound for cross-entropy / MSE (True).

    Card: ``docs/methods/auto.md``.
    """

    name = "auto"

    def __init__(
        self,
        *,
        presample: float = 3.0,
        hysteresis: float = 0.1,
        gain: str = "auto",
        tau_momentum: float = 0.9,
        probe_every: int = 500,
        efficiency: float = 0.1,
        window: int = 30,
        settle: int = 10,
        cooldown: int = 200,
        closed_form: bool = True,
    ) -> None:
        super().__init__(**_arguments(locals()))


#: The scheme object class of every registry name.
SCHEME_OBJECTS: dict[str, type[Scheme]] = {
    cls.name: cls
    for cls in (
        Uniform,
        KatharopoulosFleuret,
        LaBER,
        OnlineBatchSelection,
        SelectiveBackprop,
        InfoBatch,
        RhoLoss,
        HistoryIS,
        HistoryGradNorm,
        PoolLinearGradNorm,
        Auto,
    )
}


class _Registered(Scheme):
    """A scheme object for a registry name without its own class (its parameters are the loader's)."""

    def __init__(self, name: str, **params: Any) -> None:
        self.name = name  # type: ignore[misc]  # per instance: one class serves every such name
        own = scheme_parameters(name)
        unknown = sorted(set(params) - set(own))
        if unknown:
            listed = ", ".join(own)
            raise TypeError(f"Scheme {name!r} has no parameter {unknown[0]!r}. Its parameters: {listed}.")
        super().__init__(**{k: v for k, v in own.items() if v is not inspect.Parameter.empty} | params)

    def changed(self) -> dict[str, Any]:
        """The parameters whose value differs from the loader's default."""
        own = scheme_parameters(self.name)
        return {k: v for k, v in self.params.items() if k not in own or not _same(v, own[k])}

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.changed().items())
        return f"scheme_object({self.name!r}{args})"


def scheme_object(name: str, **params: Any) -> Scheme:
    """The scheme object of registry name ``name`` with ``params`` (its class when it has one).

    Raises:
        ValueError: unknown name. TypeError: a parameter the scheme does not take.
    """
    describe(name)  # ValueError listing the available names for an unknown one
    if name in SCHEME_OBJECTS:
        return SCHEME_OBJECTS[name](**params)
    return _Registered(name, **params)
