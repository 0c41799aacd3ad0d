"""Bad input and divergence through the entry points users type: one sentence, no traceback, nothing left.

Each corruption of docs/reliability.md is applied to a tiny BraTS 2021 dataset and fed to
``prepare``, to ``monai.bundle run training`` and to inference; the error must name the file and
the problem, end the command with exit code 1 and leave no output folder behind.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, REPO_ROOT, write_brats_case
from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from test_inference_config import TINY_NET, _checkpoint

from bundle.data import generate_demo_dataset, make_datalist
from bundle.errors import DataError, find_user_error
from bundle.inference.run import infer
from bundle.transforms import LoadCaseImaged

CASE = "BraTS2021_00001"


def _file(root: Path, suffix: str) -> Path:
    return root / CASE / f"{CASE}_{suffix}.nii.gz"


def _with_voxels(path: Path, edit: Callable[[np.ndarray], None]) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    edit(data)
    nib.save(nib.Nifti1Image(data, image.affine), path)


def _nan_inf(data: np.ndarray) -> None:
    flat = data.reshape(-1)
    flat[:10] = np.nan
    flat[10:15] = np.inf
    flat[15:20] = -np.inf


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:-12])  # the gzip trailer and the last data: header intact, data cut off


def _resave(path: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


# name -> (corrupt the dataset, the sentence's expected end). Rows of docs/reliability.md.
CORRUPTIONS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "missing modality": (lambda r: _file(r, "t2").unlink(), f"{CASE}_t2.nii.gz: missing modality t2"),
    "empty file": (lambda r: _file(r, "t1").write_bytes(b""), f"{CASE}_t1.nii.gz: file is empty"),
    "not a NIfTI file": (
        lambda r: _file(r, "t1").write_bytes(b"not an image" * 100),
        f"{CASE}_t1.nii.gz: not a readable NIfTI file",
    ),
    "truncated .nii.gz": (lambda r: _truncate(_file(r, "flair")), f"{CASE}_flair.nii.gz: image data cannot be decoded"),
    "NaN / Inf voxels": (
        lambda r: _with_voxels(_file(r, "t1ce"), _nan_inf),
        f"{CASE}_t1ce.nii.gz: 20 of 960 voxels are not finite (NaN or Inf)",
    ),
    "shape mismatch": (
        lambda r: _resave(_file(r, "t2"), np.zeros((10, 12, 9), np.float32)),
        f"{CASE}_t2.nii.gz: shape (10, 12, 9) differs from",
    ),
    "affine mismatch": (
        lambda r: _resave(_file(r, "t2"), affine=np.diag([-2.0, -1.0, 1.0, 1.0])),
        f"{CASE}_t2.nii.gz: affine differs from",
    ),
}
LABEL_CORRUPTIONS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "unknown label value": (
        lambda r: _with_voxels(_file(r, "seg"), lambda d: d.reshape(-1).__setitem__(0, 3)),
        f"{CASE}_seg.nii.gz: unknown label values [3] for the brats2021 layout",
    ),
    "truncated label": (lambda r: _truncate(_file(r, "seg")), f"{CASE}_seg.nii.gz: label data cannot be decoded"),
    "label shape mismatch": (
        lambda r: _resave(_file(r, "seg"), np.zeros((10, 12, 7), np.uint8)),
        f"{CASE}_seg.nii.gz: label shape (10, 12, 7) differs from image",
    ),
}


def _dataset(tmp_path: Path, corruption: Callable[[Path], Any]) -> Path:
    root = tmp_path / "data"
    for i in range(4):
        write_brats_case(root, f"BraTS2021_{i:05d}", "brats2021")
    corruption(root)
    return root


def _user_error(call: Callable[[], Any]) -> str:
    with pytest.raises(Exception) as info:
        call()
    error = find_user_error(info.value)
    assert error is not None, f"not a one-sentence user error: {info.value!r}"
    return str(error)


TRAIN_OVERRIDES = {
    "num_folds": 2,
    "num_workers": 0,
    "patch_size": [16, 16, 16],  # a multiple of the 16 of four down-samplings
    "network_factory#filters": [4, 8, 16, 32, 64],
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS) + sorted(LABEL_CORRUPTIONS))
def test_prepare_and_training_stop_before_any_folder(tmp_path: Path, name: str) -> None:
    corrupt, expected = {**CORRUPTIONS, **LABEL_CORRUPTIONS}[name]
    root = _dataset(tmp_path, corrupt)
    message = _user_error(lambda: make_datalist(root))
    assert expected in message, message
    out, models = tmp_path / "out", tmp_path / "models"
    message = _user_error(
        lambda: run(
            "training",
            config_file=str(REPO_ROOT / "configs" / "train.yaml"),
            bundle_root=str(REPO_ROOT),
            dataset_dir=str(root),
            output_dir=str(out),
            ckpt_dir=str(models),
            **TRAIN_OVERRIDES,
        )
    )
    assert expected in message, message
    assert not out.exists() and not models.exists(), "a folder was made before the checks passed"


#: What inference finds in a case's voxels (decoded once, by its loader), not in its headers
VOXEL_CORRUPTIONS = ("NaN / Inf voxels", "truncated .nii.gz")


@pytest.mark.parametrize("name", sorted(set(CORRUPTIONS) - set(VOXEL_CORRUPTIONS)))
def test_inference_stops_before_loading_the_model(tmp_path: Path, name: str) -> None:
    corrupt, expected = CORRUPTIONS[name]
    root = _dataset(tmp_path, corrupt)
    out = tmp_path / "out"
    message = _user_error(lambda: infer(str(root), output=str(out), checkpoint=str(tmp_path / "absent.pt")))
    assert expected in message, message  # the cases are checked first: the missing checkpoint comes later
    assert not out.exists()


@pytest.mark.parametrize("name", VOXEL_CORRUPTIONS)
def test_inference_names_a_file_whose_voxels_fail_and_writes_nothing_of_it(tmp_path: Path, name: str) -> None:
    """Inference decodes each case once, in its loader: bad voxels are one sentence naming the file there."""
    corrupt, expected = CORRUPTIONS[name]
    root = _dataset(tmp_path, corrupt)
    out = tmp_path / "out"
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    message = _user_error(lambda: infer(str(root), output=str(out), checkpoint=str(checkpoint), window=[8, 8, 8]))
    assert expected in message, message
    assert not list(out.glob(f"{CASE}_*"))  # nothing of the bad case; the cases before it are complete


def test_evaluate_with_a_checkpoint_decodes_and_checks_each_image_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bundle evaluate --checkpoint``: the cases' headers and labels are checked up front, each image is
    decoded and scanned for NaN / Inf once, by inference's loader (was: by the case checks too); a NaN
    case is still one sentence naming its file, and nothing of it is written."""
    import bundle.data.io
    import bundle.transforms.loading
    from bundle.integrations.cli import evaluate

    root = tmp_path / "data"
    for i in (0, 1):  # the corruptions below are made in BraTS2021_00001
        write_brats_case(root, f"BraTS2021_{i:05d}", "brats2021")
    checkpoint = str(_checkpoint(tmp_path / "model.pt", TINY_NET))
    decoded, scanned, checked = [], [], []
    for module in (bundle.data.io, bundle.transforms.loading):  # every NIfTI decode of the bundle is load_nifti
        original = module.load_nifti
        monkeypatch.setattr(module, "load_nifti", lambda p, f=original: decoded.append(Path(p).name) or f(p))
    refuse, read = bundle.transforms.loading._refuse_non_finite, bundle.data.io.read_voxels
    monkeypatch.setattr(bundle.transforms.loading, "_refuse_non_finite", lambda a, s: scanned.append(s) or refuse(a, s))
    monkeypatch.setattr(bundle.data.checks, "read_voxels", lambda p, *a: checked.append(Path(p).name) or read(p, *a))
    kwargs = {"checkpoint": checkpoint, "tta": False, "window": [8, 8, 8], "lesion_wise": False}
    evaluate(truth=str(root), output_dir=str(tmp_path / "scores"), **kwargs)
    images = sorted(name for name in decoded if not name.endswith("_seg.nii.gz"))
    assert len(images) == 8 and len(set(images)) == 8, images  # 2 cases x 4 modalities, once each
    assert len(scanned) == 2 and not [name for name in checked if not name.endswith("_seg.nii.gz")]
    corrupt, expected = CORRUPTIONS["NaN / Inf voxels"]
    corrupt(root)
    with pytest.raises(SystemExit) as stop:
        evaluate(truth=str(root), output_dir=str(tmp_path / "again"), **kwargs)
    assert expected in str(stop.value), stop.value
    assert not list((tmp_path / "again").glob(f"{CASE}*"))


