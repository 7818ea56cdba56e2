"""Argument checks shared by the whole package: a bad value raises ``ValueError`` naming the argument and what
it accepts. Every check takes ``(name, value, ...)`` and returns the value converted (``int``, ``float``).

Example:
    >>> check_int("every_n_steps", 10)
    10
    >>> check_fraction("threshold", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: `threshold` must be a number in [0, 1], got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from numbers import Integral, Real

from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite_real",
    "check_fraction",
    "check_int",
    "check_names",
    "check_nonnegative",
    "check_positive_int",
    "check_tensor",
]


def check_int(name: str, value: object, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int, unless it is not an int (bools excluded) of at least ``minimum`` (None if allowed).

    Raises:
        ValueError: naming ``name`` and what it accepts.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        accepted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {accepted}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: object, allow_none: bool = False) -> int | None:
    """``check_int(name, value, 1, allow_none)``: an int >= 1."""
    return check_int(name, value, 1, allow_none)


def check_fraction(name: str, value: object, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, unless it is not a real number in [0, 1] (ends open as asked).

    Raises:
        ValueError: naming ``name`` and the accepted interval.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)


def check_finite_real(name: str, value: object) -> float:
    """``value`` (a real number, or a one-element real tensor) as a float, unless it is not finite."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float, unless it is not a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 <= float(value) < math.inf):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Collection) -> object:
    """``value``, unless it is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value``, unless it is not ``True`` or ``False``.

    Raises:
        ValueError: naming ``name``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_names(name: str, value: object, what: str) -> list[str] | None:
    """``value`` as a list of strings (or None), unless it is a lone string or holds anything but strings.

    Args:
        name: the argument's name.
        value: a sequence of names, or None.
        what: what the names name, for the message (``"parameter or module names"``).

    Raises:
        ValueError: naming ``name`` and ``what`` it accepts.
    """
    if value is None:
        return None
    names = None if isinstance(value, str) or not isinstance(value, Iterable) else list(value)
    if names is None or not all(isinstance(item, str) for item in names):
        raise ValueError(f"`{name}` must be a list of {what} or None, got {value!r}")
    return names


def check_tensor(name: str, value: object) -> Tensor:
    """``value``, unless it is not a tensor."""
    if not isinstance(value, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value
