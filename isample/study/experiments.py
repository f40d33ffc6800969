"""The experiments of ``isample study`` (issue 15) on top of the ``isample bench`` harness.

Every training run is one :func:`isample.bench.harness.train_run` (the bench's loop, datasets
and models); this module only chooses the runs and turns their curves into the numbers of
:mod:`isample.study.analysis`:

* **A, effective batch.** Importance sampling at batch b against uniform sampling at batch
  ``round(kappa b)`` with the hyperparameters of :func:`isample.metrics.scaled_hyperparameters`
  (the *coupled* run), and against uniform at batch b with the same hyperparameters (the
  *control*). kappa is the median over the IS run's probes of kappa in the optimizer's
  geometry. :func:`effective_batch_verdict` says whether the rule holds. The *matched*
  variant runs IS itself with the scaled hyperparameters (its control: uniform at b with them).
* **B, does the metric predict the speed-up.** For every checkpoint t of an IS run,
  ``predicted`` = mean kappa (Q_log, tau^2) over the probes up to t, ``realized`` = steps (CPU
  seconds) uniform needs to reach the IS run's training loss at t, over t (the IS run's CPU
  seconds at t): :func:`checkpoint_points`. :func:`family_spearman` correlates them per
  optimizer family.
* **C, stability.** :func:`isample.study.analysis.largest_stable_lr` over a geometric grid,
  uniform against importance sampling with raw, clipped (``max_weight``) and mean-normalised
  weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .analysis import curve_match, is_stable, largest_stable_lr, spearman, time_to_reach

__all__ = [
    "FAMILIES",
    "STUDY_SCHEMES",
    "optimizer_family",
    "resolve_scheme",
    "run_kappa",
    "effective_batch_verdict",
    "checkpoint_points",
    "family_spearman",
    "experiment_a",
    "experiment_b",
    "experiment_c",
]

#: Optimizer families of Experiment B (Spearman is reported per family).
FAMILIES: dict[str, tuple[str, ...]] = {
    "sgd-like": ("sgd", "sgd-momentum", "nesterov"),
    "rmsprop-like": ("rmsprop",),
    "adam-like": ("adam", "adam-b1-0", "adam-b1-0.99", "adam-b1=b2", "adamw"),
    "bayesian": ("brmsprop", "badam"),
}

#: Study scheme labels: ``label -> (registry name, build overrides)``. ``kf-always`` is KF's
#: pool sampler with its tau switch forced on (in a few hundred steps the switch often stays
#: off and KF equals uniform). Any other registry name is accepted as itself.
STUDY_SCHEMES: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}),
    "kf-always": ("kf", {"always": True}),
}


def optimizer_family(name: str) -> str:
    """The Experiment-B family of an optimizer name (``"other"`` when none matches)."""
    for family, names in FAMILIES.items():
        if name in names:
            return family
    return "other"


def resolve_scheme(label: str, registry: Any) -> tuple[str, dict[str, Any]]:
    """``(registry name, overrides)`` of a study scheme label.

    Raises:
        ValueError: neither a study label nor a registered scheme (the message lists both).
    """
    if label in STUDY_SCHEMES:
        name, overrides = STUDY_SCHEMES[label]
        return name, dict(overrides)
    valid = list(registry.available())
    if label in valid:
        return label, {}
    raise ValueError(
        f"Unknown scheme {label!r}. Valid schemes: {', '.join(sorted(set(STUDY_SCHEMES) | set(valid)))}."
    )


# --------------------------------------------------------------------------- pure glue


def _geometry_rows(quality: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probe rows in the optimizer's geometry: the non-identity rows when any, else identity."""
    other = [q for q in quality if q.get("geometry") != "identity"]
    if other:
        return other
    return [q for q in quality if q.get("geometry") == "identity"]


