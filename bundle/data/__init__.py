"""Datasets: layouts (BraTS 2021 / 2023, MSD), file reading, case checks, datalists and folds, demo phantoms.

Neither torch nor MONAI is imported here (case checks and discovery stay fast); :mod:`bundle.data.labels`
(label schemes and components, on numpy arrays and torch tensors) is imported by name.
"""

from bundle.data.checks import check_case, check_cases
from bundle.data.datalist import (
    NO_DATA,
    assign_folds,
    file_list,
    labelled_subset,
    load_split,
    make_datalist,
    prepare,
    resolve_datalist,
    select_cases,
    without_labels,
)
from bundle.data.demo import DEMO_SPACING, DEMO_VERSION, demo_affine, generate_demo_dataset, make_phantom
from bundle.data.io import ImageHeader, load_nifti, read_header, read_voxels, refuse_non_finite
from bundle.data.layouts import (
    IMAGE_SUFFIXES,
    ITK_READER,
    ITK_SUFFIXES,
    LAYOUTS,
    NIFTI_READER,
    NIFTI_SUFFIXES,
    Case,
    case_of_image,
    detect_layout,
    discover_cases,
    image_reader,
    image_stem,
    is_dicom_series,
    is_nifti,
)

__all__ = [
    "DEMO_SPACING",
    "DEMO_VERSION",
    "IMAGE_SUFFIXES",
    "ITK_READER",
    "ITK_SUFFIXES",
    "LAYOUTS",
    "NIFTI_READER",
    "NIFTI_SUFFIXES",
    "NO_DATA",
    "Case",
    "ImageHeader",
    "assign_folds",
    "case_of_image",
    "check_case",
    "check_cases",
    "demo_affine",
    "detect_layout",
    "discover_cases",
    "file_list",
    "generate_demo_dataset",
    "image_reader",
    "image_stem",
    "is_dicom_series",
    "is_nifti",
    "labelled_subset",
    "load_nifti",
    "load_split",
    "make_datalist",
    "make_phantom",
    "prepare",
    "read_header",
    "read_voxels",
    "refuse_non_finite",
    "resolve_datalist",
    "select_cases",
    "without_labels",
]
