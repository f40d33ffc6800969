"""Monte Carlo check that a weighted loader gives unbiased gradients with the predicted variance."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import torch
from torch import nn

from .._validation import check_float, check_int, param_error
from ..batch import batch_size_of
from ..scorers import model_device, per_example_losses, scoring_mode
from .functional import _probabilities, gradient_variance
from .per_example import per_example_gradients, select_parameters

__all__ = ["ValidationReport", "validate_sampler"]

#: Per-coordinate floor on the standard error, relative to the coordinate's RMS (float32 rounding).
ROUNDING_FLOOR = 1e-5


@dataclass
class ValidationReport:
    """Result of :func:`validate_sampler`.

    Attributes:
        num_batches: T, batches drawn.
        batch_size: mean batch size b.
        num_parameters: P, gradient coordinates compared.
        relative_error: ``||m - g|| / ||g||``, m the mean of the T minibatch gradients.
        max_abs_z: the largest per-coordinate ``|m_k - g_k| / se_k``.
        z_threshold: Bonferroni threshold ``Phi^{-1}(1 - alpha / (2P))`` for ``max_abs_z``.
        norm_ratio: ``T ||m - g||^2 / tr(Sigma_hat)``, about 1 for an unbiased loader.
        mean_passed: ``max_abs_z <= z_threshold``.
        empirical_variance: mean over batches of ``||h_t - g||^2``, an unbiased estimate
            of the trace of the minibatch gradient's covariance.
        expected_variance: ``mean_t V(p) / b_t`` when probabilities were given, else None.
        variance_z: ``(empirical - expected) / standard error``, or None.
        variance_passed: ``|variance_z| <= Phi^{-1}(1 - alpha / 2)``, or None.
        alpha: the test level.
        passed: ``mean_passed`` and (``variance_passed`` when it was tested); False
            whenever ``status`` is not ``"passed"``.
        status: ``"passed"``, ``"failed"`` or ``"inconclusive"`` (the mean test failed
            but examples never drawn can explain the gap, and without ``probabilities``
            their share of the gradient cannot be weighed: rerun with ``probabilities``
            or more batches).
        reason: one sentence saying why the report did not pass ("" when it passed).
        nonfinite_batches: batches whose minibatch gradient had NaN or inf entries
            (any such batch fails the report).
    """

    num_batches: int
    batch_size: float
    num_parameters: int
    relative_error: float
    max_abs_z: float
    z_threshold: float
    norm_ratio: float
    mean_passed: bool
    empirical_variance: float
    expected_variance: float | None
    variance_z: float | None
    variance_passed: bool | None
    alpha: float
    passed: bool
    status: str = "passed"
    reason: str = ""
    nonfinite_batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def validate_sampler(
    loader: Iterable[Any],
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    dataset_inputs: Any,
    dataset_targets: Any,
    num_batches: int,
    probabilities: torch.Tensor | None = None,
    alpha: float = 1e-3,
    chunk_size: int = 64,
    params: Iterable[nn.Parameter | str] | None = None,
) -> ValidationReport:
    """Draw batches from a weighted loader and test them against the exact full gradient.

    For each of T batches (``WeightedBatch``: ``.inputs``, ``.targets``, ``.indices``,
    ``.weights``), the minibatch gradient ``h_t`` of ``(weights * losses).mean()`` is taken
    by autograd (model in eval mode, as for the exact gradient). With ``g`` the exact mean
    of the per-example gradients of the dataset:

    * mean test: ``z_k = (m_k - g_k) / se_k`` with ``se_k^2 = s_k^2 / T + (1e-5 rms_k)^2``
      (``s_k`` the sample std of coordinate k, a floor for float32 rounding); passes when
      ``max_k |z_k|`` is below the Bonferroni threshold for level ``alpha``.
    * variance test (when ``probabilities`` p of the loader's i.i.d. draws are given):
      ``d_t = ||h_t - g||^2`` has mean ``V(p) / b`` (:func:`gradient_variance`); passes when
      ``|mean(d) - V(p)/b| <= Phi^{-1}(1 - alpha/2) se_d``. This assumes b
      i.i.d. draws with replacement per batch and weights ``1 / (N p_i)``.

    Heavy tails (a few examples with tiny p and huge weights): in T batches such an
    example is usually never drawn, so the sample standard errors miss its share of the
    variance, and the rare batch that draws it moves the mean far in units of the
    others' spread. With ``probabilities``, each standard error is the larger of the
    sample one and the exact one under the null hypothesis (per coordinate
    ``sum_i p_i (w_i G_ik)^2 - g_k^2`` over b; for ``d`` the exact fourth moment of a
    mean of b i.i.d. vectors): the exact one covers the never-drawn case, the sample one
    the drawn-once case. Without ``probabilities`` a failing mean test whose gap the
    never-drawn examples' share of ``g`` can explain is reported as ``"inconclusive"``.
    Any NaN or inf minibatch gradient fails the report (it is never averaged away).

    Args:
        loader: any iterable of ``WeightedBatch`` (re-iterated if it runs out).
        model: the model whose gradients are compared.
        loss_fn: ``(outputs, targets) -> per-example losses``.
        dataset_inputs: all N inputs, row i is the example with index i.
        dataset_targets: all N targets (or ``None``).
        num_batches: T >= 2.
        probabilities: optional Tensor of shape (N,), the loader's draw probabilities.
        alpha: test level (default 1e-3).
        chunk_size: chunk size of the exact per-example gradients.
        params: optional parameter subset (names or tensors).

    Returns:
        :class:`ValidationReport`.
    """
    owner = "validate_sampler"
    if not isinstance(model, nn.Module):
        raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
    t_total = check_int(num_batches, "num_batches", owner, minimum=2)
    level = check_float(
        alpha, "alpha", owner, minimum=0.0, maximum=1.0, min_inclusive=False, max_inclusive=False
    )
    chosen = [v for _, v in select_parameters(model, params, owner)]
    G = per_example_gradients(model, loss_fn, dataset_inputs, dataset_targets, chunk_size, chosen)
    G = G.to("cpu", torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{owner}: the exact per-example gradients contain NaN or inf.")
    n_ex, n_par = G.shape
    g = G.mean(0)
    v_one = None
    exact = None
    if probabilities is not None:
        prob = _probabilities(probabilities, n_ex, owner, "probabilities")
        v_one = gradient_variance(G, prob)
        exact = _null_moments(G, prob)

    device = model_device(model)
    s1 = torch.zeros(n_par, dtype=torch.float64)
    s2 = torch.zeros(n_par, dtype=torch.float64)
    raw2 = torch.zeros(n_par, dtype=torch.float64)
    dists = []
    sizes = []
    seen = torch.zeros(n_ex, dtype=torch.bool)
    nonfinite = 0
    iterator = iter(loader)
    restarted = False
    while len(dists) < t_total:
        try:
            batch = next(iterator)
            restarted = False
        except StopIteration:
            if restarted:
                raise ValueError(f"The 'loader' parameter of {owner} yielded no batches.") from None
            iterator, restarted = iter(loader), True
            continue
        for attr in ("inputs", "targets", "indices", "weights"):
            if not hasattr(batch, attr):
                raise TypeError(
                    f"{owner} expects WeightedBatch objects from the loader; got {type(batch).__name__}."
                )
        indices = batch.indices.to("cpu", torch.long)
        if indices.numel() == 0 or bool((indices < 0).any()) or bool((indices >= n_ex).any()):
            raise ValueError(f"{owner}: batch indices must lie in [0, {n_ex}).")
        b = batch_size_of(batch.inputs)
        if indices.shape != (b,) or batch.weights.shape != (b,):
            raise ValueError(
                f"{owner}: a batch has {b} rows but indices / weights of shape "
                f"{tuple(indices.shape)} / {tuple(batch.weights.shape)}."
            )
        inputs = batch.inputs.to(device) if isinstance(batch.inputs, torch.Tensor) else batch.inputs
        targets = batch.targets.to(device) if isinstance(batch.targets, torch.Tensor) else batch.targets
        with scoring_mode(model), torch.enable_grad():
            losses = per_example_losses(loss_fn, model(inputs), targets, owner)
            loss = (batch.weights.to(device=device, dtype=losses.dtype) * losses).mean()
            grads = torch.autograd.grad(loss, chosen, allow_unused=True)
        h = torch.cat(
            [
                (gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                for gr, p in zip(grads, chosen, strict=True)
            ]
        ).to("cpu", torch.float64)
        seen[indices] = True
        if not bool(torch.isfinite(h).all()):
            nonfinite += 1
        diff = h - g
        s1 += diff
        s2 += diff.square()
        raw2 += h.square()
        dists.append(float(diff.square().sum()))
        sizes.append(b)

    t = float(t_total)
    mean_diff = s1 / t
    var = ((s2 - s1.square() / t) / (t - 1)).clamp_min(0.0)
    floor = ROUNDING_FLOOR * (raw2 / t).sqrt()
    inv_b = sum(1.0 / bt for bt in sizes)  # sum_t 1 / b_t
    sample_var = var / t
    if exact is not None:  # the exact variance of the mean under the null: covers unseen heavy examples
        sample_var = torch.maximum(sample_var, exact[0] * inv_b / t**2)
    se = (sample_var + floor.square()).sqrt()
    zero = mean_diff == 0
    z = torch.where(se > 0, mean_diff.abs() / se.clamp_min(1e-300), torch.where(zero, 0.0, math.inf))
    z = torch.where(torch.isnan(mean_diff) | torch.isnan(se), math.nan, z)  # NaN never passes
    max_z = float(z.max()) if not bool(torch.isnan(z).any()) else math.nan
    z_thr = NormalDist().inv_cdf(1.0 - level / (2 * n_par))
    trace = float(var.sum())
    norm_ratio = t * float(mean_diff.square().sum()) / trace if trace > 0 else math.nan
    g_norm = float(g.norm())
    rel = float(mean_diff.norm()) / g_norm if g_norm > 0 else float(mean_diff.norm())
    mean_passed = bool(max_z <= z_thr) and nonfinite == 0
    inconclusive = False
    if not mean_passed and nonfinite == 0 and exact is None and not bool(seen.all()):
        # could the examples never drawn explain the gap? their share of g is unknown without p
        unseen_share = G[~seen].sum(0).abs() / n_ex
        failing = z > z_thr
        inconclusive = bool((mean_diff.abs()[failing] <= unseen_share[failing] + z_thr * se[failing]).all())

    d = torch.tensor(dists, dtype=torch.float64)
    emp = float(d.mean())
    expected = v_z = v_pass = None
    if v_one is not None:
        expected = float(sum(v_one / bt for bt in sizes) / len(sizes))
        se_v = float(d.std()) / math.sqrt(t)
        if exact is not None and math.isfinite(expected):
            m2, m4, tr_s2 = exact[1]
            var_d = sum(
                (bt * m4 + bt * (bt - 1) * (m2 * m2 + 2 * tr_s2)) / bt**4 - (m2 / bt) ** 2 for bt in sizes
            )
            se_v = max(se_v, math.sqrt(max(var_d, 0.0)) / t)
        if not math.isfinite(emp):
            v_z, v_pass = math.nan, False
        elif se_v > 0:
            v_z = (emp - expected) / se_v
            v_pass = abs(v_z) <= NormalDist().inv_cdf(1.0 - level / 2)
        else:
            v_z = 0.0 if abs(emp - expected) <= 1e-9 * max(expected, 1e-300) else math.inf
            v_pass = v_z == 0.0
    v_failed = v_pass is False
    if nonfinite:
        status = "failed"
        reason = f"{nonfinite} of {t_total} minibatch gradients had NaN or inf entries."
    elif mean_passed and not v_failed:
        status, reason = "passed", ""
    elif inconclusive and not v_failed:
        status = "inconclusive"
        reason = (
            f"the mean test failed (max |z| = {max_z:.3g} > {z_thr:.3g}) but {int((~seen).sum())} examples "
            "were never drawn and their share of the gradient explains the gap; pass 'probabilities' "
            "(exact standard errors) or draw more batches."
        )
    else:
        status = "failed"
        reason = (
            f"mean test: max |z| = {max_z:.3g} > {z_thr:.3g}."
            if not mean_passed
            else f"variance test: z = {v_z:.3g} (empirical {emp:.4g}, expected {expected:.4g})."
        )
    return ValidationReport(
        num_batches=t_total,
        batch_size=sum(sizes) / len(sizes),
        num_parameters=n_par,
        relative_error=rel,
        max_abs_z=max_z,
        z_threshold=z_thr,
        norm_ratio=norm_ratio,
        mean_passed=bool(mean_passed),
        empirical_variance=emp,
        expected_variance=expected,
        variance_z=v_z,
        variance_passed=v_pass,
        alpha=level,
        passed=status == "passed",
        status=status,
        reason=reason,
        nonfinite_batches=nonfinite,
    )


def _null_moments(G: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Exact moments of one unbiased draw ``X = G_i / (N p_i) - mu``, ``i ~ p``, under the null.

    Returns:
        ``(var_k, (m2, m4, tr_sigma2))``: the per-coordinate variance (float64 Tensor of
        shape (P,)), ``E||X||^2``, ``E||X||^4`` and ``tr(Cov(X)^2)`` (floats), over the
        support of p (``inf`` when an example outside it has a non-zero gradient).
    """
    n_ex = G.shape[0]
    support = p > 0
    if bool((G[~support] != 0).any()):
        inf = torch.full((G.shape[1],), math.inf, dtype=torch.float64)
        return inf, (math.inf, math.inf, math.inf)
    ps = p[support]
    y = G[support] / (n_ex * ps).unsqueeze(1)  # the weighted draw values w_i g_i
    mu = (ps.unsqueeze(1) * y).sum(0)
    x = y - mu
    var_k = (ps.unsqueeze(1) * x.square()).sum(0)
    sq = x.square().sum(1)
    m2 = float((ps * sq).sum())
    m4 = float((ps * sq.square()).sum())
    a = x * ps.sqrt().unsqueeze(1)
    small = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a  # same Frobenius norm
    return var_k, (m2, m4, float(small.square().sum()))
