"""Reading image files: headers (shape, affine, spacing) and voxels, NIfTI with ISA-L gzip, the rest through ITK.

:func:`read_header` reads what the case checks compare without decoding voxels; :func:`read_voxels`
decodes every voxel (the checks' truncation test); :func:`load_nifti` is the one NIfTI decoder of the
bundle (checks and :class:`bundle.transforms.ConcurrentNibabelReader`), gzip by ISA-L.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip

from bundle.data.layouts import is_dicom_series, is_nifti
from bundle.errors import DataError

# ------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class ImageHeader:
    """What the case checks need of an image without its voxels: shape, RAS affine (as MONAI reads it), spacing."""

    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, ...]

    @property
    def ndim(self) -> int:
        """Number of array dimensions (a vector-valued ITK image counts its components as the last one)."""
        return len(self.shape)


def _itk_header(path: Path) -> ImageHeader:
    """The header of an NRRD / MetaImage file through ITK's ImageIO, voxels not read.

    ITK's physical space is LPS, NIfTI's and MONAI's RAS: the affine is flipped by MONAI's
    ``orientation_ras_lps``, as MONAI's ``ITKReader`` does (imported here: ``bundle.data`` stays
    importable without torch and MONAI).
    """
    import itk
    from monai.data.utils import orientation_ras_lps

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DataError(f"{path}: ITK has no reader for this file")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    ndim = io.GetNumberOfDimensions()
    spacing = [float(io.GetSpacing(i)) for i in range(ndim)]
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = np.array([list(io.GetDirection(i)) for i in range(ndim)]).T @ np.diag(spacing)
    affine[:ndim, ndim] = [float(io.GetOrigin(i)) for i in range(ndim)]
    if ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got {ndim} dimensions (4-D images are read from NIfTI)")
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    components = int(io.GetNumberOfComponents())
    return ImageHeader(shape + ((components,) if components > 1 else ()), orientation_ras_lps(affine), tuple(spacing))


def _dicom_series_check(folder: Path) -> None:
    """One sentence unless ``folder`` holds exactly one DICOM series (ITK would read the first of several)."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # as MONAI's ITKReader groups a folder
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if len(series) != 1:
        raise DataError(f"{folder}: expected one DICOM series in the folder, found {len(series)}")


def _itk_volume(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxels ``(x, y, z[, components])`` and MONAI's metadata of an ITK-read file or DICOM series folder."""
    from monai.data import ITKReader

    reader = ITKReader()
    return reader.get_data(reader.read(str(path)))


def read_header(path: str | Path) -> ImageHeader:
    """The header of an image file or DICOM series folder; :class:`DataError` naming it if it cannot be read.

    NIfTI headers are read by nibabel and NRRD / MetaImage headers by ITK's ImageIO, neither decoding the
    voxels; a DICOM series folder is read whole by MONAI's ITKReader (its geometry comes from all slices).
    """
    p = Path(path)
    if p.is_dir():
        if not is_dicom_series(p):
            raise DataError(f"{p}: the folder holds no DICOM files")
        _dicom_series_check(p)
        try:
            data, meta = _itk_volume(p)
        except Exception as err:
            raise DataError(f"{p}: the DICOM series cannot be read ({type(err).__name__}: {err})") from err
        affine = np.asarray(meta["affine"], dtype=float)
        return ImageHeader(tuple(data.shape), affine, tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)))
    if not p.is_file():
        raise DataError(f"{p}: file does not exist")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    try:
        if is_nifti(p):
            image = nib.load(str(p))
            zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
            return ImageHeader(tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=float), zooms)
        return _itk_header(p)
    except DataError:
        raise
    except Exception as err:  # nibabel and ITK raise several types for corrupt files
        kind = "NIfTI file" if is_nifti(p) else "image file (NRRD / MetaImage through ITK)"
        raise DataError(f"{p}: not a readable {kind} ({type(err).__name__}: {err})") from err


def load_nifti(path: str | os.PathLike) -> Any:
    """One NIfTI image (nibabel's) with its voxels in memory: ``.gz`` decompressed by ISA-L, else ``nibabel.load``.

    ISA-L (python-isal) decodes these files faster than zlib (docs/benchmarks/code_notes.md) and
    releases the GIL, so the files of a case decode at once in threads
    (``bundle.transforms.ConcurrentNibabelReader``, which also corrects the header as MONAI's reader
    does). The case checks (:func:`read_voxels`) decode with it too.
    """
    name = str(path)
    if not name.endswith(".gz"):
        return nib.load(name)
    with open(name, "rb") as handle:
        raw = igzip.decompress(handle.read())
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        header_size = image_class.header_class.sizeof_hdr
        if image_class.header_class.may_contain_header(raw[:header_size]):
            return image_class.from_bytes(raw)
    raise ValueError(f"{name}: not a NIfTI-1 or NIfTI-2 image")


def read_voxels(path: str | Path, what: str = "image") -> np.ndarray:
    """Decode every voxel of ``path``; raise :class:`DataError` if it cannot be or holds NaN / Inf.

    A header can be intact over truncated or corrupt data (an interrupted copy of a ``.nii.gz``),
    and NaN or infinite intensities would flow silently through normalisation into NaN
    probabilities, NaN losses and NaN weights; both are found here (:func:`refuse_non_finite`),
    before any long work. The reader is
    the one training and inference use (:func:`image_reader`), so the array is the one they see.
    """
    try:
        data = np.asarray(load_nifti(path).dataobj) if is_nifti(path) else _itk_volume(Path(path))[0]
    except Exception as err:  # zlib, EOFError, nibabel's and ITK's own: whatever a damaged file raises
        raise DataError(f"{path}: {what} data cannot be decoded ({type(err).__name__}: {err})") from err
    refuse_non_finite(data, path)
    return data


def refuse_non_finite(data: np.ndarray, path: str | Path) -> None:
    """Raise :class:`DataError` naming ``path`` if ``data`` holds NaN or infinite voxels (one pass over them).

    The one NaN / Inf check of the bundle: the case checks (:func:`read_voxels`) and the loader
    (:class:`bundle.transforms.LoadCaseImaged`) both call it. Integer data cannot hold non-finite
    values and is not scanned.
    """
    if data.dtype.kind in "fc":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(f"{path}: {bad} of {data.size} voxels are not finite (NaN or Inf)")


def _read_label_values(path: str) -> np.ndarray:
    data = read_voxels(path, "label")
    if data.dtype.kind in "ui" and data.size:
        # Label maps hold a few small integers: testing each value of the range is much faster
        # than np.unique's sort of a whole 240 x 240 x 155 volume (checking 1251 BraTS cases).
        low, high = int(data.min()), int(data.max())
        if high - low < 32:
            return np.array([v for v in range(low, high + 1) if (data == v).any()], dtype=np.int64)
    return np.unique(data)