def run_kappa(quality: Sequence[dict[str, Any]], up_to: float = math.inf, key: str = "kappa") -> float:
    """Median of ``key`` over a run's probes at ``0 < step <= up_to`` in the optimizer's geometry.

    Step 0 is left out (the model and, for Adam, the preconditioner are untrained). NaN when
    no finite value exists.
    """
    rows = _geometry_rows(quality)
    values = [float(q.get(key, math.nan)) for q in rows if 0 < q["step"] <= up_to]
    values = [v for v in values if math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _running_mean(quality: Sequence[dict[str, Any]], up_to: float, key: str) -> float:
    rows = _geometry_rows(quality)
    values = [float(q.get(key, math.nan)) for q in rows if 0 < q["step"] <= up_to]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def effective_batch_verdict(
    d_rule: float, d_control: float, batch_ratio: float, threshold: float = 0.05, min_ratio: float = 1.1
) -> str:
    """Experiment A's verdict for one optimizer from two curve distances.

    Args:
        d_rule: median |log loss ratio| between the IS run and the coupled uniform run
            (batch ``round(kappa b)``, hyperparameters scaled by the rule).
        d_control: the same between the IS run and the uncoupled control (uniform, batch b,
            same hyperparameters).
        batch_ratio: the coupled run's batch over b (``round(kappa b) / b``).
        threshold: largest ``d_rule`` that counts as matching (0.05: the curves agree within
            about 5 % of the loss at the median step).
        min_ratio: below this ``max(ratio, 1/ratio)`` the coupled run is nearly the control
            and the test cannot tell them apart.

    Returns:
        ``"holds"`` (``d_rule <= threshold`` and the coupled run is at least as close as the
        control), ``"closer than control"`` (closer, but above the threshold), ``"fails"``
        (the control matches IS at least as well as the rule), ``"untestable (kappa ~ 1)"``,
        or ``"n/a"`` when a distance is undefined (NaN).
    """
    if any(isinstance(v, float) and math.isnan(v) for v in (d_rule, d_control, batch_ratio)):
        return "n/a"
    if max(batch_ratio, 1.0 / batch_ratio) < min_ratio:
        return "untestable (kappa ~ 1)"
    if d_rule <= d_control:
        return "holds" if d_rule <= threshold else "closer than control"
    return "fails"


def _xy(curve: Sequence[dict[str, Any]], axis: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, train_loss)`` of a curve, keeping strictly increasing x (a repeated x is dropped)."""
    xs, ys = [], []
    for point in curve:
        x = float(point[axis])
        if xs and x <= xs[-1]:
            continue
        xs.append(x)
        ys.append(float(point["train_loss"]))
    return np.asarray(xs), np.asarray(ys)


def checkpoint_points(
    is_run: dict[str, Any], uniform_run: dict[str, Any], tau2: Sequence[tuple[int, float]] = ()
) -> list[dict[str, Any]]:
    """Experiment B's (predicted, realized) pairs of one IS run against its uniform twin.

    For every probe step t > 0 of ``is_run`` with a recorded training loss L_t:

    * ``kappa`` / ``kappa_pool`` / ``q_log``: mean over the run's probes at ``0 < step <= t``
      in the optimizer's geometry (``kappa_pool``: the two-stage kappa of pool schemes, NaN
      for others); ``tau2``: mean of ``tau**2`` over the steps ``<= t`` (pool
      schemes; NaN otherwise);
    * ``realized_steps`` = (steps uniform needs to reach L_t) / t and ``realized_cpu`` =
      (uniform's CPU seconds to L_t) / (the IS run's CPU seconds at t). When uniform never
      reaches L_t the value is a lower bound (uniform's last x over t) and ``censored`` is
      True.

    Args:
        is_run: a :func:`isample.bench.harness.train_run` result with ``quality`` rows.
        uniform_run: the uniform run of the same seed and optimizer.
        tau2: ``(step, tau**2)`` pairs of the IS run.

    Returns:
        One dict per checkpoint: ``step``, ``train_loss``, ``kappa``, ``kappa_pool``, ``q_log``, ``tau2``,
        ``realized_steps``, ``realized_cpu``, ``censored``.
    """
    loss_at = {int(p["step"]): p for p in is_run["curve"]}
    us, ul = _xy(uniform_run["curve"], "step")
    uc, ucl = _xy(uniform_run["curve"], "cpu_seconds")
    steps = sorted({int(q["step"]) for q in is_run.get("quality") or [] if q["step"] > 0})
    tau_steps = np.asarray([s for s, _ in tau2], dtype=float)
    tau_vals = np.asarray([v for _, v in tau2], dtype=float)
    out = []
    for t in steps:
        point = loss_at.get(t)
        if point is None or not math.isfinite(float(point["train_loss"])) or float(point["train_loss"]) <= 0:
            continue
        level = float(point["train_loss"])
        t_steps = time_to_reach(us, ul, level)
        t_cpu = time_to_reach(uc, ucl, level)
        censored = math.isinf(t_steps) or math.isinf(t_cpu)
        if math.isinf(t_steps):
            t_steps = float(us[-1])
        if math.isinf(t_cpu):
            t_cpu = float(uc[-1])
        cpu_is = float(point["cpu_seconds"])
        mask = tau_steps <= t
        out.append(
            {
                "step": t,
                "train_loss": level,
                "kappa": _running_mean(is_run["quality"], t, "kappa"),
                "kappa_pool": _running_mean(is_run["quality"], t, "kappa_pool"),
                "q_log": _running_mean(is_run["quality"], t, "q_log"),
                "tau2": float(tau_vals[mask].mean()) if mask.any() else math.nan,
                "realized_steps": t_steps / t,
                "realized_cpu": t_cpu / cpu_is if cpu_is > 0 else math.nan,
                "censored": bool(censored),
            }
        )
    return out


def family_spearman(
    points: Sequence[dict[str, Any]],
    predictors: Sequence[str] = ("kappa", "kappa_pool", "q_log", "tau2"),
    targets: Sequence[str] = ("realized_steps", "realized_cpu"),
    n_boot: int = 1000,
    seed: int = 0,
    exclude_censored: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman rho with a bootstrap interval per optimizer family (and ``"all"``).

    Points need a ``family`` key and the predictor/target keys; pairs with a non-finite
    value are left out, and so are censored points (``censored`` True: the realized value is
    only a lower bound) unless ``exclude_censored`` is False; fewer than 3 pairs (or a
    constant variable) give ``rho = nan``.

    Returns:
        ``{family: {"<predictor>~<target>": {"rho", "low", "high", "n"}}}``.
    """
    if exclude_censored:
        points = [p for p in points if not p.get("censored", False)]
    groups: dict[str, list[dict[str, Any]]] = {"all": list(points)}
    for p in points:
        groups.setdefault(p["family"], []).append(p)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family, rows in groups.items():
        out[family] = {}
        for pred in predictors:
            for target in targets:
                pairs = [
                    (float(r[pred]), float(r[target]))
                    for r in rows
                    if math.isfinite(float(r.get(pred, math.nan)))
                    and math.isfinite(float(r.get(target, math.nan)))
                ]
                entry: dict[str, Any] = {"rho": math.nan, "low": math.nan, "high": math.nan, "n": len(pairs)}
                if len(pairs) >= 3:
                    x, y = zip(*pairs, strict=True)
                    if len(set(x)) > 1 and len(set(y)) > 1:
                        res = spearman(x, y, n_boot=n_boot, rng=seed)
                        entry.update(rho=res.rho, low=res.low, high=res.high)
                out[family][f"{pred}~{target}"] = entry
    return out


# --------------------------------------------------------------------------- experiments


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "dataset",
        "scheme",
        "optimizer",
        "seed",
        "lr",
        "diverged",
        "steps",
        "train_seconds",
        "train_cpu_seconds",
        "is_on_share",
    )
    return {k: run.get(k) for k in keep}


