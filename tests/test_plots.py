"""Pictures: overlay colours at known voxels, PNG sizes, training curves and box plots from CSV files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from bundle.constants import ED, ET, LABEL_COLOURS, NCR
from bundle.evaluation.files import write_metrics_csv
from bundle.evaluation.plots import (
    overlay_rgb,
    plot_case_overlays,
    plot_metric_boxplot,
    plot_overlay,
    plot_training_curves,
    voxel_to_pixel,
)


def _phantom(shape=(48, 40, 32)):
    """Ellipsoid 'head' with a layered tumour: ED shell, ET rim, NCR centre."""
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    radius = np.array(shape)[:, None, None, None] / 2.3
    image = np.where((((grid - centre) / radius) ** 2).sum(0) <= 1, 100.0 + grid[0], 0.0)
    t = np.array([30, 18, 16])[:, None, None, None]
    dist = np.sqrt(((grid - t) ** 2).sum(0))
    truth = np.zeros(shape, np.uint8)
    truth[dist <= 8] = ED
    truth[dist <= 5] = ET
    truth[dist <= 3] = NCR
    return image, truth


def _pixel(png, panel, voxel):
    col, row = voxel_to_pixel(panel, voxel)
    return png[row, col, :3]


def test_overlay_png_size_and_label_colours(tmp_path):
    image, truth = _phantom()
    pred = np.roll(truth, 4, axis=0)
    path = tmp_path / "overlay.png"
    panels = plot_overlay(image, truth, pred, path, spacing=(1.0, 1.0, 1.5), alpha=1.0, panel_size=2.0, dpi=50)
    png = imread(path)
    assert png.shape[:2] == (2 * 2 * 50, 3 * 2 * 50)  # 2 rows x 3 views of 100 px each
    centre = (30, 18, 16)  # the tumour's centre of mass: all three views go through it
    assert {p["index"] for k, p in panels.items() if k.startswith("truth")} == set(centre)
    # voxels 4 (ET) and 7 (ED) voxels from the centre along an in-plane axis of each view
    in_plane = {"axial": 0, "coronal": 0, "sagittal": 1}
    for view, axis in in_plane.items():
        truth_panel = panels[f"truth_{view}"]
        et, ed = list(centre), list(centre)
        et[axis] += 4
        ed[axis] += 7
        assert _pixel(png, truth_panel, centre) == pytest.approx(LABEL_COLOURS[NCR], abs=0.01)
        assert _pixel(png, truth_panel, et) == pytest.approx(LABEL_COLOURS[ET], abs=0.01)
        assert _pixel(png, truth_panel, ed) == pytest.approx(LABEL_COLOURS[ED], abs=0.01)
    # prediction shifted by +4 along x: its NCR centre is at x = 34, ED at x = 26 (truth's rim at x = 22)
    for view in ("axial", "coronal"):
        pred_panel = panels[f"prediction_{view}"]
        assert _pixel(png, pred_panel, (34, 18, 16)) == pytest.approx(LABEL_COLOURS[NCR], abs=0.01)
        assert _pixel(png, pred_panel, (26, 18, 16)) == pytest.approx(LABEL_COLOURS[ED], abs=0.01)
    # its sagittal slice x = 30 cuts the shifted tumour 4 voxels off-centre: ET there
    assert _pixel(png, panels["prediction_sagittal"], centre) == pytest.approx(LABEL_COLOURS[ET], abs=0.01)
    # head outside the tumour: grey (r = g = b), not a label colour
    grey = _pixel(png, panels["truth_axial"], (10, 20, 16))
    assert grey[0] == pytest.approx(grey[1], abs=0.01) and grey[1] == pytest.approx(grey[2], abs=0.01)
    assert 0.05 < grey[0] < 0.95


def test_overlay_blending_and_title(tmp_path):
    image, truth = _phantom()
    rgb = overlay_rgb(image[:, :, 16].T, truth[:, :, 16].T, alpha=0.6)
    et = rgb[18, 34]  # row = y, column = x
    assert et[0] > 0.6 and et[1] > 0.6 and et[2] < 0.4  # yellowish over grey
    panels = plot_overlay(image, truth, None, tmp_path / "t.png", title="case", panel_size=2.0, dpi=50)
    assert set(panels) == {"truth_axial", "truth_coronal", "truth_sagittal"}
    assert imread(tmp_path / "t.png").shape[:2] == (2 * 50 + 20, 3 * 2 * 50)
    with pytest.raises(ValueError, match="shape"):
        plot_overlay(image, truth[:-1], None, tmp_path / "x.png")


def test_plot_case_overlays_from_folders(tmp_path):
    image, truth = _phantom()
    case = tmp_path / "truth" / "Case_001"
    case.mkdir(parents=True)
    (tmp_path / "pred").mkdir()
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.where(truth == ET, 4, truth).astype(np.uint8), affine), case / "Case_001_seg.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), case / "Case_001_flair.nii.gz")
    nib.save(
        nib.Nifti1Image(np.where(truth == ET, 4, truth).astype(np.uint8), affine), tmp_path / "pred" / "Case_001.nii.gz"
    )
    written = plot_case_overlays(tmp_path / "pred", tmp_path / "truth", tmp_path / "png")
    assert written == [tmp_path / "png" / "Case_001_overlay.png"] and written[0].is_file()
    with pytest.raises(FileNotFoundError, match="t1ce"):
        plot_case_overlays(tmp_path / "pred", tmp_path / "truth", tmp_path / "png", modality="t1ce")


def test_training_curves_from_csv(tmp_path):
    log = tmp_path / "log.csv"
    lines = ["epoch,loss,val_mean_dice,val_dice_WT,val_dice_TC,val_dice_ET,val_hd95_WT,lr"]
    for e in range(1, 11):
        val = e % 2 == 0  # validation every second epoch: other rows have empty metric cells
        d = [0.5 + 0.04 * e, 0.4 + 0.04 * e, 0.3 + 0.04 * e]
        cells = [f"{np.mean(d):.3f}", *(f"{v:.3f}" for v in d), f"{20 - e:.1f}"] if val else [""] * 5
        lines.append(",".join([str(e), f"{1.0 / e:.4f}", *cells, "0.0001"]))
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "curves.png"
    plotted = plot_training_curves(log, out, dpi=50)
    assert plotted == ["loss", "val_mean_dice", "val_dice_WT", "val_dice_TC", "val_dice_ET", "val_hd95_WT"]
    png = imread(out)
    assert png.shape[:2] == (round(3.6 * 50), round(3 * 4.5 * 50))  # three panels: loss, Dice, HD95
    (tmp_path / "bad.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*epoch"):
        plot_training_curves(tmp_path / "bad.csv", tmp_path / "bad.png")


def test_boxplot_from_metrics_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"case": f"c{i}", "region": region, "dice": float(rng.uniform(lo, 1.0)), "hd95": float(rng.uniform(1, 9))}
        for i in range(8)
        for region, lo in (("WT", 0.8), ("TC", 0.6), ("ET", 0.4))
    ]
    write_metrics_csv(rows, tmp_path / "metrics.csv")
    values = plot_metric_boxplot(tmp_path / "metrics.csv", tmp_path / "box.png", dpi=50)
    assert list(values) == ["WT", "TC", "ET"] and all(len(v) == 8 for v in values.values())
    assert values["ET"][0] == pytest.approx(rows[2]["dice"])
    assert imread(tmp_path / "box.png").shape[:2] == (round(3.6 * 50), round((1.4 * 3 + 1.5) * 50))
    plot_metric_boxplot(tmp_path / "metrics.csv", tmp_path / "hd.png", metric="hd95", dpi=50)
    assert (tmp_path / "hd.png").is_file()
    with pytest.raises(ValueError, match="lesion_dice"):
        plot_metric_boxplot(tmp_path / "metrics.csv", tmp_path / "x.png", metric="lesion_dice")
