"""The benchmark harness: configuration, one training run, and the full sweep.

One *run* trains one model with one sampling scheme (from :mod:`isample.schemes`), one
optimizer, one learning rate and one seed, for a budget of optimizer steps or of training
seconds, with the loop every isample loader shares::

    for epoch ...:
        loader.set_epoch(epoch)
        for batch in loader:                       # timed: "loader" (sampling + scoring)
            with loader.step_context(batch):       # timed: "step"
                out = model(batch.inputs); losses = loss_fn(out, batch.targets)
                (batch.weights * losses).mean().backward()
            opt.step(); opt.zero_grad()
            loader.feedback(batch, out.detach(), losses.detach())   # timed: "feedback"

Wall-clock seconds count only these three parts; evaluation (training loss on a fixed subset,
test accuracy) and the sampler-quality probe run outside the clock every
``eval_every`` / ``quality_every`` steps.

A *sweep* (:func:`run_bench`) first tunes the learning rate of every (scheme, optimizer)
on the validation split (:mod:`isample.bench.tuning`) with runs of the same budget and
learning-rate schedule as the measured runs (:func:`run_plan`), then measures every
(scheme, optimizer, seed) with the chosen learning rate.
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .._random import derive_seed
from .curves import SCHEDULES, compute_units, schedule_factor
from .datasets import BenchData
from .models import build_model

__all__ = [
    "BenchConfig",
    "OPTIMIZERS",
    "STUDY_OPTIMIZERS",
    "available_study_optimizers",
    "DEFAULT_LR_GRIDS",
    "available_optimizers",
    "make_optimizer",
    "parse_budget",
    "train_run",
    "evaluate",
    "machine_info",
    "quick_config",
    "default_schemes",
    "run_plan",
    "measure_step_costs",
    "is_on_history",
    "tau_history",
]

#: Optimizers by name: ``f(params, lr) -> torch.optim.Optimizer`` (library defaults otherwise;
#: ``sgd`` is plain SGD without momentum).
OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}

#: The further optimizers of ``isample study``'s grid (docs/study.md), by name; ``isample bench``
#: does not offer them (its optimizers and results stay as they are), :func:`make_optimizer`
#: builds them. ``brmsprop`` / ``badam`` are added when :mod:`isample.optim` imports.
STUDY_OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adam-b1-0": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999)),
    "adam-b1-0.99": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.99, 0.999)),
    "adam-b1=b2": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.99, 0.99)),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def _register_bayesian() -> None:
    """Add ``brmsprop`` / ``badam`` (:mod:`isample.optim`) when that module imports."""
    try:
        from .. import optim as _optim
    except ImportError:
        return
    if hasattr(_optim, "BRMSprop"):
        STUDY_OPTIMIZERS["brmsprop"] = lambda params, lr: _optim.BRMSprop(params, lr=lr)
    if hasattr(_optim, "BAdam"):
        STUDY_OPTIMIZERS["badam"] = lambda params, lr: _optim.BAdam(params, lr=lr)


_register_bayesian()

#: Learning-rate grids searched per optimizer (half-decade steps; centred where the default
#: MNIST-1D sweep chose for uniform, whose short cosine runs favour large rates); a choice
#: at an edge extends the grid (:func:`isample.bench.curves.extend_grid`).
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.1, 0.3, 1.0),
    "rmsprop": (1e-3, 3e-3, 1e-2),
    "adam": (3e-3, 1e-2, 3e-2),
}

#: Schemes of the default comparison (``auto`` joins when the registry has it).
DEFAULT_SCHEMES: tuple[str, ...] = ("uniform", "kf", "history-is", "infobatch", "selective-backprop")


def default_schemes(registry: Any = None) -> tuple[str, ...]:
    """:data:`DEFAULT_SCHEMES` that the registry has, plus ``auto`` when it is registered."""
    registry = registry if registry is not None else _registry()
    valid = set(registry.available())
    names = [s for s in DEFAULT_SCHEMES if s in valid]
    if "auto" in valid:
        names.append("auto")
    return tuple(names)


#: Seed offset of the tuning runs, so the learning rate is never chosen on a measured run.
TUNING_SEED_OFFSET = 10_000


def available_optimizers() -> list[str]:
    """Names of the benchmark optimizers."""
    return sorted(OPTIMIZERS)


def available_study_optimizers() -> list[str]:
    """Names of every optimizer :func:`make_optimizer` builds (the bench's and the study's)."""
    return sorted({**OPTIMIZERS, **STUDY_OPTIMIZERS})


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (:data:`OPTIMIZERS` or :data:`STUDY_OPTIMIZERS`) with learning rate ``lr``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    factory = OPTIMIZERS.get(name) or STUDY_OPTIMIZERS.get(name)
    if factory is None:
        raise ValueError(
            f"Unknown optimizer {name!r}. Valid optimizers: {', '.join(available_study_optimizers())}."
        )
    return factory(params, float(lr))


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|secs|seconds|steps?)?\s*$", re.IGNORECASE)


def parse_budget(text: str | int) -> tuple[str, float]:
    """Parse a budget: ``"500"`` (optimizer steps) or ``"30s"`` (training seconds per run).

    Returns:
        ``("steps", n)`` with n an int >= 1, or ``("seconds", t)`` with t > 0.

    Raises:
        ValueError: anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"The 'budget' must be steps (e.g. 500) or seconds (e.g. 30s). Got {text!r}.")
    if isinstance(text, int):
        text = str(text)
    match = _BUDGET.match(str(text))
    if not match:
        raise ValueError(f"The 'budget' must be steps (e.g. 500) or seconds (e.g. 30s). Got {text!r}.")
    value, unit = match.group(1), (match.group(2) or "steps").lower()
    if unit.startswith("s") and not unit.startswith("step"):
        seconds = float(value)
        if seconds <= 0:
            raise ValueError(f"The 'budget' in seconds must be > 0. Got {text!r}.")
        return "seconds", seconds
    if "." in value or int(value) < 1:
        raise ValueError(f"The 'budget' in steps must be an int >= 1. Got {text!r}.")
    return "steps", int(value)


