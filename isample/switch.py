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

import bisect
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
    "discounted_gain",
    "pool_cost_ratio",
    "realized_speedup",
    "relative_rate",
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

    @property
    def wants_timing(self) -> bool:
        """Whether ``observe`` uses the step and read times in ``timing``.

        False for this rule, which ignores them (a :class:`isample.PoolLoader` in Algorithm 1
        mode then makes no clock call while off); True for a subclass that overrides
        :meth:`observe`, unless it says otherwise.
        """
        return type(self).observe is not TauSwitch.observe

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


def discounted_gain(gain: float, efficiency: float) -> float:
    """``1 + efficiency (gain - 1)``: the share ``efficiency`` of the predicted excess speed-up.

    Args:
        gain: predicted progress per step relative to a uniform step (``tau**2`` or ``tau``).
        efficiency: realized over predicted excess speed-up, in [0, 1] (1 = trust the prediction).

    Returns:
        float (NaN when ``gain`` is NaN).
    """
    return 1.0 + efficiency * (gain - 1.0)


def relative_rate(costs: Sequence[float], losses: Sequence[float]) -> float:
    """Relative decrease of the loss per unit cost: ``-slope(loss ~ cost) / mean(loss)`` (OLS).

    A least-squares slope over the window (not the difference of two noisy end points),
    divided by the window's mean loss so that rates measured at different loss levels
    compare (for an exponential decay it is the decay constant; > 0 = progress).

    Returns:
        float, NaN with fewer than 3 points, no spread in cost or a mean loss <= 0.
    """
    n = len(costs)
    if n < 3 or n != len(losses):
        return math.nan
    mc, ml = sum(costs) / n, sum(losses) / n
    var = sum((c - mc) ** 2 for c in costs)
    if not var > 0 or not ml > 0:
        return math.nan
    cov = sum((c - mc) * (v - ml) for c, v in zip(costs, losses, strict=True))
    return -(cov / var) / ml


def realized_speedup(rate_on: float, rate_off: float) -> float:
    """Progress per unit cost with importance sampling over that of uniform steps.

    Both rates are :func:`relative_rate` values (per unit of cost, a uniform step = 1). A
    uniform reference without progress (``rate_off <= 0``) makes any progress of importance
    sampling count as a win (``inf``) and none as a loss (0).
    """
    if rate_on != rate_on or rate_off != rate_off:
        return math.nan
    if rate_off <= 0:
        return math.inf if rate_on > 0 else 0.0
    return rate_on / rate_off


