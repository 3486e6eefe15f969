"""Numbers in configs and requests: ``bool`` is an ``int`` in Python, so ``True`` must not pass as 1.

One place for the test every range check starts with (engine, allocator, experiment and request
settings alike); numpy scalars pass, as the numbers they are.
"""
from __future__ import annotations

from numbers import Integral, Real


def is_int(v) -> bool:
    """A whole number given as one (not a bool, not a float)."""
    return isinstance(v, Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A number (int or float, not a bool); finiteness is the caller's range check."""
    return isinstance(v, Real) and not isinstance(v, bool)
