"""Atomic file writes: a file appears under its final name complete, or not at all.

Everything the bundle writes for a later step to read (datalists, metrics tables, summaries,
segmentations) goes through :func:`atomic_path`: the data is written to a hidden temporary file in
the same folder, renamed over the final name when complete (``os.replace`` is atomic on one file
system) and removed if writing fails. Hidden, because folder scans (:func:`bundle.evaluation.files.find_segmentations`,
case discovery) skip hidden files, so a killed run's leftover is never taken for a result; the name
holds the process id, a random token and the host (:func:`temporary_name`), so two processes writing
the same file never share one, and a later run can tell a leftover whose writer is dead
(:func:`remove_stale_temporaries`) from a write in progress.

A write that fails because the disk is full, the folder read-only or not writable raises
:class:`bundle.errors.WriteError`: one sentence with the file and the cause (``no space left on
device``), not the writer's traceback.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bundle.errors import WriteError

logger = logging.getLogger(__name__)

#: a temporary name: ``.<final name>.<pid>-<8 hex>.<host>.partial<suffix>``; versions before the host was
#: part of it wrote ``.<final name>.<pid>-<8 hex>.partial<suffix>`` (group ``host`` empty). The host has no
#: dots, so the two never read as each other.
TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}(?:\.(?P<host>[A-Za-z0-9_-]+))?\.partial(?P<suffix>.*)$"
)
#: what a user can fix, and how the sentence says it
STORAGE_FAULTS = {
    errno.ENOSPC: "free some space there, or write elsewhere",
    errno.EDQUOT: "your disk quota is used up; free some space, or write elsewhere",
    errno.EROFS: "the file system is mounted read-only; write elsewhere",
    errno.EACCES: "you may not write in this folder; write elsewhere",
    errno.EPERM: "you may not write in this folder; write elsewhere",
}


def host_tag() -> str:
    """This machine's name as it goes into temporary names: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def temporary_name(final: str | Path, suffix: str = "") -> Path:
    """The hidden temporary file beside ``final`` that one write of this process uses (see :data:`TEMPORARY`)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.{host_tag()}.partial{suffix}")


def process_is_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's too); ``False`` only when it is gone."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # exists, another user's (an absurd pid is no process of ours either)
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files that killed writes of the bundle left in ``folder``; return them.

    Only regular files whose name is the bundle's own temporary pattern (:data:`TEMPORARY`; of the final
    file ``name`` only, when given), written on this machine (or by a version that did not record the
    machine), by a process that no longer runs. A write in progress, another machine's on a shared
    folder, and anything the bundle did not name are never touched. Each removal is logged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob.escape(name)}.*.partial*" if name else ".*.partial*"
    removed = []
    for path in folder.glob(pattern):
        match = TEMPORARY.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if match["host"] not in (None, host_tag()) or path.is_symlink() or not path.is_file():
            continue
        pid = int(match["pid"])
        if process_is_running(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another run removed it first
            continue
        removed.append(path)
        logger.info("removed %s: the temporary file of a write that process %d did not finish", path, pid)
    return removed


def write_error(path: str | Path, err: BaseException) -> WriteError | None:
    """The one sentence of a storage fault writing ``path`` (full disk, read-only, no permission), else ``None``.

    The fault is the first ``OSError`` with one of :data:`STORAGE_FAULTS`'s error numbers in ``err``'s
    chain: writers wrap it (PyTorch's ``torch.save`` raises a ``RuntimeError`` while handling Errno 28).
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in STORAGE_FAULTS:
            reason = (cause.strerror or os.strerror(cause.errno)).lower()
            return WriteError(f"{path}: cannot be written: {reason} ({STORAGE_FAULTS[cause.errno]})")
        cause = cause.__cause__ or cause.__context__
    return None


@contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; rename it to ``final`` when the block succeeds.

    ``suffix`` ends the temporary name (e.g. ``.nii.gz`` for a writer that picks the format from it).
    The folder is created if needed; the temporary file is removed whatever happens, and those that
    killed writes of ``final`` left are removed first (:func:`remove_stale_temporaries`). A full disk,
    a read-only or forbidden folder is a :class:`~bundle.errors.WriteError` naming ``final``.
    """
    final = Path(final)
    tmp = temporary_name(final, suffix)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, final.name)
        yield tmp
        os.replace(tmp, final)
    except Exception as err:
        error = write_error(final, err)
        if error is None:
            raise
        raise error from err
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (newlines as given); return the path."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(data: Any, output: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``output`` atomically; return the path."""
    return write_text_atomic(output, json.dumps(data, indent=2))


__all__ = [
    "TEMPORARY",
    "atomic_path",
    "host_tag",
    "process_is_running",
    "remove_stale_temporaries",
    "temporary_name",
    "write_error",
    "write_json_atomic",
    "write_text_atomic",
]