def _curve(run: dict[str, Any]) -> list[dict[str, float]]:
    return [
        {"step": p["step"], "cpu_seconds": p["cpu_seconds"], "train_loss": p["train_loss"]}
        for p in run["curve"]
    ]


def experiment_a(
    data: Any,
    bench: Any,
    study: Any,
    train: Callable[..., dict[str, Any]],
    registry: Any,
    workload: str,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Experiment A on one workload: per optimizer and seed, IS vs coupled uniform vs control.

    Five runs per (optimizer, seed): IS at b (base hyperparameters), uniform at b (control),
    uniform at round(kappa b) with the scaled hyperparameters (coupled), IS at b with the scaled
    hyperparameters and uniform at b with them (the matched pair).
    """
    from ..metrics import scaled_hyperparameters

    scheme, options = resolve_scheme(study.a_scheme, registry)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    is_runs: dict[str, list[dict[str, Any]]] = {}
    start = float(bench.eval_every)
    for opt in study.optimizers:
        lr = float(study.lrs[opt])
        for seed in study.seeds:
            log(f"A {opt} seed {seed}")
            is_run = train(data, bench, scheme, opt, lr, seed, scheme_options=options, record_tau=True)
            kappa_probe = run_kappa(is_run["quality"])
            kappa_pool = run_kappa(is_run["quality"], key="kappa_pool")
            # a pool scheme's effective multiplier is the two-stage kappa (<= B / b)
            kappa = kappa_pool if math.isfinite(kappa_pool) else kappa_probe
            row: dict[str, Any] = {
                "workload": workload,
                "optimizer": opt,
                "family": optimizer_family(opt),
                "seed": seed,
                "scheme": study.a_scheme,
                "lr": lr,
                "kappa": kappa,
                "kappa_probe": kappa_probe,
                "kappa_pool": kappa_pool,
                "batch_size": bench.batch_size,
                "coupled_batch_size": None,
                "coupled_lr": math.nan,
                "rule": "",
                "d_rule": math.nan,
                "d_control": math.nan,
                "d_matched": math.nan,
                "d_matched_control": math.nan,
                "is_diverged": bool(is_run["diverged"]),
                "is_on_share": is_run["is_on_share"],
            }
            control = train(data, bench, "uniform", opt, lr, seed)
            row["d_control"] = _distance(is_run, control, start)
            coupled = None
            extra: dict[str, Any] = {}
            if math.isfinite(kappa) and kappa > 0:
                big = max(1, int(round(kappa * bench.batch_size)))
                ratio = big / bench.batch_size
                row["coupled_batch_size"] = big
                applied: dict[str, Any] = {}

                def hook(optimizer: Any, ratio: float = ratio, applied: dict = applied) -> None:
                    try:
                        groups = scaled_hyperparameters(optimizer, ratio)
                    except (TypeError, ValueError) as exc:
                        applied["error"] = str(exc)
                        return
                    for group, new in zip(optimizer.param_groups, groups, strict=True):
                        group.update(new)
                    keys = set(groups[0])
                    applied["rule"] = (
                        "linear"
                        if keys == {"lr"}
                        else "square-root, prior x kappa"
                        if "prior_variance" in keys
                        else "square-root"
                    )

                coupled = train(
                    data, replace(bench, batch_size=big), "uniform", opt, lr, seed, optimizer_hook=hook
                )
                row["rule"] = applied.get("rule", "none")
                row["rule_error"] = applied.get("error", "")
                row["coupled_lr"] = coupled["lr"]
                if "error" not in applied:
                    row["d_rule"] = _distance(is_run, coupled, start)
                    # matched: IS itself run with the scaled hyperparameters, against the coupled
                    # run, and against uniform at b with the same scaled hyperparameters
                    is_scaled = train(
                        data, bench, scheme, opt, lr, seed, scheme_options=options, optimizer_hook=hook
                    )
                    small_scaled = train(data, bench, "uniform", opt, lr, seed, optimizer_hook=hook)
                    row["d_matched"] = _distance(is_scaled, coupled, start)
                    row["d_matched_control"] = _distance(is_scaled, small_scaled, start)
                    extra = {"is_scaled": _curve(is_scaled), "uniform_scaled": _curve(small_scaled)}
            rows.append(row)
            is_runs.setdefault(opt, []).append(is_run)
            if seed == study.seeds[0]:
                curves[opt] = {"is": _curve(is_run), "control": _curve(control)}
                if coupled is not None:
                    curves[opt]["coupled"] = _curve(coupled)
                    curves[opt].update(extra)
    verdicts = {}
    for opt in study.optimizers:
        mine = [r for r in rows if r["optimizer"] == opt]
        # the seed-to-seed distance of the IS runs: the noise floor of every d above
        pair = is_runs.get(opt, [])
        d_seed = _distance(pair[0], pair[1], start) if len(pair) > 1 else math.nan
        d_rule = _nanmedian([r["d_rule"] for r in mine])
        d_control = _nanmedian([r["d_control"] for r in mine])
        ratios = [r["coupled_batch_size"] / r["batch_size"] for r in mine if r["coupled_batch_size"]]
        ratio = float(np.median(ratios)) if ratios else math.nan
        d_matched = _nanmedian([r["d_matched"] for r in mine])
        d_matched_control = _nanmedian([r["d_matched_control"] for r in mine])
        verdicts[opt] = {
            "family": optimizer_family(opt),
            "rule": next((r["rule"] for r in mine if r["rule"]), ""),
            "kappa": _nanmedian([r["kappa"] for r in mine]),
            "kappa_probe": _nanmedian([r["kappa_probe"] for r in mine]),
            "batch_ratio": ratio,
            "d_seed": d_seed,
            "d_rule": d_rule,
            "d_control": d_control,
            "verdict": effective_batch_verdict(d_rule, d_control, ratio, study.match_threshold),
            "d_matched": d_matched,
            "d_matched_control": d_matched_control,
            "verdict_matched": effective_batch_verdict(
                d_matched, d_matched_control, ratio, study.match_threshold
            ),
        }
    return {
        "workload": workload,
        "scheme": study.a_scheme,
        "rows": rows,
        "verdicts": verdicts,
        "curves": curves,
    }


def _nanmedian(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.median(finite)) if finite else math.nan


def _distance(a: dict[str, Any], b: dict[str, Any], start: float) -> float:
    xa, la = _xy(a["curve"], "step")
    xb, lb = _xy(b["curve"], "step")
    la = np.where(la > 0, la, math.nan)
    lb = np.where(lb > 0, lb, math.nan)
    try:
        return curve_match(xa, la, xb, lb, start=start).median_abs_log_ratio
    except ValueError:
        return math.nan


def experiment_b(
    datasets: dict[str, Any],
    benches: dict[str, Any],
    uniform_benches: dict[str, Any],
    study: Any,
    train: Callable[..., dict[str, Any]],
    registry: Any,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Experiment B over the workloads: checkpoint points of every IS scheme vs its uniform twin."""
    points: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    optimizers = [o for o in (study.b_optimizers or study.optimizers) if o in study.optimizers]
    for workload, data in datasets.items():
        bench = benches[workload]
        for opt in optimizers:
            lr = float(study.lrs[opt])
            for seed in study.seeds:
                log(f"B {workload} {opt} seed {seed}")
                base = train(data, uniform_benches[workload], "uniform", opt, lr, seed)
                runs.append({"workload": workload, **_summary(base), "scheme": "uniform"})
                for label in study.b_schemes:
                    scheme, options = resolve_scheme(label, registry)
                    run = train(data, bench, scheme, opt, lr, seed, scheme_options=options, record_tau=True)
                    runs.append({"workload": workload, **_summary(run), "scheme": label})
                    tau2 = [
                        (h["step"], h["tau"] ** 2)
                        for h in run.get("tau_history") or []
                        if math.isfinite(h["tau"])
                    ]
                    found = checkpoint_points(run, base, tau2)
                    last = max((p["step"] for p in found), default=None)
                    for p in found:
                        points.append(
                            {
                                "workload": workload,
                                "optimizer": opt,
                                "family": optimizer_family(opt),
                                "scheme": label,
                                "seed": seed,
                                "is_on_share": run["is_on_share"],
                                "final": p["step"] == last,
                                **p,
                            }
                        )
    return {
        "points": points,
        "runs": runs,
        "spearman": family_spearman(points, n_boot=study.n_boot, seed=0),
        # between runs only: the last checkpoint of every run (no within-run time trend)
        "spearman_final": family_spearman([p for p in points if p["final"]], n_boot=study.n_boot, seed=0),
        "optimizers": optimizers,
    }


def experiment_c(
    data: Any,
    bench: Any,
    study: Any,
    train: Callable[..., dict[str, Any]],
    registry: Any,
    workload: str,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Experiment C: the largest stable learning rate per optimizer and weighting variant."""
    scheme, options = resolve_scheme(study.c_scheme, registry)
    variants: dict[str, tuple[str, dict[str, Any], str]] = {
        "uniform": ("uniform", {}, "none"),
        "is": (scheme, dict(options), "none"),
        "is-clip": (scheme, {**options, "max_weight": study.c_max_weight}, "none"),
        "is-mean": (scheme, dict(options), "mean"),
    }
    table_name, table_options = resolve_scheme(study.c_table_scheme, registry)
    variants["table"] = (table_name, dict(table_options), "none")
    variants["table-clip"] = (table_name, {**table_options, "max_weight": study.c_max_weight}, "none")
    variants = {k: v for k, v in variants.items() if k in study.c_variants}
    table: dict[str, dict[str, Any]] = {}
    for opt in study.optimizers:
        base = float(study.lrs[opt])
        grid = [base * f for f in study.c_lr_factors]
        table[opt] = {}
        for variant, (name, opts, normalize) in variants.items():
            log(f"C {opt} {variant}")
            refused: dict[float, str] = {}

            def run(
                lr: float,
                name: str = name,
                opts: dict = opts,
                normalize: str = normalize,
                o: str = opt,
                refusals: dict = refused,
            ) -> list[float]:
                # stable only when every seed is: the curve of the first unstable seed, else seed 0's
                curves = []
                for seed in study.seeds:
                    with warnings.catch_warnings():  # diverging runs warn about non-finite scores
                        warnings.simplefilter("ignore", RuntimeWarning)
                        try:
                            result = train(
                                data,
                                bench,
                                name,
                                o,
                                lr,
                                seed,
                                scheme_options=opts,
                                weight_normalize=normalize,
                            )
                        except ValueError as exc:  # the optimizer refuses this lr (BAdam: lr**2 < 2 sigma^2)
                            refusals[lr] = str(exc)
                            return [1.0, math.nan]
                    losses = [float(p["train_loss"]) for p in result["curve"]]
                    if not is_stable(losses, study.divergence_factor):
                        return losses
                    curves.append(losses)
                return curves[0]

            found = largest_stable_lr(
                run, grid, divergence_factor=study.divergence_factor, search=study.c_search
            )
            table[opt][variant] = {
                "lr": found.lr,
                "factor": None if found.lr is None else found.lr / base,
                "at_edge": found.at_edge,
                "monotone": found.monotone,
                "refused": {repr(k): v for k, v in refused.items()},
                "tested": {repr(k): v for k, v in found.tested.items()},
            }
    return {
        "workload": workload,
        "scheme": study.c_scheme,
        "table_scheme": study.c_table_scheme,
        "max_weight": study.c_max_weight,
        "grid_factors": list(study.c_lr_factors),
        "table": table,
    }
