"""Evaluation of prediction folders: per-case tables and summaries.

These are the functions the command line calls (``python -m bundle evaluate --pred DIR --truth DIR``):

* :func:`evaluate_files` scores one prediction/ground-truth NIfTI pair;
* :func:`evaluate_folder` scores every case of a folder and writes ``metrics.csv`` (one row per case and
  region) and ``summary.json`` (mean, std, median, 25th/75th percentile per region and metric).

Metric definitions live in :mod:`bundle.evaluation.metrics` and ``docs/reference/evaluation.md``; paired
comparisons between runs in :mod:`bundle.evaluation.statistics`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bundle.atomic import write_text_atomic
from bundle.data import is_nifti, read_header
from bundle.errors import UserError
from bundle.evaluation.files import (
    case_id_from_path,
    find_segmentations,
    load_label_map,
    read_metrics_csv,
    write_metrics_csv,
)
from bundle.evaluation.metrics import DISTANCE_METRICS, OVERLAP_METRICS, evaluate_case
from bundle.options import as_bool

#: Metrics where a smaller value is better (all others: larger is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"hd95", "hd95_monai", "lesion_hd95", "lesion_hd95_matched", "lesion_fp"})
#: Columns summarised and compared by default (counts and volumes are kept in metrics.csv only).
SUMMARY_METRICS: tuple[str, ...] = (
    *OVERLAP_METRICS,
    *DISTANCE_METRICS,
    "lesion_dice",
    "lesion_hd95",
    "lesion_dice_matched",
    "lesion_hd95_matched",
    "lesion_f1",
)


def _label_map_header(path: Path, role: str, other: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from an image header (no voxel data read); one sentence naming both files if unusable."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {role} file does not exist (paired with {other})")
    try:
        header = read_header(path)  # the reader the case checks use: nibabel for NIfTI, ITK for NRRD / MetaImage
    except UserError as err:
        reason = str(err).removeprefix(f"{path}: ")
        kind = "NIfTI" if is_nifti(path) else "an image"
        raise ValueError(f"{path}: {role} cannot be read as {kind} ({reason}; paired with {other})") from err
    shape, affine = header.shape, header.affine
    if len(shape) != 3:
        raise ValueError(f"{path}: {role} is not a 3-D label map (shape {shape}; paired with {other})")
    return shape, affine


def check_pairs(pairs: Iterable[tuple[str | Path, str | Path, str, str]], verbose: bool = False) -> None:
    """Check every (prediction, ground truth, truth scheme, prediction scheme) before any case is scored.

    First every pair's headers: both files exist and are readable NIfTI, 3-D, with the same shape and
    affine (within 1e-3, what :func:`evaluate_files` requires: scoring compares voxel by voxel and
    takes the spacing from the truth). Then every voxel of both files is decoded once
    (:func:`load_label_map`: truncated data, NaN / Inf, non-integer values, values outside the
    scheme). The first bad pair raises ``FileNotFoundError`` or ``ValueError``, one sentence naming
    the file, so a problem in the last case is not found after scoring all the others. Decoding a
    label map is a small part of scoring it (HD95, lesion-wise; docs/benchmarks/code_notes.md).
    """
    pairs = [(Path(pred), Path(truth), scheme, pred_scheme) for pred, truth, scheme, pred_scheme in pairs]
    for pred, truth, _, _ in pairs:
        truth_shape, truth_affine = _label_map_header(truth, "ground truth", pred)
        pred_shape, pred_affine = _label_map_header(pred, "prediction", truth)
        if pred_shape != truth_shape:
            raise ValueError(
                f"{pred}: prediction shape {pred_shape} differs from the ground truth {truth} {truth_shape}"
            )
        if not np.allclose(pred_affine, truth_affine, atol=1e-3):
            raise ValueError(
                f"{pred}: prediction affine differs from the ground truth {truth} (another voxel grid; resample it)"
            )
    quiet = not verbose or len(pairs) < 20
    for pred, truth, scheme, pred_scheme in tqdm(pairs, desc="checking", unit="case", disable=quiet):
        load_label_map(truth, scheme)
        load_label_map(pred, pred_scheme or scheme)


def evaluate_files(
    pred_path: str | Path,
    truth_path: str | Path,
    label_scheme: str = "brats2021",
    pred_label_scheme: str | None = None,
    lesion_wise: bool = True,
    include_disjoint: bool = False,
    case_id: str | None = None,
) -> list[dict]:
    """Score one prediction/ground-truth NIfTI pair (one row per region, :func:`.metrics.evaluate_case`).

    ``label_scheme`` maps the ground truth's values, ``pred_label_scheme`` (default: the same) the
    prediction's. The spacing comes from the ground truth's header; shapes and affines must agree.
    """
    truth, spacing, truth_affine = load_label_map(truth_path, label_scheme)
    pred, _, pred_affine = load_label_map(pred_path, pred_label_scheme or label_scheme)
    if pred.shape != truth.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from the ground truth {truth_path} {truth.shape}")
    if not np.allclose(pred_affine, truth_affine, atol=1e-3):
        raise ValueError(f"{pred_path}: affine differs from the ground truth {truth_path}; resample it first")
    case = case_id if case_id is not None else case_id_from_path(truth_path)
    return evaluate_case(pred, truth, spacing, lesion_wise=lesion_wise, include_disjoint=include_disjoint, case_id=case)


def evaluate_folder(
    pred_dir: str | Path,
    truth_dir: str | Path,
    label_scheme: str = "brats2021",
    output_dir: str | Path | None = None,
    pred_label_scheme: str | None = None,
    lesion_wise: bool = True,
    include_disjoint: bool = False,
    verbose: bool = True,
) -> list[dict]:
    """Score every case in ``pred_dir`` against ``truth_dir``; write ``metrics.csv`` and ``summary.json``.

    Cases are paired by :func:`case_id_from_path`. Every ground-truth case must have a prediction (a
    missing one stops the run before any scoring, naming the cases); predictions without ground truth are
    an error too. Every pair's headers are checked (:func:`check_pairs`) before the first case is scored.
    With ``output_dir`` the two files are written there (atomically: no half-written file is left if
    scoring fails). With ``verbose`` a progress bar runs and the summary table is printed.
    Returns the per-case rows.
    """
    preds, truths = find_segmentations(pred_dir), find_segmentations(truth_dir)
    missing, extra = sorted(set(truths) - set(preds)), sorted(set(preds) - set(truths))
    if missing:
        raise ValueError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s): {', '.join(missing)}")
    if extra:
        raise ValueError(f"{truth_dir}: no ground truth for {len(extra)} predicted case(s): {', '.join(extra)}")
    check_pairs(((preds[c], truths[c], label_scheme, pred_label_scheme) for c in sorted(truths)), verbose)
    rows: list[dict] = []
    for case in tqdm(sorted(truths), desc="scoring", unit="case", disable=not verbose):
        rows += evaluate_files(
            preds[case],
            truths[case],
            label_scheme,
            pred_label_scheme,
            lesion_wise=lesion_wise,
            include_disjoint=include_disjoint,
            case_id=case,
        )
    save_evaluation(rows, output_dir, verbose=verbose)
    return rows


def summarize(rows: Iterable[dict], metrics: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per region and metric: ``n``, ``mean``, ``std`` (sample, ddof=1), ``median``, ``p25``, ``p75``.

    NaN values (none are produced by :func:`bundle.evaluation.metrics.evaluate_case`) are left out of the statistics.
    """
    rows = list(rows)
    metrics = [m for m in (metrics or SUMMARY_METRICS) if any(m in r for r in rows)]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        out[region] = {}
        for metric in metrics:
            values = np.array(
                [float(r[metric]) for r in rows if r["region"] == region and r.get(metric, "") not in ("", None)]
            )
            values = values[~np.isnan(values)]
            if values.size == 0:
                continue
            out[region][metric] = {
                "n": int(values.size),
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                "median": float(np.median(values)),
                "p25": float(np.percentile(values, 25)),
                "p75": float(np.percentile(values, 75)),
            }
    return out


