"""Tests for bundle/ and bundle/: probabilities -> labels, M4's clean-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_samples_dir
from monai.data import MetaTensor
from monai.transforms import Compose
from scipy import ndimage

from bundle.constants import BACKGROUND, ED, ET, NCR
from bundle.inference.postprocessing import (
    CloseTumourRegionsd,
    RemoveSmallTumourComponentsd,
    RemoveUnconfidentComponentsd,
    SmallETComponentsToNCRd,
    SmallETVolumeToNCRd,
    binary_dilation,
    binary_erosion,
    close_tumour_regions,
    remove_small_tumour_components,
    remove_unconfident_components,
    small_et_components_to_ncr,
    small_et_volume_to_ncr,
)
from bundle.inference.to_labels import (
    ClassesToLabelsd,
    LabelsToSchemed,
    RegionsToLabelsd,
    classes_to_labels,
    labels_to_scheme,
    regions_to_labels,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------
# regions / classes -> labels
# ------------------------------------------------------------------------------------------------

# (p(WT), p(TC), p(ET)) -> internal label; each threshold just below / just above
RULE_CASES = [
    ((0.449, 0.99, 0.99), BACKGROUND),  # WT just below: background whatever TC/ET say
    ((0.451, 0.399, 0.99), ED),  # WT just above, TC just below: edema even with high ET
    ((0.451, 0.401, 0.449), NCR),  # TC just above, ET just below
    ((0.451, 0.401, 0.451), ET),  # ET just above
    ((0.10, 0.10, 0.10), BACKGROUND),
    ((0.99, 0.99, 0.99), ET),
]


def _prob_map(cases) -> torch.Tensor:
    """One voxel per case along the first spatial axis: shape (3, n, 1, 1)."""
    return torch.tensor([c for c, _ in cases], dtype=torch.float32).T[:, :, None, None]


def test_region_rule_every_branch():
    probs = _prob_map(RULE_CASES)
    labels = regions_to_labels(probs)
    assert labels.shape == (1, len(RULE_CASES), 1, 1) and labels.dtype == torch.float32
    assert labels.flatten().tolist() == [lab for _, lab in RULE_CASES]


def test_region_thresholds_are_arguments():
    probs = _prob_map([((0.3, 0.3, 0.3), None)])
    assert regions_to_labels(probs).flatten().tolist() == [BACKGROUND]
    assert regions_to_labels(probs, 0.25).flatten().tolist() == [ED]
    assert regions_to_labels(probs, 0.25, 0.25).flatten().tolist() == [NCR]
    assert regions_to_labels(probs, 0.25, 0.25, 0.25).flatten().tolist() == [ET]


@pytest.mark.parametrize(
    "scheme, values",
    [
        ("internal", [0, 2, 1, 3]),
        ("brats2021", [0, 2, 1, 4]),
        ("brats2023", [0, 2, 1, 3]),
        ("msd", [0, 1, 2, 3]),  # MSD: 1 edema, 2 non-enhancing, 3 enhancing
    ],
)
def test_label_schemes(scheme, values):
    probs = _prob_map(RULE_CASES[:4])
    assert regions_to_labels(probs, scheme=scheme).flatten().tolist() == values
    internal = regions_to_labels(probs)
    assert labels_to_scheme(internal, scheme).flatten().tolist() == values
    out = LabelsToSchemed("label", scheme=scheme)({"label": internal})["label"]
    assert out.flatten().tolist() == values
    # classes: argmax over (bg, NCR, ED, ET) probabilities, same scheme mapping
    onehot = torch.eye(4)[[BACKGROUND, ED, NCR, ET]].T[:, :, None, None] * 0.7 + 0.1
    assert classes_to_labels(onehot, scheme=scheme).flatten().tolist() == values


def test_label_dict_transforms_and_numpy():
    probs = _prob_map(RULE_CASES)
    d = RegionsToLabelsd("pred", output_keys="label", scheme="brats2021")({"pred": probs})
    assert torch.equal(d["pred"], probs)  # probabilities kept for post-processing
    assert d["label"].flatten().tolist() == [0, 2, 1, 4, 0, 4]
    lab_np = regions_to_labels(probs.numpy(), scheme="brats2021")
    assert isinstance(lab_np, np.ndarray) and lab_np.ravel().tolist() == [0, 2, 1, 4, 0, 4]
    cls = ClassesToLabelsd("pred")({"pred": torch.eye(4)[:, :, None]})["pred"]
    assert cls.flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="scheme"):
        RegionsToLabelsd("pred", scheme="brats2019")
    with pytest.raises(ValueError, match="region channels"):
        regions_to_labels(torch.zeros(4, 2, 2))


# ------------------------------------------------------------------------------------------------
# post-processing
# ------------------------------------------------------------------------------------------------


def _blank(shape=(20, 20, 20), dtype=torch.int64, device="cpu"):
    return torch.zeros((1, *shape), dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_small_low_confidence_et_becomes_ncr(device, dtype):
    lab = _blank(dtype=dtype, device=device)
    prob = torch.zeros((1, 20, 20, 20), device=device)
    lab[0, 1:3, 1:3, 1:3] = ET  # 8 voxels, low confidence -> NCR
    prob[0, 1:3, 1:3, 1:3] = 0.6
    lab[0, 10:12, 1:3, 1:3] = ET  # 8 voxels, confident -> stays
    prob[0, 10:12, 1:3, 1:3] = 0.95
    lab[0, 10:14, 10:14, 10:14] = ET  # 64 voxels, low confidence but large -> stays
    prob[0, 10:14, 10:14, 10:14] = 0.6
    lab[0, 1:4, 10:15, 1:2] = ET  # 15 voxels (just below 16), low confidence -> NCR
    prob[0, 1:4, 10:15, 1:2] = 0.6
    lab[0, 1:5, 1:5, 15:16] = ET  # 16 voxels (= threshold, not smaller) -> stays
    prob[0, 1:5, 1:5, 15:16] = 0.6
    lab[0, 18, 18, 18] = ED  # other labels untouched
    out = small_et_components_to_ncr(lab, prob, min_size=16, prob_threshold=0.9)
    assert out.dtype == dtype and out.device == lab.device and out.shape == lab.shape
    o = out[0].cpu()
    assert (o[1:3, 1:3, 1:3] == NCR).all()
    assert (o[1:4, 10:15, 1:2] == NCR).all()
    assert (o[10:12, 1:3, 1:3] == ET).all()
    assert (o[10:14, 10:14, 10:14] == ET).all()
    assert (o[1:5, 1:5, 15:16] == ET).all()
    assert o[18, 18, 18] == ED
    assert int((o != lab[0].cpu()).sum()) == 8 + 15
    # the paper's other threshold: 73 voxels also demotes the 64-voxel blob
    out73 = small_et_components_to_ncr(lab, prob, min_size=73)
    assert (out73[0, 10:14, 10:14, 10:14] == NCR).all()


def test_small_et_components_dict_uses_et_channel_of_probabilities():
    lab = _blank()
    lab[0, 1:3, 1:3, 1:3] = ET
    probs = torch.zeros(3, 20, 20, 20)
    probs[2, 1:3, 1:3, 1:3] = 0.95  # ET channel (region order WT, TC, ET) is confident
    probs[0, 1:3, 1:3, 1:3] = 0.1
    d = {"label": lab, "pred": probs}
    assert torch.equal(SmallETComponentsToNCRd("label", prob_key="pred")(d)["label"], lab)
    # read from the wrong channel the same blob looks unconfident and is demoted
    demoted = SmallETComponentsToNCRd("label", prob_key="pred", et_channel=0)(d)["label"]
    assert (demoted[0, 1:3, 1:3, 1:3] == NCR).all()


@pytest.mark.parametrize("device", DEVICES)
def test_small_unconfident_et_volume_becomes_ncr(device):
    """The paper's second rule: fewer than 73 ET voxels in the case *and* their mean p(ET) < 0.9: all ET -> NCR."""
    lab = _blank(device=device)
    lab[0, 5:15, 5:15, 5:15] = ED
    lab[0, 8:10, 8:10, 8:10] = ET  # 8 ET voxels in the whole case
    lab[0, 12, 12, 12] = ET  # 9 in total, in two components
    prob = torch.zeros(1, 20, 20, 20, device=device)
    prob[0, 8:10, 8:10, 8:10] = 0.85
    prob[0, 12, 12, 12] = 0.95  # mean (8 * 0.85 + 0.95) / 9 = 0.861 < 0.9
    out = small_et_volume_to_ncr(lab, prob, min_volume=10, prob_threshold=0.9)
    assert out.device == lab.device
    assert int((out == ET).sum()) == 0 and int((out == NCR).sum()) == 9
    assert torch.equal(out == ED, lab == ED)
    assert torch.equal(small_et_volume_to_ncr(lab, prob, min_volume=9), lab)  # 9 voxels is not below 9
    # as confident as the threshold (mean 0.861 >= 0.86): kept, however small
    assert torch.equal(small_et_volume_to_ncr(lab, prob, min_volume=10, prob_threshold=0.86), lab)
    prob[0, 8:10, 8:10, 8:10] = 0.95
    assert torch.equal(small_et_volume_to_ncr(lab, prob, min_volume=10), lab)  # confident: kept
    # the paper's numbers are the defaults: 72 unconfident voxels go, 73 stay
    big = _blank(device=device)
    big[0, 0:8, 0:9, 0] = ET  # 72
    p = torch.full((1, 20, 20, 20), 0.5, device=device)
    assert int((small_et_volume_to_ncr(big, p) == NCR).sum()) == 72
    big[0, 10, 10, 10] = ET  # 73
    assert torch.equal(small_et_volume_to_ncr(big, p), big)
    empty = _blank(device=device)
    assert torch.equal(
        SmallETVolumeToNCRd("label", prob_key="pred")({"label": empty, "pred": p.expand(3, -1, -1, -1)})["label"], empty
    )


