"""MONAI Label on BraTS data as users have it: studies, served weights, the app's configs, and a real server.

The server tests need monailabel (its own venv, ``.venv-label``; see docs/guides/monai-label-slicer.md) and are
marked ``slow`` and ``label``:  ``.venv-label/bin/python -m pytest -m label tests/test_label.py``.
They drive the server through MONAI Label's own client on a BraTS 2021 folder as downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser

from bundle.constants import LABEL_SCHEMES, MODALITIES, MSD_CHANNEL_ORDER
from bundle.data import make_phantom
from bundle.errors import DataError, UserError
from bundle.integrations.export import md5sum
from bundle.integrations.monailabel import (
    MODEL_NAME,
    PRED_KEY,
    app_inference_config,
    assemble_app,
    choose_checkpoint,
    default_tta,
    expand_config,
    label_channel_def,
    prepare_studies,
)
from bundle.plan.checkpoints import save_model

# A tiny network and patch so CPU inference and one training epoch take seconds.
TINY = {"network_factory#filters": [4, 8, 16, 32, 64], "patch_size": [32, 32, 32], "num_workers": 0}
SHAPE = (40, 36, 30)
MSD_VALUE = {internal: value for value, internal in LABEL_SCHEMES["msd"].items()}
BRATS2021_INTERNAL = LABEL_SCHEMES["brats2021"]
# monailabel.utils.async_tasks.task: a task is SUBMITTED, then RUNNING, then one of these.
TASK_FINAL_STATES = ("DONE", "ERROR", "STOPPED")


def lps_affine() -> np.ndarray:
    """An LPS-oriented affine (x and y flipped, 1.5 mm, shifted origin), as BraTS files have."""
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [30.0, 40.0, -20.0]
    return affine


def write_brats_case(root: Path, case_id: str, seed: int, with_label: bool, skip: str | None = None) -> Path:
    """A phantom case as BraTS 2021 ships it: CASE/CASE_{t1,t1ce,t2,flair}.nii.gz (+ _seg, values 1, 2, 4)."""
    image, labels = make_phantom(seed, SHAPE)
    case_dir = root / case_id
    case_dir.mkdir(parents=True)
    for channel, modality in enumerate(MODALITIES):
        if modality != skip:
            nib.save(nib.Nifti1Image(image[channel], lps_affine()), case_dir / f"{case_id}_{modality}.nii.gz")
    if with_label:
        nib.save(nib.Nifti1Image(labels, lps_affine()), case_dir / f"{case_id}_seg.nii.gz")
    return case_dir


def truncate(path: Path) -> Path:
    """Cut a ``.nii.gz`` file to half its bytes: its header is read, its voxels cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_msd_case(studies: Path, case_id: str, seed: int, with_label: bool) -> Path:
    """A phantom as one 4-D NIfTI in MSD channel order, with its label (MSD values) in labels/final."""
    image, labels = make_phantom(seed, SHAPE)  # channels in MODALITIES order, labels in BraTS 2021 values
    msd_image = np.stack([image[MODALITIES.index(m)] for m in MSD_CHANNEL_ORDER], axis=-1).astype(np.float32)
    path = studies / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(msd_image, lps_affine()), path)
    if with_label:
        msd_labels = np.zeros_like(labels, dtype=np.uint8)
        for value, internal in BRATS2021_INTERNAL.items():
            msd_labels[labels == value] = MSD_VALUE[internal]
        (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(msd_labels, lps_affine()), studies / "labels" / "final" / f"{case_id}.nii.gz")
    return path


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Randomly initialised weights of the tiny network (what MONAI Label needs to list the model)."""
    parser = ConfigParser(expand_config(REPO_ROOT, "train.yaml", TINY))
    torch.manual_seed(seed)
    return save_model(path, parser.get_parsed_content("network_def"), patch_size=TINY["patch_size"])


@pytest.fixture
def brats_dataset(tmp_path: Path) -> Path:
    """A BraTS 2021 folder as downloaded: two labelled cases, one without segmentation."""
    root = tmp_path / "BraTS2021"
    write_brats_case(root, "BraTS2021_00001", seed=1, with_label=True)
    write_brats_case(root, "BraTS2021_00002", seed=2, with_label=True)
    write_brats_case(root, "BraTS2021_00003", seed=3, with_label=False)
    return root


# ------------------------------------------------------------------ label names, studies, weights (default run)


def test_label_names_follow_each_scheme() -> None:
    assert label_channel_def("msd") == {"0": "background", "1": "ED", "2": "NCR", "3": "ET"}
    assert label_channel_def("brats2021") == {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
    assert label_channel_def("brats2023") == {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}


def test_a_brats_folder_becomes_one_link_per_case_with_its_labels(brats_dataset: Path, tmp_path: Path) -> None:
    studies = prepare_studies(brats_dataset, tmp_path / "work")
    assert studies.layout == "brats2021" and studies.folder == (tmp_path / "work" / "studies").resolve()
    links = sorted(p for p in studies.folder.iterdir() if p.is_symlink())
    assert [p.name for p in links] == [f"BraTS2021_0000{i}.nii.gz" for i in (1, 2, 3)]
    assert links[0].resolve() == (brats_dataset / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").resolve()
    final = studies.folder / "labels" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["BraTS2021_00001.nii.gz", "BraTS2021_00002.nii.gz"]
    assert not (final / "BraTS2021_00001.nii.gz").is_symlink(), "a link would let MONAI Label write into the dataset"

    # a label saved in MONAI Label is kept at the next start; a case added to the dataset shows up
    (final / "BraTS2021_00001.nii.gz").write_bytes(b"saved by a user")
    write_brats_case(brats_dataset, "BraTS2021_00004", seed=4, with_label=False)
    again = prepare_studies(brats_dataset, tmp_path / "work")
    assert (final / "BraTS2021_00001.nii.gz").read_bytes() == b"saved by a user"
    assert (again.folder / "BraTS2021_00004.nii.gz").is_symlink()
    shutil.rmtree(brats_dataset / "BraTS2021_00004")
    assert not (prepare_studies(brats_dataset, tmp_path / "work").folder / "BraTS2021_00004.nii.gz").exists()

    # the view given as --studies is served as it is; another dataset needs another work folder
    assert prepare_studies(studies.folder, tmp_path / "elsewhere").layout == "brats2021"
    other = tmp_path / "other"
    write_brats_case(other, "BraTS2021_00009", seed=9, with_label=False)
    with pytest.raises(UserError, match=r"studies: holds the studies and labels of .*BraTS2021; pass another"):
        prepare_studies(other, tmp_path / "work")


def test_brats2023_nrrd_and_msd_folders(tmp_path: Path) -> None:
    from conftest import convert_with_itk

    source = write_brats_case(tmp_path / "src", "Case", seed=5, with_label=True)
    case = tmp_path / "BraTS2023" / "BraTS-GLI-00005-000"
    case.mkdir(parents=True)
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f"), ("seg", "seg")):
        convert_with_itk(source / f"Case_{old}.nii.gz", case / f"{case.name}-{new}.nrrd")
    studies = prepare_studies(tmp_path / "BraTS2023", tmp_path / "w2023")
    assert studies.layout == "brats2023"
    assert [p.name for p in studies.folder.iterdir() if p.is_symlink()] == ["BraTS-GLI-00005-000.nrrd"]
    assert (studies.folder / "labels" / "final" / "BraTS-GLI-00005-000.nrrd").is_file()

    from conftest import write_msd

    msd = prepare_studies(write_msd(tmp_path / "Task01_BrainTumour"), tmp_path / "wmsd")
    assert msd.layout == "msd" and len([p for p in msd.folder.iterdir() if p.is_symlink()]) == 4
    flat = tmp_path / "label_studies"
    flat.mkdir()
    write_msd_case(flat, "case", seed=1, with_label=False)
    assert prepare_studies(flat, tmp_path / "wflat").folder == flat.resolve()  # MONAI Label's own folder


def test_served_weights_survive_restarts_and_are_chosen_explicitly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "work" / "models"
    first = tiny_checkpoint(tmp_path / "first.pt", seed=0)
    caplog.set_level(logging.INFO, logger="bundle.integrations.monailabel")
    served = choose_checkpoint(models, first)
    assert md5sum(served) == md5sum(first) and f"copied from {first}" in caplog.text

    tiny_checkpoint(served, seed=1)  # MONAI Label's training replaced the served weights
    trained = md5sum(served)
    caplog.clear()
    assert md5sum(choose_checkpoint(models, first)) == trained  # the same command line again
    assert "trained in MONAI Label since it was copied from --checkpoint" in caplog.text
    assert md5sum(choose_checkpoint(models)) == trained
    assert md5sum(choose_checkpoint(models, served)) == trained  # --checkpoint at the served file itself

    second = tiny_checkpoint(tmp_path / "second.pt", seed=2)
    caplog.clear()
    assert md5sum(choose_checkpoint(models, second)) == md5sum(second)
    (kept,) = (models / "previous").iterdir()
    assert md5sum(kept) == trained and f"kept as {kept}" in caplog.text

    with pytest.raises(UserError, match=r"missing\.pt: checkpoint does not exist"):
        choose_checkpoint(tmp_path / "fresh", tmp_path / "missing.pt")


def test_rebuilding_the_app_keeps_the_weights(tmp_path: Path) -> None:
    work = tmp_path / "work"
    choose_checkpoint(work / "models", tiny_checkpoint(tmp_path / "tiny.pt"))
    bundle_dir = assemble_app(work, "brats2021", overrides=TINY)
    assert (bundle_dir / "models").is_symlink() and (bundle_dir / "models" / "model.pt").is_file()
    trained = md5sum(work / "models" / "model.pt")
    assemble_app(work, "brats2021", overrides=TINY)
    assert md5sum(work / "models" / "model.pt") == trained

    # weights an earlier version kept inside the app folder are moved out before the rebuild
    (bundle_dir / "models").unlink()
    (bundle_dir / "models").mkdir()
    shutil.move(work / "models" / "model.pt", bundle_dir / "models" / "model.pt")
    assemble_app(work, "brats2021", overrides=TINY)
    assert md5sum(work / "models" / "model.pt") == trained

    # ... also when the served file exists: the old one is kept in models/previous, never deleted
    (bundle_dir / "models").unlink()
    (bundle_dir / "models").mkdir()
    tiny_checkpoint(bundle_dir / "models" / "model.pt", seed=3)
    older = md5sum(bundle_dir / "models" / "model.pt")
    assemble_app(work, "brats2021", overrides=TINY)
    assert md5sum(work / "models" / "model.pt") == trained
    assert [md5sum(p) for p in (work / "models" / "previous").iterdir()] == [older]


def test_an_override_no_config_knows_is_one_sentence(tmp_path: Path) -> None:
    from bundle.errors import OptionError

    choose_checkpoint(tmp_path / "work" / "models", tiny_checkpoint(tmp_path / "tiny.pt"))
    with pytest.raises(OptionError, match=r"^--ttta: not a key of configs/inference.yaml or configs/train.yaml"):
        assemble_app(tmp_path / "work", "brats2021", overrides={**TINY, "ttta": "false"})


def test_label_serve_command_ends_a_misspelt_option_with_one_sentence(brats_dataset: Path, tmp_path: Path) -> None:
    """``python -m bundle label_serve`` as typed: a key no config has is refused before anything is made."""
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    command = [sys.executable, "-m", "bundle", "label_serve", "--studies", str(brats_dataset)]
    command += ["--checkpoint", str(checkpoint), "--work_dir", str(tmp_path / "work"), "--ttta", "false"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: --ttta: not a key of configs/inference.yaml or configs/train.yaml (it would be ignored)"
    assert not (tmp_path / "work").exists(), "nothing is made for a refused option"


def test_tta_default_is_one_pass_without_cuda_and_reads_strings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bundle.integrations.monailabel")
    assert default_tta("false") is False and default_tta("true") is True
    if not torch.cuda.is_available():
        assert default_tta(None) is False
        assert "no CUDA, one pass per case" in caplog.text


def _serve_like_monai_label(config: dict[str, Any], image: str) -> dict[str, Any]:
    """MONAI Label's BundleInferTask sequence: pre (loader with image_only False), inferer, post without saving."""
    parser = ConfigParser(config)
    pre = parser.get_parsed_content("preprocessing")
    for transform in pre.transforms:
        if type(transform).__name__ == "LoadCaseImaged":
            transform._loader.image_only = False  # what MONAI Label sets
    data = pre({"image": image})
    network = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        data[PRED_KEY] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    post = parser.get_parsed_content("postprocessing")
    post.transforms = tuple(t for t in post.transforms if "SaveImage" not in type(t).__name__)  # as MONAI Label does
    return post(data)


