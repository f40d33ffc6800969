"""The building-block loaders validate datasets and DataLoader options in the one shared place."""

from __future__ import annotations

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import isample

CE = nn.CrossEntropyLoss(reduction="none")


class Stream(IterableDataset):
    def __len__(self) -> int:
        return 10

    def __iter__(self):
        return iter([(torch.randn(5), 0)] * 10)


def pool(ds, **options):
    return isample.PoolLoader(ds, make_mlp(), isample.UpperBoundScorer(CE), 2, **options)


def table(ds, **options):
    return isample.ImportanceDataLoader(ds, isample.TableSampler(10, 2), **options)


@pytest.mark.parametrize("build", [pool, table], ids=["PoolLoader", "ImportanceDataLoader"])
def test_an_iterable_dataset_is_a_clear_type_error(build):
    with pytest.raises(TypeError, match="IterableDataset"):
        build(Stream())


@pytest.mark.parametrize("build", [pool, table], ids=["PoolLoader", "ImportanceDataLoader"])
@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"num_workers": 1, "prefetch_factor": 0}, ValueError, "prefetch_factor"),
        ({"prefetch_factor": 2}, ValueError, "prefetch_factor"),  # needs workers
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"timeout": -1.0}, ValueError, "timeout"),
        ({"pin_memory": "yes"}, TypeError, "pin_memory"),
    ],
)
def test_bad_dataloader_options_are_named(build, options, error, match):
    x, y = make_classification(10)
    with pytest.raises(error, match=match):
        build(TensorDataset(x, y), **options)
