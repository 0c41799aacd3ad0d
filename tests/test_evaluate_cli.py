"""``python -m bundle evaluate / compare / plots`` and configs/evaluate.yaml (checkpoint + labelled data)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser

from bundle.data import generate_demo_dataset
from bundle.evaluation.reports import evaluate_folder
from bundle.integrations.cli import COMMANDS
from bundle.plan.checkpoints import save_model
from bundle.plan.network import build_network

SHAPE = (16, 14, 10)
SPACING = (1.0, 1.0, 2.0)
AFFINE = np.diag([*SPACING, 1.0])


def _truth_labels() -> np.ndarray:
    """BraTS 2021 values: an edema block around a core with NCR (1) and ET (4)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:13, 3:11, 2:8] = 2
    labels[5:11, 5:9, 3:7] = 4
    labels[7:9, 6:8, 4:6] = 1
    return labels


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Ground truth as BraTS case folders (seg + FLAIR) and predictions: exact, ET eroded, shifted."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    pred_dir.mkdir()
    truth = _truth_labels()
    eroded = truth.copy()
    eroded[5, 5:9, 3:7] = 2  # 16 ET voxels become edema
    shifted = np.roll(truth, 2, axis=0)
    for case, pred in (("Case_0", truth), ("Case_1", eroded), ("Case_2", shifted)):
        (truth_dir / case).mkdir(parents=True)
        nib.save(nib.Nifti1Image(truth, AFFINE), truth_dir / case / f"{case}_seg.nii.gz")
        flair = np.where(truth > 0, 200.0, 100.0).astype(np.float32)
        nib.save(nib.Nifti1Image(flair, AFFINE), truth_dir / case / f"{case}_flair.nii.gz")
        nib.save(nib.Nifti1Image(pred, AFFINE), pred_dir / f"{case}.nii.gz")
    return pred_dir, truth_dir