def test_a_missing_dataset_folder(tmp_path: Path) -> None:
    message = _user_error(lambda: make_datalist(tmp_path / "nowhere"))
    assert message.endswith("nowhere: dataset folder does not exist")


# ------------------------------------------------------------------ the loader itself (MONAI Label's path)


def test_the_loader_refuses_non_finite_voxels_and_names_the_modality_file(tmp_path: Path) -> None:
    """MONAI Label loads cases through the bundle's preprocessing, without the up-front checks."""
    case = write_brats_case(tmp_path, "Case", "brats2021", with_label=False)
    files = [str(case / f"Case_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
    _with_voxels(Path(files[2]), _nan_inf)
    loader = LoadCaseImaged(keys="image", ensure_channel_first=True, image_only=True)
    with pytest.raises(DataError, match=r"Case_t2\.nii\.gz: 20 of 960 voxels are not finite \(NaN or Inf\)$"):
        loader({"image": files})
    _with_voxels(Path(files[2]), lambda d: d.fill(1.0))
    assert loader({"image": files})["image"].shape == (4, 10, 12, 8)


def test_monai_label_inference_config_refuses_a_nan_case(tmp_path: Path) -> None:
    from bundle.integrations.monailabel import app_inference_config

    image = np.random.default_rng(0).uniform(0, 100, (12, 10, 8, 4)).astype(np.float32)
    image[0, 0, 0, 1] = np.nan
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), path)
    # the preprocessing is the checkpoint's (its recipe names the training configs it comes from)
    checkpoint = str(_checkpoint(tmp_path / "model.pt", TINY_NET))
    parser = ConfigParser(app_inference_config(REPO_ROOT, {"demo": True, "tta": False, "checkpoint": checkpoint}))
    preprocessing = parser.get_parsed_content("preprocessing")
    message = _user_error(lambda: preprocessing({"image": str(path)}))  # MONAI's Compose wraps it
    assert message == f"{path}: 1 of 3840 voxels are not finite (NaN or Inf)"


