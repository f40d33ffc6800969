"""Bayesian filtering optimizers: BRMSprop and BAdam.

Aitchison (2018) reads adaptive SGD as Bayesian filtering: each weight ``w`` is a hidden
state that drifts between steps, and the gradient of the minibatch loss is the observation.
Per scalar weight (elementwise for every tensor) the generative model is

.. math::

    w_{t+1} = a\\,w_t + \\eta\\,\\xi_t,\\quad \\xi_t \\sim \\mathcal N(0, 1),\\qquad
    a = 1 - \\frac{\\eta^2}{2\\sigma^2},

with ``eta = lr`` and ``sigma^2 = prior_variance`` (the stationary prior variance
``eta^2 / (1 - a^2) = 2 sigma^2 / (1 + a)`` is ``sigma^2`` to first order in
``eta^2 / sigma^2``). The likelihood of the data is approximated by a Gaussian in ``w`` whose
precision is the bias-corrected running mean square gradient ``v_hat`` (a Fisher
approximation) and whose log-density has gradient ``-g`` at the prior mean. A factorised
(per-parameter) Kalman filter for this model keeps a posterior mean ``mu`` (the parameter
itself) and variance ``s^2`` and, at step t = 1, 2, ... with ``g = p.grad``:

.. math::

    \\begin{aligned}
    &\\text{1. predict:} && \\mu \\leftarrow a\\,\\mu, \\qquad s^2_{\\text{prior}} = a^2 s^2 + \\eta^2 \\\\
    &\\text{2. second moment:} && v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2, \\qquad
        \\hat v = v / (1 - \\beta_2^t) \\\\
    &\\text{3. precision:} && s^2 \\leftarrow
        1 \\big/ \\max\\big(1 / s^2_{\\text{prior}} + \\hat v,\\ \\epsilon\\big) \\\\
    &\\text{4. mean:} && \\text{BRMSprop: } \\mu \\leftarrow \\mu - s^2 g; \\qquad
        \\text{BAdam: } m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\ \\hat m = m / (1-\\beta_1^t),\\
        \\mu \\leftarrow \\mu - s^2 \\hat m
    \\end{aligned}

The code computes 2 before 1 (they are independent), so that at t = 1 the variance can be
initialised from the first ``v_hat``: ``s^2_0 = 1 / (1 / sigma^2 + sqrt(v_hat_1) / eta)``,
the Adam-like scale, instead of the prior's large variance. The predict step's ``a mu`` is a
decoupled weight decay of ``eta^2 / (2 sigma^2)`` per step (AdamW-like).

Limits. With ``eta^2 / sigma^4 << v_hat << 1 / eta^2`` the steady-state variance is
``s^2 ~ eta / sqrt(v_hat)`` and the update is RMSprop's / Adam's with learning rate ``eta``
(and ``eps = 0``); with ``v_hat -> 0``, ``s^2 -> sigma^2`` and the update is SGD (BRMSprop) or
SGD with an EMA momentum (BAdam) with learning rate ``sigma^2``. The upper bound matters:
when ``eta sqrt(v_hat)`` is not small, one step's observation dominates the prior drift
``eta^2`` and ``s^2`` approaches ``1 / v_hat`` (from below), under Adam's step size. The
initialisation ``eta / (sqrt(v_hat) + eta / sigma^2)`` is Adam's step size with
``eps = eta / sigma^2``; it has both limits right, but the exact steady state of the
recursion under a constant gradient (the positive root of
``v_hat a^2 s^4 + (1 - a^2 + v_hat eta^2) s^2 - eta^2 = 0``) differs from it in between:
to first order by the factor ``1 + (eta / sigma^2) / (2 sqrt(v_hat)) - eta sqrt(v_hat) / 2``
in the Adam regime and ``1 + sqrt(v_hat) sigma^2 / eta`` in the SGD regime, and by
``sqrt(5) - 1 ~ 1.236`` at the crossover ``sqrt(v_hat) = eta / sigma^2`` (small ``eta``).

``eps`` floors the precision (step 3). The precision is at least ``1 / s^2_prior`` and, by
induction, ``s^2_prior <= 2 sigma^2 / (1 + a) < 2 sigma^2``, so the floor never binds unless
``prior_variance > 1 / (2 eps)`` (5e11 for the default): it changes no result for normal
inputs and only keeps ``s^2 <= 1 / eps``. ``eps = 0`` disables it.

NaN or infinite gradients propagate as in ``torch.optim``: they make the affected elements'
state (``exp_avg_sq``, ``posterior_variance``, ``exp_avg``) and weights NaN, elementwise;
other elements and other parameters are untouched. Sparse gradients raise a ``RuntimeError``.

References:
    L. Aitchison, "A unified theory of adaptive stochastic gradient descent as Bayesian
    filtering", arXiv:1807.07540 (2018) (BRMSprop, BAdam); L. Aitchison, "Bayesian filtering
    unifies adaptive and non-adaptive neural network optimization methods", NeurIPS 2020.
    The generative model is the paper's; the four equations above are the standard Kalman
    predict / update for that model, written out here. The papers' text available to us had
    its mathematics stripped, so these equations could not be checked symbol by symbol
    against the paper: treat them as this library's reading of the model, not a quotation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._validation import check_float, param_error

__all__ = ["BRMSprop", "BAdam"]


def prior_decay(lr: float, prior_variance: float, owner: str) -> float:
    """The prior's per-step decay ``a = 1 - lr^2 / (2 prior_variance)``, checked to lie in (0, 1].

    Raises:
        ValueError: ``a <= 0``, i.e. ``lr^2 >= 2 prior_variance``.
    """
    a = 1.0 - lr * lr / (2.0 * prior_variance)
    if not 0.0 < a <= 1.0:
        raise ValueError(
            f"The 'lr' and 'prior_variance' parameters of {owner} must satisfy lr**2 < 2 * prior_variance, "
            f"so that the prior decay a = 1 - lr**2 / (2 * prior_variance) lies in (0, 1]. Got lr={lr!r}, "
            f"prior_variance={prior_variance!r} (a = {a!r})."
        )
    return a


def initial_posterior_variance(v_hat: torch.Tensor, lr: float, prior_variance: float) -> torch.Tensor:
    """``s^2_0 = 1 / (1 / prior_variance + sqrt(v_hat) / lr)``: the Adam-like starting variance."""
    return torch.reciprocal(v_hat.sqrt().div_(lr).add_(1.0 / prior_variance))


def kalman_variance_step_(
    s2: torch.Tensor, v_hat: torch.Tensor, a: float, lr: float, eps: float
) -> torch.Tensor:
    """Predict then update one posterior variance in place; returns ``s2``.

    ``s2 <- 1 / max(1 / (a^2 s2 + lr^2) + v_hat, eps)`` (elementwise; NaN propagates).
    """
    s2.mul_(a * a).add_(lr * lr)  # s^2_prior
    s2.reciprocal_().add_(v_hat)  # posterior precision
    if eps > 0.0:
        s2.clamp_min_(eps)
    return s2.reciprocal_()


def _check_beta(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, minimum=0.0, maximum=1.0, max_inclusive=False)  # type: ignore[return-value]


class _BayesianFilter(torch.optim.Optimizer):
    """Shared machinery of :class:`BRMSprop` and :class:`BAdam` (not public)."""

    _momentum = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validating its hyperparameters (defaults filled in first)."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        lr = check_float(group["lr"], "lr", owner, minimum=0.0, min_inclusive=False)
        if self._momentum:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise param_error("betas", owner, "a pair (beta1, beta2)", betas, TypeError)
            group["betas"] = (
                _check_beta(betas[0], "betas[0]", owner),
                _check_beta(betas[1], "betas[1]", owner),
            )
        else:
            group["beta2"] = _check_beta(group["beta2"], "beta2", owner)
        sigma2 = check_float(
            group["prior_variance"], "prior_variance", owner, minimum=0.0, min_inclusive=False
        )
        group["eps"] = check_float(group["eps"], "eps", owner, minimum=0.0)
        group["lr"], group["prior_variance"] = lr, sigma2
        prior_decay(lr, sigma2, owner)  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one filtering step for every parameter with a gradient; return the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owner = type(self).__name__
        for group in self.param_groups:
            lr = float(group["lr"])
            sigma2 = float(group["prior_variance"])
            a = prior_decay(lr, sigma2, owner)  # a scheduler may have changed lr
            eps = float(group["eps"])
            if self._momentum:
                beta1, beta2 = (float(b) for b in group["betas"])
            else:
                beta1, beta2 = 0.0, float(group["beta2"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(f"{owner} does not support sparse gradients.")
                if torch.is_complex(p):
                    raise RuntimeError(f"{owner} does not support complex parameters.")
                state = self.state[p]
                first = len(state) == 0
                if first:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if self._momentum:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                v = state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # 2. second moment
                v_hat = v / (1.0 - beta2**t)
                if first:  # s^2 before the first predict: the steady state for v_hat_1
                    state["posterior_variance"] = initial_posterior_variance(v_hat, lr, sigma2)
                s2 = kalman_variance_step_(state["posterior_variance"], v_hat, a, lr, eps)  # 1. and 3.
                if self._momentum:
                    m = state["exp_avg"]
                    m.lerp_(g, 1.0 - beta1)
                    direction = m / (1.0 - beta1**t)
                else:
                    direction = g
                if a != 1.0:
                    p.mul_(a)  # 1. predict the mean: decoupled weight decay lr^2 / (2 prior_variance)
                p.addcmul_(s2, direction, value=-1.0)  # 4. update the mean
        return loss


class BRMSprop(_BayesianFilter):
    """Bayesian RMSprop: a per-parameter Kalman filter whose mean update is ``s^2 g``.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: ``eta`` (> 0, finite), the prior's per-step drift; the RMSprop-limit learning
            rate. Default 1e-3.
        beta2: EMA factor of the squared gradient, in [0, 1). Default 0.999.
        prior_variance: ``sigma^2`` (> 0, finite), the prior's stationary variance; the
            SGD-limit learning rate. Needs ``lr**2 < 2 * prior_variance``. Default 1.0.
        eps: floor on the posterior precision (>= 0); binds only when
            ``prior_variance > 1 / (2 eps)``. Default 1e-12.

    .. math::

        \\mu \\leftarrow a\\mu - s^2 g,\\quad
        s^2 \\leftarrow \\frac{1}{1 / (a^2 s^2 + \\eta^2) + \\hat v},\\quad
        a = 1 - \\frac{\\eta^2}{2\\sigma^2}

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg_sq`` (v) and
    ``posterior_variance`` (s^2, the variance used by the last step). See the module
    docstring (:mod:`isample.optim`) for the model, the initialisation and the limits.

    Example::

        opt = BRMSprop(model.parameters(), lr=1e-3, prior_variance=1.0)
        loss = loss_fn(model(x), y).mean(); loss.backward(); opt.step(); opt.zero_grad()

    References:
        L. Aitchison, arXiv:1807.07540 (2018); the update equations are the Kalman filter of
        the paper's model, written out here (not checked symbol by symbol against the paper).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        beta2: float = 0.999,
        prior_variance: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        defaults = {"lr": lr, "beta2": beta2, "prior_variance": prior_variance, "eps": eps}
        self._check_group(dict(defaults))
        super().__init__(params, defaults)