def test_et_volume_dict_reads_the_et_channel():
    lab = _blank()
    lab[0, 1:3, 1:3, 1:3] = ET  # 8 voxels
    probs = torch.zeros(4, 20, 20, 20)
    probs[3, 1:3, 1:3, 1:3] = 0.95  # class models: ET is channel 3 and here confident
    d = {"label": lab, "pred": probs}
    assert torch.equal(SmallETVolumeToNCRd("label", et_channel=3)(d)["label"], lab)
    demoted = SmallETVolumeToNCRd("label", et_channel=2)(d)["label"]  # the wrong channel reads p = 0
    assert (demoted[0, 1:3, 1:3, 1:3] == NCR).all()


@pytest.mark.parametrize("device", DEVICES)
def test_small_isolated_tumour_component_removed_big_one_stays(device):
    lab = _blank(dtype=torch.float32, device=device)
    lab[0, 2:8, 2:8, 2:8] = ED  # 216 voxels, mixed labels: one whole-tumour component
    lab[0, 4:6, 4:6, 4:6] = ET
    lab[0, 3, 3, 3] = NCR
    lab[0, 15:17, 15:17, 15] = ET  # 4 isolated voxels
    lab[0, 15, 2, 2] = NCR  # 1 isolated voxel
    out = remove_small_tumour_components(lab, min_size=10)
    assert out.device == lab.device and out.dtype == lab.dtype
    assert torch.equal(out[0, 2:8, 2:8, 2:8], lab[0, 2:8, 2:8, 2:8])
    assert int((out[0, 12:, :, :] != 0).sum()) == 0
    # a 4-voxel component is kept by min_size=4 (only strictly smaller components go)
    assert int((remove_small_tumour_components(lab, min_size=4)[0, 15:17, 15:17, 15] == ET).sum()) == 4


