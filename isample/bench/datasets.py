"""Benchmark datasets: built-in (no download) and user-supplied through a ``module:function`` hook.

Built-in datasets:

* ``digits``: scikit-learn's bundled ``load_digits`` (1797 images of 8x8 pixels, 10
  classes), split 60 / 20 / 20 into train / validation / test (stratified, seeded) and
  standardised with the training mean and standard deviation of every pixel.
* ``mnist1d`` (the default): MNIST-1D generated locally from its ten templates
  (:mod:`isample.bench.mnist1d`; 8000 / 2000 / 2000 examples of 40 points, 10 balanced
  classes), the workload where a forward pass costs enough for sampling to matter.
* ``mnist1d-noisy``: the same with 15% of the training labels flipped (validation and
  test clean): biased schemes that chase the mislabelled examples show in test accuracy.
* ``noisy-imbalanced``: a seeded Gaussian mixture generated locally (NumPy only): 10
  classes in 32 dimensions, two clusters per class, class priors decaying geometrically
  (largest / smallest = 10), 15% of the training labels flipped uniformly at random; 4000
  examples split 60 / 20 / 20, standardised (the clusters overlap: an MLP reaches about
  87% test accuracy). Validation and test labels are clean, so
  label noise hurts training loss but is not rewarded at test time.

User datasets: ``--dataset mypackage.mymodule:make_data`` imports ``mypackage.mymodule`` and
calls ``make_data()``, which must return ``(X_train, y_train, X_test, y_test)`` as tensors
(or NumPy arrays), or ``(train_dataset, test_dataset)`` / ``(train_dataset, None,
test_dataset, None)`` as map-style datasets of ``(input, label)`` pairs. Labels are
integer class ids. 20% of the training set (seeded, stratified) becomes the validation
split used for learning-rate tuning. User data is used as given (not standardised).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .mnist1d import make_mnist1d

__all__ = [
    "BenchData",
    "BUILTIN_DATASETS",
    "available_datasets",
    "load_dataset",
    "load_digits_data",
    "load_user_dataset",
    "make_mnist1d",
    "make_noisy_imbalanced",
]


@dataclass
class BenchData:
    """A classification dataset split into train / validation / test tensors.

    Attributes:
        name: the dataset's name.
        x_train, x_val, x_test: float32 Tensors of shape (n, d) (or (n, ...) for user data).
        y_train, y_val, y_test: int64 Tensors of shape (n,), class ids in [0, num_classes).
        num_classes: number of classes.
        description: one line for the report.
        image_shape: (channels, height, width) when the flat features are an image
            (used by the ``cnn`` model), else None.
        info: extra facts for the report (noise rate, class counts, ...).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    description: str = ""
    image_shape: tuple[int, int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict[str, Any]:
        """Sizes and shapes as a JSON-friendly dict."""
        return {
            "name": self.name,
            "description": self.description,
            "n_train": int(self.x_train.shape[0]),
            "n_val": int(self.x_val.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": int(self.num_classes),
            **self.info,
        }


def _stratified_split(
    y: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices into len(fractions) parts, per class, in the given proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    edges = np.cumsum((0.0,) + tuple(fractions))
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        idx = idx[rng.permutation(idx.size)]
        cuts = np.round(edges * idx.size).astype(int)
        for k in range(len(fractions)):
            parts[k].append(idx[cuts[k] : cuts[k + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    split: list[np.ndarray],
    description: str,
    image_shape: tuple[int, int, int] | None = None,
    info: dict[str, Any] | None = None,
    train_labels: np.ndarray | None = None,
) -> BenchData:
    tr, va, te = split
    xtr, xva, xte = _standardise(x[tr], x[va], x[te])
    ytr = (train_labels if train_labels is not None else y)[tr]
    return BenchData(
        name=name,
        x_train=torch.from_numpy(xtr),
        y_train=torch.from_numpy(ytr.astype(np.int64)),
        x_val=torch.from_numpy(xva),
        y_val=torch.from_numpy(y[va].astype(np.int64)),
        x_test=torch.from_numpy(xte),
        y_test=torch.from_numpy(y[te].astype(np.int64)),
        num_classes=int(y.max()) + 1,
        description=description,
        image_shape=image_shape,
        info=dict(info or {}),
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The arrays of ``sklearn.datasets.load_digits()``.

    Read straight from the CSV that scikit-learn bundles (``sklearn/datasets/data/digits.csv.gz``,
    the file ``load_digits`` itself parses) when it is there, which avoids importing
    scikit-learn (seconds on a busy machine); otherwise through ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("The 'digits' dataset needs scikit-learn: pip install 'isample[bench]'.")
    if spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].astype(np.float64), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - layout changed

    raw = load_digits()  # pragma: no cover
    return np.asarray(raw.data, dtype=np.float64), np.asarray(raw.target, dtype=np.int64)  # pragma: no cover


def load_digits_data(seed: int = 0) -> BenchData:
    """scikit-learn's bundled digits (no download), split 60/20/20 and standardised.

    Args:
        seed: seed of the stratified split (the same for every run of a benchmark).

    Returns:
        :class:`BenchData` with 64 features (8x8 pixels) and 10 classes.
    """
    x, y = _digits_arrays()
    split = _stratified_split(y, (0.6, 0.2, 0.2), np.random.default_rng(seed))
    return _from_arrays(
        "digits",
        x,
        y,
        split,
        "scikit-learn load_digits: 1797 8x8 images, 10 classes, standardised",
        image_shape=(1, 8, 8),
    )


def make_noisy_imbalanced(
    seed: int = 0,
    n: int = 4000,
    dim: int = 32,
    classes: int = 10,
    imbalance: float = 10.0,
    noise: float = 0.15,
) -> BenchData:
    """A seeded hard classification problem: imbalanced Gaussian mixture with label noise.

    Class ``c`` has prior proportional to ``imbalance ** (-c / (classes - 1))``; each class
    is a mixture of two isotropic Gaussians (unit variance) with centres drawn from
    ``N(0, 0.7^2 I)``. After the split, a fraction ``noise`` of the *training* labels is
    replaced by a uniformly random (different) class.

    Args:
        seed: seed of the generator and of the split.
        n: total examples (>= 10 * classes).
        dim: feature dimension.
        classes: number of classes (>= 2).
        imbalance: ratio of the largest to the smallest class prior (>= 1).
        noise: fraction of training labels flipped, in [0, 1).

    Returns:
        :class:`BenchData`.
    """
    rng = np.random.default_rng([seed, 7919])
    prior = imbalance ** (-np.arange(classes) / max(classes - 1, 1))
    prior = prior / prior.sum()
    y = rng.choice(classes, size=n, p=prior)
    centres = rng.normal(0.0, 0.7, size=(classes, 2, dim))
    cluster = rng.integers(0, 2, size=n)
    x = centres[y, cluster] + rng.normal(0.0, 1.0, size=(n, dim))
    split = _stratified_split(y, (0.6, 0.2, 0.2), np.random.default_rng([seed, 104729]))
    noisy = y.copy()
    tr = split[0]
    flip = tr[rng.random(tr.size) < noise]
    noisy[flip] = (y[flip] + rng.integers(1, classes, size=flip.size)) % classes
    counts = np.bincount(y, minlength=classes)
    return _from_arrays(
        "noisy-imbalanced",
        x,
        y,
        split,
        f"seeded Gaussian mixture: {n} x {dim}, {classes} classes, imbalance {imbalance:g}:1, "
        f"{noise:.0%} of training labels flipped",
        info={
            "label_noise": float(noise),
            "flipped_train_labels": int(flip.size),
            "imbalance": float(imbalance),
            "class_counts": counts.tolist(),
        },
        train_labels=noisy,
    )


def _as_tensors(obj: Any, what: str, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) from a dataset (TensorDataset or map-style of pairs)."""
    tensors = getattr(obj, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return torch.as_tensor(tensors[0]), torch.as_tensor(tensors[1])
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        items = [obj[i] for i in range(len(obj))]
        if not items:
            raise ValueError(f"The dataset hook {hook!r} returned an empty {what} dataset.")
        xs = torch.stack([torch.as_tensor(it[0]) for it in items])
        ys = torch.as_tensor([int(it[1]) for it in items])
        return xs, ys
    raise TypeError(
        f"The dataset hook {hook!r} returned a {what} of type {type(obj).__name__}; "
        "expected tensors, arrays or a map-style dataset of (input, label) pairs."
    )


def load_user_dataset(spec: str, seed: int = 0) -> BenchData:
    """Load a dataset through a ``module:function`` hook (see the module docstring).

    Args:
        spec: ``"package.module:function"``.
        seed: seed of the stratified train / validation split.

    Returns:
        :class:`BenchData` (the hook's training set split 80 / 20 into train / validation).
    """
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"A user dataset must be given as 'module:function'. Got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Cannot import the dataset module {module_name!r} of {spec!r}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"The dataset module {module_name!r} has no callable {func_name!r}.")
    out = fn()
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise TypeError(
            f"The dataset hook {spec!r} must return (X_train, y_train, X_test, y_test) or "
            f"(train_dataset, test_dataset). Got {type(out).__name__}."
        )
    if len(out) == 2 or (len(out) == 4 and out[1] is None and out[3] is None):
        train, test = (out[0], out[1]) if len(out) == 2 else (out[0], out[2])
        x_tr, y_tr = _as_tensors(train, "training", spec)
        x_te, y_te = _as_tensors(test, "test", spec)
    else:
        x_tr, y_tr, x_te, y_te = (torch.as_tensor(v) for v in out)
    x_tr, x_te = x_tr.float(), x_te.float()
    y_tr, y_te = y_tr.long().reshape(-1), y_te.long().reshape(-1)
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise ValueError(f"The dataset hook {spec!r} returned inputs and labels of different lengths.")
    if x_tr.shape[0] < 10:
        raise ValueError(f"The dataset hook {spec!r} returned fewer than 10 training examples.")
    if int(min(y_tr.min(), y_te.min())) < 0:
        raise ValueError(f"The dataset hook {spec!r} returned negative labels; use class ids 0..C-1.")
    yn = y_tr.numpy()
    tr, va = _stratified_split(yn, (0.8, 0.2), np.random.default_rng(seed))
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return BenchData(
        name=spec,
        x_train=x_tr[tr_t],
        y_train=y_tr[tr_t],
        x_val=x_tr[va_t],
        y_val=y_tr[va_t],
        x_test=x_te,
        y_test=y_te,
        num_classes=int(max(y_tr.max(), y_te.max())) + 1,
        description=f"user dataset from {spec}",
    )


#: Built-in datasets by name.
BUILTIN_DATASETS: dict[str, Callable[[int], BenchData]] = {
    "digits": load_digits_data,
    "mnist1d": lambda seed: make_mnist1d(seed),
    "mnist1d-noisy": lambda seed: make_mnist1d(seed, noise=MNIST1D_NOISY_RATE),
    "noisy-imbalanced": make_noisy_imbalanced,
}

#: Fraction of flipped training labels of the ``mnist1d-noisy`` workload.
MNIST1D_NOISY_RATE = 0.15


def available_datasets() -> list[str]:
    """Names of the built-in datasets (a user dataset is any ``module:function``)."""
    return sorted(BUILTIN_DATASETS)


def load_dataset(name: str, seed: int = 0) -> BenchData:
    """A built-in dataset by name, or a user dataset given as ``module:function``.

    Args:
        name: one of :func:`available_datasets`, or ``"module:function"``.
        seed: split (and generator) seed; fixed across the runs of one benchmark.

    Returns:
        :class:`BenchData`.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"The 'dataset' parameter must be a str. Got {name!r}.")
    if ":" in name:
        return load_user_dataset(name, seed)
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Valid datasets: {', '.join(available_datasets())} "
            "(or a user dataset as 'module:function')."
        )
    return BUILTIN_DATASETS[name](seed)
