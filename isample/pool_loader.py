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
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as _dist
from ._fetch import IndexedCollate, IndexedDataset, can_gather
from ._random import permutation, step_generator
from ._validation import check_choice, check_float, check_int, param_error
from .batch import WeightedBatch, index_rows, move_to, slice_rows, split_batch
from .policies import ScorePolicy
from .scorers import model_call_of, model_device, per_example_losses, scoring_mode
from .switch import TauSwitch, default_tau_threshold
from .weighting import NORMALIZATIONS, importance_weights

__all__ = ["PoolLoader", "pool_tau"]


def pool_tau(scores: torch.Tensor) -> float:
    """tau of one pool (see :mod:`isample.switch`); delegates to :func:`isample.metrics.tau`."""
    from .metrics.functional import tau

    return float(tau(scores))


class _PoolStream(Sampler[int]):
    """The candidates of one epoch for one rank.

    The global stream concatenates random permutations of the dataset seeded by
    ``(seed, epoch, block)``; it is cut into chunks of ``pool_size``, and step s of rank r
    reads chunk ``s * num_replicas + r``. With one replica the chunks are consecutive.
    """

    def __init__(
        self,
        num_samples: int,
        pool_size: int,
        num_batches: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.pool_size = pool_size
        self.num_batches = num_batches
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return (self.num_batches - self.start_step) * self.pool_size

    def __iter__(self) -> Iterator[int]:
        n, size = self.num_samples, self.pool_size
        cached_block, perm = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start_step, self.num_batches):
            lo = (step * self.num_replicas + self.rank) * size
            hi = lo + size
            for block in range(lo // n, (hi - 1) // n + 1):
                if block != cached_block:
                    perm, cached_block = permutation(n, self.seed, self.epoch, block, 1), block
                yield from perm[max(lo - block * n, 0) : min(hi - block * n, n)].tolist()


class PoolLoader:
    """Online importance sampling: score a uniform pool of B, train on b drawn from it.

    .. math::

        p_i = \\mathrm{policy}(s)_i \\text{ over the pool}, \\qquad
        w_i = \\Big(\\frac{1}{B p_i}\\Big)^k

    Args:
        dataset: a map-style dataset of ``(input, target)`` pairs or dicts.
        model: the model being trained; it scores each pool (in eval mode, restored after).
        scorer: ``scorer(model, inputs, targets) -> Tensor[B]``, e.g. ``UpperBoundScorer``.
        batch_size: b, examples per yielded batch.
        presample: B / b (float >= 1, default 4.0). B = round(presample x b).
        replacement: draw the b with replacement (default True, the unbiased i.i.d.
            estimator). Without replacement the weights are the same i.i.d. weights,
            an approximation that is exact only when p is uniform.
        power, additive, relative, mixing: score smoothing (see :class:`ScorePolicy`).
        bias_exponent: k in [0, 1]; 1 = unbiased.
        max_weight: clip weights (None = no clipping).
        normalize: ``"none"``, ``"mean"`` or ``"max"`` (see :mod:`isample.weighting`).
        always: importance sampling from the first step; otherwise batches are uniform
            until the EMA of tau exceeds ``tau_threshold``.
        tau_threshold: default ``(B + 3b) / (3b)``.
        tau_momentum: EMA momentum of tau (0.9).
        switch: an object with ``observe(tau, timing) -> bool``, ``state_dict``,
            ``load_state_dict`` and ``describe`` replacing the tau switch. ``timing`` is a
            dict with ``score_seconds`` (scoring this pool), ``step_seconds`` (wall time the
            training loop spent between the previous batch and this request, None at
            the first step), ``pool_size`` and ``batch_size``.
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

    Yields:
        :class:`WeightedBatch` with inputs and targets on the model's device, indices
        on the CPU and float32 weights on the model's device.

    Under DDP with ``torch.distributed`` initialised, the tau fed to the switch is the
    mean of the ranks' pool taus (one all-gather of a float per step), so every rank
    switches importance sampling on at the same step.

    References:
        Katharopoulos and Fleuret, ICML 2018 (arXiv:1803.00942).
    """

    STATE_VERSION = 1
    #: steps of ``tau_history`` kept (and saved in ``state_dict``)
    HISTORY_LIMIT = 10_000

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
    ) -> None:
        owner = "PoolLoader"
        if not isinstance(model, nn.Module):
            raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
        if not callable(scorer):
            raise param_error("scorer", owner, "a callable scorer(model, inputs, targets)", scorer, TypeError)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise param_error(
                "dataset", owner, "a map-style Dataset (with __len__ and __getitem__)", dataset, TypeError
            )
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise ValueError("The 'dataset' parameter of PoolLoader is empty (len 0).")
        self.batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
        self.presample = check_float(presample, "presample", owner, minimum=1.0)
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
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _dist.resolve_world(num_replicas, rank, owner)
        step_size = self.batch_size * self.num_replicas
        default_batches = (
            (self.num_samples // step_size) if self.drop_last else math.ceil(self.num_samples / step_size)
        )
        self.num_batches = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True) or max(
            default_batches, 1
        )
        if switch is None:
            threshold = tau_threshold
            if threshold is None:
                threshold = default_tau_threshold(self.pool_size, self.batch_size)
            switch = TauSwitch(threshold, momentum=tau_momentum, always=always)
        self.switch = switch
        self.dataset = dataset
        self.model = model
        self.scorer = scorer
        self.seed = _dist.shared_seed(seed, generator, owner, self.num_replicas)
        self.epoch = 0
        self.position = 0
        self.steps = 0
        #: per-step switch inputs and decision, most recent ``HISTORY_LIMIT`` steps
        self.tau_history: deque[dict[str, Any]] = deque(maxlen=self.HISTORY_LIMIT)
        self._yielded_at: float | None = None
        self._last_step_seconds: float | None = None
        self._stream = _PoolStream(
            self.num_samples, self.pool_size, self.num_batches, self.seed, self.num_replicas, self.rank
        )
        self._loader = DataLoader(
            IndexedDataset(dataset, gather=can_gather(dataset, collate_fn)),
            batch_size=self.pool_size,
            sampler=self._stream,
            num_workers=check_int(num_workers, "num_workers", owner, minimum=0),
            pin_memory=bool(pin_memory),
            collate_fn=IndexedCollate(collate_fn),
            drop_last=False,
            persistent_workers=bool(persistent_workers) and num_workers > 0,
            prefetch_factor=prefetch_factor,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
        )
        if check_loss_fn:
            self._check_scorer()

    # ------------------------------------------------------------------ protocol
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: the epoch's pools and draws are a pure function of (seed, epoch)."""
        self.epoch = check_int(epoch, "epoch", "PoolLoader.set_epoch", minimum=0)
        self.position = 0

    def __iter__(self) -> Iterator[WeightedBatch]:
        return self._iterate()

    def _iterate(self) -> Iterator[WeightedBatch]:
        self._stream.epoch = self.epoch
        self._stream.start_step = self.position
        epoch = self.epoch
        self._yielded_at = None
        for indices, data in self._loader:
            now = time.perf_counter()
            # time the loop spent on the previous batch (training step + loading wait)
            self._last_step_seconds = None if self._yielded_at is None else now - self._yielded_at
            batch = self._select(indices, data, epoch, self.position)
            self.position += 1
            self.steps += 1
            if self.position >= self.num_batches:  # epoch complete: the next iteration is a new epoch
                self.epoch += 1
                self.position = 0
            self._yielded_at = time.perf_counter()
            yield batch

    # ------------------------------------------------------------------ one step
    def _select(self, indices: torch.Tensor, data: Any, epoch: int, step: int) -> WeightedBatch:
        device = model_device(self.model)
        data = move_to(data, device, non_blocking=True)
        inputs, targets = split_batch(data)
        started = time.perf_counter()
        scores = self._score(inputs, targets).to(torch.float64).cpu()  # .cpu() synchronises the device
        score_seconds = time.perf_counter() - started
        m = scores.shape[0]
        b = min(self.batch_size, m)
        finite = bool(torch.isfinite(scores).all())
        if finite and bool((scores < 0).any()):
            raise ValueError(
                f"The scorer of PoolLoader returned negative scores (min {float(scores.min()):.4g})."
            )
        tau_value = pool_tau(scores) if finite and float(scores.sum()) > 0 else float("nan")
        timing = {
            "score_seconds": score_seconds,
            "step_seconds": self._last_step_seconds,
            "pool_size": m,
            "batch_size": b,
        }
        observed = tau_value
        if self.num_replicas > 1 and _dist.is_initialized():  # every rank observes the same tau
            observed = _dist.nanmean(_dist.all_gather_floats(tau_value))
        on = self.switch.observe(observed, timing)
        ema = getattr(self.switch, "ema", None)
        entry = {"step": self.steps, "tau": tau_value, "ema": ema, "on": on, **timing}
        if self.num_replicas > 1:
            entry["tau_global"] = observed
        self.tau_history.append(entry)
        g = step_generator(self.seed, epoch, step, stream=2 * self.rank)  # stream 1: the candidate stream
        if not finite:
            warnings.warn(
                f"PoolLoader: {int((~torch.isfinite(scores)).sum())} non-finite scores in a pool; "
                "this batch is drawn uniformly.",
                RuntimeWarning,
                stacklevel=3,
            )
        if on and finite:
            p = self.policy.probabilities(scores)
            rows = torch.multinomial(p, b, replacement=self.replacement, generator=g)
            weights = importance_weights(p[rows], m, self.bias_exponent, self.max_weight, self.normalize)
        else:
            rows = torch.randperm(m, generator=g)[:b]
            weights = torch.ones(b, dtype=torch.float32)
        selected = index_rows(data, rows.to(device) if device.type != "cpu" else rows)
        sel_inputs, sel_targets = split_batch(selected)
        return WeightedBatch(sel_inputs, sel_targets, indices[rows], weights.to(device))

    def _score(self, inputs: Any, targets: Any) -> torch.Tensor:
        from .batch import batch_size_of

        m = batch_size_of(inputs)
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

        The arguments are validated (same length) and otherwise ignored.
        """
        if len(indices) != len(scores):
            raise ValueError(
                f"PoolLoader.update got {len(indices)} indices and {len(scores)} scores; lengths must match."
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically.

        Returns:
            A dict of ints, floats, lists and dicts (loadable with
            ``torch.load(weights_only=True)``): seed, epoch, position in the epoch, steps,
            the switch state (tau EMA and on/off), the tau history and the replica
            layout. Pools and draws are pure functions of ``(seed, epoch, step, rank)``
            and the model, so a pool in flight (prefetched by workers) is redrawn
            identically after loading.
        """
        return {
            "version": self.STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "pool_size": self.pool_size,
            "num_batches": self.num_batches,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
            "switch": self.switch.state_dict(),
            "tau_history": list(self.tau_history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next batch continues where it left off.

        Each rank restores its own view; only the tau history differs between ranks, so
        a state saved on another rank of the same world size loads too.

        Raises:
            KeyError: a required key is missing.
            ValueError: the state was saved with another dataset size, batch size, pool
                size, number of batches or number of replicas (positions count
                per-replica steps, so a state cannot be resumed exactly under another
                world size; start a fresh epoch instead).
        """
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
        self.seed = int(state["seed"])
        self._stream.seed = self.seed
        self.switch.load_state_dict(state["switch"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.steps = int(state["steps"])
        self.tau_history = deque(state.get("tau_history", []), maxlen=self.HISTORY_LIMIT)
