"""Dataset discovery, case checks, datalists with folds, and the embedded demo phantoms.

Three layouts are recognised and mapped onto one convention (``bundle.constants``):

* ``brats2021`` (BraTS 2018-2021): ``CASE/CASE_{t1,t1ce,t2,flair}.nii.gz`` (+ ``CASE_seg.nii.gz``);
* ``brats2023`` (BraTS 2023+): ``CASE/CASE-{t1n,t1c,t2w,t2f}.nii.gz`` (+ ``CASE-seg.nii.gz``);
* ``msd`` (Decathlon Task01): ``imagesTr/*.nii.gz`` 4-D (FLAIR, T1w, T1gd, T2w) + ``labelsTr``.

Files may be NIfTI (``.nii.gz``, ``.nii``), NRRD (``.nrrd``, 3D Slicer's ``.seg.nrrd``) or MetaImage
(``.mha``, ``.mhd``), and a modality of a case may be a folder holding one DICOM series
(``CASE/CASE_flair/`` or ``CASE/flair/``). :func:`image_reader` picks the MONAI reader of every file the
same way wherever a case is read (checks here, ``bundle.transforms.ThreadUnsafeLoadImaged`` in training,
inference and MONAI Label, evaluation): NIfTI through nibabel, everything else through ITK.

Every datalist item is ``{"case_id", "layout", "image", "label"?, "fold"?}`` where ``image`` is
either the four files in the canonical order (T1, T1ce, T2, FLAIR) or one 4-D file; the
``layout`` key tells :class:`bundle.transforms.ToInternalConventiond` how to reorder channels
and map label values. MONAI's ``load_decathlon_datalist`` reads the JSON back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip
from tqdm import tqdm

from bundle.atomic import write_json_atomic
from bundle.constants import (
    BRATS2021_SUFFIXES,
    BRATS2023_SUFFIXES,
    LABEL_SCHEMES,
    MODALITIES,
    MSD_CHANNEL_ORDER,
)
from bundle.errors import UserError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Read through ITK: NRRD (3D Slicer's volumes and segmentations) and MetaImage. ``.seg.nrrd`` comes first
#: so that ``CASE_seg.seg.nrrd`` loses the whole suffix.
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
#: MONAI reader names (``LoadImage``'s registry): NIfTI stays on nibabel, which is as fast as ITK for it
#: and is what every earlier version used (docs/ecosystem.md, "Image formats"); ITK reads the rest.
NIFTI_READER, ITK_READER = "NibabelReader", "ITKReader"
LAYOUTS = ("brats2021", "brats2023", "msd")


class DataError(UserError):
    """A user's dataset problem, with a message that names the file and the problem."""


@dataclass
class Case:
    """One case as found on disk, before any check."""

    case_id: str
    layout: str
    image: list[str] | str
    label: str | None = None
    problems: list[str] = field(default_factory=list)

    def to_item(self) -> dict[str, Any]:
        """Return the datalist item for this case."""
        item: dict[str, Any] = {"case_id": self.case_id, "layout": self.layout, "image": self.image}
        if self.label is not None:
            item["label"] = self.label
        return item