def test_component_connectivity():
    lab = _blank()
    lab[0, 2:8, 2:8, 2:8] = ED
    lab[0, 8, 8, 8] = ET  # touches the cube only at a corner
    full = RemoveSmallTumourComponentsd("label", min_size=10)({"label": lab})["label"]
    assert full[0, 8, 8, 8] == ET  # 26-connectivity: part of the big component
    faces = RemoveSmallTumourComponentsd("label", min_size=10, connectivity=1)({"label": lab})["label"]
    assert faces[0, 8, 8, 8] == BACKGROUND  # 6-connectivity: isolated single voxel


@pytest.mark.parametrize("device", DEVICES)
def test_closing_fills_one_voxel_hole(device):
    lab = _blank(dtype=torch.uint8, device=device)
    lab[0, 2:9, 2:9, 2:9] = ED
    lab[0, 5, 5, 5] = BACKGROUND  # hole inside edema -> ED
    lab[0, 11:18, 11:18, 11:18] = ET
    lab[0, 14, 14, 14] = BACKGROUND  # hole inside ET -> ET
    out = close_tumour_regions(lab)
    assert out.dtype == torch.uint8 and out.device == lab.device
    expected = lab.clone()
    expected[0, 5, 5, 5] = ED
    expected[0, 14, 14, 14] = ET
    assert torch.equal(out, expected)
    assert torch.equal(CloseTumourRegionsd("label")({"label": lab})["label"], expected)