@dataclass
class BenchConfig:
    """Everything that defines a benchmark sweep (stored verbatim in ``results.json``).

    Attributes:
        dataset: built-in name or ``module:function``.
        model: ``mlp``, ``linear``, ``cnn`` or ``cnn1d``.
        schemes: scheme names from :func:`isample.schemes.available` (``uniform`` first is
            the baseline; it is added if missing); default :func:`default_schemes`.
        optimizers: names from :data:`OPTIMIZERS`.
        seeds: the measured seeds (model initialisation and sampling).
        budget: ``"500"`` steps or ``"30s"`` training seconds per measured run.
        batch_size: examples per training step b.
        eval_every: evaluate the training loss (on ``train_eval_size`` examples), test loss
            and test accuracy every k steps (and at the end; with a seconds budget as well).
        quality_every: measure kappa on the probe every k steps (0 = never).
        probe_size: probe examples for kappa (a fixed seeded subset of the training set).
        tune: tune the learning rate (otherwise the middle of each grid is used).
        tune_fraction: tuning runs last this fraction of the measured budget (1 = the same
            budget; the schedule is stretched over the tuning run's own budget).
        schedule: learning-rate schedule of every run, tuning included: ``constant``,
            ``cosine`` or ``linear`` (decay to 0 over the budget).
        lr_grids: learning-rate grid per optimizer (default :data:`DEFAULT_LR_GRIDS`).
        max_grid: a grid whose choice sits at an edge is extended up to this many points.
        smooth: targets and the tuning criterion use the mean of the last ``smooth``
            evaluations (1 = the last evaluation alone).
        train_eval_size: training examples in the training-loss evaluation (a fixed seeded
            subset; None = all).
        noise_dataset: a label-noise workload run after the main sweep with the tuned
            learning rates, reporting clean test accuracy (None = skip).
        noise_optimizers: optimizers of the label-noise runs (None = ``adam`` when it is
            among ``optimizers``, else the last optimizer).
        tie_rtol: relative tolerance under which validation losses tie (smaller lr wins).
        device: torch device string.
        data_seed: seed of the data split (and of the generated dataset).
        threads: ``torch.set_num_threads`` value used by the CLI (None = unchanged).
        progress: show tqdm progress bars.
        plots: draw the PNG plots (needs matplotlib).
        quick: the tiny profile (recorded for the report).
    """

    dataset: str = "mnist1d"
    model: str = "cnn1d"
    schemes: tuple[str, ...] = field(default_factory=lambda: default_schemes())
    optimizers: tuple[str, ...] = ("sgd", "rmsprop", "adam")
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: str = "240"
    batch_size: int = 64
    eval_every: int = 30
    quality_every: int = 120
    probe_size: int = 128
    tune: bool = True
    tune_fraction: float = 1.0
    schedule: str = "cosine"
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LR_GRIDS))
    max_grid: int = 5
    smooth: int = 3
    train_eval_size: int | None = 2000
    noise_dataset: str | None = "mnist1d-noisy"
    noise_optimizers: tuple[str, ...] | None = None
    tie_rtol: float = 1e-3
    device: str = "cpu"
    data_seed: int = 0
    threads: int | None = 1
    progress: bool = True
    plots: bool = True
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        d = asdict(self)
        d["schemes"] = list(self.schemes)
        d["optimizers"] = list(self.optimizers)
        d["seeds"] = list(self.seeds)
        d["noise_optimizers"] = None if self.noise_optimizers is None else list(self.noise_optimizers)
        d["lr_grids"] = {k: list(v) for k, v in self.lr_grids.items()}
        return d


