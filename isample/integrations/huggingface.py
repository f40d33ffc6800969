"""A ``transformers.Trainer`` that trains on importance-weighted batches.

:class:`ImportanceTrainer` replaces the Trainer's random sampler by a
:class:`isample.TableSampler` fed with the per-example training losses (history-based
importance sampling, no extra forward pass), keeps the Trainer's collator, DataLoader
options and accelerate's data preparation (device placement, distributed wrappers), and
weights each example's loss by its importance weight::

    from isample.integrations.huggingface import ImportanceTrainer

    trainer = ImportanceTrainer(model=model, args=TrainingArguments(...), train_dataset=train_set)
    trainer.train()

The per-example loss is computed from the model's logits: cross-entropy per example for
``(b, C)`` logits, and the mean over the example's non-ignored tokens (``labels == -100``
ignored) for ``(b, T, C)`` logits. Pass ``loss_fn(logits, labels) -> Tensor (b,)`` for
anything else.

Under DDP the sampler draws one global batch per step from the shared table and each
process takes its shard (see :class:`isample.TableSampler`); accelerate's batch-sampler
sharding is turned into a pass-through so the shards are not split twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised without transformers installed
    raise ImportError(
        "isample.integrations.huggingface needs transformers: pip install 'isample[huggingface]'."
    ) from error

from .._validation import param_error
from ..table_sampler import TableSampler

__all__ = ["ImportanceTrainer", "per_example_cross_entropy", "WEIGHTS_KEY", "INDICES_KEY"]

#: batch keys that carry the importance weights and dataset indices through accelerate
WEIGHTS_KEY = "isample_weights"
INDICES_KEY = "isample_indices"


def per_example_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-example cross-entropy: Tensor of shape (b,) in nats.

    ``(b, C)`` logits with ``(b,)`` labels give the usual per-example loss; ``(b, T, C)``
    logits with ``(b, T)`` labels give each example's mean over its tokens whose label is
    not ``ignore_index`` (0 for an example with no such token).
    """
    if logits.dim() == 2 and labels.shape == logits.shape[:1]:
        return torch.nn.functional.cross_entropy(
            logits.float(), labels, reduction="none", ignore_index=ignore_index
        )
    if logits.dim() == 3 and labels.shape == logits.shape[:2]:
        token = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, reduction="none", ignore_index=ignore_index
        )
        count = (labels != ignore_index).sum(dim=1)
        return token.sum(dim=1) / count.clamp(min=1)
    raise ValueError(
        f"per_example_cross_entropy expects (b, C) logits with (b,) labels or (b, T, C) logits with "
        f"(b, T) labels; got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}. "
        "Pass loss_fn= to ImportanceTrainer for other outputs."
    )


class _IndexedWeighted(Dataset):
    """``dataset[(index, weight)] -> (index, weight, dataset[index])`` (runs inside workers)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, float]) -> tuple[int, float, Any]:
        index, weight = key
        return index, weight, self.dataset[index]


class _WeightedDictCollate:
    """Collate with the Trainer's collator and add the weights and indices as batch keys (picklable)."""

    def __init__(self, base: Callable) -> None:
        self.base = base

    def __call__(self, items: list[tuple[int, float, Any]]) -> dict[str, Any]:
        batch = self.base([item for _, _, item in items])
        if not isinstance(batch, Mapping):
            raise TypeError(
                "ImportanceTrainer needs a data collator that returns a dict of tensors; "
                f"got {type(batch).__name__}."
            )
        batch = dict(batch)
        batch[INDICES_KEY] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        batch[WEIGHTS_KEY] = torch.tensor([w for _, w, _ in items], dtype=torch.float32)
        return batch


