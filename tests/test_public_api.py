"""A curated public API: sorted __all__, every public name documented, stable names present."""

from __future__ import annotations

import inspect

import isample

STABLE = [
    "DataLoader",
    "GradNormScorer",
    "ImportanceDataLoader",
    "LossScorer",
    "PoolLoader",
    "TableSampler",
    "UpperBoundScorer",
    "WeightedBatch",
    "score_dataset",
]


def test_all_is_sorted_and_has_the_stable_names():
    assert list(isample.__all__) == sorted(isample.__all__)
    for name in STABLE:
        assert name in isample.__all__
        assert hasattr(isample, name)


def test_every_public_name_and_method_has_a_docstring():
    missing = []
    for name in isample.__all__:
        obj = getattr(isample, name)
        if inspect.ismodule(obj):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                if not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"undocumented public names: {missing}"


def test_importing_isample_does_not_patch_torch():
    import torch.utils.data as data

    assert data.DataLoader.__module__.startswith("torch.")
    assert data.WeightedRandomSampler.__module__.startswith("torch.")


def test_every_scheme_object_is_exported_and_documented():
    from isample import schemes
    from isample.schemes.objects import SCHEME_OBJECTS

    assert set(SCHEME_OBJECTS) <= set(schemes.available())
    for name in schemes.available():  # a registry name without its own class still has an object
        assert schemes.scheme_object(name).name == name
    assert list(schemes.__all__) == sorted(schemes.__all__)
    for name, cls in SCHEME_OBJECTS.items():
        assert getattr(schemes, cls.__name__) is cls
        assert inspect.getdoc(cls) and f"``{name}``" in inspect.getdoc(cls) or name == "uniform"
        for attr in ("build", "describe", "changed"):
            assert inspect.getdoc(getattr(cls, attr))


def test_the_entry_point_is_not_torchs_dataloader_and_does_not_patch_it():
    import torch.utils.data as data

    assert isample.DataLoader is not data.DataLoader
    assert isample.DataLoader.__module__ == "isample.loader"
