"""isample: importance sampling for PyTorch training.

Scorers compute per-example importance scores, loaders draw examples with probability
p_i and weight them by 1 / (N p_i) so the gradient stays unbiased, and ``isample.metrics``
measures how good a sampling scheme is. ``isample.DataLoader(dataset, batch_size,
scheme=..., model=..., loss_fn=..., **torch_dataloader_options)`` is the one entry point
for every scheme. See ``docs/index.md``.
"""

from __future__ import annotations

from . import metrics, schemes
from .batch import WeightedBatch
from .dataloader import ImportanceDataLoader, WeightedCollate, WeightedDataset, weighted_collate
from .linear_scorer import LinearGradNormScorer
from .loader import DataLoader
from .metrics import SamplerQuality, validate_sampler
from .pool_loader import PoolLoader
from .recorder import GradNormRecorder
from .scorers import GradNormScorer, LossScorer, Scorer, UpperBoundScorer, score_dataset
from .table_sampler import TableSampler, WeightedIndices

__version__ = "0.1.0"

__all__ = [
    "DataLoader",
    "GradNormRecorder",
    "GradNormScorer",
    "ImportanceDataLoader",
    "LinearGradNormScorer",
    "LossScorer",
    "PoolLoader",
    "SamplerQuality",
    "Scorer",
    "TableSampler",
    "UpperBoundScorer",
    "WeightedBatch",
    "WeightedCollate",
    "WeightedDataset",
    "WeightedIndices",
    "metrics",
    "schemes",
    "score_dataset",
    "validate_sampler",
    "weighted_collate",
]
