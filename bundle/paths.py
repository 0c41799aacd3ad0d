"""Where the bundle's files are: the bundle root, config files, the demo folder, output names.

One rule for config paths, the one ``python -m monai.bundle run`` follows: it runs with the working
directory as the bundle root, and the configs name each other bundle-relatively (``%configs/train.yaml::...``).
So a relative config path always means a file under :data:`BUNDLE_ROOT`, whatever the caller's working
directory; an absolute path is taken as it is. Workflows are parsed inside :func:`working_directory`
(:data:`BUNDLE_ROOT`) so the configs' own relative references follow the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: the bundle root (``configs/``, ``models/``, ``data/``): the repository this package lives in
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: MONAI's logging configuration of the bundle
LOGGING_CONF = BUNDLE_ROOT / "configs" / "logging.conf"


def resolve_config_files(config_file: str | Path | Sequence[str | Path]) -> list[str]:
    """Absolute paths of one or several config files: relative ones are under :data:`BUNDLE_ROOT`."""
    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file)
    return [str(Path(f) if Path(f).is_absolute() else BUNDLE_ROOT / f) for f in files]


@contextmanager
def working_directory(path: str | Path) -> Iterator[None]:
    """Run the block with ``path`` as the working directory (and return to the previous one after).

    The configs reference each other by bundle-relative paths (MONAI macros ``%configs/...``), so
    workflows are parsed from the bundle root, as ``monai.bundle run`` is.
    """
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def output_path(output_dir: str | Path, name: str, postfix: str, ext: str = ".nii.gz") -> Path:
    """The final name of one output, ``<output_dir>/<name>_<postfix><ext>`` (what inference writes)."""
    return Path(output_dir) / f"{name}_{postfix}{ext}"


__all__ = ["BUNDLE_ROOT", "LOGGING_CONF", "output_path", "resolve_config_files", "working_directory"]
