"""``PoolLoader``: online importance sampling from freshly scored pools.

Each step reads a pool of B = presample x b examples through an ordinary DataLoader
(workers and pinned memory honoured), scores the pool with the current model, draws b
of them with replacement from p over the pool, and yields the selected rows of the
tensors it already holds: no example is loaded twice.

Estimator: pools are consecutive chunks of a stream of random permutations of the
dataset, so every pool position is uniform over the dataset; within the pool,
weights ``1 / (B p_i)`` make the batch unbiased for the pool mean, hence for the full
gradient.

Under DDP (``num_replicas`` R > 1) every rank reads and scores its own pool: step s of
rank r takes chunk ``s R + r`` of the shared stream (pools of one step are disjoint
while they lie in one permutation) and draws its b from it with a rank-specific random
stream. Each rank's weighted gradient is unbiased for the full gradient by the
argument above, so their average (what DDP's all-reduce computes) is unbiased too.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as _dist
from ._fetch import IndexedCollate, IndexedDataset, can_gather, can_read_directly, read_directly
from ._options import check_dataset, check_loader_options
from ._random import UNIFORM_STREAM, permutation, step_generator
from ._validation import check_choice, check_float, check_int, param_error
from .batch import WeightedBatch, index_rows, move_to, slice_rows, split_batch
from .policies import ScorePolicy
from .scorers import (
    LossScorer,
    UpperBoundScorer,
    model_call_of,
    model_device,
    output_gradient_norms,
    per_example_losses,
    scoring_mode,
    upper_bound_closed_form,
)
from .switch import (
    History,
    ImportanceSamplingOffWarning,
    TauSwitch,
    check_tau_momentum,
    check_tau_threshold,
    default_tau_threshold,
)
from .weighting import NORMALIZATIONS, importance_weights

__all__ = [
    "ALGORITHM1_TAU_EVERY",
    "PoolLoader",
    "check_presample",
    "format_status",
    "pool_tau",
    "scores_from_outputs",
]

#: ``tau_every`` of the Algorithm 1 schemes (``kf``, ``auto``): while off, decide every this
#: many steps. The scores fed back since the last decision are computed in one batched pass
#: and the switch replays every step in order, so its state is that of an every-step
#: evaluation; a switch-on takes effect up to ``ALGORITHM1_TAU_EVERY - 1`` steps later.
ALGORITHM1_TAU_EVERY = 16


def pool_tau(scores: torch.Tensor) -> float:
    """tau of one pool (see :mod:`isample.switch`); delegates to :func:`isample.metrics.tau`."""
    from .metrics.functional import tau

    return float(tau(scores))


class _ChunkStream(Sampler[torch.Tensor]):
    """The candidates of one epoch for one rank, as a batch sampler of fixed-size chunks.

    The global stream concatenates random permutations of the dataset seeded by
    ``(seed, epoch, block)``; it is cut into chunks of ``chunk_size``, and the j-th chunk
    of rank r is global chunk ``j * num_replicas + r``. A step reads one chunk (a pool of
    B, or in Algorithm 1 mode a batch of b while importance sampling is off) or
    ``B / b`` chunks (a pool, in Algorithm 1 mode while it is on); the sequence of chunks
    does not depend on those decisions, so workers can prefetch it. In Algorithm 1 mode
    (``aligned``) each permutation is cut on its own into ``ceil(N / b)`` chunks, the last
    one short, as the uniform scheme cuts its epoch: a switch that stays off reads exactly
    uniform's batches whatever N mod b (a pool that reaches the end of a permutation is
    then shorter than B).
    The range to read is captured when ``iter()`` is called (two iterators do not share it).
    """

    def __init__(
        self,
        num_samples: int,
        chunk_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        stream: int = 1,
        aligned: bool = False,
    ) -> None:
        self.stream = stream  # permutation stream id (UNIFORM_STREAM in Algorithm 1 mode)
        #: chunks never straddle two permutations (Algorithm 1: uniform's batches, short last one)
        self.aligned = aligned
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0
        self.stop = 0

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._chunks(self.seed, self.epoch, self.start, self.stop)

    def _chunks(self, seed: int, epoch: int, start: int, stop: int) -> Iterator[torch.Tensor]:
        """LongTensor chunks of dataset indices (no per-index Python objects)."""
        n, size, replicas, rank = self.num_samples, self.chunk_size, self.num_replicas, self.rank
        cached_block, perm = -1, torch.empty(0, dtype=torch.long)
        if self.aligned:  # each permutation cut into ceil(n / size) chunks, the last one short
            per_block = -(-n // size)
            for j in range(start, stop):
                block, part = divmod(j * replicas + rank, per_block)
                if block != cached_block:
                    perm, cached_block = permutation(n, seed, epoch, block, self.stream), block
                yield perm[part * size : min((part + 1) * size, n)]
            return
        for j in range(start, stop):
            lo = (j * replicas + rank) * size
            hi = lo + size
            parts = []
            for block in range(lo // n, (hi - 1) // n + 1):
                if block != cached_block:
                    perm, cached_block = permutation(n, seed, epoch, block, self.stream), block
                parts.append(perm[max(lo - block * n, 0) : min(hi - block * n, n)])
            yield parts[0] if len(parts) == 1 else torch.cat(parts)


def scores_from_outputs(
    scorer: Any, outputs: Any, targets: Any, losses: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The scorer's scores computed from the training step's outputs, without another forward pass.

    * :class:`isample.UpperBoundScorer`: ``||d l_i / d z_i||`` from the (detached) outputs
      z, in closed form for cross-entropy and MSE, else by one backward of the loss alone.
    * :class:`isample.LossScorer`: the per-example losses (``losses`` when given).
    * any scorer with a ``scores_from_outputs(outputs, targets)`` method: that method.

    Returns:
        Tensor of shape (b,) on the outputs' device, or None when the scorer cannot score
        from outputs (its scores need a pass of its own).
    """
    hook = getattr(scorer, "scores_from_outputs", None)
    if callable(hook):
        return hook(outputs, targets)
    if isinstance(scorer, UpperBoundScorer):
        return _upper_bound_from_logits(scorer, model_call_of(scorer).read(outputs), targets)
    if isinstance(scorer, LossScorer):
        if losses is not None:
            return losses.detach()
        with torch.no_grad():
            return per_example_losses(
                scorer.loss_fn, model_call_of(scorer).read(outputs).detach(), targets, "PoolLoader"
            )
    return None


def _upper_bound_from_logits(scorer: UpperBoundScorer, z: torch.Tensor, targets: Any) -> torch.Tensor:
    """The upper bound of :func:`scores_from_outputs` from logits already read from the outputs."""
    z = z.detach()  # detached: no graph is recorded below
    scores = None
    if scorer.closed_form and isinstance(targets, torch.Tensor):
        scores = upper_bound_closed_form(scorer.loss_fn, z, targets)
    if scores is None:
        scores = output_gradient_norms(scorer.loss_fn, z, targets, "PoolLoader.feedback")
    return scores


def _scores_from_outputs_supported(scorer: Any) -> bool:
    return callable(getattr(scorer, "scores_from_outputs", None)) or isinstance(
        scorer, (UpperBoundScorer, LossScorer)
    )


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    return None