class AutoSwitch:
    """Pool importance sampling only while it pays in measured time (the ``auto`` scheme's rule).

    **Costs.** It follows an EMA (momentum ``momentum``) of tau and three measured times fed
    by a :class:`isample.PoolLoader` in Algorithm 1 mode: the training step
    (``step_seconds``) and reading one batch (``fetch_seconds / chunks``), each the median
    of the last ``MEDIAN_OF = 25`` measurements (a loop that pauses to evaluate, log or
    checkpoint inflates a few step times; an EMA would carry those pauses into R), and
    scoring a pool of B and drawing from it (``score_seconds``, an EMA, from real pools
    while on and from timed scoring probes of a batch, scaled by B / b, while off). The
    first measurement of each time is discarded (warm-up). They give the cost ratio R of a
    pool step to a uniform step. The loader times in process CPU seconds when the model is
    on the CPU (other processes on a shared machine do not tilt R) and in wall seconds on
    an accelerator.

    **Predicted gain.** ``tau**2`` estimates the variance multiplier kappa of drawing b from
    the pool of B. A step with kappa times less gradient noise is worth about kappa uniform
    steps with SGD (linear scaling) and ``sqrt(kappa)`` with Adam-type optimizers
    (square-root scaling) *when the learning rate is rescaled and the noise limits progress*.
    At a fixed learning rate only the noise share of the progress is bought back, so the
    realized excess speed-up is a fraction of the predicted one (measured with ``isample
    bench`` on digits: kappa 6-7 gave 1.15x per step with Adam / RMSprop and less than 1x with
    SGD, a fraction of 0.03-0.1). The rule therefore uses the discounted gain

    .. math::

        G = \\tau^2 \\text{ (kappa) or } \\tau \\text{ (sqrt-kappa)}, \\qquad
        G_\\mathrm{eff} = 1 + \\alpha (G - 1), \\qquad
        R = \\frac{t_\\mathrm{tr} + k\\, t_\\mathrm{f} + t_\\mathrm{s}}{t_\\mathrm{tr} + t_\\mathrm{f}},

    with the efficiency alpha starting at ``efficiency`` and re-estimated from every trial
    (below); importance sampling turns on when ``G_eff > R (1 + h)`` and off when
    ``G_eff < R``.

    **Realized progress.** When the loop hands back its losses (``timing["train_loss"]``,
    the weighted mean loss of the previous batch, an unbiased estimate of the mean loss in
    both regimes), the switch also checks what importance sampling actually buys:

    * while off it keeps the last ``window`` (cost, loss) points of uniform steps (a uniform
      step costs 1, a pool step R); it turns on only once that reference is full;
    * once on, it ignores ``settle`` steps, then fits the same window on the pool steps;
    * the realized speed-up ``S = rate_on / rate_off`` compares the relative rates of
      loss decrease per unit cost (:func:`relative_rate`, least squares);
      ``S >= 1``: importance sampling pays, it stays on (and re-checks every window against
      the same reference); ``S < 1``: it switches off and stays off for a cool-down of
      ``cooldown * 2**(failures - 1)`` steps (doubling back-off), whatever tau says;
    * each check re-estimates the efficiency, ``alpha <- (alpha + (S R - 1) / (G - 1)) / 2``
      clipped to [0, 1] (``S R`` is the realized per-step speed-up), so a workload on which
      the prediction over-promised asks for a larger tau next time.

    Loss decrease slows down as training proceeds, so the later on-window is compared with
    an earlier uniform window: the check errs towards uniform, the safe side. Without
    losses the rule is the discounted prediction alone. Until every cost has been measured
    the switch stays off (uniform batches, which is what a uniform step costs).

    Args:
        momentum: EMA momentum of tau and the times, in [0, 1) (0.9).
        hysteresis: h >= 0, relative width of the on/off band (0.1).
        gain: ``"kappa"`` (SGD) or ``"sqrt-kappa"`` (Adam, RMSprop, Adagrad).
        probe_every: while off, re-time a scoring probe every this many steps (int >= 1, 500).
        always: on from the first step (the rule then only reports).
        efficiency: initial alpha in [0, 1] (1.0 here: the undiscounted prediction; the
            ``auto`` scheme passes 0.1).
        window: steps in each realized-progress fit (int >= 3, 30).
        settle: on-steps ignored after a switch before fitting (int >= 0, 10).
        cooldown: steps off after the first failed check, doubled after each (int >= 1, 200).
    """

    STATE_KEYS = ("ema", "on", "observations", "costs", "seen", "since_score")
    _COSTS = ("train_seconds", "fetch_seconds", "score_seconds")
    #: a :class:`isample.PoolLoader` hands it the weighted loss of each batch (``train_loss``)
    wants_losses = True
    #: a :class:`isample.PoolLoader` times every step and read for it
    wants_timing = True
    #: the step and read times are the median of this many recent measurements
    MEDIAN_OF = 25
    _MEDIAN_COSTS = ("train_seconds", "fetch_seconds")
    #: switch events kept in ``history``
    HISTORY_LIMIT = 100

    def __init__(
        self,
        momentum: float = 0.9,
        hysteresis: float = 0.1,
        gain: str = "kappa",
        probe_every: int = 500,
        always: bool = False,
        efficiency: float = 1.0,
        window: int = 30,
        settle: int = 10,
        cooldown: int = 200,
    ) -> None:
        owner = "AutoSwitch"
        self.momentum = check_float(
            momentum, "momentum", owner, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.hysteresis = check_float(hysteresis, "hysteresis", owner, minimum=0.0, maximum=10.0)
        self.gain_rule = check_choice(gain, "gain", owner, GAIN_RULES)
        self.probe_every = check_int(probe_every, "probe_every", owner, minimum=1)
        self.always = bool(always)
        self.efficiency = check_float(efficiency, "efficiency", owner, minimum=0.0, maximum=1.0)
        self.window = check_int(window, "window", owner, minimum=3)
        self.settle = check_int(settle, "settle", owner, minimum=0)
        self.cooldown = check_int(cooldown, "cooldown", owner, minimum=1)
        self.ema: float | None = None
        self.on = self.always
        self.observations = 0
        self.costs: dict[str, float | None] = dict.fromkeys(self._COSTS)
        self.seen: dict[str, int] = dict.fromkeys(self._COSTS, 0)
        self._recent: dict[str, deque[float]] = {}
        self._sorted: dict[str, list[float]] = {}  # the same values, sorted
        self.since_score = 0
        self.chunks_per_pool: float | None = None
        # realized progress
        self.alpha = self.efficiency
        self.steps = 0
        self.cost_so_far = 0.0
        self.losses_seen = 0
        self.failures = 0
        self.off_until = 0
        self.rate_off = math.nan
        self.rate_on = math.nan
        self.realized = math.nan
        self.history: deque[dict[str, Any]] = deque(maxlen=self.HISTORY_LIMIT)
        self._off_points: deque[tuple[float, float]] = deque(maxlen=self.window)
        self._on_points: list[tuple[float, float]] = []
        self._on_steps = 0
        self._gains: list[float] = []

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
        if key in self._MEDIAN_COSTS:  # per-step times: a median, robust to pauses of the loop
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque()
                self._sorted[key] = []
            ordered = self._sorted[key]
            if len(recent) >= self.MEDIAN_OF:
                del ordered[bisect.bisect_left(ordered, recent.popleft())]
            recent.append(float(value))
            bisect.insort(ordered, float(value))
            mid = len(ordered) // 2
            self.costs[key] = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
            return
        old = self.costs[key]
        self.costs[key] = value if old is None else self.momentum * old + (1 - self.momentum) * value

    def gain(self) -> float:
        """The predicted gain G from the tau EMA (NaN before the first tau)."""
        if self.ema is None:
            return math.nan
        return self.ema**2 if self.gain_rule == "kappa" else self.ema

    def effective_gain(self) -> float:
        """The discounted gain ``1 + alpha (G - 1)`` the rule compares with R."""
        return discounted_gain(self.gain(), self.alpha)

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
        """The effective gain needed now: ``R (1 + h)`` while off, ``R`` while on (NaN if unknown)."""
        ratio = self.cost_ratio()
        return ratio if self.on else ratio * (1.0 + self.hysteresis)

    @property
    def threshold(self) -> float:
        """The threshold on tau itself (what ``tau_ema`` is compared with in reports).

        The tau at which the effective gain reaches :meth:`threshold_value` (inf when the
        efficiency is 0: no tau suffices).
        """
        needed = self.threshold_value()
        if needed != needed:
            return needed
        if self.alpha <= 0:
            return math.inf
        g = 1.0 + (needed - 1.0) / self.alpha
        return math.sqrt(max(g, 0.0)) if self.gain_rule == "kappa" else g

    def _event(self, event: str, reason: str, **extra: Any) -> None:
        self.history.append(
            {
                "step": self.steps,
                "event": event,
                "reason": reason,
                "gain": self.gain(),
                "effective_gain": self.effective_gain(),
                "cost_ratio": self.cost_ratio(),
                "efficiency": self.alpha,
                **extra,
            }
        )

    def _progress(self, timing: dict[str, Any], ratio: float) -> None:
        """Enter the previous step's (cost, loss) point into the window of its regime (R = ``ratio``)."""
        was_on = bool(timing.get("was_on", self.on))
        self.cost_so_far += (ratio if ratio == ratio else 1.0) if was_on else 1.0
        loss = timing.get("train_loss")
        if loss is None or not math.isfinite(loss):
            return
        self.losses_seen += 1
        point = (self.cost_so_far, float(loss))
        if was_on:
            self._on_points.append(point)
        else:
            self._off_points.append(point)

    def _check(self) -> bool | None:
        """The realized-progress check of an on-window: False (switch off), True (stay), None (not yet)."""
        if not self.losses_seen or len(self._on_points) < self.settle + self.window:
            return None
        points = self._on_points[self.settle :]
        self.rate_on = relative_rate([c for c, _ in points], [v for _, v in points])
        self.rate_off = relative_rate([c for c, _ in self._off_points], [v for _, v in self._off_points])
        self.realized = realized_speedup(self.rate_on, self.rate_off)
        gain = sum(self._gains) / len(self._gains) if self._gains else self.gain()
        ratio = self.cost_ratio()
        if self.realized == self.realized and ratio == ratio and gain > 1.0:
            per_step = min(self.realized * ratio, gain)  # realized speed-up per step
            measured = (per_step - 1.0) / (gain - 1.0)
            self.alpha = min(max(0.5 * (self.alpha + measured), 0.0), 1.0)
        self._on_points = self._on_points[: self.settle]  # next window, same settle skipped
        self._gains = []
        return not (self.realized == self.realized and self.realized < 1.0)

    def observe(self, tau_value: float, timing: dict[str, Any] | None = None) -> bool:
        """Feed tau and the last step's timings (and loss); return whether importance sampling is on."""
        self.since_score += 1
        timing = timing or {}
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
        ratio = self.cost_ratio()
        if self.steps > 0:
            self._progress(timing, ratio)
        self.steps += 1
        if tau_value == tau_value:
            self.ema = (
                tau_value if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * tau_value
            )
            self.observations += 1
        if self.always:
            self.on = True
            return True
        predicted = auto_decision(self.effective_gain(), ratio, self.on, self.hysteresis)
        if self.on:
            if self.gain() == self.gain():
                self._gains.append(self.gain())
            verdict = self._check()
            if verdict is False:
                self.failures += 1
                self.off_until = self.steps + self.cooldown * 2 ** (self.failures - 1)
                self._switch(False, "realized speed-up below 1", realized=self.realized)
            elif not predicted:
                self._switch(False, "effective gain below the cost ratio")
        elif predicted and self.steps >= self.off_until:
            if self.losses_seen and len(self._off_points) < self.window:
                pass  # the uniform reference window is not full yet
            else:
                self._switch(True, "effective gain above the cost ratio")
        return self.on

    def _switch(self, on: bool, reason: str, **extra: Any) -> None:
        self.on = on
        self._event("on" if on else "off", reason, **extra)
        if on:
            self._on_points, self._gains = [], []
        else:
            self._off_points.clear()

    def state_dict(self) -> dict[str, Any]:
        """tau EMA, decision, cost EMAs, counters and the realized-progress state."""
        return {
            "ema": self.ema,
            "on": self.on,
            "observations": self.observations,
            "costs": dict(self.costs),
            "seen": dict(self.seen),
            "since_score": self.since_score,
            "chunks_per_pool": self.chunks_per_pool,
            "alpha": self.alpha,
            "steps": self.steps,
            "cost_so_far": self.cost_so_far,
            "losses_seen": self.losses_seen,
            "failures": self.failures,
            "off_until": self.off_until,
            "rate_off": self.rate_off,
            "rate_on": self.rate_on,
            "realized": self.realized,
            "history": [dict(h) for h in self.history],
            "off_points": [list(p) for p in self._off_points],
            "on_points": [list(p) for p in self._on_points],
            "gains": list(self._gains),
            "recent": {k: list(v) for k, v in self._recent.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without the realized-progress keys starts them afresh)."""
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
        self.alpha = float(state.get("alpha", self.efficiency))
        self.steps = int(state.get("steps", self.observations))
        self.cost_so_far = float(state.get("cost_so_far", 0.0))
        self.losses_seen = int(state.get("losses_seen", 0))
        self.failures = int(state.get("failures", 0))
        self.off_until = int(state.get("off_until", 0))
        self.rate_off = float(state.get("rate_off", math.nan))
        self.rate_on = float(state.get("rate_on", math.nan))
        self.realized = float(state.get("realized", math.nan))
        self.history = deque((dict(h) for h in state.get("history", [])), maxlen=self.HISTORY_LIMIT)
        self._off_points = deque(
            (tuple(p) for p in state.get("off_points", [])),
            maxlen=self.window,  # type: ignore[misc]
        )
        self._on_points = [tuple(p) for p in state.get("on_points", [])]  # type: ignore[misc]
        self._gains = [float(g) for g in state.get("gains", [])]
        self._recent = {
            k: deque(float(v) for v in list(values)[-self.MEDIAN_OF :])
            for k, values in state.get("recent", {}).items()
        }
        self._sorted = {k: sorted(v) for k, v in self._recent.items()}

    def describe(self) -> dict[str, Any]:
        """The decision, the rule and its inputs.

        Returns:
            dict with ``rule`` ("auto"), ``decision_rule`` (the rule in words),
            ``decision`` ("pool-is" or "uniform"), ``on``, ``ema`` (tau EMA), ``gain``
            (predicted G) and ``gain_rule``, ``efficiency`` (alpha), ``effective_gain``,
            ``cost_ratio``, ``gain_threshold`` (the effective gain needed now),
            ``threshold`` (the same on the tau scale, comparable with ``ema``),
            ``hysteresis``, ``costs`` (seconds: ``train_seconds`` per step,
            ``fetch_seconds`` per batch read, ``score_seconds`` per pool scored), and the
            realized-progress check: ``rate_off`` / ``rate_on`` (relative loss decrease per
            unit cost), ``realized_speedup``, ``failures``, ``cooldown_until`` (the step
            before which it stays off), ``window``, ``settle``, ``reference_points`` and
            ``history`` (the switch events: step, on / off, reason, gains, cost ratio).
        """
        return {
            "rule": "auto",
            "decision_rule": (
                "on when 1 + alpha (G - 1) > R (1 + h), off when below R; once on, off when the "
                "realized speed-up per unit cost S = rate_on / rate_off < 1, then a doubling cool-down"
            ),
            "decision": "pool-is" if self.on else "uniform",
            "on": self.on,
            "ema": self.ema,
            "gain": self.gain(),
            "gain_rule": self.gain_rule,
            "efficiency": self.alpha,
            "effective_gain": self.effective_gain(),
            "cost_ratio": self.cost_ratio(),
            "gain_threshold": self.threshold_value(),
            "threshold": self.threshold,
            "hysteresis": self.hysteresis,
            "costs": dict(self.costs),
            "rate_off": self.rate_off,
            "rate_on": self.rate_on,
            "realized_speedup": self.realized,
            "failures": self.failures,
            "cooldown_until": self.off_until,
            "window": self.window,
            "settle": self.settle,
            "reference_points": len(self._off_points),
            "history": [dict(h) for h in self.history],
        }