def quick_config(**overrides: Any) -> BenchConfig:
    """The tiny ``--quick`` profile: 2 seeds, 40 steps, two optimizers, a 2-point grid, no extension."""
    base = BenchConfig(
        schemes=("uniform", "kf"),
        optimizers=("sgd", "adam"),
        seeds=(0, 1),
        budget="40",
        eval_every=10,
        quality_every=20,
        probe_size=64,
        lr_grids={"sgd": (0.1, 0.3), "rmsprop": (3e-4, 1e-3), "adam": (1e-3, 3e-3)},
        max_grid=2,
        train_eval_size=1000,
        quick=True,
    )
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


def run_plan(config: BenchConfig, tuning: bool = False) -> dict[str, Any]:
    """Budget and schedule of one run: the single place tuning and measured runs get them from.

    Returns:
        ``{"kind": "steps" | "seconds", "max_steps": int | None, "max_seconds": float | None,
        "schedule": str, "eval_every": int, "smooth": int}``; a tuning run's budget is
        ``tune_fraction`` of the measured one (the same with the default 1) and its
        schedule is the same schedule over its own budget.
    """
    kind, amount = parse_budget(config.budget)
    if config.schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {config.schedule!r}. Valid schedules: {', '.join(SCHEDULES)}.")
    if tuning:
        amount = (
            max(1, int(round(amount * config.tune_fraction)))
            if kind == "steps"
            else amount * config.tune_fraction
        )
    return {
        "kind": kind,
        "max_steps": int(amount) if kind == "steps" else None,
        "max_seconds": float(amount) if kind == "seconds" else None,
        "schedule": config.schedule,
        "eval_every": int(config.eval_every),
        "smooth": int(config.smooth),
    }