class ImportanceTrainer(Trainer):
    """``transformers.Trainer`` with history-based importance sampling.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``.
        sampler: the :class:`isample.TableSampler` to draw with (default: one over
            ``train_dataset`` with the per-device train batch size, seeded with
            ``args.seed``, ``drop_last`` from ``args.dataloader_drop_last``).
        loss_fn: ``loss_fn(logits, labels) -> Tensor (b,)`` per-example losses (default
            :func:`per_example_cross_entropy`).

    Attributes:
        isample_sampler: the sampler (its ``state_dict`` saves the score table).

    Each training step weights example i's loss by ``w_i = 1 / (N p_i)`` (the batch loss is
    ``mean_i w_i l_i``, unbiased for the uniform mean loss) and writes the detached
    per-example losses back into the table. Evaluation is unchanged (uniform, unweighted).
    """

    def __init__(
        self,
        *args: Any,
        sampler: TableSampler | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        owner = "ImportanceTrainer"
        if sampler is not None and not isinstance(sampler, TableSampler):
            raise param_error("sampler", owner, "an isample.TableSampler or None", sampler, TypeError)
        if loss_fn is not None and not callable(loss_fn):
            raise param_error(
                "loss_fn", owner, "a callable (logits, labels) -> losses or None", loss_fn, TypeError
            )
        self.isample_sampler = sampler
        self.isample_loss_fn = loss_fn or per_example_cross_entropy
        # the weighted mean below is a per-batch mean: let the Trainer scale it for gradient accumulation
        self.model_accepts_loss_kwargs = False

    def _make_sampler(self, dataset: Dataset) -> TableSampler:
        if self.isample_sampler is None:
            self.isample_sampler = TableSampler(
                len(dataset),  # type: ignore[arg-type]
                self._train_batch_size,
                seed=int(self.args.seed),
                drop_last=bool(self.args.dataloader_drop_last),
            )
        elif self.isample_sampler.num_samples != len(dataset):  # type: ignore[arg-type]
            raise ValueError(
                f"The 'sampler' of ImportanceTrainer has num_samples={self.isample_sampler.num_samples}, "
                f"but train_dataset has {len(dataset)} examples."  # type: ignore[arg-type]
            )
        return self.isample_sampler

    def get_train_dataloader(self) -> DataLoader:
        """The weighted training DataLoader, passed through ``accelerator.prepare`` like the Trainer's own."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "ImportanceTrainer needs a map-style train_dataset (with __len__ and __getitem__)."
            )
        sampler = self._make_sampler(dataset)
        workers = int(self.args.dataloader_num_workers)
        loader = DataLoader(
            _IndexedWeighted(dataset),
            batch_sampler=sampler,
            collate_fn=_WeightedDictCollate(self.data_collator),
            num_workers=workers,
            pin_memory=bool(self.args.dataloader_pin_memory),
            persistent_workers=bool(self.args.dataloader_persistent_workers) and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
        )
        prepared = self.accelerator.prepare(loader)
        # the sampler already yields this rank's shard: accelerate must not shard it again
        inner = getattr(prepared, "batch_sampler", None)
        if inner is not None and getattr(inner, "batch_sampler", None) is sampler:
            inner.num_processes = 1
            inner.process_index = 0
        return prepared

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Weighted mean of the per-example losses; feeds the losses back to the sampler when training."""
        if WEIGHTS_KEY not in inputs:  # evaluation batches: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        weights = inputs.pop(WEIGHTS_KEY)
        indices = inputs.pop(INDICES_KEY)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("ImportanceTrainer needs 'labels' in every training batch.")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs)
        losses = self.isample_loss_fn(logits, labels)
        if losses.shape != weights.shape:
            raise ValueError(
                "ImportanceTrainer's loss_fn must return one loss per example, shape "
                f"{tuple(weights.shape)}; got {tuple(losses.shape)}."
            )
        if model.training:
            self.isample_sampler.update(indices, losses.detach())  # type: ignore[union-attr]
        loss = (weights.to(losses.dtype) * losses).mean()
        return (loss, outputs) if return_outputs else loss