def _cli(*args: str) -> object:
    return fire.Fire(COMMANDS, command=list(args))


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_predictions_on_disk(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred_dir, truth_dir = folders
    out = tmp_path / "eval"
    _cli("evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--output_dir", str(out))
    printed = capsys.readouterr().out
    assert "3 case(s); mean +- std (median)" in printed and "hd95" in printed

    rows = _rows(out / "metrics.csv")
    assert [(r["case"], r["region"]) for r in rows] == [(f"Case_{i}", g) for i in range(3) for g in ("WT", "TC", "ET")]
    value = {(r["case"], r["region"]): r for r in rows}
    assert float(value[("Case_0", "ET")]["dice"]) == 1.0 and float(value[("Case_0", "WT")]["hd95"]) == 0.0
    # Case_1, ET: 88 true voxels (6x4x4 minus the 2x2x2 NCR), 16 of them predicted as edema -> 72 predicted
    et_true = int((_truth_labels() == 4).sum())
    assert et_true == 88
    assert float(value[("Case_1", "ET")]["dice"]) == pytest.approx(2 * 72 / (72 + 88))
    assert float(value[("Case_1", "WT")]["dice"]) == 1.0  # edema is still tumour
    assert float(value[("Case_2", "WT")]["dice"]) < 1.0

    summary = json.loads((out / "summary.json").read_text())
    et_dice = [float(value[(f"Case_{i}", "ET")]["dice"]) for i in range(3)]
    assert summary["ET"]["dice"]["mean"] == pytest.approx(np.mean(et_dice))
    assert summary["ET"]["dice"]["std"] == pytest.approx(np.std(et_dice, ddof=1))
    assert summary["ET"]["dice"]["median"] == pytest.approx(np.median(et_dice))
    assert summary["ET"]["dice"]["p25"] == pytest.approx(np.percentile(et_dice, 25))


def test_evaluate_plots_and_no_lesion_scores(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, truth_dir = folders
    out = tmp_path / "eval"
    args = ["--output_dir", str(out), "--plots", "--overlays", "1", "--lesion_wise", "false"]
    _cli("evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), *args)
    assert (out / "boxplot_dice.png").stat().st_size > 0
    # the one overlay is the worst case: the shifted prediction
    assert [p.name for p in (out / "overlays").iterdir()] == ["Case_2_overlay.png"]
    assert "lesion_dice" not in _rows(out / "metrics.csv")[0]


def test_missing_prediction_names_the_file(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, truth_dir = folders
    (pred_dir / "Case_1.nii.gz").unlink()
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:
        _cli("evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--output_dir", str(out))
    message = str(info.value)
    assert str(truth_dir / "Case_1" / "Case_1_seg.nii.gz") in message and "no prediction" in message
    assert len(message.splitlines()) == 1
    assert not out.exists(), "nothing may be written when a prediction is missing"


def _write_table(path: Path, dice: np.ndarray, hd95: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "region", "dice", "hd95"])
        for i, (d, h) in enumerate(zip(dice, hd95, strict=True)):
            writer.writerow([f"c{i:02d}", "WT", repr(float(d)), repr(float(h))])


def test_compare_finds_a_known_shift_and_none_between_identical_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    dice, hd95 = rng.uniform(0.6, 0.9, 20), rng.uniform(2.0, 10.0, 20)
    _write_table(tmp_path / "a" / "metrics.csv", dice, hd95)
    # B: Dice higher by 0.05 (+ small noise), HD95 unchanged
    _write_table(tmp_path / "b" / "metrics.csv", dice + 0.05 + rng.normal(0, 0.005, 20), hd95)
    out = tmp_path / "cmp.csv"
    _cli("compare", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.csv"), "--output", str(out))
    result = {r["metric"]: r for r in _rows(out)}
    assert float(result["dice"]["mean_diff"]) == pytest.approx(0.05, abs=0.005)
    assert result["dice"]["verdict"].startswith("B better than A")
    assert float(result["dice"]["ci_low"]) > 0
    assert result["hd95"]["verdict"] == "no significant difference"

    _cli("compare", str(tmp_path / "a"), str(tmp_path / "a"), "--output", str(out))
    for row in _rows(out):
        assert float(row["mean_diff"]) == 0.0 and row["verdict"] == "no significant difference"


def test_compare_without_a_table_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no metrics\.csv or cv_metrics\.csv"):
        _cli("compare", str(tmp_path), str(tmp_path))


def test_plots_of_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics_per_epoch.csv").write_text("epoch,loss,val_dice_WT,val_mean_dice\n1,0.9,0.5,0.4\n2,0.7,0.6,0.5\n")
    _write_table(run / "metrics.csv", np.array([0.7, 0.8, 0.9]), np.array([3.0, 4.0, 5.0]))
    written = _cli("plots", str(run))
    assert sorted(Path(p).name for p in written) == ["boxplot_dice.png", "training_curves.png"]
    assert all(Path(p).stat().st_size > 0 for p in written)


TINY_NET = """\
network_factory:
  _target_: DynUNet
  _mode_: callable
  spatial_dims: 3
  in_channels: 4
  out_channels: 3
  kernel_size: [3, 3, 3]
  strides: [1, 2, 2]
  upsample_kernel_size: [2, 2]
  filters: [4, 8, 16]
  norm_name: [INSTANCE, {affine: true}]
  deep_supervision: true
  deep_supr_num: 1
  res_block: true
window: [32, 32, 32]
"""


def test_evaluate_config_from_a_checkpoint(tmp_path: Path) -> None:
    """inference.yaml + evaluate.yaml through `python -m monai.bundle run`: predictions, then their metrics."""
    data = generate_demo_dataset(tmp_path / "data", num_cases=2, num_test_cases=1, shape=(32, 32, 24))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_NET)
    parser = ConfigParser()
    parser.read_config(str(tiny))
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_network(parser.get_parsed_content("network_factory")), patch_size=[32] * 3)
    out = tmp_path / "out"
    configs = f"['configs/inference.yaml','configs/evaluate.yaml','{tiny}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(data)]
    cmd += ["--checkpoint", str(tmp_path / "model.pt"), "--output_dir", str(out), "--tta", "False"]
    cmd += ["--lesion_wise", "False"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 case(s); mean +- std (median)" in result.stdout

    rows = _rows(out / "metrics.csv")
    # the labelled cases only (the held-out demo case has no segmentation in its folder)
    assert [(r["case"], r["region"]) for r in rows] == [
        (c, g) for c in ("Demo_00000", "Demo_00001") for g in ["WT", "TC", "ET"]
    ]
    assert (out / "summary.json").is_file()
    # the numbers are those of scoring the written predictions against the truth files
    truth = tmp_path / "truth"
    for case in ("Demo_00000", "Demo_00001"):
        (truth / case).mkdir(parents=True)
        (truth / case / f"{case}_seg.nii.gz").symlink_to(data / case / f"{case}_seg.nii.gz")
    expected = evaluate_folder(out, truth, lesion_wise=False, verbose=False)
    for row, want in zip(rows, expected, strict=True):
        assert float(row["dice"]) == pytest.approx(want["dice"]) and float(row["hd95"]) == pytest.approx(want["hd95"])


def test_labelled_cases_of_a_fold_and_a_missing_prediction(tmp_path: Path) -> None:
    """evaluate.yaml's data: a datalist fold's validation cases; each prediction must exist before scoring."""
    from bundle.data import prepare, select_cases
    from bundle.errors import DataError
    from bundle.evaluation.reports import evaluate_datalist

    data = generate_demo_dataset(tmp_path / "data", num_cases=4, num_test_cases=1, shape=(16, 16, 12))
    assert [i["case_id"] for i in select_cases(str(data), labelled=True)] == [f"Demo_{i:05d}" for i in range(4)]
    datalist = prepare(str(data), str(tmp_path / "datalist.json"), folds=2)
    fold_1 = select_cases(None, datalist, fold=1, split="val", labelled=True)
    folds = {i["case_id"]: i["fold"] for i in json.loads(Path(datalist).read_text())["training"]}
    assert sorted(i["case_id"] for i in fold_1) == sorted(c for c, f in folds.items() if f == 1)

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    first, second = fold_1[0], fold_1[1]
    (pred_dir / f"{first['case_id']}_seg.nii.gz").symlink_to(first["label"])
    with pytest.raises(FileNotFoundError, match=f"{second['case_id']}_seg.nii.gz: no prediction"):
        evaluate_datalist(pred_dir, fold_1, tmp_path / "eval", verbose=False)
    assert not (tmp_path / "eval").exists()
    rows = evaluate_datalist(pred_dir, fold_1[:1], tmp_path / "eval", lesion_wise=False, verbose=False)
    assert [r["dice"] for r in rows] == [1.0, 1.0, 1.0]  # the truth as its own prediction
    with pytest.raises(DataError, match="no case with a ground-truth"):
        select_cases(None, str(_datalist_without_labels(tmp_path)), labelled=True)


def _datalist_without_labels(tmp_path: Path) -> Path:
    path = tmp_path / "unlabelled.json"
    path.write_text(json.dumps({"training": [], "testing": [{"case_id": "x", "image": "x.nii.gz"}]}))
    return path


def test_evaluate_command_from_a_checkpoint(tmp_path: Path) -> None:
    """`python -m bundle evaluate --checkpoint ... --truth DATASET`: the same config run in-process, with plots."""
    data = generate_demo_dataset(tmp_path / "data", num_cases=2, num_test_cases=0, shape=(32, 32, 24))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_NET)
    parser = ConfigParser()
    parser.read_config(str(tiny))
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_network(parser.get_parsed_content("network_factory")), patch_size=[32] * 3)
    out = tmp_path / "out"
    args = ["--truth", str(data), "--checkpoint", str(tmp_path / "model.pt"), "--config_file", str(tiny)]
    _cli("evaluate", *args, "--output_dir", str(out), "--tta", "false", "--lesion_wise", "false", "--plots")
    rows = _rows(out / "metrics.csv")
    assert {r["case"] for r in rows} == {"Demo_00000", "Demo_00001"} and len(rows) == 6
    assert "lesion_dice" not in rows[0]
    assert (out / "Demo_00000_seg.nii.gz").is_file() and (out / "boxplot_dice.png").is_file()
    with pytest.raises(SystemExit, match="either --pred"):
        _cli("evaluate", "--truth", str(data), "--pred", str(out), "--checkpoint", str(tmp_path / "model.pt"))


def _bad_shape(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((16, 14, 9), np.uint8), AFFINE), path)


