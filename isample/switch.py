"""When to turn importance sampling on: the Katharopoulos-Fleuret tau switch.

Over a uniformly drawn pool of B candidates with normalised scores q (sum 1),

.. math::

    \\tau = \\sqrt{B \\sum_i q_i^2} \\;\\ge 1,

and ``tau**2`` estimates the variance multiplier kappa that sampling b of the B
proportionally to q buys. Scoring B examples costs B forwards; a training step on b
costs about 3b forwards (backward = 2 x forward), so importance sampling pays when
``tau > tau_th = (B + 3b) / (3b)``. The switch follows an EMA of tau (momentum 0.9).

References:
    Katharopoulos and Fleuret, "Not All Samples Are Created Equal", ICML 2018.
"""

from __future__ import annotations

from typing import Any

from ._validation import check_float

__all__ = ["TauSwitch", "default_tau_threshold"]


def default_tau_threshold(pool_size: int, batch_size: int) -> float:
    """``(B + 3b) / (3b)``: the cost break-even of scoring B to train on b."""
    return (pool_size + 3.0 * batch_size) / (3.0 * batch_size)


class TauSwitch:
    """Tracks an EMA of tau and says whether importance sampling is on.

    Args:
        threshold: tau_th; importance sampling is on while the EMA exceeds it.
        momentum: EMA momentum in [0, 1) (0.9 as in the paper).
        always: if True, importance sampling is on from the first step (no warm-up).

    The EMA starts at the first observed tau. The decision is re-evaluated at every
    pool (no hysteresis), as in the reference implementation.
    """

    STATE_KEYS = ("ema", "on", "observations")

    def __init__(self, threshold: float, momentum: float = 0.9, always: bool = False) -> None:
        self.threshold = check_float(threshold, "threshold", "TauSwitch", minimum=1.0)
        self.momentum = check_float(momentum, "momentum", "TauSwitch", minimum=0.0, maximum=1.0, max_inclusive=False)
        self.always = bool(always)
        self.ema: float | None = None
        self.on = self.always
        self.observations = 0

    def observe(self, tau_value: float, timing: dict[str, Any] | None = None) -> bool:
        """Feed the tau of the current pool; return whether importance sampling is on.

        ``timing`` (scoring and step seconds, see :class:`PoolLoader`) is ignored by this
        rule, which assumes backward = 2 x forward.
        """
        if tau_value != tau_value:  # NaN: keep the previous state
            return self.on
        self.ema = tau_value if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * tau_value
        self.observations += 1
        self.on = self.always or self.ema > self.threshold
        return self.on

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "on": self.on, "observations": self.observations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"TauSwitch state is missing {missing}.")
        self.ema = state["ema"]
        self.on = bool(state["on"])
        self.observations = int(state["observations"])

    def describe(self) -> dict[str, Any]:
        """The decision and its inputs, for reports."""
        return {"rule": "tau", "threshold": self.threshold, "ema": self.ema, "on": self.on}
