"""isample: importance sampling for PyTorch training."""

from __future__ import annotations

from . import metrics
from .batch import WeightedBatch
from .dataloader import ImportanceDataLoader
from .pool_loader import PoolLoader
from .table_sampler import TableSampler
from .metrics import SamplerQuality, validate_sampler
from .scorers import GradNormScorer, LossScorer, UpperBoundScorer, score_dataset

__version__ = "0.1.0"

__all__ = sorted(
    [
        "GradNormScorer",
        "ImportanceDataLoader",
        "PoolLoader",
        "SamplerQuality",
        "TableSampler",
        "LossScorer",
        "UpperBoundScorer",
        "WeightedBatch",
        "metrics",
        "score_dataset",
        "validate_sampler",
    ]
)
