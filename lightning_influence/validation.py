"""Argument checks shared by every stage, with errors that name the argument and the value."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive integer (or None).

    Example:
        >>> check_positive_int("rank", 4)
        >>> check_positive_int("rank", None, allow_none=True)
    """
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive integer{extra}, got {value!r}.")