def measure_step_costs(
    model: nn.Module,
    loss_fn: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    repeats: int = 7,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Time a training forward and its backward on one batch: the measured cost model.

    Each of ``repeats`` rounds (after one warm-up) times ``model(inputs)`` plus the loss with
    gradients enabled, then ``loss.mean().backward()``; the medians are reported. The model's
    gradients are cleared afterwards (its parameters are not changed).

    Args:
        model: the benchmark model (train mode is kept as it is).
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> Tensor (b,)``.
        inputs, targets: one training batch of ``b`` examples.
        repeats: timed rounds (>= 1).
        clock: seconds counter (default: process CPU time on a CPU device, wall clock with
            CUDA synchronisation otherwise); injectable for tests.

    Returns:
        ``{"forward_seconds", "backward_seconds"}`` per batch (medians), ``"batch_size"``,
        and ``"backward_cost"`` = backward / forward, the ``r`` of
        :func:`isample.bench.curves.compute_units`.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            f"The 'repeats' parameter of measure_step_costs must be an int >= 1. Got {repeats!r}."
        )
    device = inputs.device
    if clock is None:
        if device.type == "cpu":
            clock = time.process_time
        else:

            def clock() -> float:
                _sync(device)
                return time.perf_counter()

    fwd, bwd = [], []
    for i in range(repeats + 1):
        t0 = clock()
        losses = loss_fn(model(inputs), targets)
        t1 = clock()
        losses.mean().backward()
        t2 = clock()
        if i > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    model.zero_grad(set_to_none=True)
    f, b = sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2]
    return {
        "forward_seconds": float(f),
        "backward_seconds": float(b),
        "batch_size": int(inputs.shape[0]),
        "backward_cost": float(b / f) if f > 0 else math.nan,
    }


def is_on_history(loader: Any) -> list[bool]:
    """Per-step importance-sampling on/off flags of a switched loader ([] when it exposes none).

    Read from ``tau_history`` entries with an ``"on"`` key on the loader or its ``pool``,
    else from ``describe()["on_history"]`` when the loader has it.
    """
    for owner in (loader, getattr(loader, "pool", None)):
        history = getattr(owner, "tau_history", None) if owner is not None else None
        if history:
            return [bool(h.get("on")) for h in list(history) if isinstance(h, dict) and "on" in h]
    describe = getattr(loader, "describe", None)
    if callable(describe):
        try:
            info = describe()
        except Exception:  # describe is informative only
            return []
        if isinstance(info, dict) and isinstance(info.get("on_history"), (list, tuple)):
            return [bool(v) for v in info["on_history"]]
    return []


def tau_history(loader: Any) -> list[dict[str, float]]:
    """Per-step ``{"step", "tau"}`` of a pool loader's ``tau_history`` ([] when it has none)."""
    for owner in (loader, getattr(loader, "pool", None)):
        history = getattr(owner, "tau_history", None) if owner is not None else None
        if history:
            out = []
            for h in list(history):
                if isinstance(h, dict) and h.get("tau") is not None:
                    out.append({"step": int(h.get("step", len(out))), "tau": float(h["tau"])})
            return out
    return []


# --------------------------------------------------------------------------- machine


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core counts, torch / Python versions, the device and the 1/5/15-minute load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        info["load_average"] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, chunk: int = 512
) -> tuple[float, float]:
    """Mean (unweighted) loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Returns:
        ``(mean loss, accuracy in [0, 1])`` as floats.
    """
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        for start in range(0, x.shape[0], chunk):
            out = model(x[start : start + chunk])
            target = y[start : start + chunk]
            total += float(loss_fn(out, target).double().sum())
            correct += int((out.argmax(1) == target).sum())
    finally:
        model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return total / n, correct / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- quality probe