def test_app_inference_on_a_brats_link_loads_the_whole_case(brats_dataset: Path, tmp_path: Path) -> None:
    studies = prepare_studies(brats_dataset, tmp_path / "work")
    checkpoint = str(tiny_checkpoint(tmp_path / "model.pt"))
    config = app_inference_config(REPO_ROOT, {**TINY, "checkpoint": checkpoint, "tta": False}, studies.layout)
    data = _serve_like_monai_label(config, str(studies.folder / "BraTS2021_00003.nii.gz"))
    assert data["image"].shape[0] == 4 and data["layout"] == "brats2021"
    pred = data[PRED_KEY]
    assert tuple(pred.shape) == (1, *SHAPE)
    np.testing.assert_allclose(pred.affine.numpy(), lps_affine(), atol=1e-5)
    assert set(torch.unique(pred).int().tolist()) <= {0, 1, 2, 4}

    (brats_dataset / "BraTS2021_00003" / "BraTS2021_00003_t2.nii.gz").unlink()
    with pytest.raises(Exception) as raised:
        _serve_like_monai_label(config, str(studies.folder / "BraTS2021_00003.nii.gz"))
    from bundle.errors import find_user_error

    error = find_user_error(raised.value)
    assert isinstance(error, DataError)
    assert str(error) == f"{brats_dataset.resolve()}/BraTS2021_00003/BraTS2021_00003_t2.nii.gz: missing modality t2"