def _bad_affine(path: Path) -> None:
    nib.save(nib.Nifti1Image(_truth_labels(), np.diag([1.0, 1.0, 3.0, 1.0])), path)


def _four_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.uint8), AFFINE), path)


def _junk(path: Path) -> None:
    path.write_bytes(b"not a NIfTI file")


def test_bad_pair_sorted_last_stops_before_any_scoring(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """`python -m bundle evaluate`: a shape mismatch in the last case is found before the first is scored."""
    pred_dir, truth_dir = folders
    _bad_shape(pred_dir / "Case_2.nii.gz")
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "bundle", "evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "--output_dir", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout == "", "no summary, no scores"
    assert "Traceback" not in result.stderr and "scoring" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: {pred_dir / 'Case_2.nii.gz'}: prediction shape (16, 14, 9) differs from the ground truth "
        f"{truth_dir / 'Case_2' / 'Case_2_seg.nii.gz'} (16, 14, 10)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("damage", "which", "message"),
    [
        (_bad_affine, "pred", "prediction affine differs from the ground truth"),
        (_four_d, "pred", r"prediction is not a 3-D label map \(shape \(16, 14, 10, 2\)"),
        (_junk, "pred", "prediction cannot be read as NIfTI"),
        (_junk, "truth", "ground truth cannot be read as NIfTI"),
    ],
)
def test_every_pair_header_is_checked_before_scoring(
    folders: tuple[Path, Path], tmp_path: Path, capsys, damage, which, message
) -> None:
    pred_dir, truth_dir = folders
    pred, truth = pred_dir / "Case_2.nii.gz", truth_dir / "Case_2" / "Case_2_seg.nii.gz"
    damage(pred if which == "pred" else truth)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:
        _cli("evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--output_dir", str(out))
    text = str(info.value)
    assert len(text.splitlines()) == 1 and re.search(message, text), text
    assert str(pred) in text and str(truth) in text, "both files named"
    printed = capsys.readouterr()
    assert "scoring" not in printed.err and "case(s)" not in printed.out
    assert not out.exists()


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-12])  # header intact, data cut off


