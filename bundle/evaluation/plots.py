"""Pictures for evaluation: label overlays, training curves and per-region box plots (PNG, headless).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through
``pyplot``, so nothing here needs a display or changes the process-wide backend.

Colours follow the usual BraTS figures: NCR red, ED green, ET yellow (:data:`LABEL_COLOURS`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bundle.constants import (
    BRATS2021_SUFFIXES,
    BRATS2023_SUFFIXES,
    CLASS_NAMES,
    DISJOINT_CLASSES,
    ED,
    ET,
    LABEL_COLOURS,
    NCR,
    REGION_NAMES,
)
from bundle.data.labels import bounding_box
from bundle.evaluation.files import case_id_from_path, find_segmentations, load_label_map, read_metrics_csv

#: The three orthogonal views: name -> array axis held fixed (arrays in RAS-like voxel order, as NIfTI).
VIEWS: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}


def tumour_centre(*label_maps: np.ndarray) -> tuple[int, ...]:
    """Voxel index of the centre of mass of the first non-empty label map's tumour (else the volume centre)."""
    for labels in label_maps:
        if labels is not None and np.any(labels > 0):
            return tuple(int(np.rint(c)) for c in np.argwhere(labels > 0).mean(axis=0))
    return tuple(s // 2 for s in label_maps[0].shape)


def view_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2-D slice for display: rows run along the second remaining axis (drawn bottom-up), columns the first."""
    return np.take(volume, index, axis=VIEWS[view]).T


def overlay_rgb(image: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a 2-D label slice over a grey image slice: float RGB in [0, 1], shape ``image.shape + (3,)``.

    The image is windowed to its 1st-99th percentile of non-zero pixels; labelled pixels become
    ``alpha * colour + (1 - alpha) * grey`` (``alpha=1``: pure label colours).
    """
    image = np.asarray(image, dtype=np.float64)
    nonzero = image[image != 0]
    lo, hi = np.percentile(nonzero, [1, 99]) if nonzero.size else (0.0, 1.0)
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for label, colour in LABEL_COLOURS.items():
        mask = labels == label
        rgb[mask] = alpha * np.asarray(colour) + (1.0 - alpha) * rgb[mask]
    return rgb


def plot_overlay(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray | None,
    output_path: str | Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    title: str | None = None,
    alpha: float = 0.6,
    panel_size: float = 3.0,
    dpi: int = 100,
    crop_margin: int = 5,
) -> dict[str, dict]:
    """Save a PNG: axial, coronal and sagittal slices through the tumour centre, truth row above prediction row.

    Args:
        image: 3-D background (FLAIR or T1ce), same shape as the label maps.
        truth: internal label map of the ground truth.
        pred: internal label map of the prediction (``None``: truth row only).
        output_path: PNG file to write.
        spacing: voxel size in mm, for correct aspect ratios.
        centre: voxel index the slices go through (default: centre of mass of the truth's tumour).
        title: figure title (default: none).
        alpha: label opacity.
        panel_size: inches per panel; the PNG is ``3 * panel_size * dpi`` pixels wide.
        dpi: resolution.
        crop_margin: voxels kept around the non-zero part of the image (the head) in every view.

    Returns:
        Per panel (``"truth_axial"``, ...): ``bbox`` (x0, y0, x1, y1 in PNG pixels, origin top-left), ``shape``
        of the displayed slice, the slice ``index`` (in the input volume), ``view`` and the crop ``offset``
        - enough to find a voxel in the PNG with :func:`voxel_to_pixel`.
    """
    image, truth = np.asarray(image), np.asarray(truth)
    rows = [("truth", truth)] + ([("prediction", np.asarray(pred))] if pred is not None else [])
    for name, labels in rows:
        if labels.shape != image.shape:
            raise ValueError(f"{name} shape {labels.shape} differs from the image shape {image.shape}")
    centre = tuple(centre) if centre is not None else tumour_centre(truth, pred)
    spacing = tuple(float(s) for s in spacing)
    # show the head, not the empty field of view: crop every view to the non-zero image (+ labels) box
    content = (image != 0) | (truth > 0) | (rows[-1][1] > 0)
    box = bounding_box(content, crop_margin) or tuple(slice(0, s) for s in image.shape)
    lo = [b.start for b in box]
    hi = [b.stop for b in box]
    image = image[box]
    rows = [(name, labels[box]) for name, labels in rows]
    centre = tuple(int(np.clip(c - a, 0, b - a - 1)) for c, a, b in zip(centre, lo, hi, strict=True))
    fig = Figure(figsize=(3 * panel_size, len(rows) * panel_size + (0.4 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    top = 1.0 - (0.4 / (len(rows) * panel_size + 0.4) if title else 0.0)
    axes = fig.subplots(len(rows), 3, squeeze=False, gridspec_kw={"top": top, "bottom": 0, "left": 0, "right": 1})
    for r, (row_name, labels) in enumerate(rows):
        for c, view in enumerate(VIEWS):
            ax = axes[r, c]
            index = centre[VIEWS[view]]
            shown = [s for a, s in enumerate(spacing) if a != VIEWS[view]]
            rgb = overlay_rgb(view_slice(image, view, index), view_slice(labels, view, index), alpha)
            ax.imshow(rgb, origin="lower", interpolation="nearest", aspect=shown[1] / shown[0])
            ax.set_axis_off()
            ax.text(0.02, 0.98, f"{row_name} {view}", color="white", fontsize=8, va="top", transform=ax.transAxes)
    handles = [Patch(color=LABEL_COLOURS[k], label=CLASS_NAMES[k]) for k in (NCR, ED, ET)]
    axes[-1, -1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.5)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.canvas.draw()
    height = fig.bbox.height
    panels = {}
    for r, (row_name, _) in enumerate(rows):
        for c, view in enumerate(VIEWS):
            ext = axes[r, c].get_window_extent()
            panels[f"{row_name}_{view}"] = {
                "bbox": (float(ext.x0), float(height - ext.y1), float(ext.x1), float(height - ext.y0)),
                "shape": view_slice(image, view, centre[VIEWS[view]]).shape,
                "index": int(centre[VIEWS[view]] + lo[VIEWS[view]]),
                "view": view,
                "offset": tuple(int(a) for a in lo),
            }
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=dpi, facecolor="black")
    return panels


def voxel_to_pixel(panel: dict, voxel: Sequence[int]) -> tuple[int, int]:
    """PNG (column, row) of a voxel in a panel returned by :func:`plot_overlay` (voxel must lie in its slice)."""
    axis = VIEWS[panel["view"]]
    if voxel[axis] != panel["index"]:
        raise ValueError(f"voxel {tuple(voxel)} is not in the {panel['view']} slice {panel['index']}")
    # (column index, row index) of the displayed, cropped slice
    rest = [v - o for a, (v, o) in enumerate(zip(voxel, panel["offset"], strict=True)) if a != axis]
    n_rows, n_cols = panel["shape"]
    x0, y0, x1, y1 = panel["bbox"]
    col = x0 + (rest[0] + 0.5) / n_cols * (x1 - x0)
    row = y1 - (rest[1] + 0.5) / n_rows * (y1 - y0)  # origin="lower": row 0 of the slice at the bottom
    return int(col), int(row)


def find_image(truth_path: str | Path, modality: str = "flair") -> Path:
    """The ``modality`` image next to a BraTS ground truth (``*_seg`` -> ``*_flair`` or ``*-seg`` -> ``*-t2f``)."""
    truth_path = Path(truth_path)
    case = case_id_from_path(truth_path)
    candidates = [
        truth_path.parent / f"{case}{sep}{suffixes[modality]}{ext}"
        for suffixes in (BRATS2021_SUFFIXES, BRATS2023_SUFFIXES)
        for sep in ("_", "-")
        for ext in (".nii.gz", ".nii")
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{truth_path}: no {modality} image next to it (looked for {candidates[0].name}, ...)")


def plot_case_overlays(
    pred_dir: str | Path,
    truth_dir: str | Path,
    output_dir: str | Path,
    cases: Sequence[str] | None = None,
    label_scheme: str = "brats2021",
    pred_label_scheme: str | None = None,
    modality: str = "flair",
    alpha: float = 0.6,
) -> list[Path]:
    """Overlay PNGs (``<output_dir>/<case>_overlay.png``) for chosen cases of a prediction folder.

    The background is the ``modality`` image found next to each ground truth (:func:`find_image`); cases
    default to all. Returns the written files.
    """
    preds, truths = find_segmentations(pred_dir), find_segmentations(truth_dir)
    cases = list(cases) if cases is not None else sorted(set(preds) & set(truths))
    for case in cases:
        if case not in truths or case not in preds:
            raise ValueError(f"case {case!r}: needs a prediction in {pred_dir} and a ground truth in {truth_dir}")
    written = []
    for case in cases:
        truth, spacing, _ = load_label_map(truths[case], label_scheme)
        pred, _, _ = load_label_map(preds[case], pred_label_scheme or label_scheme)
        image = np.asarray(nib.load(str(find_image(truths[case], modality))).dataobj, dtype=np.float32)
        path = Path(output_dir) / f"{case}_overlay.png"
        plot_overlay(image, truth, pred, path, spacing=spacing, title=f"{case} ({modality})", alpha=alpha)
        written.append(path)
    return written


def _read_columns(path: Path) -> dict[str, list[float]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise ValueError(f"{path}: a training log needs an 'epoch' column (found {reader.fieldnames})")
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in columns:
                try:
                    columns[name].append(float(row[name]) if row[name] not in ("", None) else math.nan)
                except ValueError:
                    columns[name].append(math.nan)
    return columns


def _region_of(column: str) -> str | None:
    for region in (*REGION_NAMES, *DISJOINT_CLASSES):
        if column.endswith(f"_{region}") or column.endswith(f"-{region}"):
            return region
    return None


def plot_training_curves(csv_path: str | Path, output_path: str | Path, dpi: int = 100) -> list[str]:
    """Training curves PNG from a per-epoch CSV log (e.g. :class:`bundle.evaluation.handlers.RegionMetricsCSVHandler`).

    Expected columns: ``epoch`` (required); ``loss`` and/or ``val_loss`` (optional, left panel); per-region
    columns whose name contains ``dice`` and ends in ``_WT``, ``_TC``, ``_ET`` (or ``_NCR``, ``_ED``), e.g.
    ``val_dice_WT`` (middle panel), plus a ``*mean_dice`` column if present; per-region ``hd95`` columns
    (``val_hd95_WT``, ...) get a third panel when present. Empty cells (epochs without validation) are
    skipped. Returns the plotted column names.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such training log")
    cols = _read_columns(csv_path)
    epoch = np.asarray(cols["epoch"])
    losses = [c for c in ("loss", "val_loss") if c in cols]
    dice = [c for c in cols if "dice" in c.lower() and (_region_of(c) or "mean" in c.lower())]
    dist = [c for c in cols if "hd95" in c.lower() and _region_of(c)]
    if not losses and not dice:
        raise ValueError(f"{csv_path}: no 'loss' column and no per-region dice columns (e.g. val_dice_WT)")
    panels = [p for p in (("loss", losses), ("Dice", dice), ("HD95 (mm)", dist)) if p[1]]
    fig = Figure(figsize=(4.5 * len(panels), 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, names) in zip(axes, panels, strict=True):
        for name in names:
            y = np.asarray(cols[name])
            ok = ~np.isnan(y)
            region = _region_of(name)
            colour = _REGION_COLOURS.get(region) if region else None
            style = "--" if "mean" in name.lower() else "-"
            ax.plot(epoch[ok], y[ok], style, marker="o", markersize=3, label=name, color=colour)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if label == "Dice":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(csv_path.name, fontsize=9)
    fig.tight_layout()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=dpi)
    return [n for _, names in panels for n in names]


#: Line colours of the regions in curves and box plots.
_REGION_COLOURS: dict[str, str] = {
    "WT": "tab:green",
    "TC": "tab:red",
    "ET": "goldenrod",
    "NCR": "tab:red",
    "ED": "tab:green",
}


def plot_metric_boxplot(
    metrics_csv: str | Path, output_path: str | Path, metric: str = "dice", dpi: int = 100
) -> dict[str, list[float]]:
    """Box plot of a per-case metric per region from ``metrics.csv``, with the cases as jittered points.

    Returns the plotted values per region (in file order).
    """
    rows = read_metrics_csv(metrics_csv)
    if metric not in rows[0]:
        raise ValueError(f"{metrics_csv}: no column {metric!r}")
    regions = list(dict.fromkeys(r["region"] for r in rows))
    values = {g: [float(r[metric]) for r in rows if r["region"] == g and r[metric] != ""] for g in regions}
    fig = Figure(figsize=(1.4 * len(regions) + 1.5, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    box = ax.boxplot([values[g] for g in regions], patch_artist=True, widths=0.55, showfliers=False)
    ax.set_xticks(range(1, len(regions) + 1), regions)
    rng = np.random.default_rng(0)  # fixed jitter: identical pictures for identical inputs
    for i, g in enumerate(regions, start=1):
        box["boxes"][i - 1].set_facecolor(_REGION_COLOURS.get(g, "lightgrey"))
        box["boxes"][i - 1].set_alpha(0.45)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values[g])), values[g], s=10, color="black", zorder=3)
    ax.set_ylabel(metric)
    if metric in ("dice", "iou", "lesion_dice", "lesion_dice_matched", "sensitivity", "specificity"):
        ax.set_ylim(-0.02, 1.02)
    n = max(len(v) for v in values.values())
    ax.set_title(f"{metric} per case ({n} cases)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=dpi)
    return values
