"""The bundle's user errors and how they end a command: one sentence, exit code 1, no traceback.

A user's bad input (a dataset problem, a misspelt option) is a :class:`UserError` whose message
names the file or the key and the problem. MONAI's config parser wraps whatever a ``$`` expression
raises in ``RuntimeError("Failed to evaluate ...")``, and a DataLoader re-raises a worker's
exception; :func:`find_user_error` digs the user's error out of such chains, and
:func:`report_user_errors` (the first ``initialize`` step of every config) makes an uncaught one end
``python -m monai.bundle run`` with its sentence alone, as ``python -m bundle`` does.

This module imports nothing of the bundle: every other module may raise these errors.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = [
    "NonFiniteError",
    "OptionError",
    "UserError",
    "WriteError",
    "find_user_error",
    "report_user_errors",
    "user_error_message",
]


class UserError(ValueError):
    """A user's bad input, with a message that names the file or option and the problem."""


class OptionError(UserError):
    """An option (a config key or command-line flag) with a value the bundle cannot read."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """The :class:`UserError` that ``err`` is or was raised from (explicitly or while handling), else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def user_error_message(err: UserError) -> str:
    """``error: <sentence>``, also for an error that a DataLoader worker raised.

    PyTorch re-raises a worker's exception as ``type(err)("Caught X in DataLoader worker ...
    Original Traceback ... X: <sentence>")``; the sentence is the traceback's last line.
    """
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return f"error: {type(err).__name__}"
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        return f"error: {last.split(': ', 1)[1] if ': ' in last else last}"
    return f"error: {lines[0]}"


def _close_progress_bars() -> None:
    """Close open tqdm bars (an interrupted run's), so the sentence is the last line, not a bar after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    user_error = find_user_error(value)
    if user_error is None:
        _previous_hook(kind, value, tb)
        return
    _close_progress_bars()
    print(user_error_message(user_error), file=sys.stderr)


_previous_hook = sys.excepthook


def report_user_errors() -> bool:
    """End the process with the sentence of an uncaught :class:`UserError` (exit code 1), no traceback.

    Installed as ``sys.excepthook``, which runs only for an exception that nothing caught, so a
    library caller (MONAI Label, a notebook, a test) still receives the exception itself; any other
    exception keeps its full traceback. Returns True (configs call it as an ``initialize`` step).
    """
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
    return True


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss or weight; nothing of it may be saved as a model."""


class DataError(UserError):
    """A user's dataset problem, with a message that names the file and the problem."""


class WriteError(UserError):
    """A file could not be written for a reason the user can fix: a full disk, a read-only mount, no permission."""