def test_app_inference_config_runs_monai_labels_pipeline_on_a_4d_lps_case(tmp_path: Path) -> None:
    case = write_msd_case(tmp_path, "case", seed=3, with_label=False)
    checkpoint = str(tiny_checkpoint(tmp_path / "model.pt"))
    data = _serve_like_monai_label(app_inference_config(REPO_ROOT, {**TINY, "checkpoint": checkpoint}), str(case))
    pred = data[PRED_KEY]
    assert tuple(pred.shape) == (1, *SHAPE)
    np.testing.assert_allclose(pred.affine.numpy(), lps_affine(), atol=1e-5)
    assert set(torch.unique(pred).int().tolist()) <= {0, 1, 2, 3}


def cpu_recipe_checkpoint(path: Path) -> Path:
    """A checkpoint as configs/cpu.yaml trains it (its plan: window, recipe, schedule, sampling), tiny widths."""
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / f) for f in ("train.yaml", "cpu.yaml")])
    small = {"network_factory#filters": [4, 8, 8, 8], "patch_size": [16, 16, 16], "window": [24, 24, 16]}
    small["crop_pos"] = 3  # a sampling train.yaml does not have: fine-tuning must take it from the plan
    for key, value in {**small, "device": "$torch.device('cpu')", "num_workers": 0}.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(
        {"model": network.state_dict(), "model_record": parser.get_parsed_content("model_plan").state_dict()}, path
    )
    return path


