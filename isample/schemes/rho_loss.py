"""RHO-LOSS (Mindermann et al. 2022): train on the pool's top examples by reducible holdout loss."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._random import derive_seed
from .._validation import check_float, check_int, check_seed, param_error
from ..batch import WeightedBatch, index_rows, move_to, split_batch
from ..rank_policies import top_k_rows
from ..scorers import LossScorer, model_device, per_example_losses, score_dataset
from ._stream import RowReader
from .base import SchemeLoader

__all__ = ["RhoLoss", "train_irreducible_loss_model", "compute_irreducible_losses"]

_STREAM = 31


def train_irreducible_loss_model(
    model: nn.Module,
    holdout: Dataset,
    loss_fn: Callable,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> nn.Module:
    """Train ``model`` in place on the holdout split with AdamW (the paper's optimizer); returns it.

    The irreducible loss model only needs to be trained once, on data the main model
    never trains on; it may be much smaller than the main model.

    Args:
        model: an untrained model (trained in place, left in eval mode).
        holdout: the holdout dataset (disjoint from the training set).
        loss_fn: per-example loss (``reduction="none"``).
        epochs, batch_size, lr, weight_decay: AdamW training settings.
        seed: seeds the shuffling (a ``torch.Generator``; global RNG untouched).
        collate_fn: optional collate function.

    Returns:
        The trained model.

    References:
        Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning,
        and Not Yet Learnt", ICML 2022 (arXiv:2206.07137).
    """
    owner = "train_irreducible_loss_model"
    if not isinstance(model, nn.Module):
        raise param_error("model", owner, "a torch.nn.Module", model, TypeError)
    if holdout is None or not hasattr(holdout, "__len__") or len(holdout) == 0:  # type: ignore[arg-type]
        raise param_error("holdout", owner, "a non-empty map-style Dataset", holdout, TypeError)
    epochs = check_int(epochs, "epochs", owner, minimum=1)
    batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
    lr = check_float(lr, "lr", owner, minimum=0.0, min_inclusive=False)
    weight_decay = check_float(weight_decay, "weight_decay", owner, minimum=0.0)
    g = torch.Generator()
    g.manual_seed(derive_seed(check_seed(seed, None, owner), _STREAM))
    loader = DataLoader(holdout, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    device = model_device(model)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            inputs, targets = split_batch(move_to(batch, device))
            loss = per_example_losses(loss_fn, model(inputs), targets, owner).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def compute_irreducible_losses(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable,
    batch_size: int = 1024,
    collate_fn: Callable | None = None,
) -> torch.Tensor:
    """The holdout model's loss on every training example: float32 CPU Tensor (N,) (no grad, eval mode)."""
    return score_dataset(model, dataset, LossScorer(loss_fn), batch_size=batch_size, collate_fn=collate_fn)


class RhoLoss(SchemeLoader):
    """Reducible holdout loss selection: the top ``n_b`` of a pool of ``n_B`` by ``L_train - L_irreducible``.

    Each step reads a uniform pool of ``n_B = round(b / ratio)`` candidates, computes their
    current training loss with one no-grad forward of the pool, subtracts the irreducible
    loss (the loss of a model trained once on a holdout split, precomputed per index),
    and trains on the ``b`` largest:

    .. math::

        s_i = \\ell(f_\\theta(x_i), y_i) - \\ell(f_{\\text{holdout}}(x_i), y_i), \\qquad
        \\text{batch} = \\operatorname{top}_b \\{ s_i : i \\in \\text{pool} \\}, \\qquad w_i = 1

    Biased by design (no weights). Give exactly one of ``irreducible_losses`` (Tensor (N,)),
    ``irreducible_model`` (a trained holdout model) or ``holdout`` (a Dataset: a copy of
    ``model`` as passed is trained on it with :func:`train_irreducible_loss_model`).

    Args:
        dataset, model, loss_fn, batch_size: as for every scheme.
        seed: randomness source.
        epochs, optimizer: unused.
        ratio: n_b / n_B, the kept fraction of each pool, in (0, 1] (0.1).
        irreducible_losses, irreducible_model, holdout: the irreducible loss source.
        holdout_epochs, holdout_lr, holdout_batch_size: training of the holdout model.
        num_batches: batches per epoch (default ceil(N / b)).
        scoring_batch_size: batch size of the irreducible-loss precomputation (1024).
        **loader_options: torch DataLoader options (see :class:`isample.DataLoader`).

    Raises:
        ValueError: none (or more than one) of the irreducible loss sources is given.

    References:
        Mindermann et al., ICML 2022 (arXiv:2206.07137).
    """

    name = "rho-loss"
    kind = "pool"
    unbiased = False

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
        ratio: float = 0.1,
        irreducible_losses: torch.Tensor | None = None,
        irreducible_model: nn.Module | None = None,
        holdout: Dataset | None = None,
        holdout_epochs: int = 10,
        holdout_lr: float = 1e-3,
        holdout_batch_size: int = 64,
        num_batches: int | None = None,
        scoring_batch_size: int = 1024,
        **loader_options: Any,
    ) -> None:
        super().__init__(dataset, model, loss_fn, batch_size, seed, loader_options)
        owner = type(self).__name__
        self.ratio = check_float(ratio, "ratio", owner, minimum=0.0, maximum=1.0, min_inclusive=False)
        self.pool_size = max(self.batch_size, int(round(self.batch_size / self.ratio)))
        self.num_batches = check_int(num_batches, "num_batches", owner, minimum=1, allow_none=True) or max(
            math.ceil(self.num_samples / self.batch_size), 1
        )
        given = [x is not None for x in (irreducible_losses, irreducible_model, holdout)]
        if sum(given) != 1:
            raise ValueError(
                "RhoLoss needs exactly one source of irreducible losses: 'irreducible_losses' (a Tensor "
                f"of shape ({self.num_samples},)), 'irreducible_model' (a model trained on a holdout split), "
                "or 'holdout' "
                "(a holdout Dataset to train one on with train_irreducible_loss_model). "
                f"Got {sum(given)} of them."
            )
        if holdout is not None:
            irreducible_model = train_irreducible_loss_model(
                copy.deepcopy(model),
                holdout,
                loss_fn,
                epochs=holdout_epochs,
                lr=holdout_lr,
                batch_size=holdout_batch_size,
                seed=self.seed,
                collate_fn=self.loader_options["collate_fn"],
            )
        if irreducible_model is not None:
            if not isinstance(irreducible_model, nn.Module):
                raise param_error(
                    "irreducible_model", owner, "a torch.nn.Module", irreducible_model, TypeError
                )
            irreducible_losses = compute_irreducible_losses(
                irreducible_model,
                dataset,
                loss_fn,
                batch_size=scoring_batch_size,
                collate_fn=self.loader_options["collate_fn"],
            )
            self._scored += self.num_samples
        if not isinstance(irreducible_losses, torch.Tensor) or irreducible_losses.shape != (
            self.num_samples,
        ):
            raise param_error(
                "irreducible_losses",
                owner,
                f"a Tensor of shape ({self.num_samples},)",
                getattr(irreducible_losses, "shape", irreducible_losses),
                TypeError,
            )
        if not bool(torch.isfinite(irreducible_losses).all()):
            raise ValueError(f"The 'irreducible_losses' parameter of {owner} has NaN or infinite entries.")
        self.irreducible = irreducible_losses.detach().to("cpu", torch.float64).clone()
        self.scorer = LossScorer(loss_fn)
        self.reader = RowReader(
            dataset,
            self.pool_size,
            **self.loader_options,
        )
        self.epoch = 0
        self.position = 0
        self.last_selection: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the current epoch keeps its position, another starts at its first batch."""
        epoch = check_int(epoch, "epoch", "RhoLoss.set_epoch", minimum=0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._detach_iterators()

    def reducible_losses(self, indices: torch.Tensor, training_losses: torch.Tensor) -> torch.Tensor:
        """``training_losses - irreducible[indices]`` (float64, shape (k,))."""
        return training_losses.to("cpu", torch.float64) - self.irreducible[indices]

    def _batches(self) -> Iterator[WeightedBatch]:
        token, owner = self._claim_cursor()
        epoch, position = self.epoch, (self.position if owner else 0)
        device = model_device(self.model)
        length = self.num_batches * self.pool_size
        start = position * self.pool_size
        stream = self.reader.from_stream(self.seed, epoch, _STREAM, start=start, length=length)
        try:
            for indices, data in stream:
                data = move_to(data, device, non_blocking=True)
                inputs, targets = split_batch(data)
                losses = self.scorer(self.model, inputs, targets)
                self._scored += indices.numel()
                scores = self.reducible_losses(indices, losses)
                scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf))
                rows = top_k_rows(scores, self.batch_size)
                self.last_selection = {"indices": indices, "scores": scores, "rows": rows}
                selected = index_rows(data, rows)
                position += 1
                if self._owns_cursor(token):
                    done = position >= self.num_batches
                    self.epoch, self.position = (epoch + 1, 0) if done else (epoch, position)
                weights = torch.ones(rows.numel(), dtype=torch.float32)
                yield WeightedBatch.from_collated(selected, indices[rows], weights)
        finally:
            self._release_cursor(token)

    def update(self, indices: Any, scores: Any) -> None:
        """Validated (same length) and ignored: pools are re-scored at every step."""
        if len(indices) != len(scores):
            raise ValueError(
                f"RhoLoss.update got {len(indices)} indices and {len(scores)} scores; lengths must match."
            )

    def _state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "irreducible": self.irreducible.clone()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        irreducible = torch.as_tensor(state["irreducible"], dtype=torch.float64)
        if irreducible.shape != (self.num_samples,):
            raise ValueError("RhoLoss state has irreducible losses of the wrong shape.")
        self.irreducible = irreducible.clone()
