"""The files evaluation reads and writes: segmentation folders, label maps and metrics tables.

Shared by the evaluation reports and plots, cross-validation (:mod:`bundle.integrations.cv`) and the
per-epoch CSV of validation (:mod:`bundle.evaluation.handlers`)
(so none of them imports another for its file handling). Tables are written atomically
(:mod:`bundle.atomic`), floats as the shortest text that reads back exactly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bundle.atomic import write_text_atomic
from bundle.data import IMAGE_SUFFIXES, image_stem, read_header, read_voxels
from bundle.data.labels import scheme_values, to_internal, unknown_label_values

_SEG_TAGS = ("_seg", "-seg", "_label", "-label", "_pred", "-pred")


def case_id_from_path(path: str | Path) -> str:
    """Case identifier of a segmentation file: its name without ``.nii[.gz]`` and a ``_seg``-like tag.

    ``BraTS2021_00000_seg.nii.gz`` and ``BraTS2021_00000.nii.gz`` both give ``BraTS2021_00000``, so a
    prediction folder pairs with a BraTS ground-truth folder whatever the prediction files' tag.
    """
    name = image_stem(Path(path).name)
    for tag in _SEG_TAGS:
        if name.endswith(tag):
            return name[: -len(tag)]
    return name


def find_segmentations(folder: str | Path) -> dict[str, Path]:
    """Map case id -> segmentation file for a flat folder of label maps or a BraTS-style case-folder tree.

    In a case-folder tree (``<case>/<case>_seg.nii.gz`` next to the images) only files tagged as
    segmentations are taken; in a flat folder every NIfTI file is a case.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    # hidden files are never cases: temporary files of atomic writes (a killed run leaves one) and macOS's ._ files
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name.endswith(IMAGE_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    tagged = [p for p in files if any(image_stem(p.name).endswith(t) for t in _SEG_TAGS)]
    chosen = tagged if any(p.parent != folder for p in files) else files
    found: dict[str, Path] = {}
    for path in chosen:
        case = case_id_from_path(path)
        if case in found:
            raise ValueError(f"{folder}: two segmentations for case {case!r}: {found[case]} and {path}")
        found[case] = path
    if not found:
        raise FileNotFoundError(f"{folder}: no segmentation files (NIfTI, NRRD, MetaImage) found")
    return found


def read_label_map(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Read a label map as it is on disk: ``(integer values, spacing_mm, affine)``.

    NIfTI, NRRD or MetaImage, each through the reader the case checks and the loader use
    (:func:`bundle.data.image_reader`). Raises ``ValueError`` naming the file if it cannot be read, is
    truncated, holds NaN / Inf or non-integer values, or is not 3-D.
    """
    header = read_header(path)  # a DataError is a ValueError: one sentence naming the file
    data = read_voxels(str(path), "label map")  # truncated data and NaN / Inf
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    if not np.allclose(data, np.round(data)):
        raise ValueError(f"{path}: label map holds non-integer values")
    return np.round(data).astype(np.int64), header.spacing, header.affine


def load_label_map(path: str | Path, label_scheme: str) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Load a label map (:func:`read_label_map`) and map its values onto the internal labels.

    Returns ``(labels, spacing_mm, affine)``. Raises ``ValueError`` naming the file if it holds a value the
    scheme does not know (e.g. a BraTS 2021 file read with the ``brats2023`` scheme).
    """
    known = scheme_values(label_scheme)
    data, spacing, affine = read_label_map(path)
    unknown = unknown_label_values(data, label_scheme)
    if unknown:
        raise ValueError(f"{path}: label values {unknown} are not in the {label_scheme!r} scheme {sorted(known)}")
    return to_internal(data, label_scheme).astype(np.uint8), spacing, affine


def write_metrics_csv(rows: Sequence[dict], path: str | Path) -> None:
    """Write per-case rows to CSV (columns: ``case``, ``region``, then every metric), atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    first = [c for c in ("case", "region") if c in columns]
    columns = first + [c for c in columns if c not in first]
    _write_csv(rows, columns, path)


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Read a ``metrics.csv``: numbers become floats, ``case`` and ``region`` stay strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"case", "region"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path}: not a metrics table (expected the columns 'case' and 'region' of a metrics.csv "
                    "from python -m bundle evaluate or cv)"
                )
            rows = []
            for row in reader:
                rows.append({k: (v if k in ("case", "region") else _to_float(v)) for k, v in row.items()})
    except (UnicodeDecodeError, csv.Error) as err:
        # a binary file (an image, a checkpoint) given by mistake: name it, not the codec's byte offset
        raise ValueError(f"{path}: not a metrics table (not CSV text: {type(err).__name__})") from None
    return rows


def write_metrics_table(rows: Sequence[dict], path: str | Path) -> None:
    """Write any list of flat dicts (a comparison, the per-epoch log) as CSV, atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    _write_csv(rows, columns, path)


def _to_float(value: str) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _csv_value(value: object) -> object:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # shortest text that round-trips exactly
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_csv(rows: Sequence[dict], columns: list[str], path: str | Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: _csv_value(r.get(k, "")) for k in columns} for r in rows])
    write_text_atomic(path, buffer.getvalue())
