"""Published sampling schemes composed from isample's core pieces, behind one registry.

::

    import isample.schemes as schemes

    schemes.available()          # ['history-gradnorm', 'history-is', 'infobatch', 'kf', ...]
    schemes.describe("kf")       # kind, unbiased, score, extra cost, reference, defaults
    loader = schemes.build("kf", dataset, model, loss_fn, batch_size=64, seed=0)

Every loader yields :class:`isample.WeightedBatch` and supports the same training loop
(see :mod:`isample.schemes.base`). One method card per scheme lives in ``docs/methods/``.
Scheme modules are imported lazily by :func:`build`.
"""

from __future__ import annotations

from .base import SchemeLoader
from .registry import available, build, describe, scheme_class
from .rho_loss import train_irreducible_loss_model

__all__ = ["SchemeLoader", "available", "build", "describe", "scheme_class", "train_irreducible_loss_model"]
