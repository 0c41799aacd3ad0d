"""Shared fixtures: tiny fake datasets in each supported layout, and the real samples if present."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.constants import BRATS2021_SUFFIXES, BRATS2023_SUFFIXES, MODALITIES, MSD_CHANNEL_ORDER

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (10, 12, 8)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def shared_samples_dir() -> Path | None:
    """The real BraTS 2021 samples beside the repository (``../shared/brats_samples``), if present."""
    env = os.environ.get("BRATS_SAMPLES_DIR")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "brats_samples"
    return candidate if candidate.is_dir() and any(candidate.iterdir()) else None


def _labels(values: tuple[int, int, int]) -> np.ndarray:
    """A label map with an edema shell, a core and an enhancing part using the given values."""
    ncr, ed, et = values
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:8, 3:9, 2:6] = ed
    label[3:7, 4:8, 3:5] = et
    label[4:6, 5:7, 3:5] = ncr
    return label


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.uniform(1, 100, size=SHAPE).astype(np.float32)
    image[0] = 0  # background plane, like skull-stripped data
    return image


def write_brats_case(root: Path, case_id: str, layout: str, with_label: bool = True) -> Path:
    """Write one tiny case in the BraTS 2021 or 2023 layout and return its folder."""
    separator, suffixes, values = (
        ("_", BRATS2021_SUFFIXES, (1, 2, 4)) if layout == "brats2021" else ("-", BRATS2023_SUFFIXES, (1, 2, 3))
    )
    case_dir = root / case_id
    case_dir.mkdir(parents=True)
    for i, modality in enumerate(MODALITIES):
        nib.save(
            nib.Nifti1Image(_image(i) + 10 * i, AFFINE), case_dir / f"{case_id}{separator}{suffixes[modality]}.nii.gz"
        )
    if with_label:
        nib.save(nib.Nifti1Image(_labels(values), AFFINE), case_dir / f"{case_id}{separator}seg.nii.gz")
    return case_dir


def write_msd(root: Path, num_train: int = 3, num_test: int = 1) -> Path:
    """Write a tiny Decathlon Task01 folder (4-D images FLAIR, T1w, T1gd, T2w; labels 1 ED, 2 NET, 3 ET)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    for i in range(num_train + num_test):
        # channel c of the file holds the constant-offset image of MSD_CHANNEL_ORDER[c]
        image = np.stack([_image(0) + 1000 * MODALITIES.index(m) for m in MSD_CHANNEL_ORDER], axis=-1)
        name = f"BRATS_{i:03d}.nii.gz"
        if i < num_train:
            nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(_labels((2, 1, 3)), AFFINE), root / "labelsTr" / name)
        else:
            nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTs" / name)
    (root / "dataset.json").write_text(
        '{"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}'
    )
    return root


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled 32 x 32 x 24 demo phantoms in the BraTS 2021 layout (modules may define their own)."""
    from bundle.data import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=0, shape=(32, 32, 24))


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``).

    Training small networks in-process on the shared 2-core machine: with two OpenMP threads and other
    processes busy, an epoch measured here took up to 100 times longer than with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def brats2021_dir(tmp_path: Path) -> Path:
    """Three labelled BraTS 2021 cases and one unlabelled."""
    root = tmp_path / "brats2021"
    for i in range(3):
        write_brats_case(root, f"BraTS2021_{i:05d}", "brats2021")
    write_brats_case(root, "BraTS2021_09999", "brats2021", with_label=False)
    return root


@pytest.fixture
def brats2023_dir(tmp_path: Path) -> Path:
    """Three labelled BraTS 2023 cases."""
    root = tmp_path / "brats2023"
    for i in range(3):
        write_brats_case(root, f"BraTS-GLI-{i:05d}-000", "brats2023")
    return root


@pytest.fixture
def msd_dir(tmp_path: Path) -> Path:
    """A tiny MSD Task01 folder."""
    return write_msd(tmp_path / "Task01_BrainTumour")


@pytest.fixture
def make_brats_case(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing single BraTS cases under ``tmp_path/cases``."""

    def _make(case_id: str = "Case_0", layout: str = "brats2021", with_label: bool = True) -> Path:
        return write_brats_case(tmp_path / "cases", case_id, layout, with_label)

    return _make


def convert_with_itk(source: Path, target: Path) -> Path:
    """Rewrite one image in another format with ITK (format from ``target``'s suffix), as Slicer would save it."""
    import itk

    target.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(itk.imread(str(source)), str(target), compression=not target.name.endswith(".mhd"))
    return target


def write_dicom_series(source: Path, folder: Path) -> Path:
    """Write a 3-D image as a DICOM series (one int16 slice per file) with ITK, geometry from ``source``.

    GDCM's writer sets the process's C locale to "C", after which Python decodes subprocess output as
    ASCII; the locale is restored so later tests see the one they started with.
    """
    import locale

    previous = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(source, folder)
    finally:
        locale.setlocale(locale.LC_ALL, previous)


def _write_dicom_series(source: Path, folder: Path) -> Path:
    import zlib

    import itk

    image = itk.imread(str(source), itk.SS)
    voxels = itk.array_from_image(image)  # (z, y, x)
    spacing, origin = list(image.GetSpacing()), np.asarray(image.GetOrigin())
    direction = itk.array_from_matrix(image.GetDirection())
    folder.mkdir(parents=True)
    study, series = "1.2.826.0.1.3680043.2.1125.7", f"1.2.826.0.1.3680043.2.1125.7.{zlib.crc32(folder.name.encode())}"
    for k in range(voxels.shape[0]):
        plane = itk.image_from_array(np.ascontiguousarray(voxels[k]))
        plane.SetSpacing(spacing[:2])
        position = origin + direction @ np.array([0.0, 0.0, k * spacing[2]])
        tags = {
            "0008|0060": "MR",
            "0010|0020": "PATIENT",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]]),
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
        }
        for key, value in tags.items():
            plane[key] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(plane, str(folder / f"IM{k:04d}.dcm"), imageio=io)
    return folder
