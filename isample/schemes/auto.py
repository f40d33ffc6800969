"""``auto``: pool importance sampling only while it pays in measured time, uniform otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_choice, check_float, check_int, param_error
from ..pool_loader import ALGORITHM1_TAU_EVERY, check_presample
from ..scorers import UpperBoundScorer
from ..switch import AutoSwitch, check_tau_momentum
from ._wrappers import PoolScheme

__all__ = ["Auto", "ADAPTIVE_OPTIMIZERS", "gain_rule_for"]

#: optimizers whose step follows the square-root scaling rule (gain sqrt(kappa) instead of kappa)
ADAPTIVE_OPTIMIZERS: tuple[type, ...] = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta")
    if hasattr(torch.optim, name)
)


def gain_rule_for(optimizer: Any) -> str:
    """``"sqrt-kappa"`` for Adam-type optimizers (square-root scaling), else ``"kappa"`` (SGD, None)."""
    return "sqrt-kappa" if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else "kappa"


class Auto(PoolScheme):
    """Importance sampling when it pays, measured; the cost of uniform sampling when it does not.

    The scheme runs Katharopoulos and Fleuret's Algorithm 1 (see
    :class:`isample.PoolLoader`, ``score_when_off=False``) with a switch driven by measured
    costs (:class:`isample.switch.AutoSwitch`):

    * **Off (uniform).** A step reads a uniform batch of b (weights 1). The gradient-norm
      upper bound of the batch is computed from the training outputs handed to
      :meth:`feedback` (closed form; no extra forward), and tau is tracked over the last
      ``B = presample x b`` of those scores. Every ``probe_every`` steps (and at the
      start) one batch is also scored by a timed no-grad pass, which measures the scoring
      cost (scaled to B). So while off a step costs what a uniform step costs.
    * **Decision.** With EMAs of the training step time ``t_tr``, the time to read a batch
      ``t_f`` and the time to score a pool and draw from it ``t_s``:

      .. math::

          G = \\tau^2 \\text{ (SGD) or } \\tau \\text{ (Adam-type)}, \\qquad
          G_{eff} = 1 + \\alpha (G - 1), \\qquad
          R = \\frac{t_{tr} + k t_f + t_s}{t_{tr} + t_f}, \\quad k = B / b,

      importance sampling turns on when ``G_eff > R (1 + h)`` and off again when
      ``G_eff < R`` (hysteresis ``h``). ``tau**2`` estimates the variance multiplier kappa of
      drawing b from a pool of B; a step with kappa times less gradient noise is worth about
      kappa uniform steps for SGD and about ``sqrt(kappa)`` for Adam, RMSprop or Adagrad
      (square-root scaling, Malladi et al. 2022) only if the learning rate is rescaled and
      the noise limits progress. At the learning rate tuned for uniform batches the realized
      excess speed-up is a fraction alpha of the predicted one (``isample bench`` on digits:
      kappa 6-7 bought 1.15x per step, alpha about 0.1 with Adam and below 0.05 with SGD),
      hence the discount, starting at ``efficiency``.
    * **Realized progress.** The loop's losses (``feedback(batch, outputs, losses)``) give
      the weighted mean loss of every batch (unbiased in both regimes). A switch-on needs a
      full reference window of ``window`` uniform steps; once on, after ``settle`` steps,
      the relative rate of loss decrease per unit cost (a pool step costs R) is fitted on
      ``window`` pool steps and compared with the uniform reference: a realized speed-up
      ``S < 1`` switches importance sampling off for ``cooldown`` steps, doubled after each
      failure, and every check re-estimates alpha from ``S R`` (the realized per-step
      speed-up). See :class:`isample.switch.AutoSwitch`.
    * **On (pool IS).** A step reads a uniform pool of B, scores it and draws b with
      replacement from ``p_i = s_i / sum s``, weights ``1 / (B p_i)``: unbiased, as the
      uniform batches are.

    ``describe()`` returns the decision and its inputs (tau EMA, gain, cost ratio,
    threshold, measured costs); ``status()`` a one-line summary for a progress bar.

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs: unused.
        optimizer: picks the gain rule when ``gain="auto"`` (Adam-type: ``sqrt-kappa``).
        presample: B / b, rounded to a whole number (3.0).
        hysteresis: h >= 0 (0.1).
        gain: ``"auto"`` (from the optimizer), ``"kappa"`` or ``"sqrt-kappa"``.
        tau_momentum: EMA momentum of tau and of the measured times (0.9).
        probe_every: steps between timed scoring probes while off (500).
        efficiency: initial alpha, the share of the predicted excess speed-up trusted (0.1).
        window: steps per realized-progress fit (30).
        settle: pool steps skipped after switching on before the fit (10).
        cooldown: steps off after the first failed check, doubled after each (200).
        closed_form: closed-form upper bound for cross-entropy / MSE (default True).
        scoring_batch_size, num_batches, drop_last, **loader_options:
            :class:`isample.PoolLoader` options.

    References:
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942), Algorithm 1; Malladi et
        al., NeurIPS 2022 (arXiv:2205.10287) for the optimizer-dependent gain.
    """

    name = "auto"
    unbiased = True
    #: ``tau_every`` of its pool loader (see :data:`isample.pool_loader.ALGORITHM1_TAU_EVERY`)
    TAU_EVERY = ALGORITHM1_TAU_EVERY

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module,
        loss_fn: Callable,
        batch_size: int,
        *,
        seed: int | None = 0,
        epochs: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
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
        scoring_batch_size: int | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        owner = type(self).__name__
        presample = check_presample(presample, owner)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise param_error("optimizer", owner, "a torch.optim.Optimizer or None", optimizer, TypeError)
        rule = check_choice(gain, "gain", owner, ("auto", "kappa", "sqrt-kappa"))
        if rule == "auto":
            rule = gain_rule_for(optimizer)
        switch = AutoSwitch(
            momentum=check_tau_momentum(tau_momentum, owner),
            hysteresis=check_float(hysteresis, "hysteresis", owner, minimum=0.0, maximum=10.0),
            gain=rule,
            probe_every=check_int(probe_every, "probe_every", owner, minimum=1),
            efficiency=check_float(efficiency, "efficiency", owner, minimum=0.0, maximum=1.0),
            window=check_int(window, "window", owner, minimum=3),
            settle=check_int(settle, "settle", owner, minimum=0),
            cooldown=check_int(cooldown, "cooldown", owner, minimum=1),
        )
        options: dict[str, Any] = dict(
            presample=presample,
            switch=switch,
            score_when_off=False,
            warn_off_epochs=None,
            tau_every=self.TAU_EVERY,
            scoring_batch_size=scoring_batch_size,
            num_batches=num_batches,
            drop_last=drop_last,
            loader_options=loader_options,
        )
        super().__init__(
            dataset, model, loss_fn, batch_size, seed, UpperBoundScorer(loss_fn, closed_form), **options
        )

    @property
    def switch(self) -> AutoSwitch:
        """The :class:`isample.switch.AutoSwitch` making the decision."""
        return self.pool.switch
