"""Per-case, per-region segmentation metrics for brain-tumour evaluation.

Everything here works on *internal* label maps (``0`` background, ``1`` NCR, ``2`` ED, ``3`` ET, see
:mod:`bundle.constants`) and turns them into binary region masks (WT, TC, ET and optionally the disjoint
NCR, ED, ET) before scoring. Definitions, conventions and the agreement with the official BraTS evaluation
package are documented in ``docs/reference/evaluation.md``; the short version:

* overlap metrics (Dice, IoU, sensitivity, specificity, accuracy) come from MONAI's confusion matrix
  (:func:`monai.metrics.get_confusion_matrix`, :func:`monai.metrics.compute_confusion_matrix_metric`);
* ``hd95`` is the official BraTS definition (pooled surface distances, see :func:`hd95`);
* ``hd95_monai`` is MONAI's :func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95``
  (larger of the two directed 95th percentiles);
* ``lesion_dice`` / ``lesion_hd95`` are the BraTS 2023 lesion-wise scores (GT lesions grown by dilation
  for matching, small GT lesions ignored, unmatched lesions scored 0 / 374 mm);
* ``lesion_dice_matched`` / ``lesion_hd95_matched`` / ``lesion_f1`` are the instance scores that the
  current ``brats-evaluation`` package (panoptica) reports as lesion-wise (one-to-one matching).

Empty-mask conventions (both empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 374 mm) apply to every
Dice- and HD95-like value.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_hausdorff_distance, get_confusion_matrix
from monai.metrics.utils import get_edge_surface_distance
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from bundle.constants import DISJOINT_CLASSES, REGIONS
from bundle.data.labels import bounding_box, connected_components

#: HD95 penalty in mm for a missing or spurious structure (the BraTS 2023 lesion-wise code uses 374 mm,
#: roughly the diagonal of the 240 x 240 x 155 SRI-24 volume).
MAX_DISTANCE_MM: float = 374.0

#: Per-region columns produced by :func:`evaluate_case`, in a stable order.
OVERLAP_METRICS: tuple[str, ...] = ("dice", "iou", "sensitivity", "specificity", "accuracy")
DISTANCE_METRICS: tuple[str, ...] = ("hd95", "hd95_monai")
LESION_METRICS: tuple[str, ...] = (
    "lesion_dice",
    "lesion_hd95",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "lesion_dice_matched",
    "lesion_hd95_matched",
    "lesion_f1",
)

# MONAI's confusion-matrix metric names for our overlap metrics: "f1 score" is 2TP/(2TP+FP+FN), i.e. Dice,
# and "threat score" is TP/(TP+FP+FN), i.e. IoU (Jaccard).
_MONAI_NAMES: dict[str, str] = {
    "dice": "f1 score",
    "iou": "threat score",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "accuracy": "accuracy",
}


def region_masks(labels: np.ndarray, regions: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Return one boolean mask per region of an internal label map (default: ``constants.REGIONS``)."""
    regions = REGIONS if regions is None else regions
    labels = np.asarray(labels)
    return {name: np.isin(labels, list(values)) for name, values in regions.items()}