def quality_candidates(
    loader: Any, probe_indices: torch.Tensor
) -> Callable[[nn.Module, Any, Any], torch.Tensor] | None:
    """The scheme's own sampling rule on the probe, as a function returning probabilities.

    * a pool loader (an object with a ``scorer``) is judged by its scorer on the probe:
      ``p_i proportional to score_i`` over the probe, as it would be over a pool;
    * a table loader (a ``sampler`` with ``probabilities()``) by its current table,
      restricted to the probe and renormalised: the distribution it actually draws from.

    Returns:
        ``f(model, inputs, targets) -> float64 Tensor (n,)`` summing to 1, or ``None`` for
        uniform and unknown loaders.
    """
    scorer = getattr(loader, "scorer", None)
    if callable(scorer):

        def scorer_probabilities(model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
            s = scorer(model, inputs, targets).detach().to("cpu", torch.float64)
            total = float(s.sum())
            return s / total if total > 0 else torch.full_like(s, 1.0 / s.numel())

        return scorer_probabilities
    sampler = getattr(loader, "sampler", None)
    probs = getattr(sampler, "probabilities", None)
    if callable(probs):

        def table_probabilities(model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
            p = torch.as_tensor(probs(), dtype=torch.float64)[probe_indices]
            total = float(p.sum())
            return p / total if total > 0 else torch.full_like(p, 1.0 / p.numel())

        return table_probabilities
    return None


class ProbeQuality:
    """kappa, kappa_opt, Q_lin, Q_log of a sampler on a fixed probe (thin; maths in isample.metrics).

    Every call computes the exact per-example gradients ``G`` (n, P) of the probe
    (:func:`isample.metrics.per_example_gradients`), their norms and mean, and hands them
    to :func:`isample.metrics.quality_from_norms`, in the identity geometry and, for
    RMSprop / Adam once they have state, in the preconditioned geometry ``D g_i``
    (:func:`isample.metrics.flat_preconditioner`). This is the quantity
    :class:`isample.metrics.SamplerQuality` reports, without its extra diagnostics (bias,
    ESS, estimator moments), which cost about ten times the gradients themselves.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: Callable,
        candidate: Callable,
        optimizer: torch.optim.Optimizer | None,
        pool: tuple[int, int] | None = None,
    ) -> None:
        self.pool = pool
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn
        self.candidate = candidate
        self.optimizer = optimizer

    def measure(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """Rows ``{step, geometry, kappa, kappa_opt, q_lin, q_log, corr_grad_norm}``.

        With ``pool = (B, b)`` (a pool loader: b drawn from a uniform pool of B) the rows also
        carry ``kappa_pool``, :func:`isample.metrics.two_stage_kappa` of the probe's gradients
        and probabilities: the pool scheme's effective batch multiplier, at most B / b.
        """
        from ..metrics import flat_preconditioner, per_example_gradients, quality_from_norms, two_stage_kappa
        from ..preconditioner import NoOptimizerStateError, is_identity_geometry

        params = [p for p in model.parameters() if p.requires_grad]
        G = per_example_gradients(model, self.loss_fn, self.inputs, self.targets, 64, params).detach().cpu()
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"non-finite per-example gradients on the probe at step {step}")
        p = self.candidate(model, self.inputs, self.targets)
        geometries: list[tuple[str, torch.Tensor]] = [("identity", G)]
        if not is_identity_geometry(self.optimizer):
            try:
                d = flat_preconditioner(self.optimizer, params).to(G.dtype)
                geometries.append((type(self.optimizer).__name__.lower(), G * d))
            except NoOptimizerStateError:
                pass
        rows = []
        for name, grads in geometries:
            norms = grads.norm(dim=1).to(torch.float64)
            mean = grads.to(torch.float64).mean(0)
            q = quality_from_norms(norms, float(mean @ mean), p)
            x, y = p - p.mean(), norms - norms.mean()
            den = float(x.norm() * y.norm())
            rows.append(
                {
                    "step": step,
                    "geometry": name,
                    "kappa": q.kappa,
                    "kappa_opt": q.kappa_opt,
                    "q_lin": q.q_lin,
                    "q_log": q.q_log,
                    "corr_grad_norm": float(x @ y) / den if den > 0 else math.nan,
                }
            )
            if self.pool is not None:
                rows[-1]["kappa_pool"] = two_stage_kappa(grads, p, self.pool[0], self.pool[1])
        return rows


# --------------------------------------------------------------------------- one run


def scheme_overrides(scheme: str, data: BenchData) -> dict[str, Any]:
    """Extra ``build`` arguments a scheme needs from the benchmark.

    ``rho-loss`` needs a holdout set to train its irreducible-loss model on: the
    validation split is used (it is also the tuning split; the test split stays unseen).
    """
    if scheme == "rho-loss":
        return {"holdout": TensorDataset(data.x_val, data.y_val)}
    return {}


def _registry() -> Any:
    import isample.schemes as schemes

    return schemes


def train_run(
    data: BenchData,
    config: BenchConfig,
    scheme: str,
    optimizer: str,
    lr: float,
    seed: int,
    *,
    tuning: bool = False,
    registry: Any = None,
    on_step: Callable[[int], None] | None = None,
    backward_cost: float = 2.0,
    scheme_options: dict[str, Any] | None = None,
    optimizer_hook: Callable[[torch.optim.Optimizer], None] | None = None,
    weight_normalize: str = "none",
    record_tau: bool = False,
) -> dict[str, Any]:
    """Train one (scheme, optimizer, lr, seed) and measure it.

    Args:
        data: the dataset.
        config: the sweep configuration (model, budget, batch size, cadences, device).
        scheme: a scheme name of the registry.
        optimizer: an optimizer name of :data:`OPTIMIZERS`.
        lr: learning rate.
        seed: model-initialisation and sampling seed.
        tuning: a tuning run: budget and schedule from :func:`run_plan` (the measured
            run's with the default ``tune_fraction`` 1), validation loss evaluated at the
            last ``config.smooth`` evaluation points only, no quality probe.
        registry: the schemes registry (default :mod:`isample.schemes`).
        on_step: called with the step count after every step (progress bars).
        backward_cost: cost of a backward in forwards for the ``compute`` axis (measured
            by :func:`measure_step_costs` in a sweep).
        scheme_options: extra ``build`` overrides of the scheme (e.g. ``{"always": True}``
            or ``{"max_weight": 10.0}``; ``isample study``).
        optimizer_hook: called with the freshly built optimizer before the first step, e.g.
            to apply :func:`isample.metrics.scaled_hyperparameters`; the learning rate it
            leaves in the first param group becomes the run's base ``lr`` (the schedule
            multiplies it).
        weight_normalize: ``"none"`` (default), ``"mean"`` or ``"max"``: divide each
            batch's importance weights by their mean or max before the loss (see
            :mod:`isample.weighting`; for schemes without a ``normalize`` option).
        record_tau: return the pool loader's per-step ``tau`` as ``tau_history``
            (``[{"step", "tau"}]``; empty for loaders without one), and add ``kappa_pool``
            (two-stage kappa, see :class:`ProbeQuality`) to the quality rows of pool loaders.

    Returns:
        dict with ``scheme``, ``optimizer``, ``seed``, ``lr``, ``diverged``, ``steps``,
        ``epochs``, ``train_seconds`` (wall-clock of loader + step + feedback),
        ``train_cpu_seconds`` (process CPU time of the same regions), ``loader_seconds``,
        ``feedback_seconds``, ``forward_examples``, ``backward_examples``,
        ``scored_examples``, ``compute`` (forward + r x backward, r = ``backward_cost``), ``is_on_share``
        (switched schemes: share of steps with importance sampling on, see
        :func:`is_on_history`; else nan), ``plan`` (:func:`run_plan`),
        ``curve`` (list of
        eval points: ``step``, ``seconds``, ``cpu_seconds``, ``forward_examples``, ``backward_examples``,
        ``compute``, ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``;
        for tuning runs ``val_loss``, ``val_accuracy`` instead), and ``quality`` (rows
        ``step``, ``geometry``, ``kappa``, ``kappa_opt``, ``q_lin``, ``q_log``,
        ``corr_grad_norm``; see :class:`ProbeQuality`).
    """
    registry = registry if registry is not None else _registry()
    device = torch.device(config.device)
    plan = run_plan(config, tuning)
    max_steps, max_seconds = plan["max_steps"], plan["max_seconds"]
    schedule = plan["schedule"]
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    in_features = int(math.prod(data.input_shape))
    model = build_model(
        config.model, in_features, data.num_classes, derive_seed(seed, 1), device, data.image_shape
    )
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr)
    if optimizer_hook is not None:
        optimizer_hook(opt)
        lr = float(opt.param_groups[0]["lr"])
    if weight_normalize not in ("none", "mean", "max"):
        raise ValueError(
            f"The 'weight_normalize' parameter of train_run must be 'none', 'mean' or 'max'. "
            f"Got {weight_normalize!r}."
        )
    train_ds = TensorDataset(data.x_train, data.y_train)
    n = len(train_ds)
    per_epoch = math.ceil(n / config.batch_size)
    epochs = math.ceil(max_steps / per_epoch) if max_steps is not None else None
    loader = registry.build(
        scheme,
        train_ds,
        model,
        loss_fn,
        config.batch_size,
        seed=int(seed),
        epochs=epochs,
        optimizer=opt,
        **{**scheme_overrides(scheme, data), **(scheme_options or {})},
    )
    info = registry.describe(scheme)
    # scoring with a backward pass (gradient-norm scorers) costs a backward per scored example
    extra_backward = bool(info.get("extra_backward", False)) if isinstance(info, dict) else False
    extra_backward = extra_backward or bool(getattr(getattr(loader, "scorer", None), "extra_backward", False))

    x_train, y_train = data.x_train, data.y_train
    if config.train_eval_size is not None and config.train_eval_size < n:
        eval_gen = torch.Generator().manual_seed(derive_seed(config.data_seed, 3))
        subset = torch.randperm(n, generator=eval_gen)[: config.train_eval_size]
        x_train, y_train = x_train[subset], y_train[subset]
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_eval, y_eval = (data.x_val, data.y_val) if tuning else (data.x_test, data.y_test)
    x_eval, y_eval = x_eval.to(device), y_eval.to(device)

    tracker = None
    if not tuning and config.quality_every > 0:
        probe_gen = torch.Generator().manual_seed(derive_seed(config.data_seed, 2))
        probe_idx = torch.randperm(n, generator=probe_gen)[: min(config.probe_size, n)]
        candidate = quality_candidates(loader, probe_idx)
        pool = None
        if record_tau:
            pool_size = getattr(getattr(loader, "pool", loader), "pool_size", None)
            if isinstance(pool_size, int) and pool_size > config.batch_size:
                pool = (pool_size, config.batch_size)
        if candidate is not None:
            tracker = ProbeQuality(
                data.x_train[probe_idx].to(device),
                data.y_train[probe_idx].to(device),
                loss_fn,
                candidate,
                opt,
                pool,
            )

    curve: list[dict[str, Any]] = []
    quality_rows: list[dict[str, Any]] = []
    step = 0
    epoch = 0
    trained = 0
    loader_s = feedback_s = total_s = cpu_s = 0.0
    diverged = False
    # a run of the same (scheme, seed) is deterministic; the clock is the only noise

    def cost() -> tuple[int, int]:
        scored = int(loader.cost().get("scored_examples", 0)) if hasattr(loader, "cost") else 0
        return scored, trained + scored

    def record() -> None:
        nonlocal diverged
        scored, forward = cost()
        backward = trained + (scored if extra_backward else 0)
        point: dict[str, Any] = {
            "step": step,
            "seconds": total_s,
            "cpu_seconds": cpu_s,
            "forward_examples": forward,
            "backward_examples": backward,
            "compute": compute_units(forward, backward, backward_cost),
        }
        if tuning:
            vl, va = evaluate(model, x_eval, y_eval, loss_fn)
            point.update(val_loss=vl, val_accuracy=va)
            bad = not math.isfinite(vl)
        else:
            tl, ta = evaluate(model, x_train, y_train, loss_fn)
            el, ea = evaluate(model, x_eval, y_eval, loss_fn)
            point.update(train_loss=tl, train_accuracy=ta, test_loss=el, test_accuracy=ea)
            bad = not math.isfinite(tl)
        curve.append(point)
        if bad:
            diverged = True
        elif tracker is not None and step % config.quality_every == 0:
            try:
                quality_rows.extend(tracker.measure(model, step))
            except ValueError:  # non-finite gradients on the probe: treat as divergence
                diverged = True

    def set_lr() -> None:
        if schedule == "constant":
            return
        progress = step / max_steps if max_steps is not None else total_s / float(max_seconds)
        factor = schedule_factor(schedule, progress)
        for group in opt.param_groups:
            group["lr"] = lr * factor

    # tuning evaluates only the last `smooth` evaluation points of a steps budget
    tune_from = 0 if max_steps is None else max_steps - (config.smooth - 1) * config.eval_every

    if not tuning:
        record()
    done = False
    while not done and not diverged:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loader.set_epoch(epoch)
        iterator = iter(loader)
        loader_s += time.perf_counter() - t0
        total_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        produced = False
        while True:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                batch = next(iterator)
            except StopIteration:
                dt = time.perf_counter() - t0
                loader_s += dt
                total_s += dt
                cpu_s += time.process_time() - c0
                break
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            _sync(device)
            t1 = time.perf_counter()
            set_lr()
            with loader.step_context(batch):
                out = model(batch.inputs)
                losses = loss_fn(out, batch.targets)
                weights = batch.weights
                if weight_normalize != "none" and weights.numel():
                    scale = weights.mean() if weight_normalize == "mean" else weights.max()
                    weights = weights / scale.clamp_min(torch.finfo(weights.dtype).tiny)
                (weights * losses).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t2 = time.perf_counter()
            loader.feedback(batch, out.detach(), losses.detach())
            _sync(device)
            t3 = time.perf_counter()
            cpu_s += time.process_time() - c0
            loader_s += t1 - t0
            feedback_s += t3 - t2
            total_s += t3 - t0
            produced = True
            step += 1
            trained += len(batch)
            if on_step is not None:
                on_step(step)
            out_of_budget = (max_steps is not None and step >= max_steps) or (
                max_seconds is not None and total_s >= max_seconds
            )
            if out_of_budget:
                done = True
            if tuning:
                if step % config.eval_every == 0 and not bool(torch.isfinite(losses).all()):
                    diverged = True
                elif not done and step % config.eval_every == 0 and step >= tune_from:
                    record()
            elif done or step % config.eval_every == 0:
                record()
            if done or diverged:
                break
        if not produced and not done:
            raise RuntimeError(f"Scheme {scheme!r} produced an empty epoch {epoch}; cannot train.")
        epoch += 1
    if tuning:
        record()
    scored, forward = cost()
    backward = trained + (scored if extra_backward else 0)
    is_on = is_on_history(loader)
    extra: dict[str, Any] = {}
    if record_tau:
        extra["tau_history"] = tau_history(loader)
    return {
        "dataset": data.name,
        "scheme": scheme,
        "optimizer": optimizer,
        "seed": int(seed),
        "lr": float(lr),
        "tuning": bool(tuning),
        "diverged": bool(diverged),
        "steps": step,
        "epochs": epoch,
        "train_seconds": total_s,
        "train_cpu_seconds": cpu_s,
        "loader_seconds": loader_s,
        "feedback_seconds": feedback_s,
        "overhead_share": (loader_s + feedback_s) / total_s if total_s > 0 else math.nan,
        "forward_examples": forward,
        "backward_examples": backward,
        "scored_examples": scored,
        "trained_examples": trained,
        "compute": compute_units(forward, backward, backward_cost),
        "plan": plan,
        "is_on_share": sum(is_on) / len(is_on) if is_on else math.nan,
        "curve": curve,
        "quality": quality_rows,
        **extra,
    }


def resolve_schemes(names: Sequence[str], registry: Any = None) -> list[str]:
    """Check scheme names against the registry; ``uniform`` is put first (the baseline).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    registry = registry if registry is not None else _registry()
    valid = list(registry.available())
    unknown = [s for s in names if s not in valid]
    if unknown:
        raise ValueError(f"Unknown scheme {unknown[0]!r}. Valid schemes: {', '.join(valid)}.")
    out = ["uniform"] + [s for s in dict.fromkeys(names) if s != "uniform"]
    if "uniform" not in valid:
        raise ValueError("The schemes registry has no 'uniform' scheme, the benchmark's baseline.")
    return out
