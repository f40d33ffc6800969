"""validate_sampler on the real loaders: unbiased mean, and the exact variance for the table."""

from __future__ import annotations

import torch
from conftest import make_mlp
from torch import nn

from isample import ImportanceDataLoader, PoolLoader, TableSampler, UpperBoundScorer, validate_sampler

CE = nn.CrossEntropyLoss(reduction="none")


def test_table_loader_is_unbiased_with_the_predicted_variance(classification):
    x, y = classification.tensors
    model = make_mlp()
    sampler = TableSampler(len(x), 8, seed=0, mixing=0.2, num_batches=600)
    sampler.update(torch.arange(len(x)), UpperBoundScorer(CE)(model, x, y))
    loader = ImportanceDataLoader(classification, sampler)
    report = validate_sampler(loader, model, CE, x, y, 600, probabilities=sampler.probabilities())
    assert report.passed, report.as_dict()
    assert report.expected_variance is not None


def test_table_loader_with_wrong_weights_fails(classification):
    """The validator has power: a loader that forgets to reweight is caught."""
    x, y = classification.tensors
    model = make_mlp()
    sampler = TableSampler(len(x), 8, seed=0, mixing=0.0, bias_exponent=0.0, num_batches=600)
    sampler.update(torch.arange(len(x)), UpperBoundScorer(CE)(model, x, y) ** 2)
    report = validate_sampler(ImportanceDataLoader(classification, sampler), model, CE, x, y, 600)
    assert not report.mean_passed


def test_pool_loader_is_unbiased(classification):
    x, y = classification.tensors
    model = make_mlp()
    loader = PoolLoader(
        classification, model, UpperBoundScorer(CE), 8, 3.0, always=True, seed=0, num_batches=600
    )
    report = validate_sampler(loader, model, CE, x, y, 600)
    assert report.mean_passed, report.as_dict()