@pytest.mark.slow
@pytest.mark.label
def test_monai_label_fine_tuning_keeps_the_served_plan(brats_dataset: Path, tmp_path: Path) -> None:
    """One epoch through MONAI Label's trainer as ``POST /train`` runs it (the app's BratsTrainTask, MONAI Label's
    BundleTrainTask: datastore list, split, CheckpointLoader of the served weights, ``monai.bundle.run`` of the
    app's train.json) from a configs/cpu.yaml checkpoint; the new model.pt records the same plan."""
    pytest.importorskip("monailabel")
    from bundle.integrations.monailabel_app import DATASTORE_EXTENSIONS, BratsTrainTask, StudiesDatastore
    from bundle.plan import read_plan
    from bundle.plan.specs import same_component

    work = tmp_path / "work"
    studies = prepare_studies(brats_dataset, work)
    served_file = choose_checkpoint(work / "models", cpu_recipe_checkpoint(tmp_path / "served.pt"))
    served = read_plan(served_file)
    # steps_per_epoch: a user's explicit change at label_serve (logged); the plan keeps the rest
    bundle_dir = assemble_app(work, studies.layout, overrides={"steps_per_epoch": 2, "num_workers": 0})
    config = ConfigParser.load_config_file(str(bundle_dir / "configs" / "train.json"))
    assert isinstance(config["train"]["handlers"], list) and config["cache"] == "none"
    assert config["window"] == [24, 24, 16] and config["crop_pos"] == 3  # the plan's, not train.yaml's

    task = BratsTrainTask(str(bundle_dir), {"models": MODEL_NAME})
    datastore = StudiesDatastore(str(studies.folder), extensions=DATASTORE_EXTENSIONS)
    request = {"model": MODEL_NAME, "max_epochs": 1, "val_split": 0.5, "multi_gpu": False, "device": "cpu"}
    task({**request, "bundle_path": str(bundle_dir)}, datastore)

    assert list((work / "runs" / "train").glob("checkpoint_*epoch=1.pt"))
    assert not (bundle_dir / "data").exists(), "MONAI Label's datalist must be used, not the demo data"
    assert md5sum(work / "models" / "model.pt") != md5sum(tmp_path / "served.pt"), "the served weights were trained"
    tuned = read_plan(work / "models" / "model.pt")  # one epoch still validates and saves the model
    for key in ("network", "input_channels", "preprocessing", "patch_size", "window", "inference_recipe"):
        assert same_component(tuned[key], served[key]), key
    changed = {k for k in served["training"] if not same_component(tuned["training"][k], served["training"][k])}
    assert changed == {"steps_per_epoch"}, changed
    assert task.stats()["epoch"] == 1 and task.stats()["eval"]["best_metric_epoch"] == 1


