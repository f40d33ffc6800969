"""isample: importance sampling for PyTorch training."""

from __future__ import annotations

from .batch import WeightedBatch
from .dataloader import ImportanceDataLoader
from .pool_loader import PoolLoader
from .table_sampler import TableSampler
from .scorers import GradNormScorer, LossScorer, UpperBoundScorer, score_dataset

__version__ = "0.1.0"

__all__ = sorted(
    [
        "GradNormScorer",
        "ImportanceDataLoader",
        "PoolLoader",
        "TableSampler",
        "LossScorer",
        "UpperBoundScorer",
        "WeightedBatch",
        "score_dataset",
    ]
)
