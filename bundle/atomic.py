"""Atomic file writes: a file appears under its final name complete, or not at all.

Everything the bundle writes for a later step to read (datalists, metrics tables, summaries,
segmentations) goes through :func:`atomic_path`: the data is written to a hidden temporary file in
the same folder, renamed over the final name when complete (``os.replace`` is atomic on one file
system) and removed if writing fails. Hidden, because folder scans (:func:`bundle.evaluation.files.find_segmentations`,
case discovery) skip hidden files, so a killed run's leftover is never taken for a result; the name
holds the process id and a random token, so two processes writing the same file never share one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; rename it to ``final`` when the block succeeds.

    ``suffix`` ends the temporary name (e.g. ``.nii.gz`` for a writer that picks the format from it).
    The folder is created if needed; the temporary file is removed whatever happens.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
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


__all__ = ["atomic_path", "write_json_atomic", "write_text_atomic"]
