"""Scheme loaders that wrap the core loaders: :class:`PoolScheme` and :class:`TableScheme` (private)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._validation import check_int
from ..batch import WeightedBatch
from ..dataloader import ImportanceDataLoader
from ..pool_loader import PoolLoader
from ..scorers import model_call_of, score_dataset
from ..table_sampler import TableSampler
from .base import SchemeLoader

__all__ = ["PoolScheme", "TableScheme"]


class PoolScheme(SchemeLoader):
    """A :class:`isample.PoolLoader` behind the scheme protocol; counts B scored examples per step.

    Subclasses build the scorer and the pool loader's configuration.
    """

    kind = "pool"

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module,
        loss_fn: Callable,
        batch_size: int,
        seed: int | None,
        scorer: Callable,
        loader_options: dict[str, Any] | None = None,
        **pool_kwargs: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        self.scorer = scorer
        self.pool = PoolLoader(
            dataset, model, scorer, self.batch_size, seed=self.seed, **pool_kwargs, **self.loader_options
        )

    @property
    def epoch(self) -> int:
        return self.pool.epoch

    @property
    def position(self) -> int:
        return self.pool.position

    def __len__(self) -> int:
        return len(self.pool)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position (see :meth:`SchemeLoader.set_epoch`)."""
        if check_int(epoch, "epoch", f"{type(self).__name__}.set_epoch", minimum=0) != self.pool.epoch:
            self.pool.set_epoch(epoch)

    def _batches(self) -> Iterator[WeightedBatch]:
        seen = self.pool.scored_examples
        for batch in self.pool:
            self._scored += self.pool.scored_examples - seen  # Algorithm 1 scores no pool while off
            seen = self.pool.scored_examples
            yield batch

    def update(self, indices: Any, scores: Any) -> None:
        """Validated and ignored: pools are re-scored at every step."""
        self.pool.update(indices, scores)

    def step_context(self, batch: WeightedBatch) -> contextlib.AbstractContextManager:
        """In Algorithm 1 mode, keep the model's output of this step for :meth:`feedback`.

        A forward hook on the model records the last output whose leading dimension is the
        batch size, so a loop that feeds back only the losses (``loader.update(losses)``)
        still gives the switch its tau. The hook is attached only once a feedback came
        without outputs (from then on; that one batch is not used for tau), so a loop that
        passes its outputs pays nothing. Outside Algorithm 1 mode it does nothing.
        """
        if not (getattr(self.pool, "lazy", False) and getattr(self, "_capture", False)):
            return contextlib.nullcontext()
        return self._capture_outputs(len(batch))

    @contextlib.contextmanager
    def _capture_outputs(self, size: int) -> Iterator[None]:
        call = model_call_of(self.scorer)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            try:
                lead = call.read(output)
            except TypeError:  # an output the scorer cannot read: not the training logits
                return
            if isinstance(lead, torch.Tensor) and lead.dim() and lead.shape[0] == size:
                self._captured = output

        self._captured = None
        handle = self.model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def feedback(self, batch: WeightedBatch, outputs: Any, losses: torch.Tensor) -> None:
        """Hand the training outputs to the pool loader (Algorithm 1's tau; :meth:`PoolLoader.feedback`).

        ``outputs=None`` uses the output recorded by :meth:`step_context` for this step.
        """
        captured, self._captured = getattr(self, "_captured", None), None
        if outputs is None:
            outputs = captured
        lazy = getattr(self.pool, "lazy", False)
        if outputs is None and lazy and not getattr(self, "_capture", False):
            self._capture = True  # record the outputs from the next step on (see step_context)
            return
        if outputs is None and lazy and self.pool._awaiting:
            raise ValueError(
                f"{type(self).__name__} computes tau from the training outputs while importance sampling is "
                "off: pass them, loader.update(losses, outputs=out.detach()) or "
                "loader.feedback(batch, out.detach(), losses), or run the step inside "
                "`with loader.step_context(batch):` (isample.DataLoader does that for you)."
            )
        self.pool.feedback(batch, outputs, losses)

    def describe(self) -> dict[str, Any]:
        """Importance sampling on/off, tau and the switch decision (:meth:`isample.PoolLoader.describe`)."""
        return {"scheme": self.name, **self.pool.describe()}

    def status(self) -> str:
        """One line for a progress bar or a log (:meth:`isample.PoolLoader.status`)."""
        return self.pool.status()

    def _state(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])