@pytest.mark.parametrize("shape, filter_size", [((9, 8, 7), 3), ((9, 8, 7), 5), ((11, 10), 3), ((11, 10), 5)])
def test_boolean_morphology_equals_monai(shape, filter_size):
    from monai.transforms.utils_morphological_ops import dilate, erode

    torch.manual_seed(9)
    radius = filter_size // 2
    # sparse masks for dilation, dense ones for erosion: otherwise both saturate and the check is void
    for density in (0.05, 0.9):
        mask = torch.rand(2, 1, *shape) < density
        before = mask.clone()
        ours_d = binary_dilation(mask, radius, len(shape))
        ours_e = binary_erosion(mask, radius, len(shape))
        assert torch.equal(mask, before)  # inputs are not modified in place
        # MONAI's versions, one channel per item (they sum over channels)
        assert torch.equal(ours_d, dilate(mask.float(), filter_size) > 0.5)
        assert torch.equal(ours_e, erode(mask.float(), filter_size) > 0.5)
        changed = ours_d if density < 0.5 else ~ours_e
        assert 0 < changed.float().mean() < 1 and not torch.equal(changed, mask if density < 0.5 else ~mask)


@pytest.mark.parametrize("shape, radius", [((9, 8, 7), 1), ((9, 8, 7), 2), ((11, 10), 1)])
def test_cross_morphology_equals_scipy(shape, radius):
    """The cross (face neighbours, repeated): scipy's binary morphology with the 1-connectivity element."""
    torch.manual_seed(11)
    structure = ndimage.generate_binary_structure(len(shape), 1)
    for density in (0.05, 0.9):
        mask = torch.rand(*shape) < density
        dilated = binary_dilation(mask, radius, element="cross")
        eroded = binary_erosion(mask, radius, element="cross")
        expected_d = ndimage.binary_dilation(mask.numpy(), structure, iterations=radius)
        expected_e = ndimage.binary_erosion(mask.numpy(), structure, iterations=radius, border_value=1)
        np.testing.assert_array_equal(dilated.numpy(), expected_d)
        np.testing.assert_array_equal(eroded.numpy(), expected_e)
        # and it is not the cube: the check can tell the two elements apart
        assert not torch.equal(
            dilated if density < 0.5 else eroded, (binary_dilation if density < 0.5 else binary_erosion)(mask, radius)
        )
    with pytest.raises(ValueError, match="element"):
        binary_dilation(mask, 1, element="ball")


def test_cross_closing_changes_less_than_the_cube():
    """A one-voxel gap between two plates closes under both; a diagonal notch only under the cube."""
    lab = _blank(dtype=torch.uint8)
    lab[0, 4:12, 4:12, 4:12] = ET
    lab[0, 8, 4:12, 4:12] = NCR  # a one-voxel NCR layer between two ET plates: both elements close ET over it
    lab[0, 11, 11, 12] = ET  # a voxel touching the cube along a face
    lab[0, 12, 12, 12] = ED  # a corner-touching voxel of another label
    cross = close_tumour_regions(lab, 3, "cross")
    cube = close_tumour_regions(lab, 3, "cube")
    assert (cross[0, 8, 5:11, 5:11] == ET).all() and (cube[0, 8, 5:11, 5:11] == ET).all()
    assert int((cross != lab).sum()) < int((cube != lab).sum())
    assert ((cross != BACKGROUND) | (lab == BACKGROUND)).all() and ((cube != BACKGROUND) | (lab == BACKGROUND)).all()


