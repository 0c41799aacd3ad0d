"""Every orientation a case can be stored in segments into the input's own space.

A case is reoriented to each of the 48 axis orders and flips (``PIR``, ``ASR``, ``LAS``, ...) and
segmented through ``python -m bundle infer`` and ``python -m monai.bundle run``. Inference reorients
every case to RAS before the network (``Orientationd``) and back afterwards (``Invertd``), so each
output must carry its input's shape and affine and hold, voxel for voxel, the segmentation of the
case in its original orientation, moved to the new axes. The case is a block of a real BraTS case
when ``../shared/brats_samples`` is present, a synthetic one otherwise.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
from conftest import shared_samples_dir
from monai.bundle.scripts import run
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from test_inference_config import TINY_NET, _checkpoint, _write_case

from bundle.constants import MODALITIES
from bundle.integrations.cli import COMMANDS
from bundle.paths import BUNDLE_ROOT

pytestmark = pytest.mark.usefixtures("single_thread")  # a small network on a shared 2-core machine

#: the 48 orientations: each order of the three axes, each axis either way
ORIENTATIONS = [
    "".join(("LR", "PA", "IS")[axis][flip] for axis, flip in zip(order, flips, strict=True))
    for order in itertools.permutations(range(3))
    for flips in itertools.product((0, 1), repeat=3)
]
#: each of the 6 axis orders, each axis both ways at least once (the fast test; the slow one takes all 48)
SOME = ["LPI", "RSA", "ALS", "PIR", "SLA", "IAR"]
BLOCK = (32, 32, 24)  # voxels of the real case kept around its tumour (a whole case is the slow test's)
WINDOW = "[32,32,24]"  # one sliding window covers a whole block
# a random network's probabilities lie around 0.5: these thresholds give it several labels to write
THRESHOLDS = ["--wt_threshold", "0.5", "--tc_threshold", "0.5", "--et_threshold", "0.5"]


def test_the_48_orientations_are_every_axis_order_and_flip() -> None:
    assert len(set(ORIENTATIONS)) == 48
    assert {"RAS", "LPS", "LAS", "PIR", "ASR", "SLA"} <= set(ORIENTATIONS)


def _base_case(root: Path, name: str) -> Path:
    """A case folder: a block of a real BraTS case around its tumour, or a synthetic oblique case without them."""
    samples = shared_samples_dir()
    if samples is None:
        return _write_case(root, name, shape=(19, 17, 13))
    source = sorted(p for p in samples.iterdir() if p.is_dir())[0]
    seg = nib.load(next(source.glob("*_seg.nii.gz")))
    centre = np.argwhere(np.asarray(seg.dataobj) > 0).mean(axis=0).round().astype(int)
    start = [int(np.clip(c - b // 2, 0, s - b)) for c, b, s in zip(centre, BLOCK, seg.shape, strict=True)]
    block = tuple(slice(a, a + b) for a, b in zip(start, BLOCK, strict=True))
    folder = root / name
    folder.mkdir(parents=True)
    for modality in MODALITIES:
        image = nib.load(next(source.glob(f"*_{modality}.nii.gz"))).slicer[block]
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), folder / f"{name}_{modality}.nii.gz")
    return folder


def reoriented(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """``image`` with its voxel axes reordered and flipped to ``codes``, the same voxels in the same world space."""
    return image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(tuple(codes))))


def _dataset(root: Path, base: Path, orientations: list[str]) -> Path:
    """A dataset folder holding the ``base`` case once in each orientation (``Case_<codes>``)."""
    data = root / "data"
    for codes in orientations:
        folder = data / f"Case_{codes}"
        folder.mkdir(parents=True)
        for modality in MODALITIES:
            image = reoriented(nib.load(base / f"Base_{modality}.nii.gz"), codes)
            nib.save(image, folder / f"Case_{codes}_{modality}.nii.gz")
    return data


def _check_round_trip(data: Path, out: Path, orientations: list[str], reference: str, suffix: str = ".nii.gz") -> None:
    """Each output has its input's shape and affine and, back in ``reference``'s axes, the reference's voxels."""
    expected = nib.load(out / f"Case_{reference}_seg.nii.gz")
    labels = np.asarray(expected.dataobj)
    assert len(np.unique(labels)) > 1, "a segmentation with one label would not show a misplaced voxel"
    for codes in orientations:
        source = nib.load(data / f"Case_{codes}" / f"Case_{codes}_t1{suffix}")
        seg = nib.load(out / f"Case_{codes}_seg.nii.gz")
        assert nib.aff2axcodes(seg.affine) == tuple(codes), codes
        assert seg.shape == source.shape, codes
        np.testing.assert_allclose(seg.affine, source.affine, atol=1e-5, err_msg=codes)
        back = reoriented(seg, reference)
        np.testing.assert_allclose(back.affine, expected.affine, atol=1e-5, err_msg=codes)
        assert np.array_equal(np.asarray(back.dataobj), labels), f"{codes}: voxels differ from {reference}'s"


def _reference(case: Path) -> str:
    return "".join(nib.aff2axcodes(nib.load(next(case.glob("*_t1.nii.gz"))).affine))


