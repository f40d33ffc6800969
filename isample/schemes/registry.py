"""The registry of built-in schemes: ``available()``, ``describe(name)``, ``build(name, ...)``.

Scheme modules are imported when a scheme is built, so the registry works even when an
optional module (or one of its dependencies) is missing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._options import LOADER_OPTIONS, SAMPLING_OPTIONS
from .base import SchemeLoader

__all__ = ["available", "describe", "build", "scheme_class", "scheme_parameters", "LOADER_LEVEL"]


@dataclass(frozen=True)
class _Spec:
    module: str
    attribute: str
    kind: str
    unbiased: bool
    score: str
    weights: str
    extra_cost: str
    reference: str


_SCHEMES: dict[str, _Spec] = {
    "uniform": _Spec(
        "uniform",
        "Uniform",
        "uniform",
        True,
        "none",
        "1",
        "none",
        "baseline (a random permutation per epoch)",
    ),
    "kf": _Spec(
        "kf",
        "KatharopoulosFleuret",
        "pool",
        True,
        "upper bound ||dl/dz||",
        "1/(B p_i)",
        "B = 3b no-grad forwards per step while the tau switch is on; none while off (Algorithm 1)",
        "Katharopoulos and Fleuret, ICML 2018, arXiv:1803.00942",
    ),
    "auto": _Spec(
        "auto",
        "Auto",
        "pool",
        True,
        "upper bound ||dl/dz|| (from the training outputs while off)",
        "1 while off; 1/(B p_i) while on",
        "none while off (plus a timed probe of b every 500 steps); B = 3b no-grad forwards per step while on",
        "Katharopoulos and Fleuret 2018 (Algorithm 1) with a measured-cost switch; docs/methods/auto.md",
    ),
    "laber": _Spec(
        "laber",
        "LaBER",
        "pool",
        True,
        "||dl/d output||",
        "mean_j(p~_j)/p~_i = 1/(B p_i)",
        "B = 4b no-grad forwards per step",
        "Lahire, Geist and Rachelson, ICML 2022, arXiv:2110.01528",
    ),
    "obs": _Spec(
        "obs",
        "OnlineBatchSelection",
        "table",
        False,
        "latest loss rank",
        "1 (optional 1/(N p_i))",
        "N forwards every rescore_every (2) epochs; training losses otherwise",
        "Loshchilov and Hutter, 2015, arXiv:1511.06343",
    ),
    "selective-backprop": _Spec(
        "selective_backprop",
        "SelectiveBackprop",
        "pool",
        False,
        "loss percentile CDF_R(loss)^beta",
        "1",
        "about b / E[P] (4b at beta = 3) no-grad forwards per step after the first epoch",
        "Jiang et al., 2019, arXiv:1910.00762",
    ),
    "infobatch": _Spec(
        "infobatch",
        "InfoBatch",
        "table",
        True,
        "latest loss (below-mean pruning)",
        "|W|/K ~ 1/(1-r) for kept low-loss",
        "none (saves steps: fewer examples per epoch)",
        "Qin et al., ICLR 2024, arXiv:2303.04947",
    ),
    "rho-loss": _Spec(
        "rho_loss",
        "RhoLoss",
        "pool",
        False,
        "training loss - irreducible holdout loss",
        "1",
        "n_B = 10b no-grad forwards per step, plus N holdout-model forwards once (and its training)",
        "Mindermann et al., ICML 2022, arXiv:2206.07137",
    ),
    "history-is": _Spec(
        "history_is",
        "HistoryIS",
        "table",
        True,
        "training loss (or upper bound) history",
        "1/(N p_i)",
        "none (optional N forwards every rescore_every epochs)",
        "Loshchilov and Hutter 2015; Katharopoulos and Fleuret 2018",
    ),
    "history-gradnorm": _Spec(
        "history_gradnorm",
        "HistoryGradNorm",
        "table",
        True,
        "recorded per-example gradient norm ||D g_i||",
        "1/(N p_i)",
        "no extra pass; hooks on the training backward (one product per Linear layer)",
        "Goodfellow 2015, arXiv:1510.01799; docs/methods/optimizer-aware.md",
    ),
    "pool-linear-gradnorm": _Spec(
        "pool_linear_gradnorm",
        "PoolLinearGradNorm",
        "pool",
        True,
        "exact Linear-layer gradient norm ||D g_i||",
        "1/(B p_i)",
        "B = 4b forwards + one backward to the layer outputs per step",
        "Katharopoulos and Fleuret 2018; docs/methods/optimizer-aware.md",
    ),
}

_COMMON = ("dataset", "model", "loss_fn", "batch_size", "seed", "epochs", "optimizer")

#: Loader-level options some schemes take besides the torch DataLoader options: they shape
#: the epoch or the scoring passes, not the sampling rule, so scheme objects leave them to
#: :class:`isample.DataLoader`.
LOADER_LEVEL = ("drop_last", "num_batches", "scoring_batch_size")


def available() -> list[str]:
    """Sorted names of the registered schemes."""
    return sorted(_SCHEMES)


def _spec(name: Any) -> _Spec:
    if not isinstance(name, str):
        raise TypeError(f"A scheme name must be a str. Got {name!r}. Available: {', '.join(available())}.")
    if name not in _SCHEMES:
        raise ValueError(f"Unknown scheme {name!r}. Available: {', '.join(available())}.")
    return _SCHEMES[name]


def scheme_class(name: str) -> type[SchemeLoader]:
    """The loader class of scheme ``name`` (imports its module).

    Raises:
        ValueError: unknown name. ImportError: the scheme's module (or a dependency) is missing.
    """
    spec = _spec(name)
    module = importlib.import_module(f"{__package__}.{spec.module}")
    return getattr(module, spec.attribute)


def _own_parameters(name: str) -> dict[str, Any]:
    """Keyword parameters of the loader class of ``name`` beyond the common ones, with defaults."""
    params = inspect.signature(scheme_class(name).__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k not in _COMMON and k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _accepted(name: str) -> list[str]:
    """Every keyword :func:`build` accepts for ``name`` besides the common ones, sorted."""
    params = inspect.signature(scheme_class(name).__init__).parameters
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return sorted(set(_own_parameters(name)) | (set(LOADER_OPTIONS) if takes_options else set()))


def scheme_parameters(name: str) -> dict[str, Any]:
    """The scheme's own hyperparameters and their defaults (what a scheme object takes).

    Excludes the common arguments of :func:`build`, the torch DataLoader options and the
    loader-level options :data:`LOADER_LEVEL`.
    """
    return {k: v for k, v in _own_parameters(name).items() if k not in LOADER_LEVEL}


def describe(name: str) -> dict[str, Any]:
    """What scheme ``name`` is: kind, unbiasedness, score, weights, extra cost, reference, defaults.

    Returns:
        dict with keys ``name``, ``kind`` (``"pool"``, ``"table"`` or ``"uniform"``),
        ``unbiased`` (bool, for the default settings), ``score``, ``weights``,
        ``extra_cost``, ``reference``, ``card`` (path of the method card) and
        ``defaults`` (the scheme's own hyperparameters; empty when its module cannot be
        imported).
    """
    spec = _spec(name)
    try:
        defaults = {k: v for k, v in _own_parameters(name).items() if v is not inspect.Parameter.empty}
    except ImportError:
        defaults = {}
    return {
        "name": name,
        "kind": spec.kind,
        "unbiased": spec.unbiased,
        "score": spec.score,
        "weights": spec.weights,
        "extra_cost": spec.extra_cost,
        "reference": spec.reference,
        "card": f"docs/methods/{name}.md",
        "defaults": defaults,
    }


def build(
    name: str,
    dataset: Dataset,
    model: nn.Module,
    loss_fn: Callable,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **overrides: Any,
) -> SchemeLoader:
    """Build the loader of scheme ``name`` with the paper's defaults, changed by ``overrides``.

    Args:
        name: one of :func:`available`.
        dataset: map-style dataset of ``(input, target)`` pairs or dicts.
        model: the model being trained (scoring uses it; batches go to its device).
        loss_fn: per-example loss ``(outputs, targets) -> Tensor (b,)`` (``reduction="none"``).
        batch_size: b.
        seed: randomness source (int >= 0).
        epochs: total number of training epochs (needed by ``infobatch``, used by ``obs``).
        optimizer: the optimizer, for schemes that score in its geometry (gradient-norm schemes).
        **overrides: scheme hyperparameters (see ``describe(name)["defaults"]``) and torch
            DataLoader options (``num_workers``, ``pin_memory``, ``collate_fn``, ...).

    Returns:
        A :class:`isample.schemes.base.SchemeLoader`.

    Raises:
        ValueError: unknown scheme name (the message lists the available ones).
        TypeError: an override the scheme does not accept (named in the message).
    """
    cls = scheme_class(name)
    accepted = _accepted(name)
    for key in overrides:
        if key in SAMPLING_OPTIONS:
            why = SAMPLING_OPTIONS[key]
            raise TypeError(f"Scheme {name!r} does not take the DataLoader option {key!r}: {why}.")
        if key not in accepted:
            raise TypeError(
                f"Unknown override {key!r} for scheme {name!r}. Accepted overrides: {', '.join(accepted)}."
            )
    return cls(
        dataset, model, loss_fn, batch_size, seed=seed, epochs=epochs, optimizer=optimizer, **overrides
    )