def overlap_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, IoU, sensitivity, specificity and accuracy of two binary masks, via MONAI's confusion matrix.

    Empty-mask conventions (as in the BraTS 2023 reference code): both empty -> every value 1; truth empty,
    prediction not -> Dice = IoU = sensitivity = 0; prediction empty, truth not -> Dice = IoU = sensitivity = 0.
    """
    return _overlap_from_confusion(_confusion(np.asarray(pred, bool)[None], np.asarray(truth, bool)[None])[0])


def _confusion(preds: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """``[C, 4]`` counts (tp, fp, tn, fn) of ``C`` stacked binary masks, computed by MONAI."""
    # float64: MONAI sums in the input dtype, and float32 counts are inexact above 2**24 voxels
    y_pred = torch.as_tensor(np.ascontiguousarray(preds), dtype=torch.float64)[None]
    y = torch.as_tensor(np.ascontiguousarray(truths), dtype=torch.float64)[None]
    return get_confusion_matrix(y_pred, y, include_background=True)[0].double().numpy()


def _overlap_from_confusion(cm: np.ndarray) -> dict[str, float]:
    tp, fp, _tn, fn = (float(v) for v in cm)
    cm_t = torch.as_tensor(cm, dtype=torch.float64)[None, None]
    out = {key: float(compute_confusion_matrix_metric(name, cm_t).item()) for key, name in _MONAI_NAMES.items()}
    if tp + fn == 0 and tp + fp == 0:  # both empty: a perfect (empty) answer
        out.update(dice=1.0, iou=1.0, sensitivity=1.0)
    # MONAI returns NaN for 0/0; the official code returns 0 there (eps in the denominator).
    return {k: (0.0 if np.isnan(v) else v) for k, v in out.items()}


def _crop_to(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Bounding box of the union of ``masks`` grown by ``margin`` voxels (clamped to the image); all of it if empty.

    Distances are unchanged by the crop because every surface voxel stays inside it and the margin keeps
    the erosion at the crop's edge from inventing surface voxels.
    """
    union = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    box = bounding_box(union, margin)
    return box if box is not None else tuple(slice(None) for _ in union.shape)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (truth surface -> prediction surface, prediction -> truth).

    MONAI's :func:`monai.metrics.utils.get_edge_surface_distance` (``symmetric=True``): the surface of a mask
    is the mask minus its erosion with the 1-connectivity (face-neighbour) structuring element, exactly as in
    the official BraTS evaluation (panoptica ``_surface_distance_pair``), and each surface voxel's distance
    to the other surface is exact (Euclidean, with the voxel spacing). MONAI returns float32 distances; they
    are returned as float64 so that :func:`hd95`'s percentile interpolates in double precision. Both masks
    must be non-empty.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        raise ValueError("surface distances need two non-empty masks (see hd95 for the empty-mask conventions)")
    spacing = _spacing(spacing, pred.ndim)
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        # tensors, not arrays: MONAI reads ``y_pred.device``, which numpy arrays have only from numpy 2
        _, (d_pred, d_truth), _ = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(truth), spacing=list(spacing), symmetric=True
        )
    return d_truth.cpu().double().numpy(), d_pred.cpu().double().numpy()


def hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None, percentile: float = 95.0
) -> float:
    """Official BraTS HD95 in mm: the 95th percentile of the *pooled* directed surface distances.

    Why not MONAI's ``HausdorffDistanceMetric(percentile=95)``: MONAI takes the larger of the two directed
    95th percentiles (see :func:`hd95_monai`), the BraTS evaluation (``brats-evaluation`` via panoptica)
    concatenates both directed distance sets and takes one percentile (numpy's linear interpolation).
    The two differ by up to tens of mm on real cases, so the official one is computed here.

    Empty masks: both empty -> 0, exactly one empty -> :data:`MAX_DISTANCE_MM`.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    empty = _empty_convention(pred, truth, both=0.0, one=MAX_DISTANCE_MM)
    if empty is not None:
        return empty
    d_truth, d_pred = surface_distances(pred, truth, spacing)
    return float(np.percentile(np.concatenate([d_truth, d_pred]), percentile))


def hd95_monai(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """MONAI's HD95 in mm (``compute_hausdorff_distance(percentile=95)``): max of the two directed 95th percentiles.

    Same empty-mask conventions as :func:`hd95`.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    empty = _empty_convention(pred, truth, both=0.0, one=MAX_DISTANCE_MM)
    if empty is not None:
        return empty
    crop = _crop_to(pred, truth)
    y_pred = torch.as_tensor(pred[crop])[None, None]
    y = torch.as_tensor(truth[crop])[None, None]
    spacing = _spacing(spacing, pred.ndim)
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    return float(value.item())


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values but the masks have {ndim} dimensions")
    return spacing