def test_the_fast_orientations_cover_every_axis_order_and_flip() -> None:
    assert len({tuple("LRPAIS".index(letter) // 2 for letter in codes) for codes in SOME}) == 6
    assert set("".join(SOME)) == set("LRPAIS")


@pytest.mark.parametrize("orientations", [SOME, pytest.param(ORIENTATIONS, marks=pytest.mark.slow)], ids=["6", "48"])
def test_orientations_round_trip_through_python_m_bundle_infer(tmp_path: Path, orientations: list[str]) -> None:
    base = _base_case(tmp_path / "base", "Base")
    reference = _reference(base)  # the case as stored: LPS for BraTS
    orientations = sorted({*orientations, reference})
    data = _dataset(tmp_path, base, orientations)
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    out = tmp_path / "out"
    args = ["infer", str(data), "--output", str(out), "--checkpoint", str(checkpoint), "--tta", "false"]
    fire.Fire(COMMANDS, command=[*args, "--window", WINDOW, *THRESHOLDS])
    _check_round_trip(data, out, orientations, reference)


def test_permuted_orientations_through_monai_bundle_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's two orientations (PIR, ASR) with the probabilities too: one channel and three."""
    monkeypatch.chdir(BUNDLE_ROOT)  # where monai.bundle run is started: the configs name each other from there
    orientations = ["RAS", "PIR", "ASR"]
    data = _dataset(tmp_path, _base_case(tmp_path / "base", "Base"), orientations)
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    out = tmp_path / "out"
    run(
        config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"),
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(data),
        output_dir=str(out),
        checkpoint=str(checkpoint),
        tta="false",
        save_probabilities="true",
        window=[32, 32, 24],
        **{k.lstrip("-"): float(v) for k, v in zip(THRESHOLDS[::2], THRESHOLDS[1::2], strict=True)},
    )
    _check_round_trip(data, out, orientations, "RAS")
    for codes in orientations:
        prob = nib.load(out / f"Case_{codes}_prob.nii.gz")
        assert prob.shape == (*nib.load(out / f"Case_{codes}_seg.nii.gz").shape, 3)
        np.testing.assert_allclose(prob.affine, nib.load(out / f"Case_{codes}_seg.nii.gz").affine, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shared_samples_dir() is None, reason="no BraTS samples in ../shared/brats_samples")
def test_a_whole_real_case_in_permuted_orientations(tmp_path: Path) -> None:
    """A whole 240 x 240 x 155 BraTS case, stored as LPS, PIR, ASR and SLA."""
    source = sorted(p for p in shared_samples_dir().iterdir() if p.is_dir())[0]
    orientations = ["LPS", "PIR", "ASR", "SLA"]
    data = tmp_path / "data"
    for codes in orientations:
        folder = data / f"Case_{codes}"
        folder.mkdir(parents=True)
        for modality in MODALITIES:
            image = reoriented(nib.load(next(source.glob(f"*_{modality}.nii.gz"))), codes)
            nib.save(image, folder / f"Case_{codes}_{modality}.nii")  # uncompressed: written and read faster
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    out = tmp_path / "out"
    args = ["infer", str(data), "--output", str(out), "--checkpoint", str(checkpoint), "--tta", "false"]
    fire.Fire(COMMANDS, command=[*args, "--window", "[96,96,96]", *THRESHOLDS])
    _check_round_trip(data, out, orientations, "LPS", suffix=".nii")


@pytest.mark.parametrize("codes", ["PIR", "ASR", "LAS"])
@pytest.mark.parametrize("output_ext", [".nii.gz", ".seg.nrrd"])
def test_the_writers_keep_a_permuted_grid(tmp_path: Path, codes: str, output_ext: str) -> None:
    """One channel with a permuted affine: MONAI 1.6.1's writers resample it "in 2-D" and fail (GridAsGiven)."""
    import torch
    from monai.data import MetaTensor

    from bundle.inference.writers import AtomicSaveImaged, SlicerSegmentationWriter, slicer_segments

    image = reoriented(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), np.diag([1.0, 1.0, 1.0, 1.0])), codes)
    voxels = np.random.default_rng(0).integers(0, 3, size=image.shape).astype(np.uint8)
    label = MetaTensor(torch.from_numpy(voxels)[None], affine=torch.from_numpy(image.affine))
    options = {"output_dtype": np.uint8, "output_ext": output_ext}
    if output_ext == ".seg.nrrd":
        options |= {"writer": SlicerSegmentationWriter, "writer_options": {"segments": slicer_segments("internal")}}
    AtomicSaveImaged("pred", output_dir=tmp_path, output_postfix="seg", **options)({"pred": label, "case_id": "c"})
    if output_ext == ".nii.gz":
        written = nib.load(tmp_path / "c_seg.nii.gz")
        affine, data = written.affine, np.asarray(written.dataobj)
    else:
        import itk

        written = itk.imread(str(tmp_path / "c_seg.seg.nrrd"))
        data = itk.array_from_image(written).transpose()  # ITK's arrays are (z, y, x)
        affine = np.eye(4)
        affine[:3, :3] = itk.array_from_matrix(written.GetDirection()) @ np.diag(written.GetSpacing())
        affine[:3, 3] = written.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS to NIfTI's RAS
    np.testing.assert_allclose(affine, image.affine, atol=1e-6)
    assert np.array_equal(data, voxels)
