"""Argument checks shared by the Recorder, the quantities and the callbacks: one rule each, one message each."""

from __future__ import annotations

import math
import numbers
from typing import Any

from dynamics.errors import ArgumentTypeError, DynamicsError

DIRECTIONS = ("update", "gradient")


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (bools, floats and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise DynamicsError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def nonnegative_int(name: str, value: Any) -> int:
    """``value`` as an int >= 0 (bools, floats and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise DynamicsError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def optional_every(name: str, value: Any) -> int | None:
    """A quantity's schedule: None (every record step) or a positive integer."""
    return None if value is None else positive_int(name, value)


def direction(value: Any, allow_none: bool = False) -> str | None:
    """A probe direction: 'update' (along θt − θt−1) or 'gradient' (along −g)."""
    if value is None and allow_none:
        return None
    if value not in DIRECTIONS:
        raise DynamicsError(f"direction must be 'update' or 'gradient', got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """A True/False switch (1, 0 and strings refused: they hide typos)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def finite_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number, optionally within [low, high] (strings and bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DynamicsError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise DynamicsError(f"{name} must be in [{low}, {high}], got {value!r}")
    return value
