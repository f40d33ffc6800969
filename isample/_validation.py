"""Argument checks shared by every public constructor.

One message shape everywhere::

    The 'presample' parameter of PoolLoader must be a float >= 1. Got 0.5.

``TypeError`` for a wrong type, ``ValueError`` for a wrong value; ``bool`` is never
accepted where a number is meant.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "check_int",
    "check_float",
    "check_choice",
    "check_seed",
    "MAX_SEED",
    "param_error",
]


def param_error(
    name: str, owner: str, expected: str, got: Any, error: type[Exception] = ValueError
) -> Exception:
    """Return (not raise) an exception with the project's message shape."""
    return error(f"The '{name}' parameter of {owner} must be {expected}. Got {got!r}.")


def check_int(
    value: Any,
    name: str,
    owner: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """Validate an integer parameter and return it as ``int``."""
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, "an int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise param_error(name, owner, bounds + (" or None" if allow_none else ""), value, TypeError)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise param_error(name, owner, bounds, value)
    return value


def check_float(
    value: Any,
    name: str,
    owner: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """Validate a real parameter and return it as ``float``.

    NaN is always rejected, and so are ``+inf`` / ``-inf`` unless ``allow_inf`` is set (an
    infinite value is then still subject to the bounds): every numeric parameter has a
    finite range by default. A value too large to be exactly an IEEE double (an ``int``
    beyond ``1.8e308``) is rejected as infinite.

    Raises:
        TypeError: not a real number (``bool`` included), or None without ``allow_none``.
        ValueError: NaN, infinite (without ``allow_inf``) or outside the bounds.
    """
    if value is None and allow_none:
        return None
    text = _bounds_text(minimum, maximum, "a float", min_inclusive, max_inclusive)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise param_error(name, owner, text + (" or None" if allow_none else ""), value, TypeError)
    try:
        converted = float(value)
    except OverflowError:  # an int beyond the float range
        converted = math.inf if value > 0 else -math.inf
    if math.isnan(converted):
        raise param_error(name, owner, text, value)
    if math.isinf(converted) and not allow_inf:
        finite = _bounds_text(minimum, maximum, "a finite float", min_inclusive, max_inclusive)
        raise param_error(name, owner, finite + (" or None" if allow_none else ""), value)
    value = converted
    if minimum is not None and (value < minimum or (not min_inclusive and value == minimum)):
        raise param_error(name, owner, text, value)
    if maximum is not None and (value > maximum or (not max_inclusive and value == maximum)):
        raise param_error(name, owner, text, value)
    return value


def check_choice(value: Any, name: str, owner: str, choices: tuple) -> Any:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise param_error(name, owner, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


#: Largest seed accepted anywhere in isample: seeds are int64 values (``torch.Generator``,
#: DDP broadcast), so one rule holds everywhere: an int in ``[0, MAX_SEED]``.
MAX_SEED = 2**63 - 1


def check_seed(seed: Any, generator: Any, owner: str) -> int:
    """Resolve ``seed`` / ``generator`` into one seed in ``[0, 2**63 - 1]`` (:data:`MAX_SEED`).

    A ``torch.Generator`` is consumed once (one draw) at construction, so two objects built
    from generators in the same state get the same seed. With neither, a fresh seed is drawn
    from a new, nondeterministically seeded generator: global RNG state is never touched.
    An explicit seed must lie in ``[0, 2**63 - 1]``: it travels as an int64 under DDP, and a
    larger one would otherwise alias a smaller seed.

    Raises:
        TypeError: ``seed`` is not an int (``bool`` included) or ``generator`` not a Generator.
        ValueError: both given, or a seed outside ``[0, 2**63 - 1]``.
    """
    if seed is not None and generator is not None:
        raise ValueError(f"{owner} takes either 'seed' or 'generator', not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise param_error("generator", owner, "a torch.Generator or None", generator, TypeError)
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if seed is None:
        fresh = torch.Generator()
        fresh.seed()
        return int(torch.randint(0, 2**62, (1,), generator=fresh).item())
    return check_int(seed, "seed", owner, minimum=0, maximum=MAX_SEED)  # type: ignore[return-value]


def _bounds_text(
    minimum: float | None,
    maximum: float | None,
    kind: str,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> str:
    lo = ">=" if min_inclusive else ">"
    hi = "<=" if max_inclusive else "<"
    if minimum is not None and maximum is not None:
        left = "[" if min_inclusive else "("
        right = "]" if max_inclusive else ")"
        return f"{kind} in {left}{minimum}, {maximum}{right}"
    if minimum is not None:
        return f"{kind} {lo} {minimum}"
    if maximum is not None:
        return f"{kind} {hi} {maximum}"
    return kind
