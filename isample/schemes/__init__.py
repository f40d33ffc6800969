"""Published sampling schemes composed from isample's core pieces, behind one registry.

::

    import isample.schemes as schemes

    schemes.available()          # ['history-gradnorm', 'history-is', 'infobatch', 'kf', ...]
    schemes.describe("kf")       # kind, unbiased, score, extra cost, reference, defaults
    scheme = schemes.HistoryIS(mixing=0.2)                  # a scheme object (name + parameters)
    loader = isample.DataLoader(dataset, 64, scheme=scheme, model=model, loss_fn=loss_fn)
    loader = schemes.build("kf", dataset, model, loss_fn, batch_size=64, seed=0)   # lower level

Every loader yields :class:`isample.WeightedBatch` and supports the same training loop
(see :mod:`isample.schemes.base`). One method card per scheme lives in ``docs/methods/``.
Scheme modules are imported lazily by :func:`build`. The scheme objects
(:mod:`isample.schemes.objects`) carry only the scheme's own parameters; the loader
classes stay in their modules (``isample.schemes.scheme_class(name)``).
"""

from __future__ import annotations

from .base import SchemeLoader
from .objects import (
    Auto,
    HistoryGradNorm,
    HistoryIS,
    InfoBatch,
    KatharopoulosFleuret,
    LaBER,
    OnlineBatchSelection,
    PoolLinearGradNorm,
    RhoLoss,
    Scheme,
    SelectiveBackprop,
    Uniform,
    scheme_object,
)
from .registry import available, build, describe, scheme_class, scheme_parameters
from .rho_loss import train_irreducible_loss_model

__all__ = [
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
    "SchemeLoader",
    "SelectiveBackprop",
    "Uniform",
    "available",
    "build",
    "describe",
    "scheme_class",
    "scheme_object",
    "scheme_parameters",
    "train_irreducible_loss_model",
]