# ------------------------------------------------------------------ whole commands (exit code, stderr)


def _command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def _assert_one_sentence(result: subprocess.CompletedProcess, expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


@pytest.mark.parametrize("name", ["NaN / Inf voxels", "truncated .nii.gz"])
def test_monai_bundle_run_training_ends_with_the_sentence(tmp_path: Path, name: str) -> None:
    corrupt, expected = CORRUPTIONS[name]
    root = _dataset(tmp_path, corrupt)
    args = ["-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
    args += ["--dataset_dir", str(root), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "m")]
    _assert_one_sentence(_command(args), expected)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_prepare_and_inference_commands_end_with_the_sentence(tmp_path: Path) -> None:
    corrupt, expected = CORRUPTIONS["NaN / Inf voxels"]
    root = _dataset(tmp_path, corrupt)
    _assert_one_sentence(_command(["-m", "bundle", "prepare", "--dataset_dir", str(root)]), expected)
    args = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--dataset_dir", str(root)]
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    args += ["--checkpoint", str(checkpoint), "--window", "[8,8,8]"]
    _assert_one_sentence(_command([*args, "--output_dir", str(tmp_path / "out")]), expected)
    assert not list((tmp_path / "out").glob(f"{CASE}_*"))


def test_a_diverging_training_stops_with_one_sentence_and_keeps_only_finite_models(tmp_path: Path) -> None:
    """lr = 1e30: epoch 1 ends with huge but finite weights, epoch 2's loss is NaN."""
    data = generate_demo_dataset(tmp_path / "demo", num_cases=4, num_test_cases=0, shape=(32, 32, 24))
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", "--dataset_dir", str(data)]
    args += ["--output_dir", str(out), "--ckpt_dir", str(models), "--epochs", "3", "--val_interval", "1"]
    for key, value in {**TRAIN_OVERRIDES, "patch_size": [32, 32, 32], "learning_rate": 1e30}.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    result = _command(args)
    _assert_one_sentence(result, "training stopped at epoch 2, iteration 2: the loss is nan")
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == ["checkpoint_epoch=1.pt"]
    for path in (models / "model.pt", out / "checkpoint_epoch=1.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state["model"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), path


def test_the_non_finite_guard_checks_weights_at_the_end_of_an_epoch() -> None:
    from ignite.engine import Engine

    from bundle.errors import NonFiniteError
    from bundle.training.handlers import StopOnNonFiniteLoss

    def guarded_engine(loss: float) -> Engine:
        engine = Engine(lambda e, b: {"loss": torch.tensor(loss)})
        StopOnNonFiniteLoss(network).attach(engine)
        return engine

    network = torch.nn.Linear(2, 1)
    guarded_engine(0.5).run([0, 1], max_epochs=2)  # finite: runs through
    with pytest.raises(NonFiniteError, match=r"epoch 1, iteration 1: the loss is inf"):
        guarded_engine(float("inf")).run([0, 1], max_epochs=1)
    with torch.no_grad():
        network.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"end of epoch 1: 1 weight tensors hold NaN or Inf \(e.g. weight\)"):
        guarded_engine(0.5).run([0], max_epochs=1)


# ------------------------------------------------------------------ degenerate runs: one sentence before training


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """``python -m bundle ARGV`` in-process (bundle.integrations.cli.main): its last line on stderr, exit 1."""
    from bundle.integrations.cli import main

    monkeypatch.setattr(sys, "argv", ["bundle", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_prepare_with_more_folds_than_cases_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = _dataset(tmp_path, lambda r: None)
    out = tmp_path / "datalist.json"
    message = _main(monkeypatch, capsys, ["prepare", "--dataset_dir", str(root), "--output", str(out), "--folds", "9"])
    assert (
        message == f"error: {root}: 9 folds of 4 labelled case(s) would leave 5 fold(s) empty; use --folds 4 or fewer"
    )
    assert not out.exists()
    held = _main(
        monkeypatch,
        capsys,
        ["prepare", "--dataset_dir", str(root), "--output", str(out), "--folds", "4", "--holdout_fraction", "0.25"],
    )
    assert held.endswith(
        "4 folds of 3 labelled case(s) (1 held out) would leave 1 fold(s) empty; use --folds 3 or fewer"
    )


def _training(tmp_path: Path, **overrides: Any) -> None:
    run(
        "training",
        config_file=str(REPO_ROOT / "configs" / "train.yaml"),
        bundle_root=str(REPO_ROOT),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        **{**TRAIN_OVERRIDES, "epochs": 1, "val_interval": 1, **overrides},
    )


def test_training_refuses_an_empty_validation_or_training_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training on an empty validation fold used to end with exit code 0 and no model."""
    from bundle.data import prepare

    monkeypatch.chdir(REPO_ROOT)
    root = _dataset(tmp_path, lambda r: None)
    # a dataset folder dealt into more folds than it has cases: fold 4 of 5 is empty (4 cases, 1 held out)
    message = _user_error(lambda: _training(tmp_path, dataset_dir=str(root), num_folds=5, fold=4))
    assert message.endswith(
        "datalist.json: fold 4 holds no case to validate on (3 labelled case(s) in 5 folds); "
        "choose another --fold or fewer folds"
    ), message
    assert not (tmp_path / "models").exists(), "no model folder for a run that cannot validate"
    # every case in one fold: nothing left to train on
    datalist = Path(prepare(str(root), str(tmp_path / "one_fold.json"), folds=2))
    data = json.loads(datalist.read_text())
    for item in data["training"]:
        item["fold"] = 0
    datalist.write_text(json.dumps(data))
    message = _user_error(lambda: _training(tmp_path, datalist=str(datalist), fold=0))
    assert message == (
        f"{datalist}: fold 0 holds every case, leaving none to train on (4 labelled case(s) in 2 folds); use more folds"
    )
    assert not (tmp_path / "models").exists()


def test_one_fold_says_validation_is_on_the_training_cases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bundle.data import select_cases

    root = _dataset(tmp_path, lambda r: None)
    datalist = make_datalist(root, folds=1)
    with caplog.at_level(logging.WARNING, logger="bundle.data.datalist"):
        assert select_cases(datalist=_write(tmp_path / "d.json", datalist), split="val", fold=0)
    said = "one fold: training and validation use the same 4 case(s), so the validation scores are scores on"
    assert f"{said} the training cases" in caplog.text


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_a_blank_modality_is_named_and_a_case_without_brain_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A T1 of zeros used to be segmented without a word; all four: an empty brain mask, nothing to segment."""
    import fire

    from bundle.integrations.cli import COMMANDS

    root = _dataset(tmp_path, lambda r: _with_voxels(_file(r, "t1"), lambda d: d.fill(0)))
    checkpoint = str(_checkpoint(tmp_path / "model.pt", TINY_NET))
    out = tmp_path / "out"
    case = root / CASE
    command = ["infer", str(case), "--output", str(out), "--checkpoint", checkpoint, "--tta", "false"]
    (written,) = fire.Fire(COMMANDS, command=command)
    log = capsys.readouterr()  # the bundle's logging.conf writes the log to stdout
    warning = f"{_file(root, 't1')}: every voxel of this t1 volume is 0 (an empty or failed export?); "
    assert f"WARNING - {warning}case {CASE} goes on with a blank t1" in log.out + log.err
    assert Path(written).is_file()
    for modality in ("t1ce", "t2", "flair"):
        _with_voxels(_file(root, modality), lambda d: d.fill(0))
    message = _main(
        monkeypatch, capsys, ["infer", str(case), "--output", str(tmp_path / "out2"), "--checkpoint", checkpoint]
    )
    assert message == (
        f"error: {case}: no voxel of any modality of case {CASE} is above 0, so its brain mask (the voxels above 0) "
        "is empty and there is nothing to segment"
    )
    assert not (tmp_path / "out2").exists()
    # prepare and training check the same way
    message = _user_error(lambda: make_datalist(root))
    assert "brain mask (the voxels above 0) is empty" in message
