"""The embedded demo: synthetic BraTS-like phantoms generated locally on first use.

Brain-shaped heads with tissue contrasts per modality and tumours with NCR / ED / ET sub-regions of
varied size and position, written in the BraTS 2021 layout (16 labelled cases and one held out whose
truth is kept apart). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from bundle.atomic import write_json_atomic
from bundle.constants import (
    MODALITIES,
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
