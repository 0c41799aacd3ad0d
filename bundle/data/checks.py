"""Case checks: every problem of a user's case is one sentence naming the file, before any long work.

:func:`check_case` compares the modalities' headers (shape, affine), decodes every voxel (truncated
files, NaN / Inf) and checks the label values of the case's layout; :func:`check_cases` runs it over a
dataset on a few threads.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bundle.constants import (
    LABEL_SCHEMES,
    MODALITIES,
    MSD_CHANNEL_ORDER,
)
from bundle.data.io import _read_label_values, read_header, read_voxels
from bundle.data.layouts import Case
from bundle.errors import DataError

logger = logging.getLogger(__name__)


def check_case(case: Case, affine_atol: float = 1e-3, check_labels: bool = True, decode: bool = True) -> None:
    """Raise :class:`DataError` naming the file if a case cannot be used.

    Checks: every modality present and readable, 3-D images of one shape and affine (within
    ``affine_atol``, in mm), a 4-D MSD image with 4 channels, a label of the image's shape and
    affine whose values belong to the layout's label scheme; then every voxel of every file is
    decoded once (:func:`read_voxels`: truncated data, NaN / Inf). The headers come first, so the
    cheap checks answer before the voxels of a real BraTS case are decoded. A modality whose every voxel
    is 0 is logged as a warning naming its file (the network would see it blank); a case with no voxel
    above 0 in any modality is an error, its brain mask (the voxels above 0) being empty. ``decode=False``
    checks the headers and label values only: inference decodes each image once, in its loader, which
    makes the same voxel checks naming the file (:class:`bundle.transforms.LoadCaseImaged`).
    """
    if case.problems:
        raise DataError(case.problems[0])
    if case.layout == "msd":
        assert isinstance(case.image, str)
        image = read_header(case.image)
        if image.ndim != 4 or image.shape[3] != len(MSD_CHANNEL_ORDER):
            raise DataError(
                f"{case.image}: expected a 4-D image with {len(MSD_CHANNEL_ORDER)} channels "
                f"({', '.join(MSD_CHANNEL_ORDER)}), got shape {image.shape}"
            )
        ref_path, ref_shape, ref_affine = case.image, image.shape[:3], image.affine
    else:
        assert isinstance(case.image, list)
        ref_path, ref_shape, ref_affine = "", None, None
        for modality, path in zip(MODALITIES, case.image):
            image = read_header(path)
            if image.ndim != 3:
                raise DataError(f"{path}: expected a 3-D {modality} volume, got shape {image.shape}")
            if ref_shape is None:
                ref_path, ref_shape, ref_affine = path, image.shape, image.affine
            elif image.shape != ref_shape:
                raise DataError(f"{path}: shape {image.shape} differs from {ref_path} {ref_shape}")
            elif not np.allclose(image.affine, ref_affine, atol=affine_atol):
                raise DataError(f"{path}: affine differs from {ref_path} by more than {affine_atol} mm")
    if case.label is not None and check_labels:
        _check_label_header(case.label, ref_path, ref_shape, ref_affine, affine_atol)
    if decode:
        _check_intensities(case)
    if case.label is not None and check_labels:
        _check_label_values(case.label, case.layout)


def _check_intensities(case: Case) -> None:
    """Decode every image voxel (:func:`read_voxels`); warn of a blank modality, refuse a case without a brain.

    The preprocessing crops each case to its voxels above 0 in any modality (the skull-stripped brain),
    and inference sets everything outside them to background: with none, there is nothing to segment or
    train on. A modality that is 0 everywhere (an empty export, a failed conversion) still gives a
    brain from the others, but the network sees it blank: said once, naming the file.
    """

    def volumes() -> Iterator[tuple[str, str, np.ndarray]]:
        """(file, modality, voxels), one modality at a time: a case's four volumes are never all in memory."""
        if isinstance(case.image, str):  # MSD: one 4-D file, its channels in MSD's order
            data = read_voxels(case.image)
            yield from ((case.image, name, data[..., c]) for c, name in enumerate(MSD_CHANNEL_ORDER))
        else:
            yield from ((path, name, read_voxels(path)) for path, name in zip(case.image, MODALITIES, strict=True))

    brain = False
    for path, modality, voxels in volumes():
        if not np.any(voxels):
            logger.warning(
                "%s: every voxel of this %s volume is 0 (an empty or failed export?); case %s goes on with a blank %s",
                path,
                modality,
                case.case_id,
                modality,
            )
        brain = brain or bool(np.any(voxels > 0))
    if not brain:
        where = case.image if isinstance(case.image, str) else str(Path(case.image[0]).parent)
        raise DataError(
            f"{where}: no voxel of any modality of case {case.case_id} is above 0, so its brain mask (the voxels "
            "above 0) is empty and there is nothing to segment"
        )


def _check_label_header(
    path: str, ref_path: str, ref_shape: Sequence[int], ref_affine: np.ndarray, affine_atol: float
) -> None:
    label = read_header(path)
    if tuple(label.shape[:3]) != tuple(ref_shape) or (label.ndim == 4 and label.shape[3] != 1) or label.ndim > 4:
        raise DataError(f"{path}: label shape {label.shape} differs from image {ref_path} {tuple(ref_shape)}")
    if not np.allclose(label.affine, ref_affine, atol=affine_atol):
        raise DataError(f"{path}: label affine differs from image {ref_path} by more than {affine_atol} mm")


def _check_label_values(path: str, layout: str) -> None:
    values = _read_label_values(path)
    allowed = LABEL_SCHEMES[layout]
    unknown = [v for v in values.tolist() if v not in allowed]
    if unknown:
        raise DataError(
            f"{path}: unknown label values {unknown} for the {layout} layout (expected a subset of {sorted(allowed)})"
        )


def check_cases(
    cases: Sequence[Case],
    check_labels: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
    num_threads: int | None = None,
    decode: bool = True,
) -> list[Case]:
    """Check every case (:func:`check_case`) on ``num_threads`` threads; return the usable ones in order.

    Decoding gzip and scanning arrays release the GIL, so threads check cases side by side
    (default: one per core, at most 8). The first bad case in dataset order raises its
    :class:`DataError`; with ``skip_bad`` bad cases are left out with a warning instead.
    ``progress`` shows a bar for 20 cases or more.
    """
    threads = max(1, min(8, os.cpu_count() or 1) if num_threads is None else num_threads)

    def problem(case: Case) -> DataError | None:
        try:
            check_case(case, check_labels=check_labels, decode=decode)
        except DataError as err:
            return err
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = tqdm(
            pool.map(problem, cases),
            total=len(cases),
            desc="checking cases",
            unit="case",
            disable=not progress or len(cases) < 20,
        )
        good: list[Case] = []
        for case, err in zip(cases, results):
            if err is None:
                good.append(case)
            elif skip_bad:
                warnings.warn(f"skipping case {case.case_id}: {err}", stacklevel=2)
            else:
                pool.shutdown(cancel_futures=True)
                raise err
    return good