def _cat_rows(parts: list[Any]) -> Any:
    """Concatenate collated chunks along dim 0 (tensors, mappings, tuples, lists of per-row values)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return type(first)({k: _cat_rows([p[k] for p in parts]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_cat_rows([p[i] for p in parts]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        if first and isinstance(first[0], (torch.Tensor, Mapping, list, tuple)):
            return type(first)(_cat_rows([p[i] for p in parts]) for i in range(len(first)))
        out: list[Any] = []
        for p in parts:
            out.extend(p)
        return type(first)(out)
    return first


class PoolLoader:
    """Online importance sampling: score a uniform pool of B, train on b drawn from it.

    .. math::

        p_i = \\mathrm{policy}(s)_i \\text{ over the pool}, \\qquad
        w_i = \\Big(\\frac{1}{B p_i}\\Big)^k

    **Two ways to run the switch.** With ``score_when_off=True`` (default) every step
    reads and scores a pool of B, and the switch follows the tau of that pool; while it is
    off the batch is a uniform subset of the pool (weights 1). With
    ``score_when_off=False`` the loader follows Katharopoulos and Fleuret's Algorithm 1:
    while the switch is off a step reads only a uniform batch of b (no presampling, no
    scoring pass, the cost of a uniform step) and tau comes from that batch's own scores,
    computed from the training outputs the loop hands to :meth:`feedback` (for
    :class:`UpperBoundScorer` the closed-form bound on the detached logits; no extra
    forward). Once on, it reads and scores a pool of B as above.

    **tau on a batch of b and on a pool of B.** ``tau**2 = mean(s**2) / mean(s)**2`` over
    the M scores it is computed on; it is capped at M and, for heavy-tailed scores, biased
    low on small sets (on a batch of b it underestimates what a pool of B would show). So
    the loader always computes tau over the B most recent scores: the pool's own B scores
    after a pool step, and otherwise the last B training-batch scores (the last B / b
    uniform batches, scored within the last B / b steps). Both regimes therefore estimate
    the same quantity, the tau of a uniform set of B, whose square estimates the variance
    multiplier of drawing b from a pool of B. The decision for a step is made before the
    step reads its data, from the scores seen up to the previous step.

    **Unbiasedness.** A step with the switch off trains on a uniform batch (weights 1); a
    step with it on draws b from a uniform pool with weights ``1 / (B p_i)``. Both
    minibatch gradients are unbiased for the full gradient, whatever the decision history.

    Args:
        dataset: a map-style dataset of ``(input, target)`` pairs or dicts.
        model: the model being trained; it scores each pool (in eval mode, restored after).
        scorer: ``scorer(model, inputs, targets) -> Tensor[B]``, e.g. ``UpperBoundScorer``.
        batch_size: b, examples per yielded batch.
        presample: B / b, a float in [1, 1024] (default 4.0). B = round(presample x b);
            with ``score_when_off=False`` B is rounded to a whole number of batches.
        replacement: draw the b with replacement (default True, the unbiased i.i.d.
            estimator). Without replacement the weights are the same i.i.d. weights,
            an approximation that is exact only when p is uniform.
        power, additive, relative, mixing: score smoothing (see :class:`ScorePolicy`).
        bias_exponent: k in [0, 1]; 1 = unbiased.
        max_weight: clip weights (None = no clipping).
        normalize: ``"none"``, ``"mean"`` or ``"max"`` (see :mod:`isample.weighting`).
        always: importance sampling from the first step; otherwise batches are uniform
            until the EMA of tau exceeds ``tau_threshold``.
        tau_threshold: a float >= 1 (``inf``: never on); default ``(B + 3b) / (3b)``.
        tau_momentum: EMA momentum of tau, in [0, 1) (0.9).
        switch: an object with ``observe(tau, timing) -> bool``, ``state_dict``,
            ``load_state_dict`` and ``describe`` replacing the tau switch. ``timing`` is a
            dict with ``score_seconds`` (scoring a pool: this pool, or in Algorithm 1 mode
            the previous step's pool or a timed probe scaled to B; None when not measured),
            ``step_seconds`` (time the training loop spent between the previous batch
            and this request, None at the first step; all times are process CPU seconds
            when the model is on the CPU, wall seconds on an accelerator), ``fetch_seconds`` and ``chunks``
            (Algorithm 1 mode: time spent reading the previous step's ``chunks`` batches of
            b), ``pool_size`` and ``batch_size``. A switch whose ``wants_score_timing`` is
            true gets a timed scoring probe of the current batch while off.
        score_when_off: see above (default True; False = Algorithm 1, which needs
            :meth:`feedback` after every training step and a scorer that can score from
            outputs, see :func:`scores_from_outputs`).
        warn_off_epochs: warn (:class:`isample.switch.ImportanceSamplingOffWarning`) once
            when pools were scored for this many epochs in a row with importance sampling
            off (None = never; default 3).
        scoring_batch_size: score the pool in chunks of this size (default: the whole pool).
        num_batches: batches per epoch (default ceil(N / b), floor with drop_last).
        drop_last: see ``num_batches``.
        num_workers, pin_memory, collate_fn, persistent_workers, prefetch_factor,
            worker_init_fn, multiprocessing_context, timeout: passed to the DataLoader
            that reads the pools.
        seed, generator: randomness source (one of them; default: a fresh random seed,
            rank 0's under DDP).
        num_replicas: number of data-parallel processes (default: the world size of the
            initialised default process group, else 1). Each rank reads its own pools
            (see the module docstring); ``len`` is then ceil(N / (R b)) by default.
        rank: this process's rank (default: from ``torch.distributed``, else 0).
        check_loss_fn: check on two examples at construction that the scorer returns
            one finite score per example (catches a reduced loss before training).
        tau_every: Algorithm 1 only: while off, decide every this many steps (default 1:
            every step). The outputs handed to :meth:`feedback` are kept, and at a decision
            the scores of all batches since the last one are computed in one batched pass
            (one closed-form call over the concatenated outputs, one synchronisation);
            the switch then observes every step in order with that step's tau and
            timings, so its state (tau EMA, costs) is exactly the one an every-step
            evaluation reaches, and ``tau_history`` has one entry per step. Only the step
            at which a switch-on takes effect can come up to ``tau_every - 1`` steps
            later. While on, every step decides. ``tau_history``, :meth:`describe` and
            :meth:`state_dict` replay the pending steps first (the served decisions do
            not change). Forced to 1 with several replicas (every rank must gather tau
            at the same steps).

    Yields:
        :class:`WeightedBatch` with inputs and targets on the model's device, indices
        on the CPU and float32 weights on the model's device.

    The epoch cursor belongs to each iterator: ``set_epoch`` (with another epoch) or a
    second iterator never changes the batches of an iterator already running, and
    ``set_epoch`` with the current epoch keeps the position (a mid-epoch resume survives
    it). :meth:`state_dict` saves the position after the last batch yielded.

    Under DDP with ``torch.distributed`` initialised, the tau fed to the switch is the
    mean of the ranks' taus (one all-gather of a float per step), so every rank
    switches importance sampling on at the same step.

    References:
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942), Algorithm 1.
    """

    STATE_VERSION = 2
    #: steps of ``tau_history`` kept (and saved in ``state_dict``)
    HISTORY_LIMIT = 10_000
    #: largest accepted ``presample`` (B / b)
    MAX_PRESAMPLE = 1024.0
    #: off batches awaiting :meth:`feedback` (older ones are forgotten)
    FEEDBACK_QUEUE = 8
    #: Algorithm 1 mode, while off: time one step and one read in this many (``step_seconds`` and
    #: ``fetch_seconds`` are None on the others; a clock read costs about 1 us of CPU time)
    TIME_EVERY = 4
    #: warn when this many off batches were yielded in Algorithm 1 mode without any feedback
    NO_FEEDBACK_WARN_STEPS = 50

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module,
        scorer: Callable[[nn.Module, Any, Any], torch.Tensor],
        batch_size: int,
        presample: float = 4.0,
        *,
        replacement: bool = True,
        power: float = 1.0,
        additive: float = 0.0,
        relative: float = 0.0,
        mixing: float = 0.0,
        bias_exponent: float = 1.0,
        max_weight: float | None = None,
        normalize: str = "none",
        always: bool = False,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        switch: Any = None,
        score_when_off: bool = True,
        warn_off_epochs: int | None = 3,
        scoring_batch_size: int | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable | None = None,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        check_loss_fn: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        tau_every: int = 1,
    ) -> None:
        owner = "PoolLoader"
        if not isinstance(model, nn.Module):
            raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
        if not callable(scorer):
            raise param_error("scorer", owner, "a callable scorer(model, inputs, targets)", scorer, TypeError)
        self.num_samples = check_dataset(dataset, owner)
        options = check_loader_options(
            dict(
                num_workers=num_workers,
                pin_memory=pin_memory,
                collate_fn=collate_fn,
                persistent_workers=persistent_workers,
                prefetch_factor=prefetch_factor,
                worker_init_fn=worker_init_fn,
                multiprocessing_context=multiprocessing_context,
                timeout=timeout,
            ),
            owner,
        )
        self.batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
        self.presample = check_presample(presample, owner)
        top = max(self.num_samples, self.batch_size) / self.batch_size  # a pool is a sample of the N
        if self.presample > top:
            raise param_error("presample", owner, f"a float in [1, N / b] = [1, {top:g}]", presample)
        if not isinstance(score_when_off, bool):
            raise param_error("score_when_off", owner, "a bool", score_when_off, TypeError)
        self.always = bool(always)
        #: Algorithm 1: read only b while the switch is off, tau from the training batches
        self.lazy = not score_when_off and not self.always
        self.score_when_off = score_when_off
        if self.lazy:
            self.chunks_per_pool = max(1, int(math.floor(self.presample + 0.5)))
            self.pool_size = self.chunks_per_pool * self.batch_size
            if not _scores_from_outputs_supported(scorer):
                raise ValueError(
                    "PoolLoader(score_when_off=False) computes tau from the training outputs, which needs "
                    "UpperBoundScorer, LossScorer or a scorer with a scores_from_outputs(outputs, targets) "
                    f"method; got {type(scorer).__name__}. Use score_when_off=True."
                )
        else:
            self.chunks_per_pool = 1
            self.pool_size = max(self.batch_size, int(round(self.presample * self.batch_size)))
        self.replacement = bool(replacement)
        self.policy = ScorePolicy(power=power, additive=additive, relative=relative, mixing=mixing)
        self.bias_exponent = check_float(bias_exponent, "bias_exponent", owner, minimum=0.0, maximum=1.0)
        self.max_weight = check_float(
            max_weight, "max_weight", owner, minimum=0.0, min_inclusive=False, allow_none=True
        )
        self.normalize = check_choice(normalize, "normalize", owner, NORMALIZATIONS)
        self.scoring_batch_size = check_int(
            scoring_batch_size, "scoring_batch_size", owner, minimum=1, allow_none=True
        )
        self.warn_off_epochs = check_int(
            warn_off_epochs, "warn_off_epochs", owner, minimum=1, allow_none=True
        )
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _dist.resolve_world(num_replicas, rank, owner)
        tau_every = check_int(tau_every, "tau_every", owner, minimum=1)
        #: Algorithm 1: steps between decisions while off (1 = every step; replicas always decide every step)
        self.tau_every = tau_every if self.num_replicas == 1 else 1
        step_size = self.batch_size * self.num_replicas
        default_batches = (
            (self.num_samples // step_size) if self.drop_last else math.ceil(self.num_samples / step_size)
        )
        self.num_batches = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True) or max(
            default_batches, 1
        )
        threshold = check_tau_threshold(tau_threshold, owner)
        momentum = check_tau_momentum(tau_momentum, owner)
        if switch is None:
            if threshold is None:
                threshold = default_tau_threshold(self.pool_size, self.batch_size)
            switch = TauSwitch(threshold, momentum=momentum, always=always)
        elif not callable(getattr(switch, "observe", None)):
            raise param_error(
                "switch", owner, "an object with observe(tau, timing) -> bool", switch, TypeError
            )
        self.switch = switch
        self.dataset = dataset
        self.model = model
        self.scorer = scorer
        self._first_param = _first_parameter(model)
        self.seed = _dist.shared_seed(seed, generator, owner, self.num_replicas)
        # progress after the last batch yielded (what state_dict saves and a new iterator starts from)
        self.epoch = 0
        self.position = 0
        self.chunk = 0
        self.steps = 0
        #: examples passed to the scorer so far (pools, and probes in Algorithm 1 mode)
        self.scored_examples = 0
        self._generation = 0
        self._live = 0  # live iterators that own the resume point
        #: per-step switch inputs and decision, most recent ``HISTORY_LIMIT`` steps (list-like)
        self._tau_history = History(maxlen=self.HISTORY_LIMIT)
        self._on_steps = 0
        self._scored_off_steps = 0
        self._warned_off = False
        self._yielded_at: float | None = None
        self._last_step_seconds: float | None = None
        # Algorithm 1 state: the last B scores, batches awaiting feedback, last step's timings
        self._window: deque[tuple[float, float, float]] = deque(maxlen=self.chunks_per_pool)
        self._window_source = "none"
        self._awaiting: deque[torch.Tensor] = deque(maxlen=self.FEEDBACK_QUEUE)
        # events not yet replayed, in order: ("scores", outputs, targets, losses, n) from feedback,
        # ("moments", count, s1, s2, source) from pools and probes, ("loss", losses, weights), and
        # ("step", score_seconds, step_seconds, fetch_seconds, chunks, step, served)
        self._events: list[tuple[Any, ...]] = []
        self._decision = self.switch.on if hasattr(self.switch, "on") else False
        self._prev_served = bool(self._decision)  # the decision the last replayed step was served with
        self._probe_pending = False  # a timed probe whose timing the switch has not observed yet
        #: hand the switch the weighted training loss of each batch (``timing["train_loss"]``)
        self._wants_losses = self.lazy and bool(getattr(self.switch, "wants_losses", False))
        # feedback reads the logits once (the scorer's logits= hook) and keeps them for the bound
        self._reads_logits = isinstance(scorer, UpperBoundScorer) and not callable(
            getattr(scorer, "scores_from_outputs", None)
        )
        # per-example scores: the fed batches can be scored concatenated (see _feedback_moments)
        self._per_example_scores = isinstance(scorer, (UpperBoundScorer, LossScorer)) and not callable(
            getattr(scorer, "scores_from_outputs", None)
        )
        self._feedbacks = 0
        self._off_yielded = 0
        self._warned_feedback = False
        self._score_seconds: float | None = None
        self._fetch_seconds: float | None = None
        self._fetch_chunks = 0
        self._clock: Callable[[], float] = time.process_time
        #: Algorithm 1 mode times steps and reads only for a switch that uses the times (not TauSwitch,
        #: whose rule ignores them: its off steps then make no clock call)
        self._timed = not self.lazy or bool(getattr(self.switch, "wants_timing", True))
        self._stream = _ChunkStream(
            self.num_samples,
            self.batch_size if self.lazy else self.pool_size,
            self.seed,
            self.num_replicas,
            self.rank,
            # Algorithm 1 reads uniform's batches while off: a switch that never turns on
            # reproduces the uniform scheme exactly (same seed, same batches)
            UNIFORM_STREAM if self.lazy else 1,
            aligned=self.lazy,
        )
        self._loader_options = dict(
            num_workers=options["num_workers"],
            pin_memory=options["pin_memory"],
            collate_fn=IndexedCollate(collate_fn),
            prefetch_factor=options["prefetch_factor"],
            worker_init_fn=options["worker_init_fn"],
            multiprocessing_context=options["multiprocessing_context"],
            timeout=options["timeout"],
        )
        self._gather = can_gather(dataset, collate_fn)
        #: no workers, no pinning, a TensorDataset: gather each chunk in this process, without the
        #: DataLoader's per-batch bookkeeping (the same tensors; the uniform scheme reads the same way)
        self._direct = can_read_directly(dataset, collate_fn, options)
        self._persistent = options["persistent_workers"]
        self._loader = self._make_loader(self._stream, self._persistent)
        self._shared_busy = False
        if check_loss_fn:
            self._check_scorer()

    def _set_clock(self) -> None:
        """Time steps and scoring in process CPU seconds on the CPU, wall seconds on an accelerator.

        On the CPU the work of other processes then does not enter the measured costs (a
        shared machine's load would otherwise inflate one of two timed sections and tilt
        the switch); on an accelerator the CPU is mostly waiting, so wall time is the cost.
        """
        param = self._first_param
        on_cpu = param is None or param.device.type == "cpu"
        self._clock = time.process_time if on_cpu else time.perf_counter

    def _make_loader(self, stream: _ChunkStream, persistent: bool) -> DataLoader:
        return DataLoader(
            IndexedDataset(self.dataset, gather=self._gather),
            batch_sampler=stream,
            persistent_workers=persistent,
            **self._loader_options,  # type: ignore[arg-type]
        )

    @property
    def tau_history(self) -> History:
        """Per-step switch inputs and decision, most recent ``HISTORY_LIMIT`` steps (list-like).

        Each entry: ``step``, ``tau`` (over the last B scores), ``ema``, ``on`` (the decision
        the step was served with), the step's timings and, in Algorithm 1 mode, ``source``.
        With ``tau_every > 1`` the steps since the last decision are replayed first.
        """
        if self._events:
            self._flush()
        return self._tau_history

    @tau_history.setter
    def tau_history(self, value: History) -> None:
        self._tau_history = value

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iterator runs: its pools and draws are a pure function of (seed, epoch).

        With the current epoch this is a no-op (the position within the epoch is kept, so a
        resumed mid-epoch state survives a framework calling ``set_epoch`` again). With
        another epoch the next iterator starts that epoch from its first batch; an iterator
        already running finishes its own epoch unchanged.
        """
        epoch = check_int(epoch, "epoch", "PoolLoader.set_epoch", minimum=0)
        if epoch == self.epoch:
            return
        self.epoch, self.position, self.chunk = epoch, 0, 0
        self._generation += 1

    def __iter__(self) -> Iterator[WeightedBatch]:
        if self._live:  # an extra pass while another iterator is live: a whole epoch of its own
            return self._iterate(self.epoch, 0, 0, -1)  # generation -1 never moves the resume point
        return self._iterate(self.epoch, self.position, self.chunk, self._generation)

    def _iterate(self, epoch: int, step: int, chunk: int, generation: int) -> Iterator[WeightedBatch]:
        _dist.check_configuration(self, "PoolLoader")  # every rank: same N, b, presample, ... (DDP)
        self._set_clock()
        use_shared = not (self._persistent and self._shared_busy)
        stream = (
            self._stream
            if use_shared
            else _ChunkStream(
                self.num_samples,
                self._stream.chunk_size,
                self.seed,
                self.num_replicas,
                self.rank,
                self._stream.stream,
                self._stream.aligned,
            )
        )
        stream.seed = self.seed
        stream.epoch, stream.start = epoch, chunk
        stream.stop = chunk + (self.num_batches - step) * self.chunks_per_pool
        direct = self._direct
        loader = self._loader if use_shared or direct else self._make_loader(stream, False)
        if use_shared:
            self._shared_busy = True
        owner = generation >= 0
        self._live += int(owner)
        try:
            chunks = read_directly(self.dataset, iter(stream)) if direct else iter(loader)  # type: ignore[arg-type]
            self._yielded_at = None
            timed, every = self._timed, (self.TIME_EVERY if self.lazy else 1)
            while step < self.num_batches:
                if timed:  # time the loop spent on the previous batch (training step + loading wait)
                    if self._yielded_at is None:
                        self._last_step_seconds = None
                    else:
                        self._last_step_seconds = self._clock() - self._yielded_at
                        self._yielded_at = None
                if self.lazy:
                    batch, used = self._lazy_step(chunks, epoch, step)
                else:
                    indices, data = next(chunks)
                    batch, used = self._select(indices, data, epoch, step), 1
                step += 1
                chunk += used
                self.steps += 1
                if generation == self._generation:  # set_epoch / load_state_dict did not intervene
                    if step >= self.num_batches:  # epoch complete: the next iterator starts a new epoch
                        self.epoch, self.position, self.chunk = epoch + 1, 0, 0
                    else:
                        self.epoch, self.position, self.chunk = epoch, step, chunk
                if timed and (every == 1 or self._decision or self.steps % every == 0):
                    self._yielded_at = self._clock()
                yield batch
        finally:
            self._live -= int(owner)
            if use_shared:
                self._shared_busy = False

    # ------------------------------------------------------------------ one step
    def _record(
        self, tau_value: float, observed: float, on: bool, timing: dict[str, Any], **extra: Any
    ) -> None:
        ema = getattr(self.switch, "ema", None)
        entry = {"step": self.steps, "tau": tau_value, "ema": ema, "on": on, **timing, **extra}
        if self.num_replicas > 1:
            entry["tau_global"] = observed
        self._tau_history.append(entry)
        self._on_steps += int(bool(on))

    def _observe(self, tau_value: float, timing: dict[str, Any]) -> tuple[float, bool]:
        observed = tau_value
        if self.num_replicas > 1 and _dist.is_initialized():  # every rank observes the same tau
            observed = _dist.nanmean(_dist.all_gather_floats(tau_value))
        return observed, bool(self.switch.observe(observed, timing))

    def _select(self, indices: torch.Tensor, data: Any, epoch: int, step: int) -> WeightedBatch:
        """A step of the score-every-step mode: score the pool, observe its tau, draw."""
        device = model_device(self.model)
        data = move_to(data, device, non_blocking=True)
        inputs, targets = split_batch(data)
        started = self._clock()
        scores = self._score(inputs, targets).to(torch.float64).cpu()  # .cpu() synchronises the device
        score_seconds = self._clock() - started
        m = scores.shape[0]
        b = min(self.batch_size, m)
        finite = self._check_scores(scores)
        tau_value = pool_tau(scores) if finite and float(scores.sum()) > 0 else float("nan")
        timing = {
            "score_seconds": score_seconds,
            "step_seconds": self._last_step_seconds,
            "pool_size": m,
            "batch_size": b,
        }
        observed, on = self._observe(tau_value, timing)
        self._record(tau_value, observed, on, timing)
        self._warn_if_off(on)
        return self._draw(indices, data, scores, finite, on, epoch, step, device)

    def _check_scores(self, scores: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(scores).all())
        if finite and bool((scores < 0).any()):
            raise ValueError(
                f"The scorer of PoolLoader returned negative scores (min {float(scores.min()):.4g})."
            )
        if not finite:
            warnings.warn(
                f"PoolLoader: {int((~torch.isfinite(scores)).sum())} non-finite scores in a pool; "
                "this batch is drawn uniformly.",
                RuntimeWarning,
                stacklevel=4,
            )
        return finite

    def _draw(
        self,
        indices: torch.Tensor,
        data: Any,
        scores: torch.Tensor,
        finite: bool,
        on: bool,
        epoch: int,
        step: int,
        device: torch.device,
    ) -> WeightedBatch:
        m = scores.shape[0]
        b = min(self.batch_size, m)
        g = step_generator(self.seed, epoch, step, stream=2 * self.rank)  # stream 1: the candidate stream
        if on and finite:
            p = self.policy.probabilities(scores)
            rows = torch.multinomial(p, b, replacement=self.replacement, generator=g)
            weights = importance_weights(p[rows], m, self.bias_exponent, self.max_weight, self.normalize)
        else:
            rows = torch.randperm(m, generator=g)[:b]
            weights = torch.ones(b, dtype=torch.float32)
        selected = index_rows(data, rows.to(device) if device.type != "cpu" else rows)
        return WeightedBatch.from_collated(selected, indices[rows], weights.to(device))

    def _warn_if_off(self, on: bool) -> None:
        """Count pools scored with the switch off; warn once after ``warn_off_epochs`` epochs of them."""
        self._scored_off_steps = 0 if on else self._scored_off_steps + 1
        limit = self.warn_off_epochs
        if limit is None or self._warned_off or self._scored_off_steps < limit * self.num_batches:
            return
        if getattr(self.switch, "threshold", 0.0) == math.inf:  # the user asked for "never on"
            return
        self._warned_off = True
        sw = self.switch
        ema, thr = getattr(sw, "ema", None), getattr(sw, "threshold", None)
        detail = f" (tau EMA {ema:.3g} vs threshold {thr:.3g})" if ema is not None and thr is not None else ""
        warnings.warn(
            f"PoolLoader scored a pool of {self.pool_size} at every step for {limit} epochs while importance "
            f"sampling stayed off{detail}: the scoring cost bought nothing. Pass score_when_off=False "
            "(Katharopoulos-Fleuret Algorithm 1: no scoring while off; needs "
            "loader.feedback(batch, outputs)), lower tau_threshold, or train uniformly.",
            ImportanceSamplingOffWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ Algorithm 1
    def _lazy_step(self, chunks: Iterator[Any], epoch: int, step: int) -> tuple[WeightedBatch, int]:
        """A step of Algorithm 1: decide from the last B scores, then read b (off) or a pool of B (on).

        The decision is re-evaluated at every step while on, and while off every
        ``tau_every`` steps: the scores handed back since the last decision are then computed
        in one batched pass and the switch replays every step in order (see :meth:`_flush`),
        so its state is the one an every-step evaluation reaches.
        """
        # the step's timings, made into the switch's dict at replay (no dict per step while off)
        steps, score_seconds, self._score_seconds = self.steps, self._score_seconds, None
        decide = self._decision or self.tau_every == 1 or steps % self.tau_every == 0
        self._events.append(
            (
                "step",
                score_seconds,
                self._last_step_seconds,
                self._fetch_seconds,
                self._fetch_chunks,
                steps,
                None if decide else self._decision,
            )
        )
        on = self._decision = self._flush() if decide else self._decision
        k = self.chunks_per_pool if on else 1
        if self._timed and (on or steps % self.TIME_EVERY == 0):
            started = self._clock()
            parts = [next(chunks) for _ in range(k)] if on else [next(chunks)]
            self._fetch_seconds = self._clock() - started
        else:
            parts = [next(chunks) for _ in range(k)] if on else [next(chunks)]
            self._fetch_seconds = None
        self._fetch_chunks = k
        # the first parameter object survives model.to(...) (its data moves), so its device is current
        device = self._first_param.device if self._first_param is not None else model_device(self.model)
        if on:
            indices = torch.cat([i for i, _ in parts])
            data = move_to(_cat_rows([d for _, d in parts]), device, non_blocking=True)
            inputs, targets = split_batch(data)
            started = self._clock()
            scores = self._score(inputs, targets).to(torch.float64).cpu()
            finite = self._check_scores(scores)
            if finite:
                self._push_scores(scores, "pool")
            batch = self._draw(indices, data, scores, finite, True, epoch, step, device)
            self._score_seconds = self._clock() - started
            return batch, k
        indices, data = parts[0]
        if device.type != "cpu":
            data = move_to(data, device, non_blocking=True)
        weights = torch.ones(indices.shape[0], dtype=torch.float32)
        batch = WeightedBatch.from_collated(
            data, indices, weights if device.type == "cpu" else weights.to(device)
        )
        if getattr(self.switch, "wants_score_timing", False) and self.steps > 0 and not self._probe_pending:
            self._probe_pending = True  # until the switch has seen its timing (tau_every > 1: at replay)
            inputs, targets = split_batch(data)
            started = self._clock()  # a timed probe: what scoring costs, scaled to a pool of B
            scores = self._score(inputs, targets).to(torch.float64).cpu()
            self._score_seconds = (self._clock() - started) * self.pool_size / max(len(indices), 1)
            if self._check_scores(scores):
                self._push_scores(scores, "probe")
        else:
            self._awaiting.append(indices)
            self._off_yielded += 1
            if self._feedbacks == 0 and self._off_yielded >= self.NO_FEEDBACK_WARN_STEPS:
                self._warn_no_feedback()
        return batch, 1

    def _warn_no_feedback(self) -> None:
        if self._warned_feedback:
            return
        self._warned_feedback = True
        warnings.warn(
            f"PoolLoader(score_when_off=False) yielded {self._off_yielded} batches without any feedback: "
            "tau cannot be estimated and importance sampling stays off. Call "
            "loader.feedback(batch, outputs) after the forward pass of every step, or pass "
            "score_when_off=True.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _push_scores(self, scores: torch.Tensor, source: str) -> None:
        """Enter scores (a pool's B, or a probe's b; CPU float64, finite, >= 0) into the tau window."""
        s1, s2 = float(scores.sum()), float(torch.dot(scores, scores))
        self._events.append(("moments", int(scores.shape[0]), s1, s2, source))

    def _push_moments(self, count: int, s1: float, s2: float, source: str) -> None:
        """The window holds the moments ``(count, sum s, sum s^2)`` of the last B / b batches.

        A pool of B enters as B / b equal parts, so that later batches displace its share
        one batch at a time (its scores are exchangeable: the moments of any b of them are
        estimated by a 1 / k share of the pool's).
        """
        k = self.chunks_per_pool
        if count >= self.pool_size and k > 1:
            self._window.clear()
            for _ in range(k):
                self._window.append((count / k, s1 / k, s2 / k))
        else:
            self._window.append((float(count), s1, s2))
        self._window_source = source

    def _window_tau(self) -> float:
        """tau over the last B scores, NaN until B / b batches have been seen (or when all are zero).

        .. math:: \\tau = \\sqrt{n \\textstyle\\sum s^2} / \\textstyle\\sum s, \\quad n = \\#\\text{scores}
        """
        window = self._window
        if len(window) < self.chunks_per_pool:
            return float("nan")
        n = s1 = s2 = 0.0
        for count, a, b in window:
            n, s1, s2 = n + count, s1 + a, s2 + b
        if not s1 > 0:
            return float("nan")
        return math.sqrt(n * s2) / s1

    def _flush(self) -> bool:
        """Replay the events since the last decision, in order; return the switch's last decision.

        Scores handed back by :meth:`feedback` enter the tau window as their moments
        ``(count, sum s, sum s^2)``, computed for all pending batches at once
        (:meth:`_feedback_moments`: one closed-form pass over the concatenated outputs and
        one device synchronisation); pools and probes enter as they were measured; each
        step computes tau over the window, feeds the switch with that step's timings and
        is recorded in ``tau_history`` with the decision it was served with. The result
        does not depend on how many steps are replayed at once.
        """
        events, self._events = self._events, []
        moments = iter(self._feedback_moments([e for e in events if e[0] == "scores"]))
        losses = iter(_weighted_means([e for e in events if e[0] == "loss"]))
        on = bool(getattr(self.switch, "on", False))
        loss: float | None = None
        switch, history, single = self.switch, self._tau_history, self.num_replicas == 1
        pool_size, batch_size = self.pool_size, self.batch_size
        for event in events:
            kind = event[0]
            if kind == "loss":
                loss = next(losses)
            elif kind == "scores":
                entry = next(moments)
                if entry is not None:
                    self._push_moments(*entry, "batch")
            elif kind == "moments":
                self._push_moments(*event[1:])
            else:
                _, score_s, step_s, fetch_s, chunks, step, served = event
                if score_s is not None:
                    self._probe_pending = False
                timing = {
                    "score_seconds": score_s,
                    "step_seconds": step_s,
                    "fetch_seconds": fetch_s,
                    "chunks": chunks,
                    "pool_size": pool_size,
                    "batch_size": batch_size,
                }
                if self._wants_losses:  # the previous batch: its weighted loss and its regime
                    timing["train_loss"], timing["was_on"] = loss, self._prev_served  # our own dict
                    loss = None
                tau_value = self._window_tau()
                if single:
                    observed, on = tau_value, bool(switch.observe(tau_value, timing))
                else:
                    observed, on = self._observe(tau_value, timing)
                shown = on if served is None else bool(served)
                self._prev_served = shown
                # what _record stores, without its call and merges (one dict per step)
                entry = {
                    "step": step,
                    "tau": tau_value,
                    "ema": getattr(switch, "ema", None),
                    "on": shown,
                    **timing,
                    "source": self._window_source,
                }
                if not single:
                    entry["tau_global"] = observed
                history.append(entry)
                self._on_steps += shown
        return on

    def _scores_of(self, z: Any, targets: Any, losses: Any) -> torch.Tensor | None:
        """Scores of one fed batch (or several concatenated): logits already read for the bound."""
        if self._reads_logits:
            return _upper_bound_from_logits(self.scorer, z, targets)
        return scores_from_outputs(self.scorer, z, targets, losses)

    def _feedback_moments(self, events: list[tuple[Any, ...]]) -> list[tuple[int, float, float] | None]:
        """``(count, sum s, sum s^2)`` of each fed batch's scores (None: no finite score).

        The outputs of batches of one shape are concatenated and scored in one call of
        :func:`scores_from_outputs` (its scores are per-example, so this equals scoring
        each batch alone); the per-batch sums are read with one synchronisation.
        NaN / inf scores are dropped; a negative score is a ValueError.
        """
        if not events:
            return []
        scores: list[torch.Tensor] = []
        sizes: list[int] = []
        flat = torch.empty(0)
        batchable = len(events) > 1 and self._per_example_scores
        if batchable:
            try:  # cat itself checks that the batches agree in everything but their length
                z = torch.cat([e[1] for e in events])
                y = torch.cat([e[2] for e in events])
            except (RuntimeError, TypeError):
                batchable = False
        if batchable:
            losses = [e[3] for e in events]
            loss = torch.cat(losses) if all(isinstance(v, torch.Tensor) for v in losses) else None
            flat = self._scores_of(z, y, loss)
            if flat is None or flat.shape[0] != z.shape[0]:  # pragma: no cover - checked at construction
                batchable = False
            else:
                sizes = [e[4] for e in events]
                if flat.requires_grad:
                    flat = flat.detach()
                if flat.dim() != 1:
                    flat = flat.reshape(-1)
        if not batchable:
            scores = []
            for _, z, y, loss, n in events:
                s = self._scores_of(z, y, loss)
                if s is None:  # pragma: no cover - checked at construction
                    s = torch.full((n,), float("nan"))
                s = s.detach().reshape(-1)
                if s.shape[0] != n:
                    raise ValueError(
                        f"PoolLoader.feedback got {s.shape[0]} scores for a batch of {n} examples."
                    )
                scores.append(s)
            sizes = [int(s.shape[0]) for s in scores]
            flat = torch.cat(scores) if len(scores) > 1 else scores[0]
        flat = flat.to(torch.float64)
        # a norm is >= 0 by construction: the upper bound needs no sign check
        signed = not self._reads_logits
        # runs of equal-size batches (a short last batch of an epoch makes a run of its own) are
        # reduced as (m, n) rows: every batch's sums come from the same row reduction as when it
        # is fed alone (tau_every=1), so the replayed tau values are bit-identical
        stats: list[list[float]] = [[], [], []]
        i = start = 0
        while i < len(sizes):
            n, j = sizes[i], i + 1
            while j < len(sizes) and sizes[j] == n:
                j += 1
            m = j - i
            if n:
                rows = flat[start : start + m * n].view(m, n)
                parts_ = (rows.sum(1), (rows * rows).sum(1)) + ((rows.amin(1),) if signed else ())
                run = torch.stack(parts_).tolist()
                stats[0] += run[0]
                stats[1] += run[1]
                stats[2] += run[2] if signed else [0.0] * m
            else:
                for column in stats:
                    column += [0.0] * m
            start, i = start + m * n, j
        out: list[tuple[int, float, float] | None] = []
        for i, n in enumerate(sizes):
            s1, s2, low = stats[0][i], stats[1][i], stats[2][i]
            if n and math.isfinite(s1) and math.isfinite(s2):
                if low < 0:
                    raise ValueError(f"PoolLoader.feedback got negative scores (min {low:.4g}).")
                out.append((n, s1, s2))
                continue
            part = flat[sum(sizes[:i]) : sum(sizes[: i + 1])]
            values = [v for v in part.tolist() if math.isfinite(v)]  # drop NaN / inf scores
            if not values:
                out.append(None)
                continue
            low = min(values)
            if low < 0:
                raise ValueError(f"PoolLoader.feedback got negative scores (min {low:.4g}).")
            out.append((len(values), sum(values), sum(map(operator.mul, values, values))))
        return out

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: torch.Tensor | None = None) -> None:
        """Hand the training step's outputs back (Algorithm 1 mode); called after the forward pass.

        In Algorithm 1 mode (``score_when_off=False``), for a batch yielded while importance
        sampling was off, the scores of its examples are computed from ``outputs`` (see
        :func:`scores_from_outputs`; no forward pass) and enter the tau estimate at the next
        batch. Batches drawn by importance (their pool was scored already), and everything in
        the default mode, are ignored. Call it once per batch; batches fetched ahead of the
        training step (as Lightning does) are matched by their indices.

        Args:
            batch: the :class:`WeightedBatch` the outputs belong to.
            outputs: the model outputs on ``batch.inputs`` (a tensor of logits, or a tuple,
                dict or object holding them); detached inside.
            losses: the per-example losses (used by :class:`LossScorer`), optional.
        """
        if self._wants_losses and isinstance(losses, torch.Tensor):
            off = False
            if self._awaiting:
                idx = getattr(batch, "indices", None)
                if not isinstance(idx, torch.Tensor):
                    raise param_error("batch", "PoolLoader.feedback", "a WeightedBatch", batch, TypeError)
                off = self._take_awaiting(idx)
            # reduced at the next decision; an off batch's weights are all 1
            weights = None if off else getattr(batch, "weights", None)
            self._events.append(("loss", losses.detach() if losses.requires_grad else losses, weights))
            if not off:
                return
        else:
            if not self.lazy or not self._awaiting:
                return
            idx = getattr(batch, "indices", None)
            if not isinstance(idx, torch.Tensor):
                raise param_error("batch", "PoolLoader.feedback", "a WeightedBatch", batch, TypeError)
            if not self._take_awaiting(idx):
                return  # not an off batch still awaited: nothing to learn from it
        z = outputs
        if self._reads_logits:
            z = model_call_of(self.scorer).read(outputs)
            if not isinstance(z, torch.Tensor):
                raise param_error(
                    "outputs", "PoolLoader.feedback", "logits the scorer can read", outputs, TypeError
                )
            if z.requires_grad:
                z = z.detach()
            if z.shape[0] != idx.shape[0]:
                raise ValueError(
                    f"PoolLoader.feedback got {z.shape[0]} scores for a batch of {idx.shape[0]} examples."
                )
        self._feedbacks += 1
        # scored at the next decision, batched with the other pending batches (no sync here); the
        # bound reads the logits only, so its events keep no losses
        loss = None if self._reads_logits else losses.detach() if isinstance(losses, torch.Tensor) else losses
        self._events.append(("scores", z, batch.targets, loss, int(idx.shape[0])))

    def _take_awaiting(self, idx: torch.Tensor) -> bool:
        """Remove the off batch with these indices from the queue awaiting feedback; False if absent."""
        if self._awaiting[0] is idx:  # the common case: feedback for the oldest batch, in order
            self._awaiting.popleft()
            return True
        for position, pending in enumerate(self._awaiting):
            if pending is idx or (
                pending.shape == idx.shape and torch.equal(pending, idx.detach().to(pending.device))
            ):
                del self._awaiting[position]  # by position: tensors do not compare with ==
                return True
        return False

    # ------------------------------------------------------------------ visibility
    def describe(self) -> dict[str, Any]:
        """Whether importance sampling is on, tau, the switch's decision and its inputs.

        Returns:
            dict with ``is_on`` (bool), ``tau`` (the last tau observed, NaN before the first),
            ``tau_ema``, ``threshold`` (what ``tau_ema`` is compared with), ``on_share``
            (share of steps so far with importance sampling on), ``steps``, ``epoch``,
            ``position``, ``mode`` (``"algorithm-1"`` or ``"score-every-step"``),
            ``tau_source`` (``"pool"``, ``"batch"`` = training outputs, ``"probe"`` or
            ``"none"``), ``pool_size``, ``batch_size`` and ``switch`` (the switch's own
            ``describe()``).
        """
        sw = self.switch
        last = self.tau_history[-1] if len(self.tau_history) else {}
        info = sw.describe() if callable(getattr(sw, "describe", None)) else {}
        return {
            "is_on": bool(getattr(sw, "on", last.get("on", False))),
            "tau": last.get("tau", float("nan")),
            "tau_ema": getattr(sw, "ema", None),
            "threshold": getattr(sw, "threshold", info.get("threshold")),
            "on_share": self._on_steps / self.steps if self.steps else 0.0,
            "steps": self.steps,
            "epoch": self.epoch,
            "position": self.position,
            "mode": "algorithm-1" if self.lazy else "score-every-step",
            "tau_source": last.get("source", "pool") if last else "none",
            "pool_size": self.pool_size,
            "batch_size": self.batch_size,
            "switch": info,
        }

    def status(self) -> str:
        """A one-line summary for a progress bar or a log, e.g. ``"IS on | tau 2.31 > 2.00 | on 43%"``.

        ``tqdm``: ``bar.set_postfix_str(loader.status())``.
        """
        return format_status(self.describe())

    # ------------------------------------------------------------------ scoring
    def _score(self, inputs: Any, targets: Any) -> torch.Tensor:
        from .batch import batch_size_of

        m = batch_size_of(inputs)
        self.scored_examples += m
        chunk = self.scoring_batch_size or m
        if chunk >= m:
            return self.scorer(self.model, inputs, targets)
        parts = []
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            chunk_targets = slice_rows(targets, start, stop) if targets is not None else None
            parts.append(self.scorer(self.model, slice_rows(inputs, start, stop), chunk_targets))
        return torch.cat(parts)

    def _check_scorer(self) -> None:
        n = min(2, self.num_samples)
        items = [self.dataset[i] for i in range(n)]
        collate = self._loader.collate_fn
        _, data = collate([(i, item) for i, item in enumerate(items)])
        inputs, targets = split_batch(move_to(data, model_device(self.model)))
        loss_fn = getattr(self.scorer, "loss_fn", None)
        if loss_fn is not None:  # eval mode: BatchNorm statistics and Dropout stay untouched
            with scoring_mode(self.model), torch.inference_mode():
                outputs = model_call_of(self.scorer)(self.model, inputs)
                per_example_losses(loss_fn, outputs, targets, "PoolLoader's scorer")
        scores = self.scorer(self.model, inputs, targets)
        if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
            raise ValueError(
                f"The scorer of PoolLoader must return a Tensor of shape ({n},) for {n} examples; "
                f"got {getattr(scores, 'shape', type(scores).__name__)}."
            )

    # ------------------------------------------------------------------ feedback & state
    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Accepted for API symmetry with :class:`TableSampler`; pools are rescored every step.

        The arguments are validated (same length) and otherwise ignored, except in
        Algorithm 1 mode with a :class:`LossScorer`: there the scores of a batch yielded
        while importance sampling was off are its losses, so ``update(batch.indices,
        losses)`` feeds tau exactly as :meth:`feedback` would. Other scorers need the
        outputs: call :meth:`feedback`.
        """
        if len(indices) != len(scores):
            raise ValueError(
                f"PoolLoader.update got {len(indices)} indices and {len(scores)} scores; lengths must match."
            )
        if self.lazy and isinstance(self.scorer, LossScorer) and isinstance(indices, torch.Tensor):
            if self._awaiting and self._take_awaiting(indices):
                self._feedbacks += 1
                values = torch.as_tensor(scores).detach().reshape(-1)
                self._events.append(("scores", None, None, values, int(values.shape[0])))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically.

        Returns:
            A dict of ints, floats, lists and dicts (loadable with
            ``torch.load(weights_only=True)``): seed, epoch, position in the epoch (after
            the last batch yielded), chunks read in the epoch, steps, the switch state
            (tau EMA and on/off), the tau history, the replica layout and, in Algorithm 1
            mode, the last B scores behind tau. Pools and draws are pure functions of
            ``(seed, epoch, step, rank)`` and the model, so a pool in flight (prefetched by
            workers) is redrawn identically after loading. Feedback still awaited for a
            batch yielded before saving is not saved.
        """
        if self._events:
            self._flush()
        return {
            "version": self.STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "pool_size": self.pool_size,
            "num_batches": self.num_batches,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "lazy": self.lazy,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "chunk": self.chunk,
            "steps": self.steps,
            "on_steps": self._on_steps,
            "scored_examples": self.scored_examples,
            "switch": self.switch.state_dict(),
            "tau_history": list(self.tau_history),
            "window": [list(m) for m in self._window],
            "window_source": self._window_source,
            "decision": bool(self._decision),
            "prev_served": bool(self._prev_served),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next batch continues where it left off.

        Each rank restores its own view; only the tau history differs between ranks, so
        a state saved on another rank of the same world size loads too.

        Raises:
            KeyError: a required key is missing.
            ValueError: the state was saved with another dataset size, batch size, pool
                size, number of batches, number of replicas or mode (positions count
                per-replica steps, so a state cannot be resumed exactly under another
                world size; start a fresh epoch instead), or a position, epoch, step count
                or score in it is out of range.
        """
        if not isinstance(state, Mapping):
            raise param_error("state", "PoolLoader.load_state_dict", "a dict", state, TypeError)
        for key in ("num_samples", "batch_size", "pool_size", "num_batches", "num_replicas"):
            if key not in state and key == "num_replicas":
                continue
            if key not in state:
                raise KeyError(f"PoolLoader state is missing '{key}'.")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"PoolLoader state was saved with {key}={state[key]}, but this loader has "
                    f"{key}={getattr(self, key)}."
                )
        for key in ("seed", "epoch", "position", "steps", "switch"):
            if key not in state:
                raise KeyError(f"PoolLoader state is missing '{key}'.")
        lazy = bool(state.get("lazy", False))
        if lazy != self.lazy:
            raise ValueError(
                f"PoolLoader state was saved with score_when_off={not lazy}, but this loader has "
                f"score_when_off={not self.lazy}."
            )
        seed = _state_int(state, "seed", 0, 2**63 - 1)
        epoch = _state_int(state, "epoch", 0, None)
        position = _state_int(state, "position", 0, self.num_batches - 1)
        steps = _state_int(state, "steps", 0, None)
        chunk = (
            _state_int(state, "chunk", position, position * self.chunks_per_pool)
            if "chunk" in state
            else position
        )
        on_steps = _state_int(state, "on_steps", 0, steps) if "on_steps" in state else 0
        window = _state_window(state.get("window", []), self.chunks_per_pool)
        self.switch.load_state_dict(state["switch"])
        self.seed = seed
        self._stream.seed = seed
        self.epoch, self.position, self.chunk, self.steps = epoch, position, chunk, steps
        self._on_steps = on_steps
        self.scored_examples = (
            _state_int(state, "scored_examples", 0, None) if "scored_examples" in state else 0
        )
        self._generation += 1
        self.tau_history = History(state.get("tau_history", []), maxlen=self.HISTORY_LIMIT)
        self._window = deque(window, maxlen=self.chunks_per_pool)
        self._window_source = str(state.get("window_source", "none"))
        self._awaiting.clear()
        self._events = []
        self._probe_pending = False
        self._decision = bool(state.get("decision", getattr(self.switch, "on", False)))
        self._prev_served = bool(state.get("prev_served", self._decision))


def _weighted_means(events: list[tuple[Any, ...]]) -> list[float | None]:
    """``mean(w * l)`` of each ``("loss", losses, weights)`` event, read with one synchronisation.

    The weighted mean is the batch's unbiased estimate of the mean training loss in both
    regimes (weights 1 for a uniform batch, ``1 / (B p_i)`` for a pool draw). None for an
    event whose losses are not one per example or not finite.
    """
    if not events:
        return []
    if all(e[2] is None for e in events):  # uniform batches: plain means, one stack per run of equal sizes
        try:
            out = _row_means([e[1] for e in events])
        except (RuntimeError, TypeError, ValueError):
            out = None
        if out is not None:
            return [v if math.isfinite(v) else None for v in out]
    shapes = {(e[1].shape, e[1].device, e[1].dtype) for e in events}
    if len(shapes) == 1 and events[0][1].dim() == 1:
        if all(isinstance(e[2], torch.Tensor) and e[2].shape == e[1].shape for e in events):
            lw = torch.stack([e[1] for e in events]).float()
            w = torch.stack([e[2] for e in events]).to(device=lw.device, dtype=lw.dtype)
            out = lw.mul_(w).mean(1).tolist()  # one synchronisation for all pending batches
            return [v if math.isfinite(v) else None for v in out]
    values: list[torch.Tensor] = []
    for _, losses, weights in events:
        flat = losses.reshape(-1) if losses.dim() else losses.reshape(1)
        if isinstance(weights, torch.Tensor) and weights.numel() == flat.numel():
            flat = flat * weights.reshape(-1).to(device=flat.device, dtype=flat.dtype)
        values.append(flat.float().mean())
    if not values:
        return []
    devices = {v.device for v in values}
    if len(devices) == 1:
        out = torch.stack(values).tolist()
    else:
        out = [float(v) for v in values]
    return [v if math.isfinite(v) else None for v in out]


def _row_means(rows: list[torch.Tensor]) -> list[float] | None:
    """``mean`` of each 1-D tensor, a stack per run of equal lengths (the same row reduction
    whether a batch is reduced alone or with others); None unless all are 1-D on one device."""
    device = rows[0].device
    out: list[float] = []
    i = 0
    while i < len(rows):
        first, j = rows[i], i + 1
        if first.dim() != 1 or first.device != device:
            return None
        n = first.shape[0]
        while j < len(rows) and rows[j].shape[0] == n and rows[j].dim() == 1:
            j += 1
        out += torch.stack(rows[i:j]).float().mean(1).tolist()
        i = j
    return out


def _state_window(window: Any, parts: int) -> list[tuple[float, float, float]]:
    """Check a saved tau window: <= ``parts`` finite ``(count > 0, sum >= 0, sum of squares >= 0)``."""
    bad = ValueError(
        f"PoolLoader state holds an invalid tau window: expected at most {parts} entries "
        "[count > 0, sum >= 0, sum of squares >= 0], all finite."
    )
    if not isinstance(window, (list, tuple)) or len(window) > parts:
        raise bad
    out = []
    for entry in window:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise bad
        try:
            count, s1, s2 = (float(v) for v in entry)
        except (TypeError, ValueError):
            raise bad from None
        if not all(math.isfinite(v) for v in (count, s1, s2)) or count <= 0 or s1 < 0 or s2 < 0:
            raise bad
        out.append((count, s1, s2))
    return out


def _state_int(state: Mapping[str, Any], key: str, lo: int, hi: int | None) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"PoolLoader state has {key}={value!r}; expected an int.")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"PoolLoader state has {key}={value}, outside {bound} for this loader.")
    return value


def check_presample(value: Any, owner: str) -> float:
    """Validate ``presample`` (B / b): a float in [1, :attr:`PoolLoader.MAX_PRESAMPLE`].

    Bounded so that a typo cannot ask for a pool that never finishes loading.
    """
    checked = check_float(value, "presample", owner, minimum=1.0)
    if checked is None or checked > PoolLoader.MAX_PRESAMPLE:
        raise param_error("presample", owner, f"a float in [1.0, {PoolLoader.MAX_PRESAMPLE}]", value)
    return checked


def format_status(info: Mapping[str, Any]) -> str:
    """One line from a ``describe()`` dict: ``"IS on | tau 2.31 > 2.00 | on 43%"``."""
    on = bool(info.get("is_on"))
    ema, thr = info.get("tau_ema"), info.get("threshold")
    parts = [f"IS {'on' if on else 'off'}"]
    if ema is None or ema != ema:
        parts.append("tau --")
    elif thr is None or thr != thr:
        parts.append(f"tau {ema:.2f}")
    else:
        parts.append(f"tau {ema:.2f} {'>' if ema > thr else '<='} {thr:.2f}")
    parts.append(f"on {100 * float(info.get('on_share', 0.0)):.0f}%")
    return " | ".join(parts)