# --------------------------------------------------------------------------------------- discovery


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` / ``.nii.gz``), read by nibabel."""
    return str(path).endswith(NIFTI_SUFFIXES)


def image_stem(name: str) -> str:
    """A file name without its image suffix (``CASE_t1.nii.gz``, ``CASE_t1.nrrd`` -> ``CASE_t1``)."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_reader(path: str | Path | Sequence[str | Path]) -> str:
    """The MONAI reader for a file, a DICOM series folder or the files of one case: nibabel for NIfTI, else ITK.

    Made explicit because MONAI's automatic choice depends on what is installed: with pynrrd or pydicom
    present (MONAI Label's venv has them) ``LoadImage`` would read NRRD or DICOM with other readers than
    the bundle's checks used.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return NIFTI_READER if paths and all(is_nifti(p) for p in paths) else ITK_READER


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"  # the DICOM preamble
    except OSError:
        return False


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files (one series per modality, read by ITK)."""
    folder = Path(path)
    return folder.is_dir() and any(p.is_file() and _is_dicom_file(p) for p in folder.iterdir())


def _entry_stem(path: Path) -> str | None:
    """The name of a possible image entry of a case folder (a file with an image suffix, or a folder), else None."""
    if path.name.startswith("."):  # macOS's ._ files, temporary files of atomic writes
        return None
    if path.is_dir():
        return path.name
    if path.is_file() and path.name.endswith(IMAGE_SUFFIXES):
        return image_stem(path.name)
    return None


def _matches(stem: str, separator: str, suffix: str) -> bool:
    """``CASE<separator><suffix>`` (BraTS naming), or the modality's name alone (``flair/``, ``t1.nrrd``)."""
    return stem.endswith(separator + suffix) or stem == suffix


def _brats_file(case_dir: Path, separator: str, suffix: str) -> Path | None:
    """Find the one image (a file or a DICOM series folder) of modality ``suffix`` in ``case_dir``, else None."""
    hits = []
    for path in case_dir.iterdir():
        stem = _entry_stem(path)
        # a folder counts when its name matches and it holds DICOM files: checked after the cheap name test
        if stem is not None and _matches(stem, separator, suffix) and (path.is_file() or is_dicom_series(path)):
            hits.append(path)
    if len(hits) > 1:
        names = ", ".join(sorted(p.name for p in hits))
        raise DataError(f"{case_dir}: several files match modality '{suffix}' ({names})")
    return hits[0] if hits else None


def _case_dir_layout(case_dir: Path) -> str | None:
    """Return the BraTS layout of a single case folder, or None if it is not one."""
    entries = [(path, stem) for path in case_dir.iterdir() if (stem := _entry_stem(path)) is not None]
    for layout, separator, suffixes in (
        ("brats2021", "_", BRATS2021_SUFFIXES),
        ("brats2023", "-", BRATS2023_SUFFIXES),
    ):
        found = 0
        for modality in MODALITIES:
            found += any(
                _matches(stem, separator, suffixes[modality]) and (path.is_file() or is_dicom_series(path))
                for path, stem in entries
            )
        # Two distinctive modalities are enough to recognise the layout; missing ones are
        # reported per file by the case check, not silently treated as "not a case".
        if found >= 2:
            return layout
    return None


def detect_layout(dataset_dir: str | Path) -> str:
    """Return ``brats2021``, ``brats2023``, ``msd`` or ``case`` (a single BraTS case folder)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return "msd"
    if _case_dir_layout(root) is not None:
        return "case"
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        layout = _case_dir_layout(sub)
        if layout is not None:
            return layout
    raise DataError(
        f"{root}: no BraTS 2021 (CASE/CASE_t1.nii.gz ...), BraTS 2023 (CASE/CASE-t1n.nii.gz ...) "
        "or Decathlon (imagesTr/, labelsTr/) layout found"
    )


def _brats_case(case_dir: Path, layout: str) -> Case:
    separator, suffixes = ("_", BRATS2021_SUFFIXES) if layout == "brats2021" else ("-", BRATS2023_SUFFIXES)
    images: list[str] = []
    problems: list[str] = []
    for modality in MODALITIES:
        path = _brats_file(case_dir, separator, suffixes[modality])
        if path is None:
            problems.append(
                f"{case_dir / (case_dir.name + separator + suffixes[modality] + '.nii.gz')}: "
                f"missing modality {modality}"
            )
            images.append("")
        else:
            images.append(str(path))
    seg = _brats_file(case_dir, separator, suffixes["seg"])
    return Case(case_dir.name, layout, images, str(seg) if seg else None, problems)


def _msd_cases(root: Path) -> list[Case]:
    cases: list[Case] = []
    labels_dir = root / "labelsTr"
    for split_dir, labelled in ((root / "imagesTr", True), (root / "imagesTs", False)):
        if not split_dir.is_dir():
            continue
        for image in sorted(p for p in split_dir.iterdir() if p.is_file() and _entry_stem(p) is not None):
            case = Case(image_stem(image.name), "msd", str(image))
            if labelled:
                label = labels_dir / image.name
                if label.is_file():
                    case.label = str(label)
                else:
                    case.problems.append(f"{label}: missing label for {image}")
            cases.append(case)
    return cases


def discover_cases(dataset_dir: str | Path, layout: str | None = None) -> list[Case]:
    """Find every case under ``dataset_dir`` (any supported layout, or one case folder)."""
    root = Path(dataset_dir)
    found = detect_layout(root) if layout is None else layout
    if found == "msd":
        cases = _msd_cases(root)
    elif found == "case":
        case_layout = _case_dir_layout(root)
        assert case_layout is not None
        cases = [_brats_case(root, case_layout)]
    elif found in ("brats2021", "brats2023"):
        cases = [
            _brats_case(sub, found)
            for sub in sorted(p for p in root.iterdir() if p.is_dir())
            if _case_dir_layout(sub) == found
        ]
    else:
        raise DataError(f"{root}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not cases:
        raise DataError(f"{root}: no cases found for layout {found}")
    return cases


def case_of_image(image: str | Path) -> Case:
    """The case one image file stands for: its BraTS case folder's four modalities, or the file itself (4-D MSD).

    MONAI Label's datastore lists one file per case (a link to the case's FLAIR, see ``bundle.label``);
    the link is followed to the case folder, whose modalities are found as :func:`discover_cases`
    finds them. A missing modality is in ``problems`` (:func:`check_case` raises it).
    """
    path = Path(image).resolve()
    layout = _case_dir_layout(path.parent)
    if layout is None:
        return Case(image_stem(path.name), "msd", str(path))
    return _brats_case(path.parent, layout)


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


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """ITK's physical space is LPS, NIfTI's and MONAI's RAS (MONAI's ``orientation_ras_lps``)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _itk_header(path: Path) -> ImageHeader:
    """The header of an NRRD / MetaImage file through ITK's ImageIO, voxels not read."""
    import itk

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
    return ImageHeader(shape + ((components,) if components > 1 else ()), _lps_to_ras(affine), tuple(spacing))


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

    ISA-L (python-isal) decodes these files 1.5-2x faster than zlib and releases the GIL, so the
    files of a case decode at once in threads (``bundle.transforms.ConcurrentNibabelReader``, which
    also corrects the header as MONAI's reader does). The case checks (:func:`read_voxels`) decode
    with it too.
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
    probabilities, NaN losses and NaN weights; both are found here, before any long work.
    Integer data cannot hold non-finite values, so only floating-point data is scanned. The reader is
    the one training and inference use (:func:`image_reader`), so the array is the one they see.
    """
    try:
        data = np.asarray(load_nifti(path).dataobj) if is_nifti(path) else _itk_volume(Path(path))[0]
    except Exception as err:  # zlib, EOFError, nibabel's and ITK's own: whatever a damaged file raises
        raise DataError(f"{path}: {what} data cannot be decoded ({type(err).__name__}: {err})") from err
    if data.dtype.kind in "fc":
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(f"{path}: {bad} of {data.size} voxels are not finite (NaN or Inf)")
    return data


def _read_label_values(path: str) -> np.ndarray:
    data = read_voxels(path, "label")
    if data.dtype.kind in "ui" and data.size:
        # Label maps hold a few small integers: testing each value of the range is ~10x faster
        # than np.unique's sort of a whole 240 x 240 x 155 volume (checking 1251 BraTS cases).
        low, high = int(data.min()), int(data.max())
        if high - low < 32:
            return np.array([v for v in range(low, high + 1) if (data == v).any()], dtype=np.int64)
    return np.unique(data)


def check_case(case: Case, affine_atol: float = 1e-3, check_labels: bool = True) -> None:
    """Raise :class:`DataError` naming the file if a case cannot be used.

    Checks: every modality present and readable, 3-D images of one shape and affine (within
    ``affine_atol``, in mm), a 4-D MSD image with 4 channels, a label of the image's shape and
    affine whose values belong to the layout's label scheme; then every voxel of every file is
    decoded once (:func:`read_voxels`: truncated data, NaN / Inf). The headers come first, so the
    cheap checks answer before the ~0.3 s of decoding a real BraTS case.
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
    for path in [case.image] if isinstance(case.image, str) else case.image:
        read_voxels(path)
    if case.label is not None and check_labels:
        _check_label_values(case.label, case.layout)


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
            check_case(case, check_labels=check_labels)
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


# --------------------------------------------------------------------------------------- datalists


def assign_folds(num_cases: int, folds: int, seed: int) -> list[int]:
    """Deterministic fold index per case: a seeded permutation dealt round-robin into ``folds``."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    order = np.random.default_rng(seed).permutation(num_cases)
    fold_of = [0] * num_cases
    for rank, index in enumerate(order):
        fold_of[int(index)] = rank % folds
    return fold_of


def _unique_names(cases: Sequence[Case]) -> list[Case]:
    """``cases``, or a :class:`DataError` at the first case name used twice (outputs would overwrite each other)."""
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(f"{case.image}: case name {case.case_id} is used twice (also {seen[case.case_id].image})")
        seen[case.case_id] = case
    return list(cases)


def _fraction(value: float, name: str) -> float:
    """``value`` as a fraction in [0, 1], or one sentence naming the option."""
    fraction = float(value)
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"{name}: {value!r} is not a fraction between 0 and 1")
    return fraction


def labelled_subset(cases: Sequence[Case], fraction: float = 1.0, seed: int = 42) -> list[Case]:
    """A seeded random ``fraction`` of the labelled cases (in discovery order), and every unlabelled one.

    M3 trains on 10 % of BraTS 2021 drawn with seed 42 (docs/methods.md). Taken before the checks,
    so only the chosen cases are read.
    """
    fraction = _fraction(fraction, "subset_fraction")
    labelled = [i for i, c in enumerate(cases) if c.label is not None]
    if fraction >= 1.0:
        return list(cases)
    keep = {
        labelled[i] for i in np.random.default_rng(seed).permutation(len(labelled))[: round(len(labelled) * fraction)]
    }
    if not keep:
        raise DataError(f"subset_fraction {fraction} of {len(labelled)} labelled cases keeps none")
    logger.info("subset: %d of %d labelled cases (fraction %s, seed %d)", len(keep), len(labelled), fraction, seed)
    return [c for i, c in enumerate(cases) if c.label is None or i in keep]


def _checked_items(
    cases: Sequence[Case],
    source: str | Path,
    folds: int,
    seed: int,
    check_labels: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
    holdout_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Datalist items of ``cases`` (in order) once every one passed :func:`check_cases`.

    Labelled cases get a fold, except a seeded ``holdout_fraction`` of them, marked ``"holdout": True``:
    a test set no fold trains or validates on (M4 holds out 20 %). Without a hold-out the folds are
    exactly those of earlier versions.
    """
    good = check_cases(_unique_names(cases), check_labels, skip_bad, progress)
    if not good:
        raise DataError(f"{source}: no usable cases")
    labelled = [i for i, c in enumerate(good) if c.label is not None]
    count = round(len(labelled) * _fraction(holdout_fraction, "holdout_fraction"))
    # its own random stream, so the hold-out does not depend on the fold seed's other uses
    held = {labelled[i] for i in np.random.default_rng([seed, 1]).permutation(len(labelled))[:count]}
    if labelled and len(held) == len(labelled):
        raise DataError(f"{source}: holdout_fraction {holdout_fraction} leaves no case to train on")
    fold_of = iter(assign_folds(len(labelled) - len(held), folds, seed))
    items = []
    for i, case in enumerate(good):
        if case.label is None:
            items.append(case.to_item())
        else:
            items.append(
                {**case.to_item(), "holdout": True} if i in held else {**case.to_item(), "fold": next(fold_of)}
            )
    return items


def _datalist(items: Sequence[dict[str, Any]], name: str, folds: int, seed: int, **settings: Any) -> dict[str, Any]:
    """The datalist dictionary (the JSON ``prepare`` writes) of checked items.

    ``training``: labelled cases with their fold; ``holdout``: labelled cases kept out of every fold
    (the test set); ``testing``: cases without a segmentation. ``settings`` are recorded as given.
    """
    data = {
        "name": name,
        "layout": items[0]["layout"],
        "modalities": list(MODALITIES),
        "num_folds": folds,
        "seed": seed,
        **settings,
        "training": [i for i in items if "label" in i and not i.get("holdout")],
        "testing": [i for i in items if "label" not in i],
    }
    held = [{k: v for k, v in i.items() if k != "holdout"} for i in items if i.get("holdout")]
    if held:
        data["holdout"] = held
    return data


def make_datalist(
    dataset_dir: str | Path,
    folds: int = 5,
    seed: int = 42,
    skip_bad: bool = False,
    layout: str | None = None,
    check_labels: bool = True,
    progress: bool = True,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
) -> dict[str, Any]:
    """Discover, check and split a dataset into a MONAI datalist dictionary.

    Labelled cases go to ``training`` (each with a ``fold``), except a seeded ``holdout_fraction`` of
    them, which go to ``holdout`` (a test set); unlabelled ones go to ``testing``. ``subset_fraction``
    first keeps a random part of the labelled cases (seed ``subset_seed``). A bad case raises
    :class:`DataError`; with ``skip_bad`` it is left out with a warning. ``progress`` shows a bar
    while the cases are checked (for 20 cases or more).
    """
    cases = labelled_subset(discover_cases(dataset_dir, layout), subset_fraction, subset_seed)
    items = _checked_items(cases, dataset_dir, folds, seed, check_labels, skip_bad, progress, holdout_fraction)
    settings: dict[str, Any] = {}
    if holdout_fraction:
        settings["holdout_fraction"] = holdout_fraction
    if subset_fraction < 1.0:
        settings.update(subset_fraction=subset_fraction, subset_seed=subset_seed)
    return _datalist(items, Path(dataset_dir).name, folds, seed, **settings)


def prepare(
    dataset_dir: str,
    output: str = "datalist.json",
    folds: int = 5,
    seed: int = 42,
    skip_bad: bool = False,
    layout: str | None = None,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
) -> str:
    """Discover and check a dataset and write its datalist JSON; return the path written."""
    datalist = make_datalist(
        dataset_dir,
        folds=folds,
        seed=seed,
        skip_bad=skip_bad,
        layout=layout,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
    )
    path = write_json_atomic(datalist, output)
    logger.info(
        "%s: %d training, %d held-out and %d testing cases (%s layout) -> %s",
        dataset_dir,
        len(datalist["training"]),
        len(datalist.get("holdout", [])),
        len(datalist["testing"]),
        datalist["layout"],
        path,
    )
    return str(path)


def load_split(
    datalist: str | Path | dict[str, Any], fold: int = 0, split: str = "train", source: str | None = None
) -> list[dict[str, Any]]:
    """Return the items of one split: ``train`` (not ``fold``), ``val`` (``fold``), ``all`` (both),
    ``holdout`` (labelled cases kept out of every fold) or ``test`` (cases without a segmentation).

    ``source`` names a datalist given as a dictionary in errors (default: the file or the dictionary).
    """
    data = json.loads(Path(datalist).read_text()) if not isinstance(datalist, dict) else datalist
    training = data.get("training", [])
    if split == "test":
        return list(data.get("testing", []))
    if split == "holdout":
        return list(data.get("holdout", []))
    if split == "all":
        return list(training)
    num_folds = int(data.get("num_folds", 1 + max((int(i.get("fold", 0)) for i in training), default=0)))
    if num_folds < 2:
        return list(training)  # one fold: train and validate on the same cases, stated in the log
    if not 0 <= fold < num_folds:
        raise DataError(f"{source or datalist}: fold {fold} is outside 0..{num_folds - 1}")
    if split == "train":
        return [i for i in training if int(i["fold"]) != fold]
    if split == "val":
        return [i for i in training if int(i["fold"]) == fold]
    raise ValueError(f"unknown split {split!r}; expected train, val, all, holdout or test")


NO_DATA = (
    "no data given: pass --dataset_dir DIR (a BraTS 2021 / BraTS 2023 / MSD Task01 folder) or --datalist FILE "
    "(python -m bundle prepare), or run the demo: add configs/demo.yaml, e.g. "
    "--config_file \"['configs/train.yaml','configs/demo.yaml']\", or python -m bundle demo"
)


def _case_from_files(files: Sequence[str], layout: str | None) -> Case:
    """A case from explicit files: four 3-D volumes (T1, T1ce, T2, FLAIR, in that order) or one 4-D image."""
    paths = [str(Path(f)) for f in files]
    if len(paths) == 1:
        # the only 4-D layout the bundle knows is MSD's (FLAIR, T1w, T1gd, T2w); say "brats2021" if
        # the file's channels are already in the canonical order
        return Case(image_stem(Path(paths[0]).name), layout or "msd", paths[0])
    if len(paths) != 4:
        raise DataError(
            f"{', '.join(paths)}: expected four files (T1, T1ce, T2, FLAIR) or one 4-D image, got {len(paths)}"
        )
    stems = [image_stem(Path(p).name) for p in paths]
    modality_names = set(BRATS2021_SUFFIXES.values()) | set(BRATS2023_SUFFIXES.values())
    if all(stem in modality_names for stem in stems):  # t1.nrrd ... or DICOM folders t1/ ...: named by their folder
        case_id = Path(paths[0]).resolve().parent.name
    else:
        case_id = os.path.commonprefix(stems).rstrip("_-.") or stems[0]  # noqa: RUF071 - file names, not paths
    return Case(case_id, layout or "brats2021", paths)


def _dataset_or_demo(dataset_dir: str | Path | None, demo_dir: str | Path | None) -> str:
    """``dataset_dir``, or ``demo_dir`` (generated once if missing), or one sentence saying what to pass."""
    if dataset_dir:
        return str(dataset_dir)
    if demo_dir:
        return str(generate_demo_dataset(demo_dir))
    raise DataError(NO_DATA)


def select_cases(
    dataset_dir: str | Path | None = None,
    datalist: str | Path | None = None,
    files: str | Sequence[str] | None = None,
    *,
    fold: int | None = None,
    split: str | None = None,
    labelled: bool | None = None,
    layout: str | None = None,
    demo_dir: str | Path | None = None,
    folds: int = 5,
    seed: int = 42,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The cases of one run (training, inference or evaluation) as datalist items, checked before it starts.

    The source is the first one given of ``files`` (the files of one case: four volumes T1, T1ce, T2,
    FLAIR or one 4-D image), ``datalist`` (a JSON from ``python -m bundle prepare`` or a training run)
    and ``dataset_dir`` (a BraTS 2021 / 2023 or MSD folder, or one case folder); with none of them,
    ``demo_dir`` if given (generated first if missing), else a :class:`DataError` saying what to pass
    (configs/demo.yaml gives the demo folder as ``dataset_dir``). Files and folders
    are discovered and every case is checked (:func:`check_cases`; label files too unless ``labelled``
    is ``False``), and a case name used twice is an error; a datalist was checked when it was written
    and is read as it is. Labelled cases of a folder are dealt into ``folds`` folds (``seed``).

    ``split`` picks among the cases: ``None`` every case, ``"train"`` / ``"val"`` the labelled cases
    outside / inside ``fold`` (:func:`load_split`), ``"test"`` the unlabelled ones. ``labelled``:
    ``True`` keeps only cases with a ground truth (none left is an error), ``False`` drops the labels
    (inference never reads them), ``None`` keeps what there is. Every problem is a :class:`DataError`
    with one sentence naming the file.
    """
    if files:
        file_list = [files] if isinstance(files, str) else [str(f) for f in files]
        source = ", ".join(file_list)
        data = _datalist(
            _checked_items([_case_from_files(file_list, layout)], source, folds, seed, labelled is not False),
            "files",
            folds,
            seed,
        )
        every = data["training"] + data["testing"]
    elif datalist:
        source = str(datalist)
        if not Path(datalist).is_file():
            raise DataError(f"{datalist}: datalist file does not exist")
        data = json.loads(Path(datalist).read_text())
        every = [*data.get("training", []), *data.get("holdout", []), *data.get("testing", [])]
    else:
        source = _dataset_or_demo(dataset_dir, demo_dir)
        cases = discover_cases(source, layout)
        every = _checked_items(cases, source, folds, seed, labelled is not False, progress=progress)
        data = _datalist(every, Path(source).name, folds, seed)
    if split is None:
        items = [dict(i) for i in every]
    else:
        items = [dict(i) for i in load_split(data, fold if fold is not None else 0, split, source=source)]
    if labelled:
        unlabelled = sum(1 for i in items if not i.get("label"))
        if unlabelled:
            logger.info("%s: %d case(s) without a segmentation left out", source, unlabelled)
        items = [i for i in items if i.get("label")]
        if not items:
            raise DataError(f"{source}: no case with a ground-truth segmentation")
    elif labelled is False:
        for item in items:
            item.pop("label", None)  # never read, so never a reason to stop
            item.pop("fold", None)
    logger.info("%s: %d case(s) selected", source, len(items))
    return items


def resolve_datalist(
    dataset_dir: str | Path | None,
    datalist: str | Path | None,
    output_dir: str | Path,
    folds: int = 5,
    seed: int = 42,
    demo_dir: str | Path | None = None,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
) -> str:
    """The datalist file of a training run, so every fold, rank and resumed run shares one split.

    The same sources as :func:`select_cases`: ``datalist`` is used as it is; a ``dataset_dir`` (or
    ``demo_dir``) is discovered, checked and dealt into folds in ``output_dir/datalist.json``, after
    the seeded subset and hold-out of :func:`make_datalist`. The run then takes its splits with
    ``select_cases(datalist=...)``.
    """
    if datalist:
        if not Path(datalist).is_file():
            raise DataError(f"{datalist}: datalist file does not exist")
        return str(datalist)
    source = _dataset_or_demo(dataset_dir, demo_dir)
    return prepare(
        source,
        str(Path(output_dir) / "datalist.json"),
        folds=folds,
        seed=seed,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
    )


# ------------------------------------------------------------------------------------ demo phantoms

DEMO_VERSION = 1
DEMO_SPACING = (2.4, 2.4, 2.4)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: trilinear up-sampling of a coarse random grid."""
    from scipy.ndimage import zoom

    coarse_shape = [max(2, round(s / scale)) for s in shape]
    coarse = rng.uniform(-1.0, 1.0, size=coarse_shape)
    field_ = zoom(coarse, [s / c for s, c in zip(shape, coarse_shape)], order=1)
    return field_[: shape[0], : shape[1], : shape[2]]


# Tissue intensities per modality (T1, T1ce, T2, FLAIR), shaped after real contrasts:
# T1 bright WM, T2 bright CSF, FLAIR dark CSF and bright edema, T1ce bright enhancing rim.
_TISSUE_INTENSITY = {
    "wm": (0.90, 0.85, 0.40, 0.45),
    "gm": (0.60, 0.60, 0.60, 0.60),
    "csf": (0.20, 0.20, 1.00, 0.10),
    "ed": (0.50, 0.50, 0.90, 1.00),
    "ncr": (0.30, 0.25, 1.10, 0.55),
    "et": (0.55, 1.45, 0.70, 0.80),
}
_MODALITY_SCALE = (900.0, 1100.0, 1000.0, 800.0)


def make_phantom(seed: int, shape: Sequence[int] = (96, 96, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Return one synthetic BraTS-like case: image ``(4, *shape)`` int16 and BraTS 2021 labels.

    A brain-shaped head (white matter, cortex, ventricles) on a zero background, per-modality
    tissue contrasts, a bias field and noise, and one tumour whose necrotic core, enhancing rim
    and edema come from nested level sets of a distorted ellipsoid; sizes vary from small
    (a few voxels of ET) to large, some tumours have no necrosis.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(shape, dtype=np.float32) * np.array([0.40, 0.46, 0.42]) * rng.uniform(0.92, 1.05, 3)
    rel = (grid - centre[:, None, None, None]) / radii[:, None, None, None]
    head_dist = np.sqrt((rel**2).sum(0)) + 0.05 * _smooth_noise(rng, shape, 12)
    brain = head_dist < 1.0
    cortex = brain & (head_dist > 0.80 + 0.06 * _smooth_noise(rng, shape, 6))
    ventricle_rel = (grid - centre[:, None, None, None]) / (
        radii[:, None, None, None] * np.array([[[[0.12]]], [[[0.28]]], [[[0.18]]]])
    )
    ventricles = brain & (np.sqrt((np.abs(ventricle_rel) ** 2).sum(0)) < 1.0)
    outer_csf = brain & (head_dist > 0.95)

    tissue = np.full(shape, "", dtype=object)
    labels = np.zeros(shape, dtype=np.uint8)

    # Tumour: centre inside one hemisphere, away from the edge; size from small to large.
    small = rng.random() < 0.3
    tumour_radius = rng.uniform(3.0, 5.0) if small else rng.uniform(7.0, 15.0)
    hemisphere = rng.choice([-1.0, 1.0])
    tumour_centre = centre + np.array(
        [
            hemisphere * rng.uniform(0.15, 0.45) * radii[0],
            rng.uniform(-0.4, 0.4) * radii[1],
            rng.uniform(-0.3, 0.3) * radii[2],
        ]
    )
    axes = tumour_radius * rng.uniform(0.75, 1.3, 3)
    t_rel = (grid - tumour_centre[:, None, None, None]) / axes[:, None, None, None]
    level = np.sqrt((t_rel**2).sum(0)) + 0.18 * _smooth_noise(rng, shape, 5)
    edema_extent = rng.uniform(1.5, 2.2)
    has_necrosis = (not small) and rng.random() < 0.8
    edema = brain & (level < edema_extent)
    enhancing = brain & (level < 1.0)
    necrotic = brain & (level < rng.uniform(0.45, 0.7)) if has_necrosis else np.zeros(shape, bool)

    labels[edema] = 2
    labels[enhancing] = 4
    labels[necrotic] = 1

    # Build per-modality images from tissue classes, then smooth for partial volume.
    image = np.zeros((4, *shape), dtype=np.float32)
    masks = {
        "wm": brain & ~cortex & ~ventricles & ~outer_csf,
        "gm": cortex & ~outer_csf,
        "csf": ventricles | outer_csf,
    }
    for name, mask in masks.items():
        tissue[mask] = name
        image[:, mask] = np.array(_TISSUE_INTENSITY[name], dtype=np.float32)[:, None]
    for name, mask in (("ed", labels == 2), ("et", labels == 4), ("ncr", labels == 1)):
        image[:, mask] = np.array(_TISSUE_INTENSITY[name], dtype=np.float32)[:, None]

    from scipy.ndimage import gaussian_filter

    bias = 1.0 + 0.12 * _smooth_noise(rng, shape, 24)
    for c in range(4):
        channel = gaussian_filter(image[c], sigma=0.7) * bias
        channel += rng.normal(0.0, 0.03, size=shape).astype(np.float32)
        channel = np.clip(channel, 0.0, None) * _MODALITY_SCALE[c] * rng.uniform(0.9, 1.1)
        channel[~brain] = 0.0  # skull-stripped: exact zeros outside the brain, as in BraTS
        image[c] = channel
    return np.round(image).astype(np.int16), labels


def demo_affine(shape: Sequence[int], spacing: Sequence[float] = DEMO_SPACING) -> np.ndarray:
    """An LPS affine like BraTS's (x and y flipped), so the demo exercises reorientation."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [0.0, spacing[1] * (shape[1] - 1), 0.0]
    return affine


def generate_demo_dataset(
    output_dir: str | Path,
    num_cases: int = 16,
    num_test_cases: int = 1,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 64),
) -> Path:
    """Write (once, cached, deterministic by ``seed``) the demo in the BraTS 2021 file layout.

    ``num_cases`` labelled cases plus ``num_test_cases`` cases without a segmentation (the
    held-out demo case). A ``demo.json`` marker with the generator's parameters makes later
    calls return at once; other parameters regenerate.
    """
    root = Path(output_dir)
    params = {
        "version": DEMO_VERSION,
        "num_cases": num_cases,
        "num_test_cases": num_test_cases,
        "seed": seed,
        "shape": list(shape),
    }
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    # Written into a temporary sibling folder and moved into place when complete, so an
    # interrupted run never leaves a half-written demo and a concurrent run never reads one.
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    affine = demo_affine(shape)

    for index in tqdm(range(num_cases + num_test_cases), desc="demo data", unit="case"):
        case_id = f"Demo_{index:05d}"
        case_dir = staging / case_id
        case_dir.mkdir()
        image, labels = make_phantom(seed * 100_003 + index, shape)
        for channel, modality in enumerate(MODALITIES):
            nib.save(nib.Nifti1Image(image[channel], affine), case_dir / f"{case_id}_{modality}.nii.gz")
        if index < num_cases:
            nib.save(nib.Nifti1Image(labels, affine), case_dir / f"{case_id}_seg.nii.gz")
        else:
            # Held-out cases keep their truth outside the case folder, so discovery lists them
            # as unlabelled test cases while the demo can still compare its prediction.
            (staging / "heldout_truth").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(labels, affine), staging / "heldout_truth" / f"{case_id}_seg.nii.gz")
    write_json_atomic(params, staging / "demo.json")
    if marker.is_file() and json.loads(marker.read_text()) == params:
        shutil.rmtree(staging)  # another process finished the same demo first
        return root
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return root