def test_closing_on_the_bounding_box_equals_closing_on_the_whole_volume():
    torch.manual_seed(10)
    lab = torch.zeros(1, 30, 30, 30, dtype=torch.int64)
    blob = torch.randint(0, 4, (12, 12, 12)) * (torch.rand(12, 12, 12) > 0.3)
    lab[0, 0:12, 10:22, 17:29] = blob  # touching one border of the volume, close to another
    out = close_tumour_regions(lab, filter_size=5, element="cube")
    # reference: the same rule on the whole volume with MONAI's morphology (no cropping)
    from monai.transforms.utils_morphological_ops import dilate, erode

    regions = torch.stack([lab[0] != BACKGROUND, (lab[0] == NCR) | (lab[0] == ET), lab[0] == ET])[:, None].float()
    closed = erode(dilate(regions, 5), 5)[:, 0] > 0.5
    ref = torch.where(closed[0], ED, BACKGROUND)
    ref = torch.where(closed[0] & closed[1], NCR, ref)
    ref = torch.where(closed[0] & closed[1] & closed[2], ET, ref)
    assert torch.equal(out[0], ref)
    assert not torch.equal(out, lab)
    assert ((out != BACKGROUND) | (lab == BACKGROUND)).all()  # closing never removes tumour
    with pytest.raises(ValueError, match="odd"):
        close_tumour_regions(lab, filter_size=4)