@pytest.mark.slow
def test_default_epochs_fill_about_15_minutes_by_the_plan(tmp_path: Path) -> None:
    """The trainer's default epochs: the plan's steps, batch and windows at the measured seconds, in 15 minutes."""
    from bundle.integrations.monailabel import default_epochs, measure_training, size_training
    from bundle.plan import read_plan

    plan = {**read_plan(cpu_recipe_checkpoint(tmp_path / "cpu.pt")), "window": [160, 192, 160]}
    training = plan["training"]
    assert training["steps_per_epoch"] == 100 and training["lr_scheduler_factory"]["total_iters"] == 12  # cpu.yaml
    # 100 steps x 1.4 s + 2 validation cases x 1 whole-brain window x 2 s = 144 s an epoch: 6 in 15 minutes
    epochs, reason = default_epochs(plan, labelled=10, seconds={"step": 1.4, "window": 2.0})
    assert epochs == 6, reason
    assert reason.startswith("training: 6 epoch(s) by default, about 14 min: one step of 2 x 16x16x16 patches")
    assert default_epochs(plan, 10, {"step": 20.0, "window": 2.0})[0] == 1  # at least one
    # at most the model's learning-rate schedule (12 epochs to 0 in configs/cpu.yaml), else MONAI Label's 50
    assert default_epochs(plan, 10, {"step": 0.01, "window": 0.01})[0] == 12
    assert default_epochs({**plan, "training": {}}, 10, {"step": 0.01, "window": 0.01})[0] == 50

    seconds = measure_training(read_plan(tiny_checkpoint(tmp_path / "tiny.pt")))
    assert seconds["step"] > 0 and seconds["window"] > 0
    (tmp_path / "work" / "models").mkdir(parents=True)
    (tmp_path / "app" / "configs").mkdir(parents=True)
    first = size_training(tmp_path / "work", tmp_path / "app", plan, labelled=3)
    budget = json.loads((tmp_path / "app" / "configs" / "monailabel_training.json").read_text())
    assert budget["max_epochs"] == first
    import bundle.integrations.monailabel as monailabel

    def measured_again(*args: Any) -> None:
        raise AssertionError("the measurement of the same model on the same machine is kept")

    original, monailabel.measure_training = monailabel.measure_training, measured_again
    try:
        assert size_training(tmp_path / "work", tmp_path / "app", plan, labelled=3) == first
    finally:
        monailabel.measure_training = original


# ------------------------------------------------------------------ a real MONAI Label server


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m bundle label_serve ...`` as a user types it, started in its own process group, stopped by PID."""

    def __init__(self, root: Path, dataset: Path, checkpoint: Path) -> None:
        self.root, self.dataset, self.checkpoint = root, dataset, checkpoint
        self.work, self.log, self.tmp = root / "work", root / "server.log", root / "server_tmp"
        self.process: subprocess.Popen | None = None
        self.client: Any = None

    def command(self, port: int) -> list[str]:
        """The same command line at every start: --checkpoint unchanged, --tta false as typed."""
        tiny = [f"--{key}={json.dumps(value).replace(' ', '')}" for key, value in TINY.items()]
        return [
            sys.executable,
            "-m",
            "bundle",
            "label_serve",
            "--studies",
            str(self.dataset),
            "--checkpoint",
            str(self.checkpoint),
            "--work_dir",
            str(self.work),
            "--port",
            str(port),
            "--tta",
            "false",
            *tiny,
        ]

    def start(self) -> dict[str, Any]:
        from monailabel.client import MONAILabelClient

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.tmp.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.tmp)}  # the server's temporary files, to look at
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                self.command(port), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        (self.root / "client").mkdir(exist_ok=True)
        self.client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(self.root / "client"))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                return self.client.info()
            except Exception:  # not listening yet
                time.sleep(3)
        raise AssertionError(f"server did not answer GET /info/ in time:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # label_serve and MONAI Label: one process group
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A BraTS 2021 folder as downloaded, served by label_serve's steps on 127.0.0.1."""
    pytest.importorskip("monailabel")
    root = tmp_path_factory.mktemp("label")
    dataset = root / "BraTS2021_Training_Data"
    write_brats_case(dataset, "BraTS2021_00001", seed=21, with_label=True)
    write_brats_case(dataset, "BraTS2021_00002", seed=22, with_label=True)
    write_brats_case(dataset, "BraTS2021_00003", seed=11, with_label=False)
    write_brats_case(dataset, "BraTS2021_00004", seed=12, with_label=False, skip="t2")
    truncate(write_brats_case(dataset, "BraTS2021_00005", seed=13, with_label=False) / "BraTS2021_00005_t1.nii.gz")
    running = Server(root, dataset, tiny_checkpoint(root / "tiny.pt"))
    running.info = running.start()
    try:
        yield running
    finally:
        running.stop()


