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

import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from ._validation import check_choice, check_float, check_int

__all__ = [
    "AutoSwitch",
    "CostAwareSwitch",
    "History",
    "ImportanceSamplingOffWarning",
    "TauSwitch",
    "auto_decision",
    "check_tau_momentum",
    "check_tau_threshold",
    "cost_threshold",
    "default_tau_threshold",
    "pool_cost_ratio",
]


class ImportanceSamplingOffWarning(UserWarning):
    """A pool loader paid for scoring for several epochs while its switch kept importance sampling off."""


class History(Sequence):
    """A bounded, list-like record of the most recent entries (oldest dropped first).

    Supports ``len``, iteration, integer indexing and slicing (``history[-3:]`` returns a
    list), ``append`` and ``clear``; ``maxlen`` is the bound.

    Args:
        items: initial entries (the last ``maxlen`` are kept).
        maxlen: the bound (int >= 1).
    """

    def __init__(self, items: Iterable[Any] = (), maxlen: int = 10_000) -> None:
        self.maxlen = check_int(maxlen, "maxlen", "History", minimum=1)
        self._items: deque[Any] = deque(items, maxlen=self.maxlen)

    def append(self, item: Any) -> None:
        """Add ``item`` (drops the oldest entry when full)."""
        self._items.append(item)

    def clear(self) -> None:
        """Remove every entry."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._items))
            if step > 0 and start >= stop or step < 0 and start <= stop:
                return []
            if step > 0:
                return list(itertools.islice(self._items, start, stop, step))
            return [self._items[i] for i in range(start, stop, step)]
        return self._items[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return list(self._items) == list(other._items)
        if isinstance(other, list):
            return list(self._items) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"History({len(self)} entries, maxlen={self.maxlen})"


def check_tau_threshold(value: Any, owner: str, allow_none: bool = True) -> float | None:
    """Validate the user's ``tau_threshold``: a float >= 1 (tau is never below 1; inf = never on), or None."""
    return check_float(value, "tau_threshold", owner, minimum=1.0, allow_none=allow_none, allow_inf=True)


def check_tau_momentum(value: Any, owner: str) -> float:
    """Validate the user's ``tau_momentum``: a float in [0, 1)."""
    return check_float(  # type: ignore[return-value]
        value, "tau_momentum", owner, minimum=0.0, maximum=1.0, max_inclusive=False
    )


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
    #: whether a loader in Algorithm 1 mode should time a scoring pass while off (see CostAwareSwitch)
    wants_score_timing = False

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
    #: in Algorithm 1 mode, re-time a scoring pass after this many steps without one
    PROBE_EVERY = 500

    def __init__(self, momentum: float = 0.9, always: bool = False) -> None:
        super().__init__(threshold=1.0, momentum=momentum, always=always)
        self.score_seconds: float | None = None
        self.step_seconds: float | None = None
        self._fallback: float | None = None
        self._since_score = 0

    @property
    def wants_score_timing(self) -> bool:  # type: ignore[override]
        """True when the scoring cost is unknown or was last measured ``PROBE_EVERY`` steps ago."""
        return self.score_seconds is None or self._since_score >= self.PROBE_EVERY

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.momentum * old + (1 - self.momentum) * new

    def observe(self, tau_value: float, timing: dict[str, Any] | None = None) -> bool:
        """Feed tau and the pool's timing; return whether importance sampling is on."""
        self._since_score += 1
        if timing:
            if timing.get("score_seconds") is not None:
                self._since_score = 0
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


# --------------------------------------------------------------------------- the auto rule


def pool_cost_ratio(
    train_seconds: float, fetch_seconds: float, score_seconds: float, chunks_per_pool: float
) -> float:
    """Cost of a pool step over the cost of a uniform step, from measured times.

    .. math::

        R = \\frac{t_\\mathrm{tr} + k\\, t_\\mathrm{f} + t_\\mathrm{s}}{t_\\mathrm{tr} + t_\\mathrm{f}}

    Args:
        train_seconds: the training step (forward, backward, optimizer, feedback) on b examples.
        fetch_seconds: reading one batch of b examples.
        score_seconds: scoring a pool of B = k b examples and drawing b from it.
        chunks_per_pool: k = B / b.

    Returns:
        float R >= 1 when the times are >= 0 (1 = importance sampling costs nothing extra).

    Raises:
        ValueError: ``train_seconds + fetch_seconds`` is not > 0.
    """
    base = train_seconds + fetch_seconds
    if not base > 0:
        raise ValueError(f"pool_cost_ratio needs train_seconds + fetch_seconds > 0. Got {base!r}.")
    return (train_seconds + chunks_per_pool * fetch_seconds + score_seconds) / base