@pytest.mark.parametrize("filter_size", [3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_cross_closing_equals_scipy_per_region(filter_size: int, dtype) -> None:
    """The cross closing of each nested region (scipy's reference, erosion with the outside as 1),
    recombined by the region rule, on random label maps that touch the volume's border."""
    rng = np.random.default_rng(filter_size)
    structure = ndimage.generate_binary_structure(3, 1)
    radius = filter_size // 2
    for _ in range(5):
        lab = rng.choice(4, size=(1, 19, 23, 17), p=[0.55, 0.15, 0.15, 0.15]).astype(dtype)
        lab[0, :, :, :3] = BACKGROUND
        out = close_tumour_regions(lab, filter_size, "cross")
        regions = [lab[0] != BACKGROUND, (lab[0] == NCR) | (lab[0] == ET), lab[0] == ET]
        closed = [
            ndimage.binary_erosion(
                ndimage.binary_dilation(r, structure, iterations=radius), structure, iterations=radius, border_value=1
            )
            for r in regions
        ]
        ref = np.where(closed[0], np.where(closed[1], np.where(closed[2], ET, NCR), ED), BACKGROUND)
        assert out.dtype == lab.dtype and np.array_equal(out[0], ref)


def test_uint8_morphology_is_per_bit_plane() -> None:
    """A uint8 tensor dilates and erodes as eight independent masks (what the closing's packing relies on)."""
    rng = np.random.default_rng(4)
    planes = torch.from_numpy(rng.random((8, 11, 13, 9)) > 0.7)
    packed = sum(planes[b].to(torch.uint8) << b for b in range(8))
    for fn in (binary_dilation, binary_erosion):
        for element in ("cross", "cube"):
            out = fn(packed, 1, 3, element)
            assert out.dtype == torch.uint8
            for b in range(8):
                assert torch.equal((out >> b) & 1 == 1, fn(planes[b], 1, 3, element)), (fn.__name__, element, b)


#: internal label -> how many of the nested regions hold it (BG 0, ED 1: WT, NCR 2: WT+TC, ET 3: all three)
_NESTING = np.zeros(4, dtype=np.uint8)
_NESTING[ED], _NESTING[NCR], _NESTING[ET] = 1, 2, 3
_LEVEL_TO_LABEL = np.array([BACKGROUND, ED, NCR, ET])


def _grey_closing(lab: np.ndarray, filter_size: int, element: str) -> np.ndarray:
    """scipy's grey-level closing of the nesting level, the library's way to the same labels (issue 21).

    With a flat element, thresholding commutes with grey-level dilation and erosion, so the level map's
    closing at >= 1, >= 2 and 3 is the closing of WT, TC and ET; ``mode="nearest"`` repeats the border
    voxel, which a symmetric flat element already covers, so the outside plays no part. Not the bundle's
    code: it gives the same labels but is slower (docs/benchmarks/postprocessing_closing.md).
    """
    if filter_size == 1:
        return lab
    cross = ndimage.iterate_structure(ndimage.generate_binary_structure(lab.ndim - 1, 1), filter_size // 2)
    footprint = cross if element == "cross" else np.ones((filter_size,) * (lab.ndim - 1), bool)
    levels = _NESTING[lab[0].astype(np.intp)]
    return _LEVEL_TO_LABEL[ndimage.grey_closing(levels, footprint=footprint, mode="nearest")][None].astype(lab.dtype)


def _assert_closing_is_scipys_grey_closing(lab: np.ndarray) -> int:
    """Every element and size: the same labels as scipy's grey closing; returns how many voxels changed."""
    changed = 0
    for element in ("cross", "cube"):
        for filter_size in (1, 3, 5):
            ours = np.asarray(close_tumour_regions(lab, filter_size, element))
            np.testing.assert_array_equal(ours, _grey_closing(lab, filter_size, element), f"{element} {filter_size}")
            changed += int((ours != lab).sum())
    return changed


def test_closing_is_scipys_grey_closing_on_synthetic_label_maps() -> None:
    rng = np.random.default_rng(21)
    for trial in range(12):
        shape = (1, *rng.integers(4, 24, 3 if trial % 4 else 2))  # 3-D, and 2-D slices
        lab = rng.choice(4, size=shape, p=[0.4, 0.2, 0.2, 0.2]).astype(np.uint8)
        if trial % 2:  # blobs with holes and notches rather than noise
            lab = ndimage.median_filter(lab, size=3)
        assert _assert_closing_is_scipys_grey_closing(lab) > 0


def _real_label_maps(path) -> dict[str, np.ndarray]:
    """A real ground truth on its tumour's box, and predictions made from it: holes and specks, then shifted."""
    from bundle.evaluation.files import load_label_map

    truth, _, _ = load_label_map(path, "brats2021")
    box = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(truth))
    truth = truth[box].astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    noisy[rng.random(truth.shape) < 0.05] = BACKGROUND  # holes inside the tumour
    specks = rng.random(truth.shape) < 0.01
    noisy[specks] = rng.choice([NCR, ED, ET], size=int(specks.sum()))
    return {"truth": truth[None], "noisy": noisy[None], "shifted": np.roll(noisy, 3, axis=1)[None]}


def test_closing_is_scipys_grey_closing_on_a_real_case() -> None:
    samples = shared_samples_dir()
    if samples is None:
        pytest.skip("no real BraTS samples (../shared/brats_samples)")
    for lab in _real_label_maps(sorted(samples.glob("*/*_seg.nii.gz"))[0]).values():
        assert _assert_closing_is_scipys_grey_closing(lab) > 0


@pytest.mark.slow
def test_closing_is_scipys_grey_closing_on_all_real_cases() -> None:
    samples = shared_samples_dir()
    if samples is None:
        pytest.skip("no real BraTS samples (../shared/brats_samples)")
    for path in sorted(samples.glob("*/*_seg.nii.gz")):
        for lab in _real_label_maps(path).values():
            assert _assert_closing_is_scipys_grey_closing(lab) > 0


def test_post_processing_keeps_numpy_and_metatensor():
    lab = np.zeros((1, 10, 10, 10), dtype=np.int16)
    lab[0, 1, 1, 1] = ET
    lab[0, 5:9, 5:9, 5:9] = ED
    out = remove_small_tumour_components(lab, min_size=5)
    assert isinstance(out, np.ndarray) and out.dtype == np.int16 and out[0, 1, 1, 1] == 0
    affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    meta = MetaTensor(torch.as_tensor(lab).float(), affine=affine)
    for fn in (
        lambda m: remove_small_tumour_components(m, 5),
        lambda m: small_et_volume_to_ncr(m, torch.zeros(10, 10, 10), 5),
        lambda m: small_et_components_to_ncr(m, torch.zeros(10, 10, 10)),
        close_tumour_regions,
    ):
        res = fn(meta)
        assert isinstance(res, MetaTensor), fn
        torch.testing.assert_close(res.affine.float(), affine)


def test_full_post_processing_chain():
    """Regions -> internal labels -> M4 clean-up -> BraTS 2021 values, as the inference config composes it."""
    probs = torch.zeros(3, 16, 16, 16)
    probs[:, 2:10, 2:10, 2:10] = torch.tensor([0.9, 0.8, 0.1])[:, None, None, None]  # NCR block
    probs[:, 4:8, 4:8, 4:8] = torch.tensor([0.9, 0.8, 0.95])[:, None, None, None]  # confident ET inside
    probs[:, 13, 13, 13] = torch.tensor([0.9, 0.9, 0.6])  # isolated unconfident ET voxel
    chain = Compose(
        [
            RegionsToLabelsd("pred", output_keys="label"),
            SmallETComponentsToNCRd("label", prob_key="pred"),
            SmallETVolumeToNCRd("label", prob_key="pred", min_volume=10),
            RemoveSmallTumourComponentsd("label", min_size=5),
            CloseTumourRegionsd("label"),
            LabelsToSchemed("label", scheme="brats2021"),
        ]
    )
    lab = chain({"pred": probs})["label"]
    assert set(torch.unique(lab).tolist()) == {0, 1, 4}
    assert int((lab == 4).sum()) == 64 and int((lab == 1).sum()) == 8**3 - 64
    assert lab[0, 13, 13, 13] == 0


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_components_never_confident_go_the_most_confident_stays(device):
    """A large false region just above the threshold goes whatever its size; a confident tumour stays."""
    labels = torch.zeros(1, 24, 24, 24, dtype=torch.uint8, device=device)
    prob = torch.zeros(24, 24, 24, device=device)
    labels[0, 2:8, 2:8, 2:8] = ED  # the tumour: a confident core
    prob[2:8, 2:8, 2:8] = 0.7
    prob[4:6, 4:6, 4:6] = 0.99
    labels[0, 12:22, 12:22, 12:22] = ED  # 1000 voxels, never above 0.6: a false region
    prob[12:22, 12:22, 12:22] = 0.6
    out = remove_unconfident_components(labels, prob, min_prob=0.9)
    assert out.device == labels.device and out.dtype == labels.dtype
    assert int((out[0, 2:8, 2:8, 2:8] == ED).sum()) == 216 and int(out[0, 12:22, 12:22, 12:22].sum()) == 0
    prob[4:6, 4:6, 4:6] = 0.7  # no component reaches 0.9: the case is never emptied
    alone = remove_unconfident_components(labels, prob, min_prob=0.9)
    assert int((alone[0, 2:8, 2:8, 2:8] == ED).sum()) == 216, "the most confident component stays"
    assert int(alone[0, 12:22, 12:22, 12:22].sum()) == 0


def test_confident_components_dict_reads_p_wt_of_regions_and_classes():
    labels = np.zeros((1, 12, 12, 12), np.uint8)
    labels[0, 1:4, 1:4, 1:4] = NCR
    labels[0, 7:10, 7:10, 7:10] = NCR
    regions = np.zeros((3, 12, 12, 12), np.float32)
    regions[0, 1:4, 1:4, 1:4] = 0.95
    regions[0, 7:10, 7:10, 7:10] = 0.5
    out = RemoveUnconfidentComponentsd("label", prob_key="pred", min_prob=0.9)({"label": labels, "pred": regions})
    assert out["label"][0, 2, 2, 2] == NCR and out["label"][0, 8, 8, 8] == BACKGROUND
    classes = np.zeros((4, 12, 12, 12), np.float32)  # p(WT) = NCR + ED + ET
    classes[1:4, 1:4, 1:4, 1:4] = 0.32
    classes[1:4, 7:10, 7:10, 7:10] = 0.2
    step = RemoveUnconfidentComponentsd("label", prob_key="pred", wt_channels=(1, 2, 3), min_prob=0.9)
    out = step({"label": labels, "pred": classes})
    assert out["label"][0, 2, 2, 2] == NCR and out["label"][0, 8, 8, 8] == BACKGROUND
