"""isample: importance sampling for PyTorch training."""

from __future__ import annotations

from . import metrics, schemes
from .batch import WeightedBatch
from .dataloader import ImportanceDataLoader
from .linear_scorer import LinearGradNormScorer
from .pool_loader import PoolLoader
from .recorder import GradNormRecorder
from .table_sampler import TableSampler
from .metrics import SamplerQuality, validate_sampler
from .scorers import GradNormScorer, LossScorer, UpperBoundScorer, score_dataset

__version__ = "0.1.0"

__all__ = sorted(
    [
        "GradNormRecorder",
        "GradNormScorer",
        "ImportanceDataLoader",
        "PoolLoader",
        "SamplerQuality",
        "TableSampler",
        "LinearGradNormScorer",
        "LossScorer",
        "UpperBoundScorer",
        "WeightedBatch",
        "metrics",
        "schemes",
        "score_dataset",
        "validate_sampler",
    ]
)
