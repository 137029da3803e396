"""Checks of the arguments a user passes, with messages that name the argument and what it got."""

from __future__ import annotations

from typing import Any


def require_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else ``ValueError`` naming ``name``.

    Example:
        >>> require_int("min_blocks", 100, 0)
        100
        >>> require_int("min_blocks", True, 0)
        Traceback (most recent call last):
        ...
        ValueError: min_blocks must be an int >= 0, got True
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def require_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    return value