def auto_decision(gain: float, cost_ratio: float, on: bool, hysteresis: float) -> bool:
    """The ``auto`` rule: importance sampling pays when its gain exceeds its cost ratio.

    Turns on when ``gain > cost_ratio * (1 + hysteresis)``; once on, stays on while
    ``gain >= cost_ratio``. The band between the two keeps the decision from flapping
    when the gain hovers around the break-even. A NaN gain or ratio keeps the current state.

    Args:
        gain: progress per step of importance sampling relative to a uniform step
            (``tau**2`` estimates the variance multiplier kappa; see :class:`AutoSwitch`).
        cost_ratio: cost of an importance-sampling step over a uniform step (:func:`pool_cost_ratio`).
        on: the current decision.
        hysteresis: relative width of the band (>= 0).

    Returns:
        bool, the new decision.
    """
    if gain != gain or cost_ratio != cost_ratio:
        return on
    if on:
        return gain >= cost_ratio
    return gain > cost_ratio * (1.0 + hysteresis)


GAIN_RULES = ("kappa", "sqrt-kappa")


class AutoSwitch:
    """Pool importance sampling only while it pays in measured time (the ``auto`` scheme's rule).

    It follows EMAs (momentum ``momentum``) of tau and of four measured times fed by a
    :class:`isample.PoolLoader` in Algorithm 1 mode: the training step (``step_seconds``),
    reading one batch (``fetch_seconds / chunks``), scoring a pool of B and drawing from it
    (``score_seconds``, from real pools while on and from timed scoring probes of a batch,
    scaled by B / b, while off). The first measurement of each time is discarded (warm-up).

    .. math::

        G = \\tau^2 \\;(\\text{"kappa"}) \\text{ or } \\tau \\;(\\text{"sqrt-kappa"}), \\qquad
        R = \\frac{t_\\mathrm{tr} + k\\, t_\\mathrm{f} + t_\\mathrm{s}}{t_\\mathrm{tr} + t_\\mathrm{f}},
        \\qquad \\text{on} \\iff G > R (1 + h) \\text{ (off) or } G \\ge R \\text{ (on)}.

    ``tau**2`` estimates the variance multiplier kappa of sampling b from the pool of B; a
    step with kappa times less gradient noise is worth about kappa uniform steps with SGD
    (linear scaling) and about ``sqrt(kappa)`` with Adam-type optimizers (square-root
    scaling), hence the two gain rules. Until every cost has been measured the switch stays
    off (uniform batches, which is what a uniform step costs).

    Args:
        momentum: EMA momentum of tau and the times, in [0, 1) (0.9).
        hysteresis: h >= 0, relative width of the on/off band (0.1).
        gain: ``"kappa"`` (SGD) or ``"sqrt-kappa"`` (Adam, RMSprop, Adagrad).
        probe_every: while off, re-time a scoring probe every this many steps (int >= 1, 500).
        always: on from the first step (the rule then only reports).
    """

    STATE_KEYS = ("ema", "on", "observations", "costs", "seen", "since_score")
    _COSTS = ("train_seconds", "fetch_seconds", "score_seconds")

    def __init__(
        self,
        momentum: float = 0.9,
        hysteresis: float = 0.1,
        gain: str = "kappa",
        probe_every: int = 500,
        always: bool = False,
    ) -> None:
        owner = "AutoSwitch"
        self.momentum = check_float(
            momentum, "momentum", owner, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.hysteresis = check_float(hysteresis, "hysteresis", owner, minimum=0.0, maximum=10.0)
        self.gain_rule = check_choice(gain, "gain", owner, GAIN_RULES)
        self.probe_every = check_int(probe_every, "probe_every", owner, minimum=1)
        self.always = bool(always)
        self.ema: float | None = None
        self.on = self.always
        self.observations = 0
        self.costs: dict[str, float | None] = dict.fromkeys(self._COSTS)
        self.seen: dict[str, int] = dict.fromkeys(self._COSTS, 0)
        self.since_score = 0
        self.chunks_per_pool: float | None = None

    @property
    def wants_score_timing(self) -> bool:
        """True while the scoring cost is unknown or was last measured ``probe_every`` steps ago."""
        return self.costs["score_seconds"] is None or self.since_score >= self.probe_every

    def _feed(self, key: str, value: float | None) -> None:
        if value is None or value != value or value < 0:
            return
        self.seen[key] += 1
        if self.seen[key] == 1:  # warm-up: the first measurement includes one-off costs
            return
        old = self.costs[key]
        self.costs[key] = value if old is None else self.momentum * old + (1 - self.momentum) * value

    def gain(self) -> float:
        """The estimated gain G from the tau EMA (NaN before the first tau)."""
        if self.ema is None:
            return math.nan
        return self.ema**2 if self.gain_rule == "kappa" else self.ema

    def cost_ratio(self) -> float:
        """The measured cost ratio R (NaN until every time has been measured)."""
        c = self.costs
        if None in c.values() or self.chunks_per_pool is None:
            return math.nan
        return pool_cost_ratio(
            c["train_seconds"],
            c["fetch_seconds"],
            c["score_seconds"],
            self.chunks_per_pool,  # type: ignore[arg-type]
        )

    def threshold_value(self) -> float:
        """The gain the switch needs now: ``R (1 + h)`` while off, ``R`` while on (NaN if unknown)."""
        ratio = self.cost_ratio()
        return ratio if self.on else ratio * (1.0 + self.hysteresis)

    @property
    def threshold(self) -> float:
        """The threshold on tau itself (what ``tau_ema`` is compared with in reports)."""
        needed = self.threshold_value()
        return math.sqrt(needed) if self.gain_rule == "kappa" and needed == needed else needed

    def observe(self, tau_value: float, timing: dict[str, Any] | None = None) -> bool:
        """Feed tau and the last step's timings; return whether importance sampling is on."""
        self.since_score += 1
        if timing:
            if timing.get("pool_size") and timing.get("batch_size"):
                self.chunks_per_pool = float(timing["pool_size"]) / float(timing["batch_size"])
            self._feed("train_seconds", timing.get("step_seconds"))
            chunks = timing.get("chunks")
            fetch = timing.get("fetch_seconds")
            if chunks and fetch is not None:
                self._feed("fetch_seconds", float(fetch) / float(chunks))
            if timing.get("score_seconds") is not None:
                self.since_score = 0
                self._feed("score_seconds", float(timing["score_seconds"]))
        if tau_value == tau_value:
            self.ema = (
                tau_value if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * tau_value
            )
            self.observations += 1
        self.on = self.always or auto_decision(self.gain(), self.cost_ratio(), self.on, self.hysteresis)
        return self.on

    def state_dict(self) -> dict[str, Any]:
        """tau EMA, decision, cost EMAs and counters."""
        return {
            "ema": self.ema,
            "on": self.on,
            "observations": self.observations,
            "costs": dict(self.costs),
            "seen": dict(self.seen),
            "since_score": self.since_score,
            "chunks_per_pool": self.chunks_per_pool,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        missing = [k for k in self.STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"AutoSwitch state is missing {missing}.")
        self.ema = state["ema"]
        self.on = bool(state["on"])
        self.observations = int(state["observations"])
        self.costs = {k: state["costs"].get(k) for k in self._COSTS}
        self.seen = {k: int(state["seen"].get(k, 0)) for k in self._COSTS}
        self.since_score = int(state["since_score"])
        self.chunks_per_pool = state.get("chunks_per_pool")

    def describe(self) -> dict[str, Any]:
        """The decision and its inputs.

        Returns:
            dict with ``rule`` ("auto"), ``decision`` ("pool-is" or "uniform"), ``on``,
            ``ema`` (tau EMA), ``gain`` and ``gain_rule``, ``cost_ratio``, ``gain_threshold``
            (the gain needed now), ``threshold`` (the same on the tau scale, comparable
            with ``ema``), ``hysteresis`` and ``costs`` (seconds: ``train_seconds``
            per step, ``fetch_seconds`` per batch read, ``score_seconds`` per pool scored).
        """
        return {
            "rule": "auto",
            "decision": "pool-is" if self.on else "uniform",
            "on": self.on,
            "ema": self.ema,
            "gain": self.gain(),
            "gain_rule": self.gain_rule,
            "cost_ratio": self.cost_ratio(),
            "gain_threshold": self.threshold_value(),
            "threshold": self.threshold,
            "hysteresis": self.hysteresis,
            "costs": dict(self.costs),
        }
