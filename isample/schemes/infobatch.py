"""InfoBatch (Qin et al. 2024): unbiased dynamic data pruning of well-learned examples, with rescaling."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._random import step_generator
from .._validation import check_float, check_int, param_error
from ..batch import WeightedBatch
from ..rank_policies import infobatch_kept_count, infobatch_plan
from ._stream import RowReader
from .base import SchemeLoader, feedback_arrays

__all__ = ["InfoBatch"]

_STREAM = 41


class InfoBatch(SchemeLoader):
    """InfoBatch: each epoch, randomly prune part of the examples whose last loss is below the mean.

    At the start of every epoch ``e < delta x epochs``, with ``W = {i : s_i < mean(s)}``
    (``s`` = latest training loss, ``initial_score`` for never-seen examples), a random
    ``K ≈ (1 - r)|W|`` of W are kept with every example outside W, in random order:

    .. math::

        w_i = \\begin{cases} |W| / K \\approx 1 / (1 - r) & i \\in W \\text{ kept} \\\\
                             1 & \\text{otherwise} \\end{cases}

    (:func:`isample.rank_policies.infobatch_plan`; ``|W| / K`` instead of the paper's
    ``1 / (1 - r)`` makes every inclusion probability times weight exactly 1). The final
    ``1 - delta`` of the epochs (12.5%) use the full data with weights 1. Per-epoch work is
    O(N); per-step work O(b).

    The epoch length changes: ``len(loader)`` is the current epoch's number of batches and
    :meth:`total_steps` the number of steps over all ``epochs`` (exact for the epochs
    already planned, predicted from the current scores for the others). A step-based
    learning-rate schedule should be driven by progress ``epoch + step / len(loader)`` or
    re-planned each epoch (see ``docs/methods/infobatch.md``).

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs: total number of epochs (required: pruning stops after ``delta x epochs``).
        optimizer: unused.
        prune_ratio: r in [0, 1) (0.5).
        delta: fraction of the epochs with pruning, in [0, 1] (0.875).
        initial_score: score of never-seen examples (3.0: above a typical mean, so kept).
        min_keep: keep at least this fraction of all N examples per epoch, in (0, 1] (0.1).
        drop_last: drop the epoch's last incomplete batch (when there are at least b examples).
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).

    Warns:
        RuntimeWarning: when an epoch was iterated without any loss feedback (scores stay
            stale; pruning continues on them).

    References:
        Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
        ICLR 2024 (arXiv:2303.04947).
    """

    name = "infobatch"
    kind = "table"
    unbiased = True

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
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        initial_score: float = 3.0,
        min_keep: float = 0.1,
        drop_last: bool = False,
        **loader_options: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        owner = type(self).__name__
        if epochs is None:
            raise param_error(
                "epochs",
                owner,
                "the total number of training epochs (an int >= 1; pruning stops after delta x epochs)",
                epochs,
                ValueError,
            )
        self.epochs = check_int(epochs, "epochs", owner, minimum=1)
        self.prune_ratio = check_float(
            prune_ratio, "prune_ratio", owner, minimum=0.0, maximum=1.0, max_inclusive=False
        )
        self.delta = check_float(delta, "delta", owner, minimum=0.0, maximum=1.0)
        self.initial_score = check_float(initial_score, "initial_score", owner, minimum=0.0)
        self.min_keep = check_float(
            min_keep, "min_keep", owner, minimum=0.0, maximum=1.0, min_inclusive=False
        )
        self.drop_last = bool(drop_last)
        self.reader = RowReader(
            dataset,
            self.batch_size,
            **self.loader_options,
        )
        self.scores = np.full(self.num_samples, self.initial_score, dtype=np.float64)
        self.epoch = 0
        self.position = 0
        self._plan_epoch = -1
        self._plan_idx = torch.empty(0, dtype=torch.long)
        self._plan_w = torch.empty(0, dtype=torch.float32)
        self._updates = 0
        self._iterated = False
        self._lengths: dict[int, int] = {}

    # ------------------------------------------------------------------ plan
    def is_pruning(self, epoch: int) -> bool:
        """Whether ``epoch`` prunes (``epoch < delta x epochs``)."""
        return epoch < self.delta * self.epochs

    def _batches_for(self, size: int) -> int:
        b = self.batch_size
        return max(size // b, 1) if (self.drop_last and size >= b) else max(math.ceil(size / b), 1)

    def _ensure_plan(self) -> None:
        epoch = self.epoch
        if self._plan_epoch == epoch:
            return
        if self._iterated and self._updates == 0:
            warnings.warn(
                f"InfoBatch received no loss feedback during epoch {self._plan_epoch}: call "
                "loader.feedback(batch, outputs, losses) (or loader.update(batch.indices, losses)) "
                f"after every step. Epoch {epoch} is planned from stale scores; pruning continues on them "
                f"(never-seen examples keep initial_score={self.initial_score}).",
                RuntimeWarning,
                stacklevel=4,
            )
        g = step_generator(self.seed, epoch, 0, _STREAM)
        if self.is_pruning(epoch):
            idx, w = infobatch_plan(torch.from_numpy(self.scores), self.prune_ratio, g, self.min_keep)
        else:
            idx = torch.randperm(self.num_samples, generator=g)
            w = torch.ones(self.num_samples, dtype=torch.float32)
        self._plan_idx, self._plan_w = idx, w
        self._plan_epoch = epoch
        self._updates = 0
        self._iterated = False
        self._lengths[epoch] = self._batches_for(idx.numel())

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's examples in order and their weights: LongTensor (M_e,), float32 Tensor (M_e,)."""
        self._ensure_plan()
        return self._plan_idx, self._plan_w

    def __len__(self) -> int:
        self._ensure_plan()
        return self._lengths[self.epoch]

    def total_steps(self, well_learned_fraction: float | None = None) -> int:
        """Training steps over all ``epochs``: exact for planned epochs, predicted for the others.

        Args:
            well_learned_fraction: fraction of examples expected below the mean loss in
                future pruning epochs; default: the current table's fraction (1 - all
                examples at ``initial_score`` before any feedback, i.e. no pruning).

        Returns:
            The sum over epochs of the (predicted) number of batches.
        """
        if well_learned_fraction is None:
            frac = float(np.mean(self.scores < self.scores.mean()))
        else:
            frac = check_float(
                well_learned_fraction,
                "well_learned_fraction",
                "InfoBatch.total_steps",
                minimum=0.0,
                maximum=1.0,
            )
        n = self.num_samples
        n_well = int(round(frac * n))
        pruned_size = n - n_well + infobatch_kept_count(n_well, n, self.prune_ratio, self.min_keep)
        total = 0
        for e in range(self.epochs):
            if e in self._lengths and e <= self.epoch:
                total += self._lengths[e]
            elif e == self.epoch:
                total += len(self)
            else:
                total += self._batches_for(pruned_size if self.is_pruning(e) else n)
        return total

    # ------------------------------------------------------------------ protocol
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position, another starts at its first batch."""
        epoch = check_int(epoch, "epoch", "InfoBatch.set_epoch", minimum=0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._detach_iterators()

    def _batches(self) -> Iterator[WeightedBatch]:
        self._ensure_plan()
        self._iterated = True
        token, owner = self._claim_cursor()
        epoch, position = self.epoch, (self.position if owner else 0)
        b = self.batch_size
        count = self._lengths[epoch]
        order = self._plan_idx[: min(count * b, self._plan_idx.numel())]
        weights = self._plan_w
        try:
            for indices, data in self.reader.from_indices(order, start=position * b):
                rows = weights[position * b : position * b + indices.numel()].clone()
                batch = WeightedBatch.from_collated(data, indices, rows)
                position += 1
                if self._owns_cursor(token):
                    self.epoch, self.position = (epoch + 1, 0) if position >= count else (epoch, position)
                yield batch
        finally:
            self._release_cursor(token)

    def update(self, indices: Any, scores: Any) -> None:
        """Record the latest per-example losses (used when the next epoch is planned); O(k)."""
        idx, val = feedback_arrays(indices, scores, self.num_samples, type(self).__name__)
        self.scores[idx] = val
        self._updates += 1

    def _state(self) -> dict[str, Any]:
        return {
            "scores": torch.from_numpy(self.scores.copy()),
            "epoch": self.epoch,
            "position": self.position,
            "plan_epoch": self._plan_epoch,
            "plan_indices": self._plan_idx.clone(),
            "plan_weights": self._plan_w.clone(),
            "updates": self._updates,
            "iterated": self._iterated,
            "lengths": dict(self._lengths),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        scores = np.asarray(state["scores"], dtype=np.float64)
        if scores.shape != (self.num_samples,):
            raise ValueError("InfoBatch state has a score table of the wrong shape.")
        self.scores = scores.copy()
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan_epoch = int(state["plan_epoch"])
        self._plan_idx = torch.as_tensor(state["plan_indices"], dtype=torch.long).clone()
        self._plan_w = torch.as_tensor(state["plan_weights"], dtype=torch.float32).clone()
        self._updates = int(state["updates"])
        self._iterated = bool(state["iterated"])
        self._lengths = {int(k): int(v) for k, v in state["lengths"].items()}