class BAdam(_BayesianFilter):
    """Bayesian Adam: the :class:`BRMSprop` filter with an EMA of the gradient in the mean update.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: ``eta`` (> 0, finite), the prior's per-step drift; the Adam-limit learning
            rate. Default 1e-3.
        betas: ``(beta1, beta2)``, EMA factors of the gradient and of its square, each in
            [0, 1). Default (0.9, 0.999).
        prior_variance: ``sigma^2`` (> 0, finite), the prior's stationary variance; the
            SGD-with-momentum-limit learning rate. Needs ``lr**2 < 2 * prior_variance``.
            Default 1.0.
        eps: floor on the posterior precision (>= 0); binds only when
            ``prior_variance > 1 / (2 eps)``. Default 1e-12.

    .. math::

        m \\leftarrow \\beta_1 m + (1 - \\beta_1) g,\\quad
        \\mu \\leftarrow a\\mu - s^2 \\frac{m}{1 - \\beta_1^t},\\quad
        s^2 \\leftarrow \\frac{1}{1 / (a^2 s^2 + \\eta^2) + \\hat v}

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg`` (m), ``exp_avg_sq``
    (v) and ``posterior_variance`` (s^2, the variance used by the last step).

    Example::

        opt = BAdam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), prior_variance=1.0)

    References:
        L. Aitchison, arXiv:1807.07540 (2018); the update equations are the Kalman filter of
        the paper's model, written out here (not checked symbol by symbol against the paper).
    """

    _momentum = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        prior_variance: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "prior_variance": prior_variance, "eps": eps}
        self._check_group(dict(defaults))
        super().__init__(params, defaults)