def _infer(server: Server, case: str, params: dict[str, Any] | None = None) -> nib.Nifti1Image:
    label_file, _ = server.client.infer(MODEL_NAME, case, {"device": "cpu", **(params or {})})
    assert label_file and Path(label_file).is_file()
    return nib.load(label_file)


@pytest.mark.slow
@pytest.mark.label
def test_server_lists_the_bundle_and_one_image_per_case(server: Server) -> None:
    model = server.info["models"][MODEL_NAME]
    assert model["labels"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 4}
    assert model["config"]["tta"] is False  # --tta false as typed
    # the trainer's default epochs: sized at start-up (measured), stated in the log, offered to Slicer
    budget = json.loads(
        (server.work / "app" / "model" / MODEL_NAME / "configs" / "monailabel_training.json").read_text()
    )
    assert server.info["trainers"][MODEL_NAME]["config"]["max_epochs"] == budget["max_epochs"]
    assert budget["reason"].startswith(f"training: {budget['max_epochs']} epoch(s) by default, about ")
    assert budget["reason"] in server.log.read_text()
    datastore = server.client.datastore()
    objects = datastore["objects"]
    assert sorted(objects) == [f"BraTS2021_0000{i}" for i in (1, 2, 3, 4, 5)]
    assert objects["BraTS2021_00003"]["image"]["ext"] == ".nii.gz"
    assert sorted(k for k, v in objects.items() if "final" in v["labels"]) == ["BraTS2021_00001", "BraTS2021_00002"]


@pytest.mark.slow
@pytest.mark.label
def test_server_infers_a_brats_case_in_its_own_space_and_values(server: Server) -> None:
    label = _infer(server, "BraTS2021_00003")
    flair = nib.load(server.dataset / "BraTS2021_00003" / "BraTS2021_00003_flair.nii.gz")
    assert label.shape == SHAPE
    np.testing.assert_allclose(label.affine, flair.affine, atol=1e-4)
    assert label.get_data_dtype() == np.uint8
    values = set(np.unique(np.asarray(label.dataobj)).astype(int).tolist())
    assert values <= {0, 1, 2, 4}, values


@pytest.mark.slow
@pytest.mark.label
def test_a_case_missing_a_modality_is_a_4xx_naming_the_file(server: Server) -> None:
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as raised:
        server.client.infer(MODEL_NAME, "BraTS2021_00004", {"device": "cpu"})
    missing = (server.dataset / "BraTS2021_00004" / "BraTS2021_00004_t2.nii.gz").resolve()
    # the client puts the HTTP status and the server's answer in its message
    assert raised.value.msg == f'Status: 422; Response: {{"detail":"{missing}: missing modality t2"}}'


def _request(server: Server, method: str, path: str, **kwargs: Any) -> Any:
    """One HTTP request to the server, as a client other than MONAI Label's (Slicer, curl) sends it."""
    import requests

    return requests.request(method, server.url + path, timeout=600, **kwargs)