def _nan_voxels(path: Path) -> None:
    data = _truth_labels().astype(np.float32)
    data[0, 0, :3] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def _unknown_value(path: Path) -> None:
    data = _truth_labels()
    data[0, 0, 0] = 3  # not a BraTS 2021 value
    nib.save(nib.Nifti1Image(data, AFFINE), path)


@pytest.mark.parametrize(
    ("damage", "which", "message"),
    [
        (_truncated, "pred", r"Case_2\.nii\.gz: label map data cannot be decoded"),
        (_truncated, "truth", r"Case_2_seg\.nii\.gz: label map data cannot be decoded"),
        (_nan_voxels, "pred", r"Case_2\.nii\.gz: 3 of \d+ voxels are not finite \(NaN or Inf\)"),
        (_unknown_value, "pred", r"Case_2\.nii\.gz: label values \[3\] are not in the 'brats2021' scheme"),
    ],
)
def test_every_voxel_is_decoded_before_scoring(
    folders: tuple[Path, Path], tmp_path: Path, capsys, damage, which, message
) -> None:
    """The last case's data (not only its header) is checked before the first case is scored."""
    pred_dir, truth_dir = folders
    damage(pred_dir / "Case_2.nii.gz" if which == "pred" else truth_dir / "Case_2" / "Case_2_seg.nii.gz")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:
        _cli("evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--output_dir", str(out))
    text = str(info.value)
    assert len(text.splitlines()) == 1 and re.search(message, text), text
    assert "scoring" not in capsys.readouterr().err
    assert not out.exists()


def test_hidden_files_in_a_prediction_folder_are_not_cases(folders: tuple[Path, Path]) -> None:
    """A killed inference run's temporary file (hidden) is neither a case nor a second prediction."""
    pred_dir, truth_dir = folders
    _junk(pred_dir / ".Case_1_seg.4242-deadbeef.partial.nii.gz")
    rows = evaluate_folder(pred_dir, truth_dir, lesion_wise=False, verbose=False)
    assert sorted({r["case"] for r in rows}) == ["Case_0", "Case_1", "Case_2"]


def test_evaluate_datalist_checks_headers_first(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from bundle.evaluation.reports import evaluate_datalist

    pred_dir, truth_dir = folders
    for case in ("Case_0", "Case_1", "Case_2"):
        (pred_dir / f"{case}.nii.gz").rename(pred_dir / f"{case}_seg.nii.gz")
    _bad_affine(pred_dir / "Case_2_seg.nii.gz")
    items = [{"case_id": c, "label": str(truth_dir / c / f"{c}_seg.nii.gz")} for c in ("Case_0", "Case_1", "Case_2")]
    with pytest.raises(ValueError, match=r"Case_2_seg\.nii\.gz: prediction affine differs .*Case_2_seg\.nii\.gz"):
        evaluate_datalist(pred_dir, items, tmp_path / "eval", verbose=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_config_scores_the_held_out_test_set_alone(tmp_path: Path) -> None:
    """``--datalist_file F --split holdout``: the cases kept out of every fold, nothing else."""
    from bundle.data import prepare

    data = generate_demo_dataset(tmp_path / "data", num_cases=5, num_test_cases=0, shape=(16, 16, 12))
    datalist = prepare(str(data), str(tmp_path / "datalist.json"), folds=2, holdout_fraction=0.2)
    held = [i["case_id"] for i in json.loads(Path(datalist).read_text())["holdout"]]
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / c) for c in ("inference.yaml", "evaluate.yaml")])
    parser.update({"datalist_file": datalist, "split": "holdout"})
    assert [i["case_id"] for i in parser.get_parsed_content("labelled_cases")] == held
    parser["split"] = None
    parser["fold"] = 1
    val = [i["case_id"] for i in parser.get_parsed_content("labelled_cases", lazy=False)]
    assert val and not set(val) & set(held)