class TableScheme(SchemeLoader):
    """A :class:`isample.TableSampler` + :class:`isample.ImportanceDataLoader` behind the scheme protocol.

    ``_begin_epoch(epoch)`` runs once before the first batch of every epoch (re-scoring,
    re-ranking); ``rescore_every = k`` re-scores the whole dataset with ``score_dataset``
    at epochs 0, k, 2k, ... (N forwards each, counted in ``cost()``).
    """

    kind = "table"

    def __init__(
        self,
        dataset: Dataset,
        model: nn.Module,
        loss_fn: Callable,
        batch_size: int,
        seed: int | None,
        *,
        rescore_every: int | None = None,
        scoring_batch_size: int = 1024,
        loader_options: dict[str, Any] | None = None,
        **sampler_kwargs: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        owner = type(self).__name__
        self.rescore_every = check_int(rescore_every, "rescore_every", owner, minimum=1, allow_none=True)
        self.scoring_batch_size = check_int(scoring_batch_size, "scoring_batch_size", owner, minimum=1)
        self.collate_fn = self.loader_options["collate_fn"]
        self.sampler = TableSampler(self.num_samples, self.batch_size, seed=self.seed, **sampler_kwargs)
        self.loader = ImportanceDataLoader(dataset, self.sampler, **self.loader_options)
        self._prepared_epoch = -1
        self._last_rescore: int | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        return self.sampler.position

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position (see :meth:`SchemeLoader.set_epoch`)."""
        if check_int(epoch, "epoch", f"{type(self).__name__}.set_epoch", minimum=0) != self.sampler.epoch:
            self.loader.set_epoch(epoch)

    def _batches(self) -> Iterator[WeightedBatch]:
        if self.sampler.position == 0 and self._prepared_epoch != self.sampler.epoch:
            self._begin_epoch(self.sampler.epoch)
            self._prepared_epoch = self.sampler.epoch
        yield from self.loader

    def _begin_epoch(self, epoch: int) -> None:
        """Re-score at the first epoch this loader runs and then every ``rescore_every`` epochs.

        Starting at epoch 0 that is epochs 0, k, 2k, ...; a loader started (or resumed)
        at a later epoch scores first, so its table never starts unscored.
        """
        if self.rescore_every is None:
            return
        if self._last_rescore is None or epoch - self._last_rescore >= self.rescore_every:
            self._rescore()
            self._last_rescore = epoch

    def _rescore_scorer(self) -> Callable:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rescore(self) -> torch.Tensor:
        """Score the whole dataset with the current model and feed the table; returns the scores (N,)."""
        scores = score_dataset(
            self.model,
            self.dataset,
            self._rescore_scorer(),
            batch_size=self.scoring_batch_size,
            collate_fn=self.collate_fn,
        )
        self._scored += self.num_samples
        self._rescored(scores)
        return scores

    def _rescored(self, scores: torch.Tensor) -> None:
        self.sampler.update(torch.arange(self.num_samples), scores)
        self.sampler.flush()  # epoch boundary: applies before the epoch's first draw, any worker count

    def update(self, indices: Any, scores: Any) -> None:
        """Write per-example scores into the table (see :meth:`isample.TableSampler.update`)."""
        self.sampler.update(indices, scores)

    def probabilities(self) -> torch.Tensor:
        """The current draw distribution over the N examples (float64 Tensor (N,)); O(N)."""
        return self.sampler.probabilities()

    def describe(self) -> dict[str, Any]:
        """What the table does now: the mixing level with uniform and the staleness estimate.

        Returns:
            dict with ``scheme``, ``is_on`` (True when the draws are not uniform: mixing
            level < 1), ``mixing_level`` (lambda; 1 = uniform), ``estimated_gain`` (the
            staleness estimator's uniform / table noise ratio, a kappa estimate; None with
            a fixed level), ``visited`` (examples with a score), ``epoch`` and ``position``.
        """
        mixer = getattr(self.sampler, "mixer", None)
        level = float(self.sampler.mixing_level)
        return {
            "scheme": self.name,
            "is_on": level < 1.0,
            "mixing_level": level,
            "estimated_gain": None if mixer is None else float(mixer.estimated_gain()),
            "visited": int(self.sampler._num_visited),
            "epoch": self.sampler.epoch,
            "position": self.sampler.position,
        }

    def status(self) -> str:
        """One line for a progress bar or a log, e.g. ``"IS on | mixing 0.25 | gain 1.8"``."""
        d = self.describe()
        gain = "" if d["estimated_gain"] is None else f" | gain {d['estimated_gain']:.2f}"
        return f"IS {'on' if d['is_on'] else 'off'} | mixing {d['mixing_level']:.2f}{gain}"

    def _state(self) -> dict[str, Any]:
        return {
            "loader": self.loader.state_dict(),
            "prepared_epoch": self._prepared_epoch,
            "last_rescore": self._last_rescore,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._prepared_epoch = int(state["prepared_epoch"])
        last = state.get("last_rescore")
        self._last_rescore = None if last is None else int(last)
