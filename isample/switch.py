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

__all__ = ["CostAwareSwitch", "TauSwitch", "cost_threshold", "default_tau_threshold"]


def default_tau_threshold(pool_size: int, batch_size: int) -> float:
    """``(B + 3b) / (3b)``: the cost break-even of scoring B to train on b."""
    return (pool_size + 3.0 * batch_size) / (3.0 * batch_size)


class TauSwitch:
    """Tracks an EMA of tau and says whether importance sampling is on.

    Args:
        threshold: tau_th >= 1; importance sampling is on while the EMA exceeds it
            (``inf``: never, a uniform baseline).
        momentum: EMA momentum in [0, 1) (0.9 as in the paper).
        always: if True, importance sampling is on from the first step (no warm-up).

    The EMA starts at the first observed tau. The decision is re-evaluated at every
    pool (no hysteresis), as in the reference implementation.
    """

    STATE_KEYS = ("ema", "on", "observations")

    def __init__(self, threshold: float, momentum: float = 0.9, always: bool = False) -> None:
        self.threshold = check_float(threshold, "threshold", "TauSwitch", minimum=1.0, allow_inf=True)
        self.momentum = check_float(
            momentum, "momentum", "TauSwitch", minimum=0.0, maximum=1.0, max_inclusive=False
        )
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
        self.ema = (
            tau_value if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * tau_value
        )
        self.observations += 1
        self.on = self.always or self.ema > self.threshold
        return self.on

    def state_dict(self) -> dict[str, Any]:
        """EMA, decision and number of observations."""
        return {"ema": self.ema, "on": self.on, "observations": self.observations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"TauSwitch state is missing {missing}.")
        self.ema = state["ema"]
        self.on = bool(state["on"])
        self.observations = int(state["observations"])

    def describe(self) -> dict[str, Any]:
        """The decision and its inputs, for reports."""
        return {"rule": "tau", "threshold": self.threshold, "ema": self.ema, "on": self.on}


def cost_threshold(score_seconds: float, step_seconds: float) -> float:
    """``(t_score + t_step) / t_step``: the measured cost break-even for tau.

    With ``t_score = B f`` and ``t_step = 3 b f`` (backward = 2 x forward) this is
    exactly ``(B + 3b) / (3b)``, the Katharopoulos-Fleuret threshold.
    """
    if step_seconds <= 0:
        raise ValueError(f"cost_threshold needs step_seconds > 0. Got {step_seconds!r}.")
    return (score_seconds + step_seconds) / step_seconds


class CostAwareSwitch(TauSwitch):
    """The tau switch with a threshold from measured costs instead of assumed ones.

    The :class:`PoolLoader` times the scoring of every pool (``score_seconds``) and the
    time the training loop spends per batch (``step_seconds``, everything between two
    requests for a batch). Their EMAs give the threshold
    :func:`cost_threshold` ``= (t_score + t_step) / t_step``; importance sampling is on
    while the EMA of tau exceeds it. Until both costs have been measured the threshold
    is the Katharopoulos-Fleuret ``(B + 3b) / (3b)``.

    Args:
        momentum: EMA momentum for tau and the two timings (0.9).
        always: on from the first step (then the rule only reports).

    ``describe()`` reports the decision and its inputs (tau EMA, both timings, the
    threshold and where it came from).
    """

    STATE_KEYS = TauSwitch.STATE_KEYS + ("score_seconds", "step_seconds")

    def __init__(self, momentum: float = 0.9, always: bool = False) -> None:
        super().__init__(threshold=1.0, momentum=momentum, always=always)
        self.score_seconds: float | None = None
        self.step_seconds: float | None = None
        self._fallback: float | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.momentum * old + (1 - self.momentum) * new

    def observe(self, tau_value: float, timing: dict[str, Any] | None = None) -> bool:
        """Feed tau and the pool's timing; return whether importance sampling is on."""
        if timing:
            if timing.get("score_seconds") is not None:
                self.score_seconds = self._ema(self.score_seconds, float(timing["score_seconds"]))
            if timing.get("step_seconds") is not None:
                self.step_seconds = self._ema(self.step_seconds, float(timing["step_seconds"]))
            if timing.get("pool_size") and timing.get("batch_size"):
                self._fallback = default_tau_threshold(int(timing["pool_size"]), int(timing["batch_size"]))
        self.threshold = self.current_threshold()
        return super().observe(tau_value, timing)

    def current_threshold(self) -> float:
        """The threshold in force: measured when both costs are known, else (B + 3b) / (3b)."""
        if self.score_seconds is not None and self.step_seconds is not None and self.step_seconds > 0:
            return cost_threshold(self.score_seconds, self.step_seconds)
        return self._fallback if self._fallback is not None else float("inf")

    def state_dict(self) -> dict[str, Any]:
        """The tau state plus both timing EMAs."""
        state = super().state_dict()
        state.update(
            score_seconds=self.score_seconds, step_seconds=self.step_seconds, fallback=self._fallback
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.score_seconds = state["score_seconds"]
        self.step_seconds = state["step_seconds"]
        self._fallback = state.get("fallback")
        self.threshold = self.current_threshold()

    def describe(self) -> dict[str, Any]:
        """The decision and its inputs."""
        measured = self.score_seconds is not None and self.step_seconds is not None
        return {
            "rule": "cost-aware tau",
            "threshold": self.current_threshold(),
            "threshold_source": "measured" if measured else "(B + 3b) / (3b)",
            "score_seconds": self.score_seconds,
            "step_seconds": self.step_seconds,
            "ema": self.ema,
            "on": self.on,
        }
