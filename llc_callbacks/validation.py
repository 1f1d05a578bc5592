"""Argument checks that raise ``ValueError`` naming the argument and what it accepts."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    """Accept an integer (not a bool) of at least ``minimum``, or ``None`` if ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value: object, *, positive: bool) -> None:
    """Accept a finite real number, ``> 0`` if ``positive`` else ``>= 0``."""
    bound = "> 0" if positive else ">= 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Accept ``True`` or ``False`` only."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Accept one of ``choices`` (compared by identity for bools, so 1 is not True)."""
    if not any(value is c or (not isinstance(c, bool) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