def _empty_convention(pred: np.ndarray, truth: np.ndarray, both: float, one: float) -> float | None:
    p, t = bool(pred.any()), bool(truth.any())
    if not p and not t:
        return both
    if not p or not t:
        return one
    return None


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass
class LesionWiseResult:
    """BraTS 2023 lesion-wise scores of one region (see :func:`lesion_wise_brats2023`)."""

    dice: float
    hd95: float
    tp: int
    fp: int
    fn: int
    per_lesion: list[dict]


def lesion_wise_brats2023(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    dilation_iterations: int = 3,
    min_lesion_volume: float = 50.0,
    penalty: float = MAX_DISTANCE_MM,
) -> LesionWiseResult:
    """BraTS 2023 lesion-wise Dice and HD95 of one binary region (Saluja et al., BraTS-2023-Metrics, GLI setting).

    1. Truth and prediction are split into 26-connected components (8 in 2-D).
    2. Truth lesions whose dilations touch are merged: the truth mask is dilated ``dilation_iterations`` times
       with the 18-connectivity element (``generate_binary_structure(3, 2)``, the reference's choice; 3
       iterations for gliomas), the dilated mask is labelled, and every truth voxel takes its dilated label.
    3. Each (merged) truth lesion is dilated the same way; every predicted component touching that dilation
       is matched to it (a component may match several lesions). The lesion's Dice and HD95 (:func:`hd95`,
       in mm) are computed between the lesion and the union of its matched components; no match -> Dice 0,
       HD95 ``penalty``.
    4. Truth lesions with volume <= ``min_lesion_volume`` mm^3 (50 voxels at 1 mm) are left out of the scores
       and the TP/FN counts. Predicted components matching no truth lesion are false positives (any size).
    5. ``dice = sum(lesion Dice) / (n_lesions + n_fp)``, ``hd95 = (sum(lesion HD95) + penalty * n_fp) /
       (n_lesions + n_fp)``; with nothing to score (no kept lesion and no FP) Dice is 1 and HD95 0.

    The only deliberate difference from the 2023 reference code is the per-lesion HD95 definition: the
    reference used DeepMind's surfel-weighted ``compute_robust_hausdorff``; here the official pooled HD95 of
    the current BraTS evaluation is used so that ``hd95`` and ``lesion_hd95`` share one definition.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing = _spacing(spacing, pred.ndim)
    voxel_volume = float(np.prod(spacing))
    dil_struct = ndimage.generate_binary_structure(pred.ndim, 2)
    pred_cc, _ = connected_components(pred)
    truth_cc, truth_sizes = connected_components(truth)
    if truth_sizes.size > 1:
        dilated_cc, _ = connected_components(ndimage.binary_dilation(truth, dil_struct, iterations=dilation_iterations))
        truth_cc = np.where(truth, dilated_cc, 0)
    truth_ids = [int(i) for i in np.unique(truth_cc) if i]
    pred_slices = ndimage.find_objects(pred_cc)
    pad = dilation_iterations + 1

    matched_pred: set[int] = set()
    per_lesion: list[dict] = []
    for lesion_id in truth_ids:
        lesion = truth_cc == lesion_id
        crop = _crop_to(lesion, margin=pad)
        grown = ndimage.binary_dilation(lesion[crop], dil_struct, iterations=dilation_iterations)
        hits = np.unique(pred_cc[crop][grown])
        hits = [int(h) for h in hits if h]
        matched_pred.update(hits)
        # the matched components may reach beyond the lesion's crop: score on the union's bounding box
        boxes = [crop] + [pred_slices[h - 1] for h in hits]
        box = tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(pred.ndim))
        lesion_box = lesion[box]
        pred_box = np.isin(pred_cc[box], hits) if hits else np.zeros_like(lesion_box)
        volume = float(lesion_box.sum()) * voxel_volume
        per_lesion.append(
            {
                "lesion": lesion_id,
                "volume": volume,
                "matched": hits,
                "dice": _dice(pred_box, lesion_box),
                "hd95": hd95(pred_box, lesion_box, spacing) if hits else penalty,
                "kept": volume > min_lesion_volume,
            }
        )

    n_pred = len(pred_slices)
    fp = n_pred - len(matched_pred)
    kept = [r for r in per_lesion if r["kept"]]
    tp = sum(1 for r in kept if r["matched"])
    fn = len(kept) - tp
    denominator = len(kept) + fp
    if denominator == 0:
        dice, dist = 1.0, 0.0
    else:
        dice = sum(r["dice"] for r in kept) / denominator
        dist = (sum(r["hd95"] for r in kept) + penalty * fp) / denominator
    return LesionWiseResult(dice=dice, hd95=dist, tp=tp, fp=fp, fn=fn, per_lesion=per_lesion)


@dataclass
class MatchedInstanceResult:
    """One-to-one instance scores of one region (see :func:`lesion_wise_matched`)."""

    dice: float
    hd95: float
    f1: float
    tp: int
    fp: int
    fn: int


def lesion_wise_matched(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    matching_threshold: float = 1e-6,
    penalty: float = MAX_DISTANCE_MM,
) -> MatchedInstanceResult:
    """Lesion-wise scores as the current official ``brats-evaluation`` package reports them (panoptica).

    Connected components (26-connected in 3-D; 4-connected in 2-D, as panoptica's scipy fallback) of truth
    and prediction are matched one-to-one by maximum bipartite matching on Dice (Hungarian algorithm on
    ``1 - Dice``, pairs with Dice >= ``matching_threshold`` only). ``dice`` / ``hd95`` are the means over
    the matched pairs (panoptica's ``sq_dsc`` / ``sq_hd95``, reported by brats-evaluation as
    ``lesionwise_dsc_mean`` / ``lesionwise_hd95_mean``); ``f1`` is the detection F1
    ``tp / (tp + (fp + fn) / 2)`` (panoptica's ``rq``). Without any match: both empty -> Dice 1, HD95 0, F1 1
    (panoptica: NaN); otherwise Dice 0, HD95 ``penalty`` (panoptica: inf), F1 0.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing = _spacing(spacing, pred.ndim)
    connectivity = pred.ndim if pred.ndim >= 3 else 1
    pred_cc, p_size = connected_components(pred, connectivity)
    truth_cc, t_size = connected_components(truth, connectivity)
    n_pred, n_truth = p_size.size - 1, t_size.size - 1
    matches: list[tuple[int, int]] = []
    if n_pred and n_truth:
        # every overlapping (truth, pred) pair's Dice from one joint histogram of the overlap
        both = (truth_cc > 0) & (pred_cc > 0)
        pairs, counts = np.unique(np.stack([truth_cc[both], pred_cc[both]]), axis=1, return_counts=True)
        cost = np.full((n_truth, n_pred), 1.0 + 1e-6)
        for (t, p), inter in zip(pairs.T, counts, strict=True):
            d = 2.0 * inter / (t_size[t] + p_size[p])
            if d >= matching_threshold:
                cost[t - 1, p - 1] = 1.0 - d
        rows, cols = linear_sum_assignment(cost)
        matches = [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols, strict=True) if cost[r, c] < 1.0]
    tp = len(matches)
    fp, fn = n_pred - tp, n_truth - tp
    if tp == 0:
        if n_pred + n_truth == 0:
            return MatchedInstanceResult(dice=1.0, hd95=0.0, f1=1.0, tp=0, fp=0, fn=0)
        return MatchedInstanceResult(dice=0.0, hd95=penalty, f1=0.0, tp=0, fp=fp, fn=fn)
    t_slices, p_slices = ndimage.find_objects(truth_cc), ndimage.find_objects(pred_cc)
    dices, dists = [], []
    for t, p in matches:
        box = tuple(
            slice(min(a.start, b.start), max(a.stop, b.stop))
            for a, b in zip(t_slices[t - 1], p_slices[p - 1], strict=True)
        )
        t_mask, p_mask = truth_cc[box] == t, pred_cc[box] == p
        dices.append(_dice(p_mask, t_mask))
        dists.append(hd95(p_mask, t_mask, spacing))
    f1 = tp / (tp + 0.5 * fp + 0.5 * fn)
    return MatchedInstanceResult(
        dice=float(np.mean(dices)), hd95=float(np.mean(dists)), f1=float(f1), tp=tp, fp=fp, fn=fn
    )


#: Margin (voxels) kept around the tumours by :func:`evaluate_case`; more than the 3-iteration lesion dilation.
_CASE_MARGIN = 6


def evaluate_case(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    lesion_wise: bool = True,
    include_disjoint: bool = False,
    case_id: str | None = None,
) -> list[dict]:
    """Score one case: a list of rows, one per region, each a dict of metric name -> value.

    Args:
        pred_labels: predicted internal label map (``0``..``3``), spatial shape only (no channel axis).
        true_labels: ground-truth internal label map with the same shape.
        spacing: voxel size in mm per axis (default 1 mm); used by every distance and the lesion volumes.
        regions: name -> internal labels; default the overlapping WT, TC, ET of ``constants.REGIONS``.
        lesion_wise: also compute the BraTS lesion-wise scores (about half of the run time).
        include_disjoint: also score the disjoint classes NCR and ED (named ``NCR``, ``ED``; ET is the same
            set as the ET region and is not repeated).
        case_id: stored in each row's ``case`` column when given.

    Each row holds ``region``, :data:`OVERLAP_METRICS`, :data:`DISTANCE_METRICS`, ``volume_pred``,
    ``volume_true`` and ``volume_false_positive`` (mm^3; predicted voxels outside the true region) and,
    with ``lesion_wise``, :data:`LESION_METRICS`.
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground-truth shape {true_labels.shape}")
    spacing = _spacing(spacing, pred_labels.ndim)
    regions = dict(REGIONS if regions is None else regions)
    if include_disjoint:
        for name, values in DISJOINT_CLASSES.items():
            if tuple(values) not in {tuple(v) for v in regions.values()}:
                regions[name] = values
    # Everything is scored inside the tumours' bounding box (plus a margin wider than the lesion-wise
    # dilation): values are identical, and labelling/dilating a whole volume is slow (docs/benchmarks/code_notes.md).
    # The background outside the box only adds true negatives, added back to the confusion matrix below.
    if (pred_labels > 0).any() or (true_labels > 0).any():
        crop = _crop_to(pred_labels > 0, true_labels > 0, margin=_CASE_MARGIN)
    else:
        crop = tuple(slice(0, 1) for _ in pred_labels.shape)
    outside = pred_labels.size - pred_labels[crop].size
    preds, truths = region_masks(pred_labels[crop], regions), region_masks(true_labels[crop], regions)
    names = list(regions)
    confusion = _confusion(np.stack([preds[n] for n in names]), np.stack([truths[n] for n in names]))
    confusion[:, 2] += outside  # (tp, fp, tn, fn): the voxels outside the crop are background in both
    voxel_volume = float(np.prod(spacing))
    rows = []
    for name, cm in zip(names, confusion, strict=True):
        p, t = preds[name], truths[name]
        row: dict = {} if case_id is None else {"case": case_id}
        row["region"] = name
        row.update(_overlap_from_confusion(cm))
        row["hd95"] = hd95(p, t, spacing)
        row["hd95_monai"] = hd95_monai(p, t, spacing)
        row["volume_pred"] = float(p.sum()) * voxel_volume
        row["volume_true"] = float(t.sum()) * voxel_volume
        row["volume_false_positive"] = float(cm[1]) * voxel_volume  # predicted outside the truth's region
        if lesion_wise:
            lw = lesion_wise_brats2023(p, t, spacing)
            mi = lesion_wise_matched(p, t, spacing)
            row.update(
                lesion_dice=lw.dice,
                lesion_hd95=lw.hd95,
                lesion_tp=lw.tp,
                lesion_fp=lw.fp,
                lesion_fn=lw.fn,
                lesion_dice_matched=mi.dice,
                lesion_hd95_matched=mi.hd95,
                lesion_f1=mi.f1,
            )
        rows.append(row)
    return rows
