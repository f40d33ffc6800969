"""MNIST-1D generated locally from its ten digit templates (no download, no global RNG).

MNIST-1D (Greydanus, 2020, arXiv 2011.14439) turns ten hand-written 12-point 1-D
templates into 40-point signals with the recipe of the ``mnist1d`` package's
``make_dataset(get_dataset_args())``. This module follows the published recipe with its
default arguments, vectorised and drawn from one seeded :class:`numpy.random.Generator`
(the package seeds NumPy's global RNG, which this project never touches; a given seed
therefore gives a different, equally distributed sample than the package):

1. every template is whitened and shifted to start at 0, then divided by 6;
2. pad: append ``p ~ U{36, ..., 60}`` zeros, and resample the ``12 + p`` points linearly
   onto 72 points (a random dilation);
3. scale by ``1 + 0.4 (u - 1/2)``, ``u ~ U(0, 1)``;
4. translate: rotate right by ``k ~ U{0, ..., 47}`` points;
5. correlated noise where the signal is zero: ``N(0, 0.25^2)`` smoothed by a Gaussian
   filter of width 2; then i.i.d. ``N(0, 0.02^2)`` noise everywhere;
6. shear: subtract ``0.75 (u - 1/2) t`` with ``t`` spaced evenly in ``[-1/2, 1/2]``;
7. resample linearly onto 40 points.

Classes are balanced and shuffled; inputs are standardised with one mean and standard
deviation (the recipe standardises by the global moments; here those of the training
split, so no test statistic leaks into training).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["mnist1d_templates", "make_mnist1d_arrays", "make_mnist1d"]

_TEMPLATES = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)

_PAD_LOW, _PAD_HIGH = 36, 60
_WIDTH = len(_TEMPLATES[0]) + _PAD_HIGH  # 72 points after dilation
_LENGTH = 40
_SCALE = 0.4
_TRANSLATION = 48
_CORR_NOISE = 0.25
_IID_NOISE = 0.02
_SHEAR = 0.75


def mnist1d_templates() -> np.ndarray:
    """The ten digit templates, whitened, starting at 0 and divided by 6.

    Returns:
        float64 array of shape (10, 12); row ``c`` is digit ``c``.
    """
    x = np.asarray(_TEMPLATES, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    return (x - x[:, :1]) / 6.0


def _resample(x: np.ndarray, lengths: np.ndarray, points: int) -> np.ndarray:
    """Row ``i``'s first ``lengths[i]`` values resampled linearly onto ``points`` even points."""
    n = x.shape[0]
    pos = np.linspace(0.0, 1.0, points)[None, :] * (lengths[:, None] - 1)
    left = np.minimum(np.floor(pos).astype(np.int64), lengths[:, None] - 2)
    frac = pos - left
    rows = np.arange(n)[:, None]
    return (1.0 - frac) * x[rows, left] + frac * x[rows, left + 1]


def make_mnist1d_arrays(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` MNIST-1D signals (the recipe in the module docstring, before standardisation).

    Args:
        n: number of examples (>= 10); ``n // 10`` per class, the rest filled from the first classes.
        rng: the only source of randomness.

    Returns:
        ``(x, y)``: float64 array of shape (n, 40) and int64 labels of shape (n,), shuffled.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 10:
        raise ValueError(f"The 'n' parameter of make_mnist1d_arrays must be an int >= 10. Got {n!r}.")
    templates = mnist1d_templates()
    y = np.arange(n, dtype=np.int64) % 10
    y = y[rng.permutation(n)]
    m = templates.shape[1]
    padded = np.zeros((n, _WIDTH), dtype=np.float64)
    padded[:, :m] = templates[y] + 1e-8
    pad = _PAD_LOW + np.floor(rng.random(n) * (_PAD_HIGH - _PAD_LOW + 1)).astype(np.int64)
    x = _resample(padded, m + pad, _WIDTH)
    x *= 1.0 + _SCALE * (rng.random(n)[:, None] - 0.5)
    shift = rng.integers(0, _TRANSLATION, size=n)
    cols = (np.arange(_WIDTH)[None, :] - shift[:, None]) % _WIDTH
    x = np.take_along_axis(x, cols, axis=1)
    from scipy.ndimage import gaussian_filter1d

    corr = gaussian_filter1d(_CORR_NOISE * rng.standard_normal((n, _WIDTH)), 2.0, axis=1)
    x = np.where(x != 0, x, corr)
    x = x + _IID_NOISE * rng.standard_normal((n, _WIDTH))
    x = x - (_SHEAR * (rng.random(n)[:, None] - 0.5)) * np.linspace(-0.5, 0.5, _WIDTH)[None, :]
    x = _resample(x, np.full(n, _WIDTH, dtype=np.int64), _LENGTH)
    return x, y


def make_mnist1d(
    seed: int = 0,
    n_train: int = 8000,
    n_val: int = 2000,
    n_test: int = 2000,
    noise: float = 0.0,
) -> Any:
    """MNIST-1D split into train / validation / test, optionally with flipped training labels.

    Args:
        seed: seed of the generator (the data and the flips are a pure function of it).
        n_train, n_val, n_test: split sizes (each >= 10).
        noise: fraction of *training* labels replaced by a uniformly random different
            class, in [0, 1); validation and test labels stay clean.

    Returns:
        :class:`isample.bench.BenchData` with inputs of shape (n, 40) and 10 classes.
    """
    from .datasets import BenchData

    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 10:
            raise ValueError(f"The '{name}' parameter of make_mnist1d must be an int >= 10. Got {value!r}.")
    if isinstance(noise, bool) or not 0.0 <= float(noise) < 1.0:
        raise ValueError(f"The 'noise' parameter of make_mnist1d must be a float in [0, 1). Got {noise!r}.")
    rng = np.random.default_rng([int(seed), 1_940_040])
    x, y = make_mnist1d_arrays(n_train + n_val + n_test, rng)
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, None)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = ((x - mean) / std).astype(np.float32)
    y_train = y[tr].copy()
    flip = np.nonzero(rng.random(n_train) < float(noise))[0]
    y_train[flip] = (y_train[flip] + rng.integers(1, 10, size=flip.size)) % 10
    name = "mnist1d-noisy" if noise > 0 else "mnist1d"
    description = f"MNIST-1D generated locally: 40-point signals, 10 balanced classes, seed {seed}"
    if noise > 0:
        description += f", {noise:.0%} of training labels flipped (validation and test clean)"
    return BenchData(
        name=name,
        x_train=torch.from_numpy(x[tr]),
        y_train=torch.from_numpy(y_train),
        x_val=torch.from_numpy(x[va]),
        y_val=torch.from_numpy(y[va].copy()),
        x_test=torch.from_numpy(x[te]),
        y_test=torch.from_numpy(y[te].copy()),
        num_classes=10,
        description=description,
        info={"label_noise": float(noise), "flipped_train_labels": int(flip.size)},
    )
