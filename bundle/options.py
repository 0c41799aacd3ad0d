"""How the bundle reads option values: one rule for booleans, whichever way they arrive.

``python -m bundle CMD --tta false`` (Fire) and ``python -m monai.bundle run ... --tta false``
both hand the *string* ``"false"`` to the code, and ``bool("false")`` is ``True``. Every boolean key
of every config and every boolean flag of the command line is therefore read by :func:`as_bool`
(configs as ``$bundle.options.as_bool(@tta, 'tta')``), and a value it does not know is an
:class:`bundle.errors.OptionError` naming the key, never a guess.
"""

from __future__ import annotations

from typing import Any

from bundle.errors import OptionError

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "as_bool"]

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def as_bool(value: Any, name: str = "value") -> bool:
    """Read ``value`` of option ``name`` as a boolean.

    Accepts ``True``/``False``, the integers 1/0 and, in any letter case, the strings
    true/false, yes/no, on/off, 1/0. Anything else (``None``, ``"ture"``, ``2``, a list) raises
    :class:`~bundle.errors.OptionError` with one sentence naming the option.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return as_bool(value.item(), name)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise OptionError(f"{name}: {value!r} is not a boolean; use one of true/false, yes/no, on/off, 1/0")


def check_flags(**flags: Any) -> dict[str, bool]:
    """Read every ``name=value`` with :func:`as_bool`; a config's first ``initialize`` steps call it.

    Each boolean key is read again where it is used; reading them all up front makes a misspelt
    value stop the run before any case is read or any folder is made.
    """
    return {name: as_bool(value, name) for name, value in flags.items()}
