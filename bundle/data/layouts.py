"""Dataset layouts: which files make a case, in BraTS 2021, BraTS 2023 and MSD Task01 folders.

Three layouts are recognised and mapped onto one convention (``bundle.constants``):

* ``brats2021`` (BraTS 2018-2021): ``CASE/CASE_{t1,t1ce,t2,flair}.nii.gz`` (+ ``CASE_seg.nii.gz``);
* ``brats2023`` (BraTS 2023+): ``CASE/CASE-{t1n,t1c,t2w,t2f}.nii.gz`` (+ ``CASE-seg.nii.gz``);
* ``msd`` (Decathlon Task01): ``imagesTr/*.nii.gz`` 4-D (FLAIR, T1w, T1gd, T2w) + ``labelsTr``.

Files may be NIfTI (``.nii.gz``, ``.nii``), NRRD (``.nrrd``, 3D Slicer's ``.seg.nrrd``) or MetaImage
(``.mha``, ``.mhd``), and a modality of a case may be a folder holding one DICOM series
(``CASE/CASE_flair/`` or ``CASE/flair/``). :func:`image_reader` picks the MONAI reader of every file the
same way wherever a case is read: NIfTI through nibabel, everything else through ITK.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle.constants import (
    BRATS2021_SUFFIXES,
    BRATS2023_SUFFIXES,
    MODALITIES,
)
from bundle.errors import DataError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Read through ITK: NRRD (3D Slicer's volumes and segmentations) and MetaImage. ``.seg.nrrd`` comes first
#: so that ``CASE_seg.seg.nrrd`` loses the whole suffix.
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
#: MONAI reader names (``LoadImage``'s registry): NIfTI stays on nibabel, which is as fast as ITK for it
#: and is what every earlier version used (docs/reference/formats.md); ITK reads the rest.
NIFTI_READER, ITK_READER = "NibabelReader", "ITKReader"
LAYOUTS = ("brats2021", "brats2023", "msd")


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

    MONAI Label's datastore lists one file per case (a link to the case's FLAIR, see
    ``bundle.integrations.monailabel``);
    the link is followed to the case folder, whose modalities are found as :func:`discover_cases`
    finds them. A missing modality is in ``problems`` (:func:`check_case` raises it).
    """
    path = Path(image).resolve()
    layout = _case_dir_layout(path.parent)
    if layout is None:
        return Case(image_stem(path.name), "msd", str(path))
    return _brats_case(path.parent, layout)