def metric_table(
    stats: dict[str, dict[str, dict[str, float]]], cell: Callable[[dict[str, float]], str], column_width: int
) -> list[str]:
    """Lines of a region x metric table: a header, then one line per metric with ``cell(stats)`` per region."""
    regions = list(stats)
    metrics = list(dict.fromkeys(m for r in regions for m in stats[r]))
    width = max([len(m) for m in metrics] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{r:>{column_width}}" for r in regions)]
    for metric in metrics:
        cells = [cell(s) if (s := stats[region].get(metric)) else "-" for region in regions]
        lines.append(f"{metric:<{width}}  " + "  ".join(f"{c:>{column_width}}" for c in cells))
    return lines


def format_summary(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Human-readable table: one line per metric, one ``mean +- std (median)`` column per region."""
    regions = list(summary)
    lines = metric_table(summary, lambda s: f"{s['mean']:.4f} +- {s['std']:.4f} ({s['median']:.4f})", 24)
    n = max((s["n"] for r in regions for s in summary[r].values()), default=0)
    lines.append(f"{n} case(s); mean +- std (median)")
    return "\n".join(lines)


# ------------------------------------------------------------------ entry points of `evaluate` and evaluate.yaml


def save_evaluation(rows: Sequence[dict], output_dir: str | Path | None, verbose: bool = True) -> dict:
    """Write ``metrics.csv`` and ``summary.json`` for per-case rows (atomically) and print the summary table.

    The same outputs as :func:`evaluate_folder`, for rows scored elsewhere (a datalist, a cross-validation
    fold). Returns the summary.
    """
    summary = summarize(rows)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_csv(rows, output_dir / "metrics.csv")
        write_text_atomic(output_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    if verbose:
        print(format_summary(summary))
    return summary


def check_predictions_exist(pred_dir: str | Path, truth_dir: str | Path) -> None:
    """Raise ``FileNotFoundError`` naming the ground-truth file of the first case without a prediction.

    :func:`evaluate_folder` reports missing cases by id; on the command line the file the user has to look
    at is more useful, so ``python -m bundle evaluate`` runs this check first.
    """
    preds, truths = find_segmentations(pred_dir), find_segmentations(truth_dir)
    missing = sorted(set(truths) - set(preds))
    if missing:
        more = f" (and {len(missing) - 1} more case(s): {', '.join(missing[1:6])})" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"{truths[missing[0]]}: no prediction for case {missing[0]!r} in {pred_dir} "
            f"(expected e.g. {Path(pred_dir) / (missing[0] + '_seg.nii.gz')}){more}"
        )


def evaluate_datalist(
    pred_dir: str | Path,
    items: Sequence[dict],
    output_dir: str | Path | None = None,
    pred_label_scheme: str = "brats2021",
    pred_postfix: str = "_seg",
    lesion_wise: Any = True,
    include_disjoint: Any = False,
    verbose: bool = True,
) -> list[dict]:
    """Score ``<pred_dir>/<case_id><pred_postfix>.nii.gz`` against each labelled datalist item's ``label``.

    The truth's label scheme is the item's ``layout`` (BraTS 2021 / 2023 / MSD datalists mix nothing, but
    each item says its own); ``pred_label_scheme`` is the one the predictions were written with
    (``internal`` reads as ``brats2023``: the same values 0-3). Every prediction is checked to exist before
    any scoring (a ``FileNotFoundError`` names the first missing file), then every pair's headers
    (:func:`check_pairs`). Writes ``metrics.csv`` and ``summary.json`` to ``output_dir`` and prints the
    summary table (:func:`save_evaluation`).
    """
    from bundle.constants import scheme_for_layout

    lesion_wise, include_disjoint = as_bool(lesion_wise, "lesion_wise"), as_bool(include_disjoint, "include_disjoint")
    pred_scheme = "brats2023" if pred_label_scheme == "internal" else pred_label_scheme
    pairs = []
    for item in items:
        case = str(item.get("case_id") or case_id_from_path(item["label"]))
        pred = Path(pred_dir) / f"{case}{pred_postfix}.nii.gz"
        if not pred.is_file():
            raise FileNotFoundError(f"{pred}: no prediction for case {case!r} (ground truth {item['label']})")
        pairs.append((case, pred, item["label"], scheme_for_layout(item.get("layout", "brats2021"))))
    check_pairs((pred, truth, scheme, pred_scheme) for _, pred, truth, scheme in pairs)
    rows: list[dict] = []
    for case, pred, truth, scheme in pairs:
        rows += evaluate_files(
            pred, truth, scheme, pred_scheme, lesion_wise=lesion_wise, include_disjoint=include_disjoint, case_id=case
        )
    save_evaluation(rows, output_dir, verbose=verbose)
    return rows


def evaluation_plots(
    metrics_csv: str | Path,
    output_dir: str | Path,
    pred_dir: str | Path | None = None,
    truth_dir: str | Path | None = None,
    label_scheme: str = "brats2021",
    pred_label_scheme: str | None = None,
    overlays: int = 5,
    metric: str = "dice",
) -> list[Path]:
    """Pictures of an evaluation: the per-region box plot of ``metric`` and overlays of the worst cases.

    Overlays (:func:`bundle.evaluation.plots.plot_case_overlays`) are drawn for the ``overlays`` cases with the lowest
    mean ``metric`` over the regions - the ones worth looking at - when the FLAIR image is found next to
    each ground truth; without images only the box plot is written (logged). Returns the written files.
    """
    import logging

    from bundle.evaluation.plots import find_image, plot_case_overlays, plot_metric_boxplot

    output_dir = Path(output_dir)
    box = output_dir / f"boxplot_{metric}.png"
    plot_metric_boxplot(metrics_csv, box, metric=metric)
    written = [box]
    if pred_dir is None or truth_dir is None or overlays <= 0:
        return written
    rows = read_metrics_csv(metrics_csv)
    by_case: dict[str, list[float]] = {}
    for row in rows:
        if isinstance(row.get(metric), float):
            by_case.setdefault(row["case"], []).append(row[metric])
    worst = sorted(by_case, key=lambda c: (float(np.mean(by_case[c])), c))[:overlays]
    truths = find_segmentations(truth_dir)
    try:
        for case in worst:
            find_image(truths[case])
    except (FileNotFoundError, KeyError) as err:
        logging.getLogger(__name__).warning("no overlays: %s", err)
        return written
    written += plot_case_overlays(
        pred_dir,
        truth_dir,
        output_dir / "overlays",
        worst,
        label_scheme=label_scheme,
        pred_label_scheme=pred_label_scheme,
    )
    return written
