"""Metric definitions on hand-computed masks, agreement with the official BraTS evaluation, summaries, comparison."""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bundle.constants import DISJOINT_CLASSES, LABEL_SCHEMES, REGIONS
from bundle.errors import OptionError
from bundle.evaluation.files import case_id_from_path, load_label_map, read_metrics_csv, write_metrics_csv
from bundle.evaluation.metrics import (
    MAX_DISTANCE_MM,
    evaluate_case,
    hd95,
    hd95_monai,
    lesion_wise_brats2023,
    lesion_wise_matched,
    overlap_metrics,
    region_masks,
    surface_distances,
)
from bundle.evaluation.reports import evaluate_folder, summarize
from bundle.evaluation.statistics import bootstrap_ci, compare

SAMPLES = Path(os.environ.get("BRATS_SAMPLES", Path(__file__).parents[2] / "shared" / "brats_samples"))


def _box(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[tuple(slices)] = True
    return mask


# ----------------------------------------------------------------------------- overlap metrics


def test_overlap_metrics_hand_computed():
    # 20 voxels; truth = 6, prediction = 4, overlap 3 -> TP 3, FP 1, FN 3, TN 13
    truth = np.zeros((1, 4, 5), bool)
    pred = np.zeros_like(truth)
    truth[0, 0, :5] = True
    truth[0, 1, 0] = True
    pred[0, 0, :3] = True
    pred[0, 2, 0] = True
    m = overlap_metrics(pred, truth)
    assert m["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 3))
    assert m["iou"] == pytest.approx(3 / 7)
    assert m["sensitivity"] == pytest.approx(3 / 6)
    assert m["specificity"] == pytest.approx(13 / 14)
    assert m["accuracy"] == pytest.approx(16 / 20)


def test_overlap_empty_conventions():
    empty = np.zeros((3, 3, 3), bool)
    full = _box((3, 3, 3), slice(1, 2), slice(1, 2), slice(1, 3))
    both = overlap_metrics(empty, empty)
    assert both == {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "specificity": 1.0, "accuracy": 1.0}
    missed = overlap_metrics(empty, full)  # prediction empty, truth not
    assert (missed["dice"], missed["iou"], missed["sensitivity"], missed["specificity"]) == (0.0, 0.0, 0.0, 1.0)
    spurious = overlap_metrics(full, empty)  # truth empty, prediction not
    assert (spurious["dice"], spurious["iou"], spurious["sensitivity"]) == (0.0, 0.0, 0.0)
    assert spurious["specificity"] == pytest.approx(25 / 27)


# ----------------------------------------------------------------------------- HD95


def test_hd95_pooled_vs_monai_with_anisotropic_spacing():
    # truth: one voxel A; prediction: A and a voxel B four voxels away along the last axis (2.5 mm spacing).
    # directed truth->pred {0}, pred->truth {0, 10 mm}; pooled {0, 0, 10}: 95th percentile (linear) = 9.0 mm;
    # MONAI: max(p95{0}, p95{0, 10}) = 9.5 mm
    truth = _box((3, 3, 9), slice(1, 2), slice(1, 2), slice(2, 3))
    pred = truth.copy()
    pred[1, 1, 6] = True
    spacing = (1.0, 1.0, 2.5)
    assert hd95(pred, truth, spacing) == pytest.approx(9.0)
    assert hd95_monai(pred, truth, spacing) == pytest.approx(9.5, abs=1e-5)
    # same geometry along an axis with 1 mm spacing: 3.6 / 3.8 mm
    assert hd95(pred.transpose(2, 1, 0), truth.transpose(2, 1, 0), (1.0, 1.0, 2.5)) == pytest.approx(3.6)
    assert hd95(pred, truth) == pytest.approx(3.6)


def test_hd95_translation_and_symmetry():
    truth = _box((20, 20, 20), slice(5, 12), slice(5, 12), slice(5, 12))
    pred = np.roll(truth, 2, axis=0)
    # every surface distance of a pure translation along one axis is at most 2 voxels (0.8 mm each here)
    assert 0.0 < hd95(pred, truth, (0.8, 1.0, 1.0)) <= 1.6 + 1e-6  # MONAI's distances are float32
    assert hd95(pred, truth) == pytest.approx(hd95(truth, pred))
    assert hd95(truth, truth, (0.8, 1.0, 3.0)) == 0.0


def test_surface_is_mask_minus_face_connected_erosion():
    cube = _box((7, 7, 7), slice(2, 5), slice(2, 5), slice(2, 5))  # 27 voxels, erosion leaves the centre
    d_truth, d_pred = surface_distances(cube, cube)
    assert len(d_truth) == len(d_pred) == 26
    # a plus-shaped cross: the 1-connectivity erosion keeps the centre only if all 6 faces are in the mask
    cross = ndimage.generate_binary_structure(3, 1)
    d, _ = surface_distances(cross, cross)
    assert len(d) == 6


def _old_surface_distances(pred, truth, spacing):
    """The hand-written surface distances before MONAI's get_edge_surface_distance (issue 21): the reference.

    Surface = mask minus its face-connected erosion, distances by scipy's exact EDT in float64.
    """
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=footprint)
    truth_border = truth ^ ndimage.binary_erosion(truth, structure=footprint)
    d_truth = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[truth_border]
    d_pred = ndimage.distance_transform_edt(~truth_border, sampling=spacing)[pred_border]
    return d_truth, d_pred


def _assert_same_distances(pred, truth, spacing):
    """Same surface voxels in the same order, distances within MONAI's float32, the same pooled HD95."""
    new, old = surface_distances(pred, truth, spacing), _old_surface_distances(pred, truth, spacing)
    for ours, reference in zip(new, old, strict=True):
        assert ours.dtype == np.float64 and ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    pooled = np.percentile(np.concatenate(old), 95)
    assert hd95(pred, truth, spacing) == pytest.approx(pooled, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monai_surface_distances_are_the_old_ones_on_synthetic_pairs(seed):
    rng = np.random.default_rng(seed)
    pred, truth = _synthetic_case(rng)
    spacing = [(1.0, 1.0, 1.0), (0.9, 1.1, 2.5), (1.2, 1.2, 1.2)][seed]
    for region, mask in region_masks(pred).items():
        _assert_same_distances(mask, region_masks(truth)[region], spacing)
    # masks touching the image border (the border voxels are surface), and a 2-D pair
    _assert_same_distances(pred[:20] > 0, truth[:20] > 0, spacing)
    _assert_same_distances(pred[:, :, 20] > 0, truth[:, :, 20] > 0, spacing[:2])


def _assert_same_distances_on_real_case(path, regions, perturbations=("eroded", "shifted", "lesion_removed")):
    truth, spacing = _load_cropped(path)
    truths = region_masks(truth, regions)
    for name, pred in _perturbations(truth).items():
        if name not in perturbations:
            continue
        for region, mask in region_masks(pred, regions).items():
            if mask.any() and truths[region].any():
                _assert_same_distances(mask, truths[region], spacing)


def test_monai_surface_distances_are_the_old_ones_on_a_real_case():
    cases = _sample_cases()
    if not cases:
        pytest.skip(f"no BraTS samples at {SAMPLES} (set BRATS_SAMPLES)")
    # the shifted truth (every surface voxel moves); the other perturbations, NCR and ED with -m slow
    _assert_same_distances_on_real_case(cases[0], REGIONS, ("shifted",))


@pytest.mark.slow
def test_monai_surface_distances_are_the_old_ones_on_all_real_cases():
    cases = _sample_cases()
    if not cases:
        pytest.skip(f"no BraTS samples at {SAMPLES} (set BRATS_SAMPLES)")
    for path in cases:
        _assert_same_distances_on_real_case(path, {**REGIONS, **DISJOINT_CLASSES})


@pytest.mark.parametrize("fn", [hd95, hd95_monai])
def test_hd95_empty_conventions(fn):
    empty = np.zeros((4, 4, 4), bool)
    full = _box((4, 4, 4), slice(1, 3), slice(1, 3), slice(1, 3))
    assert fn(empty, empty) == 0.0
    assert fn(empty, full) == MAX_DISTANCE_MM
    assert fn(full, empty) == MAX_DISTANCE_MM


# ----------------------------------------------------------------------------- lesion-wise


def _two_lesions_and_a_false_positive():
    shape = (40, 40, 40)
    truth = _box(shape, slice(5, 10), slice(5, 10), slice(5, 10))  # L1, 125 voxels
    truth |= _box(shape, slice(25, 29), slice(25, 29), slice(25, 29))  # L2, 64 voxels
    small = _box(shape, slice(5, 8), slice(30, 33), slice(30, 33))  # 27 voxels <= 50: ignored
    truth |= small
    pred = _box(shape, slice(5, 10), slice(5, 10), slice(5, 10))  # L1 found exactly
    pred |= small  # the small lesion found: neither TP nor FP
    pred |= _box(shape, slice(30, 32), slice(5, 7), slice(5, 7))  # false positive far away; L2 missed
    return pred, truth


def test_lesion_wise_brats2023_hand_made_case():
    pred, truth = _two_lesions_and_a_false_positive()
    r = lesion_wise_brats2023(pred, truth)
    assert (r.tp, r.fp, r.fn) == (1, 1, 1)
    # (Dice L1 + Dice L2) / (2 lesions + 1 FP); HD95 with 374 mm for the miss and the FP
    assert r.dice == pytest.approx((1.0 + 0.0) / 3)
    assert r.hd95 == pytest.approx((0.0 + 374.0 + 374.0) / 3)
    assert len(r.per_lesion) == 3 and sum(x["kept"] for x in r.per_lesion) == 2


def test_lesion_wise_brats2023_dilation_matching_and_volume_threshold_in_mm():
    pred, truth = _two_lesions_and_a_false_positive()
    near = pred.copy()
    near[11, 7, 7] = True  # a separate component one voxel beyond L1: inside L1's 3-voxel dilation
    r = lesion_wise_brats2023(near, truth)
    assert r.fp == 1  # still only the far one
    assert r.per_lesion[0]["dice"] == pytest.approx(2 * 125 / (125 + 126))
    # at 2 mm isotropic the 27-voxel lesion is 216 mm^3 > 50 and is scored (found exactly: Dice 1)
    r2 = lesion_wise_brats2023(pred, truth, spacing=(2.0, 2.0, 2.0))
    assert (r2.tp, r2.fp, r2.fn) == (2, 1, 1)
    assert r2.dice == pytest.approx(2.0 / 4)


def test_lesion_wise_brats2023_merges_lesions_whose_dilations_touch():
    shape = (30, 12, 12)
    a = _box(shape, slice(2, 6), slice(4, 8), slice(4, 8))
    close = a | _box(shape, slice(10, 14), slice(4, 8), slice(4, 8))  # gap 4 voxels: dilations (3 each) touch
    far = a | _box(shape, slice(14, 18), slice(4, 8), slice(4, 8))  # gap 8: separate lesions
    assert len(lesion_wise_brats2023(close, close).per_lesion) == 1
    assert len(lesion_wise_brats2023(far, far).per_lesion) == 2


def test_lesion_wise_matched_hand_made_case():
    pred, truth = _two_lesions_and_a_false_positive()
    r = lesion_wise_matched(pred, truth)
    # L1 and the small lesion matched exactly, L2 missed, one FP
    assert (r.tp, r.fp, r.fn) == (2, 1, 1)
    assert r.dice == pytest.approx(1.0) and r.hd95 == pytest.approx(0.0)
    assert r.f1 == pytest.approx(2 / (2 + 0.5 + 0.5))


def test_lesion_wise_empty_conventions():
    empty = np.zeros((10, 10, 10), bool)
    blob = _box((10, 10, 10), slice(2, 8), slice(2, 8), slice(2, 8))  # 216 voxels
    for fn in (lesion_wise_brats2023, lesion_wise_matched):
        both = fn(empty, empty)
        assert (both.dice, both.hd95) == (1.0, 0.0)
        for p, t in ((empty, blob), (blob, empty)):
            one = fn(p, t)
            assert (one.dice, one.hd95) == (0.0, 374.0)


def test_evaluate_case_regions_and_columns():
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:10, 2:10, 2:10] = 2  # ED
    truth[4:8, 4:8, 4:8] = 1  # NCR
    truth[5:7, 5:7, 5:7] = 3  # ET
    rows = evaluate_case(truth, truth, (1.0, 1.0, 2.0), include_disjoint=True, case_id="c1")
    assert [r["region"] for r in rows] == ["WT", "TC", "ET", "NCR", "ED"]
    for r in rows:
        assert r["case"] == "c1" and r["dice"] == 1.0 and r["hd95"] == 0.0 and r["lesion_dice"] == 1.0
    assert rows[0]["volume_true"] == pytest.approx(8**3 * 2.0)
    pred = truth.copy()
    pred[pred == 3] = 1  # ET missed entirely: ET Dice 0 / 374 mm, TC unchanged
    rows = {r["region"]: r for r in evaluate_case(pred, truth, lesion_wise=False)}
    assert rows["ET"]["dice"] == 0.0 and rows["ET"]["hd95"] == MAX_DISTANCE_MM
    assert rows["TC"]["dice"] == 1.0 and "lesion_dice" not in rows["TC"]
    assert rows["WT"]["volume_false_positive"] == 0.0
    pred[0, 0, :3] = 2  # 3 voxels of ED outside the tumour: false positives of WT, not of TC or ET
    rows = {r["region"]: r for r in evaluate_case(pred, truth, (1.0, 1.0, 2.0), lesion_wise=False)}
    assert rows["WT"]["volume_false_positive"] == pytest.approx(3 * 2.0)
    assert rows["TC"]["volume_false_positive"] == 0.0 and rows["ET"]["volume_false_positive"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(pred[:-1], truth)


def test_evaluate_case_on_2d_slices():
    truth = np.zeros((20, 20), np.uint8)
    truth[2:16, 2:16] = 2  # 196 px = 98 mm^2
    truth[6:10, 6:10] = 3  # 16 px = 8 mm^2
    pred = np.roll(truth, 3, axis=1)  # 3 columns of 0.5 mm
    rows = {r["region"]: r for r in evaluate_case(pred, truth, (1.0, 0.5))}
    assert rows["WT"]["dice"] == pytest.approx(2 * 14 * 11 / 392)
    assert rows["WT"]["hd95"] == pytest.approx(hd95(pred > 0, truth > 0, (1.0, 0.5)))
    assert 0 < rows["WT"]["hd95"] <= 1.5 + 1e-9
    assert rows["ET"]["lesion_tp"] == 0 and rows["ET"]["lesion_dice"] == 1.0  # 16 px * 0.5 mm^2 < 50: ignored
    assert rows["WT"]["lesion_tp"] == 1 and rows["WT"]["lesion_dice"] == pytest.approx(rows["WT"]["dice"])


# ----------------------------------------------------------------------------- agreement with brats-evaluation


@pytest.fixture(scope="module")
def official():
    """The official BraTS evaluator (brats-evaluation 0.0.10, glioma config) - a test-time reference only."""
    pytest.importorskip("brats_evaluation")
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    return Panoptica_Evaluator.load_from_config(str(config_path("gli")))


# our region name -> the group name in brats-evaluation's glioma config (internal labels = BraTS 2023 labels)
_GROUPS = {"WT": "wt", "TC": "tc", "ET": "et", "NCR": "netc", "ED": "snfh"}
_REGION_LABELS = {**REGIONS, **DISJOINT_CLASSES}


def _assert_agrees(official, pred, truth, spacing, include_disjoint=True):
    """Compare with the official package where both define the value; return the largest differences."""
    ours = evaluate_case(pred, truth, spacing, include_disjoint=include_disjoint)
    theirs = official.evaluate(
        pred.astype(np.uint8), truth.astype(np.uint8), voxelspacing=tuple(spacing), skip_groups=["rc"]
    )  # "rc" (resection cavity, label 4) does not exist in internal labels
    worst = {"dice": 0.0, "hd95": 0.0, "lesion_dice": 0.0, "lesion_hd95": 0.0}
    compared = compared_lesions = 0
    for row in ours:
        res = theirs[_GROUPS[row["region"]]]
        if res.global_bin_volume_pred == 0 or res.global_bin_volume_ref == 0:
            continue  # the official package gives NaN (both empty) or inf (one empty) there: our conventions
        compared += 1
        assert row["dice"] == pytest.approx(res.global_bin_dsc, abs=1e-4), row["region"]
        worst["dice"] = max(worst["dice"], abs(row["dice"] - res.global_bin_dsc))
        if np.isfinite(res.global_bin_hd95):  # inf: no overlap at all, the official package stops there
            # panoptica 2.1.7 computes the *global* HD95 in voxel units (it does not pass the spacing on, while
            # its per-lesion HD95 uses it); BraTS data are 1 mm isotropic. Ours is in mm, so on anisotropic
            # test data the official value is compared with ours at unit spacing.
            value = row["hd95"]
            if not np.allclose(spacing, 1.0):
                masks = region_masks(pred, {row["region"]: _REGION_LABELS[row["region"]]})
                truths = region_masks(truth, {row["region"]: _REGION_LABELS[row["region"]]})
                value = hd95(masks[row["region"]], truths[row["region"]])
            assert value == pytest.approx(res.global_bin_hd95, abs=0.1), row["region"]
            worst["hd95"] = max(worst["hd95"], abs(value - res.global_bin_hd95))
        assert row["lesion_f1"] == pytest.approx(res.rq, abs=1e-9), row["region"]
        if res.tp > 0:
            compared_lesions += 1
            assert row["lesion_dice_matched"] == pytest.approx(res.sq_dsc, abs=1e-3), row["region"]
            assert row["lesion_hd95_matched"] == pytest.approx(res.sq_hd95, abs=0.5), row["region"]
            worst["lesion_dice"] = max(worst["lesion_dice"], abs(row["lesion_dice_matched"] - res.sq_dsc))
            worst["lesion_hd95"] = max(worst["lesion_hd95"], abs(row["lesion_hd95_matched"] - res.sq_hd95))
    assert compared > 0 and compared_lesions > 0
    return worst


def _synthetic_case(rng, shape=(48, 44, 40)):
    """A tumour of NCR/ED/ET spheres plus a satellite lesion, and a perturbed copy as prediction."""
    grid = np.indices(shape).astype(float)
    truth = np.zeros(shape, np.uint8)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)

    def ball(c, r):
        return ((grid - np.asarray(c)[:, None, None, None]) ** 2).sum(0) <= r**2

    truth[ball(centre, rng.uniform(10, 14))] = 2
    truth[ball(centre + rng.uniform(-2, 2, 3), rng.uniform(5, 7))] = 3
    truth[ball(centre + rng.uniform(-1, 1, 3), rng.uniform(2, 4))] = 1
    truth[ball((6, 6, 6), 3)] = 3  # satellite ET lesion
    pred = np.roll(truth, int(rng.integers(1, 3)), axis=int(rng.integers(0, 3)))
    pred[ball(centre + rng.uniform(-8, 8, 3), 3)] = 3  # spurious / merged ET blob
    pred[rng.random(shape) < 0.002] = 2  # scattered false-positive voxels
    return pred, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_brats_evaluation_on_synthetic_pairs(official, seed):
    rng = np.random.default_rng(seed)
    pred, truth = _synthetic_case(rng)
    spacing = [(1.0, 1.0, 1.0), (0.9, 1.1, 2.5), (1.2, 1.2, 1.2)][seed]
    worst = _assert_agrees(official, pred, truth, spacing)
    print(f"synthetic seed {seed} spacing {spacing}: largest |difference| {worst}")


def _sample_cases():
    return sorted(SAMPLES.glob("*/*_seg.nii.gz")) if SAMPLES.is_dir() else []


def _perturbations(truth):
    """Eroded, shifted and one-lesion-removed versions of a real ground truth."""
    eroded = truth.copy()
    eroded[~ndimage.binary_erosion(truth > 0, iterations=2)] = 0
    shifted = np.roll(truth, (2, -1, 1), axis=(0, 1, 2))
    removed = truth.copy()
    et_cc, n = ndimage.label(truth == 3, structure=np.ones((3, 3, 3)))
    if n > 1:  # drop the second-largest ET lesion
        sizes = np.bincount(et_cc.ravel())[1:]
        removed[et_cc == int(np.argsort(sizes)[-2]) + 1] = 0
    else:  # a single lesion: drop the ET inside it
        removed[truth == 3] = 0
    return {"eroded": eroded, "shifted": shifted, "lesion_removed": removed}


@functools.lru_cache(maxsize=3)  # the three sample cases, each decoded once per test session
def _load_cropped(path, margin=10):
    labels, spacing, _ = load_label_map(path, "brats2021")
    # the values do not depend on background far from the tumour (shown by the synthetic tests, which use the
    # whole volume); cropping to the tumour box keeps this test fast
    idx = np.nonzero(labels)
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    labels = labels[box].copy()
    labels.flags.writeable = False  # cached for every test of the module: nobody may change it
    return labels, spacing


def _check_sample(official, path, include_disjoint):
    truth, spacing = _load_cropped(path)
    for name, pred in _perturbations(truth).items():
        worst = _assert_agrees(official, pred, truth, spacing, include_disjoint)
        print(f"{path.name} {name}: largest |difference| {worst}")


def test_agrees_with_brats_evaluation_on_a_real_case(official):
    cases = _sample_cases()
    if not cases:
        pytest.skip(f"no BraTS samples at {SAMPLES} (set BRATS_SAMPLES)")
    _check_sample(official, cases[0], include_disjoint=False)  # WT, TC, ET here; NCR and ED with -m slow


@pytest.mark.slow
def test_agrees_with_brats_evaluation_on_all_real_cases(official):
    """About 90 s on an idle machine; deselected by default, run with ``pytest -m slow``."""
    cases = _sample_cases()
    if not cases:
        pytest.skip(f"no BraTS samples at {SAMPLES} (set BRATS_SAMPLES)")
    for path in cases:
        _check_sample(official, path, include_disjoint=True)


# ----------------------------------------------------------------------------- files, folders, summaries


def _save(path, labels, spacing=(1.0, 1.0, 1.0)):
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))


