"""Command-line option values: Fire and ``monai.bundle run`` pass ``--flag false`` as the string "false"."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def as_bool(value: bool | int | str, name: str = "value") -> bool:
    """``value`` as a boolean: a bool, 1 / 0, or true/false, yes/no, on/off, 1/0 in any case.

    Anything else raises ``ValueError`` naming ``name``: a typo such as ``--overwrite flase`` must not
    silently mean ``True`` (a non-empty string is truthy).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{name}: expected true or false (yes/no, on/off, 1/0), got {value!r}")
