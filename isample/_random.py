"""Deterministic per-step random streams derived from (seed, epoch, step).

Every draw of isample's loaders uses a fresh ``torch.Generator`` seeded from a hash of
``(seed, epoch, step)``. The random numbers of a batch are thus a pure function of where
it sits in training, independent of prefetching, worker count or resume point.
"""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "permutation", "step_generator"]

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 chain).

    Args:
        parts: non-negative ints below ``2**64`` (a seed in ``[0, 2**63 - 1]``, epoch,
            step, stream, ...).

    Returns:
        int in ``[0, 2**63)``, a pure function of ``parts``.

    Raises:
        ValueError: a part outside ``[0, 2**64)``; it would alias another value after the
            64-bit mixing (e.g. ``2**64 + 5`` and ``5``), so it is refused instead.
    """
    h = 0x243F6A8885A308D3
    for part in parts:
        value = int(part)
        if value < 0 or value > _MASK:
            raise ValueError(
                f"derive_seed takes ints in [0, 2**64 - 1] (seeds in [0, 2**63 - 1]); got {value}."
            )
        h = _splitmix64(h ^ value)
    return h >> 1


def step_generator(seed: int, epoch: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` for one step, seeded from ``(seed, epoch, step, stream)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, epoch, step, stream))
    return g


#: The stream id of the uniform epoch permutations: the ``uniform`` scheme reads them, and so
#: does a switched pool loader (Algorithm 1) while importance sampling is off, so that a
#: switched scheme that never switches on trains on exactly uniform's batches.
UNIFORM_STREAM = 11


def permutation(n: int, seed: int, *parts: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` (LongTensor), a pure function of ``(seed, *parts)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *parts))
    return torch.randperm(n, generator=g)