def test_evaluate_folder_writes_csv_and_summary(tmp_path, capsys):
    truth_dir, pred_dir, out = tmp_path / "truth", tmp_path / "pred", tmp_path / "out"
    for d in (truth_dir, pred_dir):
        d.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        pred, truth = _synthetic_case(rng, shape=(24, 24, 24))
        case = truth_dir / f"Case_{i:03d}"
        case.mkdir()
        # BraTS 2021 values on disk: ET is 4
        _save(case / f"Case_{i:03d}_seg.nii.gz", np.where(truth == 3, 4, truth), (1.0, 1.0, 2.0))
        _save(case / f"Case_{i:03d}_flair.nii.gz", np.zeros_like(truth), (1.0, 1.0, 2.0))
        _save(pred_dir / f"Case_{i:03d}.nii.gz", np.where(pred == 3, 4, pred), (1.0, 1.0, 2.0))
    rows = evaluate_folder(pred_dir, truth_dir, "brats2021", out, lesion_wise=False)
    assert len(rows) == 6 and {r["case"] for r in rows} == {"Case_000", "Case_001"}
    assert "dice" in capsys.readouterr().out
    with (out / "metrics.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and table[0]["case"] == "Case_000" and table[0]["region"] == "WT"
    summary = json.loads((out / "summary.json").read_text())
    wt = [r["dice"] for r in rows if r["region"] == "WT"]
    assert summary["WT"]["dice"]["mean"] == pytest.approx(np.mean(wt))
    assert summary["WT"]["dice"]["median"] == pytest.approx(np.median(wt))
    assert set(summary["ET"]["hd95"]) == {"n", "mean", "std", "median", "p25", "p75"}
    # spacing from the header reaches the distances: same as scoring the arrays directly
    direct = evaluate_case(
        load_label_map(pred_dir / "Case_000.nii.gz", "brats2021")[0],
        load_label_map(truth_dir / "Case_000" / "Case_000_seg.nii.gz", "brats2021")[0],
        (1.0, 1.0, 2.0),
        lesion_wise=False,
    )
    assert rows[0]["hd95"] == pytest.approx(direct[0]["hd95"])
    # a missing prediction stops the run before scoring, naming the case
    (pred_dir / "Case_001.nii.gz").unlink()
    with pytest.raises(ValueError, match="Case_001"):
        evaluate_folder(pred_dir, truth_dir, "brats2021", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_load_label_map_rejects_unknown_values(tmp_path):
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1, 1, 1] = 4
    _save(tmp_path / "x_seg.nii.gz", labels)
    assert load_label_map(tmp_path / "x_seg.nii.gz", "brats2021")[0][1, 1, 1] == LABEL_SCHEMES["brats2021"][4]
    with pytest.raises(ValueError, match=r"x_seg\.nii\.gz.*\[4\]"):
        load_label_map(tmp_path / "x_seg.nii.gz", "brats2023")
    assert case_id_from_path("a/BraTS-GLI-00001-000-seg.nii.gz") == "BraTS-GLI-00001-000"


def test_summarize_statistics():
    rows = [{"case": str(i), "region": "WT", "dice": v} for i, v in enumerate([0.5, 0.7, 0.9, 1.0])]
    s = summarize(rows)["WT"]["dice"]
    assert s["mean"] == pytest.approx(0.775)
    assert s["std"] == pytest.approx(np.std([0.5, 0.7, 0.9, 1.0], ddof=1))
    assert s["median"] == pytest.approx(0.8)
    assert (s["p25"], s["p75"]) == (pytest.approx(0.65), pytest.approx(0.925))


# ----------------------------------------------------------------------------- paired comparison


def _run_table(path, dice, hd):
    rows = []
    for i, (d, h) in enumerate(zip(dice, hd, strict=True)):
        for region in ("WT", "ET"):
            rows.append({"case": f"c{i:02d}", "region": region, "dice": d, "hd95": h})
    write_metrics_csv(rows, path)
    return path


def test_compare_finds_a_known_shift(tmp_path):
    rng = np.random.default_rng(0)
    dice = rng.uniform(0.6, 0.9, 30)
    hd = rng.uniform(2, 10, 30)
    a = _run_table(tmp_path / "a.csv", dice, hd)
    b = _run_table(tmp_path / "b.csv", dice + 0.05 + rng.normal(0, 0.01, 30), hd - 1.0 + rng.normal(0, 0.2, 30))
    results = {(r["region"], r["metric"]): r for r in compare(a, b, verbose=False)}
    d = results[("WT", "dice")]
    assert d["mean_diff"] == pytest.approx(0.05, abs=0.01)
    assert d["ci_low"] < 0.05 < d["ci_high"] and d["ci_low"] > 0
    assert d["p_wilcoxon"] < 1e-3 and d["p_ttest"] < 1e-3
    assert d["verdict"].startswith("B better")
    h = results[("ET", "hd95")]
    assert h["mean_diff"] == pytest.approx(-1.0, abs=0.2) and h["verdict"].startswith("B better")
    # reversed: B worse; seeded bootstrap reproducible
    again = {(r["region"], r["metric"]): r for r in compare(b, a, verbose=False)}
    assert again[("WT", "dice")]["verdict"].startswith("B worse")
    assert compare(a, b, verbose=False)[0]["ci_low"] == d["ci_low"]


def test_compare_identical_runs_reports_no_difference(tmp_path):
    rng = np.random.default_rng(1)
    a = _run_table(tmp_path / "a.csv", rng.uniform(0.6, 0.9, 12), rng.uniform(2, 10, 12))
    results = compare(a, a, verbose=False)
    assert results
    for r in results:
        assert r["mean_diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
        assert r["p_wilcoxon"] == 1.0 and r["p_ttest"] == 1.0
        assert r["verdict"] == "no significant difference"


def test_compare_names_the_file_when_cases_differ(tmp_path):
    a = _run_table(tmp_path / "a.csv", [0.8, 0.7, 0.9], [3, 4, 5])
    b = _run_table(tmp_path / "b.csv", [0.8, 0.7], [3, 4])
    with pytest.raises(ValueError, match=r"b\.csv.*c02"):
        compare(a, b, verbose=False)
    assert read_metrics_csv(a)[0]["dice"] == 0.8


def _old_bootstrap_ci(diff: np.ndarray, n_bootstrap: int = 10000, seed: int = 0) -> tuple[float, float]:
    """The hand-written bootstrap compare used before scipy.stats.bootstrap (issue 21): the reference."""
    resample = np.random.default_rng(seed).integers(0, len(diff), size=(n_bootstrap, len(diff)))
    low, high = np.percentile(np.asarray(diff)[resample].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_bootstrap_ci_is_the_old_resampling_on_synthetic_differences(n):
    rng = np.random.default_rng(n)
    for diff in (rng.normal(0.05, 0.02, n), rng.uniform(-5, 5, n), np.zeros(n)):
        for seed, n_bootstrap in ((0, 10000), (7, 999)):
            assert bootstrap_ci(diff, n_bootstrap, seed) == pytest.approx(_old_bootstrap_ci(diff, n_bootstrap, seed))
    assert bootstrap_ci(diff, 500, 3) == bootstrap_ci(diff, 500, 3)  # same seed, same CI


def test_bootstrap_ci_is_the_old_resampling_on_real_cases():
    """Paired Dice and IoU of two perturbations (eroded vs shifted) of a real BraTS ground truth, per region."""
    cases = _sample_cases()
    if not cases:
        pytest.skip(f"no BraTS samples at {SAMPLES} (set BRATS_SAMPLES)")
    truth, _ = _load_cropped(cases[0])  # the agreement test's case, loaded once for both
    runs, regions = _perturbations(truth), {**REGIONS, **DISJOINT_CLASSES}
    truths = region_masks(truth, regions)
    a, b = {"dice": [], "iou": []}, {"dice": [], "iou": []}
    for run, name in ((a, "eroded"), (b, "shifted")):
        for region, mask in region_masks(runs[name], regions).items():
            scores = overlap_metrics(mask, truths[region])
            run["dice"].append(scores["dice"])
            run["iou"].append(scores["iou"])
    for metric in ("dice", "iou"):
        diff = np.array(b[metric]) - np.array(a[metric])
        assert bootstrap_ci(diff) == pytest.approx(_old_bootstrap_ci(diff))


def test_compare_cis_are_the_old_ones_and_n_bootstrap_is_checked(tmp_path):
    rng = np.random.default_rng(4)
    dice, hd = rng.uniform(0.6, 0.9, 9), rng.uniform(2, 10, 9)
    a = _run_table(tmp_path / "a.csv", dice, hd)
    b = _run_table(tmp_path / "b.csv", dice + rng.normal(0.02, 0.03, 9), hd + rng.normal(0, 1, 9))
    for r in compare(a, b, n_bootstrap=2000, seed=5, verbose=False):
        diff = np.array([row[r["metric"]] for row in read_metrics_csv(b) if row["region"] == r["region"]])
        diff -= np.array([row[r["metric"]] for row in read_metrics_csv(a) if row["region"] == r["region"]])
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(_old_bootstrap_ci(diff, 2000, 5))
    with pytest.raises(OptionError, match=r"^n_bootstrap: 0 is not allowed: use a whole number of at least 1$"):
        compare(a, b, n_bootstrap=0, verbose=False)