def _wait_for_training(server: Server, timeout: float = 900) -> dict[str, Any]:
    """The training task's status once it is DONE, ERROR or STOPPED."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:  # SUBMITTED -> RUNNING -> DONE | ERROR | STOPPED
        status = server.client.train_status()
        if status.get("status") in TASK_FINAL_STATES:
            break
        time.sleep(3)
    return status


#: Ids that name no listed image: a case that does not exist, a path out of the studies folder, an absolute path.
BAD_IDS = (
    "BraTS2021_09999",
    "../BraTS2021_Training_Data/BraTS2021_00001/BraTS2021_00001_flair",
    "../../../../../../etc/passwd",
    "/etc/passwd",
)


@pytest.mark.slow
@pytest.mark.label
def test_unknown_image_ids_are_404_naming_the_id_and_never_a_path(server: Server) -> None:
    """infer, download and save_label on an id the studies do not list: 404 with the id; no file read or left."""
    from bundle.integrations.monailabel_app import unknown_image

    final = server.work / "studies" / "labels" / "final"
    labels_before = sorted(p.name for p in final.iterdir())
    temporary_before = sorted(server.tmp.iterdir())
    upload = {
        "label": ("label.nii.gz", (server.dataset / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").read_bytes())
    }
    for image_id in BAD_IDS:
        answers = {
            "infer": _request(
                server, "POST", f"/infer/{MODEL_NAME}", params={"image": image_id}, data={"params": "{}"}
            ),
            "download": _request(server, "GET", "/datastore/image", params={"image": image_id}),
            "save_label": _request(
                server, "PUT", "/datastore/label", params={"image": image_id, "tag": "final"}, files=upload
            ),
        }
        for endpoint, answer in answers.items():
            assert answer.status_code == 404, (endpoint, image_id, answer.text)
            assert answer.json() == {"detail": unknown_image(image_id)}, (endpoint, answer.text)
    assert sorted(server.tmp.iterdir()) == temporary_before, "a refused upload left a temporary file"
    assert sorted(p.name for p in final.iterdir()) == labels_before
    assert _request(server, "GET", "/datastore/image", params={"image": "BraTS2021_00003"}).status_code == 200


@pytest.mark.slow
@pytest.mark.label
def test_broken_cases_are_named_at_start_up_and_new_cases_appear_without_restart(server: Server) -> None:
    log = server.log.read_text()
    truncated = (server.dataset / "BraTS2021_00005" / "BraTS2021_00005_t1.nii.gz").resolve()
    missing = (server.dataset / "BraTS2021_00004" / "BraTS2021_00004_t2.nii.gz").resolve()
    started = log.index("Uvicorn running on")  # MONAI Label's server starts after label_serve's checks
    for case, sentence in (
        ("BraTS2021_00005", f"{truncated}: image data cannot be decoded"),
        ("BraTS2021_00004", f"{missing}: missing modality t2"),
    ):
        said = log.find(f"studies: case {case} cannot be segmented or trained on as it is: {sentence}")
        assert 0 <= said < started, f"{case} was not named at start-up:\n{log[:6000]}"

    # cases copied into the dataset while the server runs: listed without a restart, a broken one named
    write_brats_case(server.dataset, "BraTS2021_00006", seed=14, with_label=False)
    truncate(
        write_brats_case(server.dataset, "BraTS2021_00007", seed=15, with_label=False) / "BraTS2021_00007_t2.nii.gz"
    )
    label = _infer(server, "BraTS2021_00006")  # an id not listed yet is looked for in the dataset first
    assert label.shape == SHAPE
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "BraTS2021_00007" not in server.client.datastore()["objects"]:
        time.sleep(1)
    assert "BraTS2021_00007" in server.client.datastore()["objects"]
    broken = (server.dataset / "BraTS2021_00007" / "BraTS2021_00007_t2.nii.gz").resolve()
    assert f"studies: case BraTS2021_00007 cannot be segmented or trained on as it is: {broken}: image data" in (
        server.log.read_text()
    )

    # cases removed from the dataset leave the list
    shutil.rmtree(server.dataset / "BraTS2021_00006")
    shutil.rmtree(server.dataset / "BraTS2021_00007")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "BraTS2021_00006" in server.client.datastore()["objects"]:
        time.sleep(1)
    assert sorted(server.client.datastore()["objects"]) == [f"BraTS2021_0000{i}" for i in (1, 2, 3, 4, 5)]


@pytest.mark.slow
@pytest.mark.label
def test_training_requests_that_cannot_train_are_refused_before_any_work(server: Server) -> None:
    """POST /train/<model>: a bad option or too few labelled cases is HTTP 422 with the sentence; nothing starts."""
    refused: list[tuple[dict[str, Any], str]] = [
        ({"max_epochs": 0}, "max_epochs: 0 is not allowed: use a whole number of at least 1"),
        ({"max_epoch": 1}, "train: unknown option 'max_epoch' (it would be ignored); did you mean 'max_epochs'?"),
        ({"val_split": -1}, "val_split: -1 is not allowed: use a number above 0 and below 1"),
        ({"val_split": 0.1}, "train: 2 labelled case(s) split by val_split 0.1 leave no case to validate on"),
    ]
    if not torch.cuda.is_available():
        refused.append(({"device": "cuda"}, "device: 'cuda' needs a CUDA GPU, and PyTorch finds none"))
    for params, sentence in refused:
        answer = _request(server, "POST", f"/train/{MODEL_NAME}", json=params)
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["detail"].startswith(sentence), answer.text

    # no labelled case at all (the final labels moved away, then back)
    final = server.work / "studies" / "labels" / "final"
    aside = server.root / "labels_aside"
    shutil.move(final, aside)
    final.mkdir()
    try:
        time.sleep(2.5)  # the datastore refreshes at most every 2 s
        answer = _request(server, "POST", f"/train/{MODEL_NAME}", json={"max_epochs": 1})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("train: no case holds a final label yet")
    finally:
        final.rmdir()
        shutil.move(aside, final)
    time.sleep(2.5)
    objects = server.client.datastore()["objects"]
    assert sorted(k for k, v in objects.items() if "final" in v["labels"]) == ["BraTS2021_00001", "BraTS2021_00002"]
    assert _request(server, "GET", "/train/").status_code == 404, "no training may have started"
    assert not (server.work / "runs" / "train").exists()


@pytest.mark.slow
@pytest.mark.label
def test_a_training_that_fails_ends_with_the_sentence_the_client_sees(server: Server) -> None:
    """A labelled case missing a modality: the training stops before any work, its status ends with the sentence."""
    label_file, _ = server.client.infer(MODEL_NAME, "BraTS2021_00003", {"device": "cpu"})
    server.client.save_label("BraTS2021_00004", label_file, tag="final")  # the case misses its T2
    served = server.work / "models" / "model.pt"
    before = md5sum(served)
    try:
        server.client.train_start(MODEL_NAME, {"max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "device": "cpu"})
        status = _wait_for_training(server)
    finally:
        _request(server, "DELETE", "/datastore/label", params={"id": "BraTS2021_00004", "tag": "final"})
    missing = (server.dataset / "BraTS2021_00004" / "BraTS2021_00004_t2.nii.gz").resolve()
    assert status.get("status") == "ERROR", status
    details = list(status["details"])
    assert details[-1] == f"error: {missing}: missing modality t2", details
    assert not any("Traceback" in line for line in details), details
    assert md5sum(served) == before
    assert not list((server.work / "runs").glob("train/checkpoint_*.pt")), "no epoch may have run"


@pytest.mark.slow
@pytest.mark.label
def test_saved_labels_train_and_trained_weights_survive_a_restart(server: Server) -> None:
    """save_label, train one epoch, restart with the same command line, infer with the trained weights."""
    label_file, _ = server.client.infer(MODEL_NAME, "BraTS2021_00003", {"device": "cpu"})
    server.client.save_label("BraTS2021_00003", label_file, tag="final")
    saved = server.work / "studies" / "labels" / "final" / "BraTS2021_00003.nii.gz"
    assert saved.is_file() and "final" in server.client.datastore()["objects"]["BraTS2021_00003"]["labels"]
    assert not (server.dataset / "BraTS2021_00003" / "BraTS2021_00003.nii.gz").exists()

    served = server.work / "models" / "model.pt"
    before = md5sum(served)
    server.client.train_start(MODEL_NAME, {"max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "device": "cpu"})
    status = _wait_for_training(server)
    assert status.get("status") == "DONE", f"{status}\n{server.log.read_text()[-4000:]}"
    stats = server.client.info()["train_stats"][MODEL_NAME]  # what 3D Slicer shows
    assert stats["epoch"] == stats["total_epochs"] == 1 and stats["total_time"].startswith("0:"), stats
    assert stats["eval"]["best_metric_epoch"] == 1 and stats["best_metric"] == stats["eval"]["best_metric"], stats
    assert "Total Records in Dataset: 3" in server.log.read_text(), "the saved label must be trained on"
    trained = md5sum(served)
    assert trained != before, "training did not replace the served weights"
    assert list((server.work / "runs" / "train").glob("checkpoint_*epoch=1.pt"))

    server.stop()
    server.start()
    assert md5sum(served) == trained, "the restart must serve the trained weights"
    assert server.client.info()["train_stats"][MODEL_NAME] == stats, "the stats are kept with the weights"
    assert "trained in MONAI Label since it was copied from --checkpoint" in server.log.read_text()
    label = _infer(server, "BraTS2021_00003")

    # the same case segmented by the bundle itself with the trained weights, one pass, BraTS 2021 values
    from bundle.inference.run import infer

    (expected,) = infer(
        str(server.dataset / "BraTS2021_00003"),
        output=str(server.root / "expected"),
        checkpoint=str(served),
        tta=False,
        device="cpu",
    )
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(nib.load(expected).dataobj))
    info = json.loads((server.work / "models" / "served.json").read_text())
    assert info["source"] == str(server.checkpoint.resolve())
