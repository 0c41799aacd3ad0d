"""MONAI Label: the app assembly, train.yaml under MONAI Label's overrides, and a real server.

The server tests need monailabel (its own venv, ``.venv-label``; see docs/ecosystem.md) and are
marked ``slow`` and ``label``:  ``.venv-label/bin/python -m pytest -m label tests/test_label.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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

from bundle.checkpoints import save_model
from bundle.constants import LABEL_SCHEMES, MODALITIES, MSD_CHANNEL_ORDER
from bundle.data import generate_demo_dataset, make_datalist, make_phantom
from bundle.label import MODEL_NAME, PRED_KEY, app_inference_config, app_train_config, expand_config, label_channel_def

# A tiny network and patch so CPU inference and one training epoch take seconds.
TINY = {"network_factory#filters": [4, 8, 16, 32, 64], "roi_size": [32, 32, 32], "num_workers": 0, "tta": False}
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


def tiny_checkpoint(path: Path) -> Path:
    """Randomly initialised weights of the tiny network (what MONAI Label needs to list the model)."""
    parser = ConfigParser(expand_config(REPO_ROOT, "train.yaml", TINY))
    torch.manual_seed(0)
    return save_model(path, parser.get_parsed_content("network_def"), patch_size=TINY["roi_size"])


# ------------------------------------------------------------------ without monailabel (default run)


def test_label_names_follow_the_msd_scheme() -> None:
    assert label_channel_def("msd") == {"0": "background", "1": "ED", "2": "NCR", "3": "ET"}
    assert label_channel_def("brats2021") == {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}


def test_app_inference_config_runs_monai_labels_pipeline_on_a_4d_lps_case(tmp_path: Path) -> None:
    """inference.yaml as the app writes it, driven the way MONAI Label's BundleInferTask drives it."""
    case = write_msd_case(tmp_path, "case", seed=3, with_label=False)
    checkpoint = str(tiny_checkpoint(tmp_path / "model.pt"))
    parser = ConfigParser(app_inference_config(REPO_ROOT, {**TINY, "checkpoint": checkpoint}))
    data = parser.get_parsed_content("preprocessing")({"image": str(case)})
    assert data["image"].shape[0] == 4
    network = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        data[PRED_KEY] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    post = parser.get_parsed_content("postprocessing")
    post.transforms = tuple(t for t in post.transforms if "SaveImage" not in type(t).__name__)  # as MONAI Label does
    data = post(data)
    pred = data[PRED_KEY]
    assert tuple(pred.shape) == (1, *SHAPE)
    np.testing.assert_allclose(pred.affine.numpy(), lps_affine(), atol=1e-5)
    assert set(torch.unique(pred).int().tolist()) <= {0, 1, 2, 3}


def test_train_yaml_honours_monai_label_overrides(tmp_path: Path) -> None:
    """The exact call MONAI Label's BundleTrainTask makes: run id 'run', no initialize/finalize."""
    from monai.bundle import run

    demo = generate_demo_dataset(tmp_path / "demo", num_cases=2, num_test_cases=0, shape=(32, 32, 24))
    items = [{"image": i["image"], "label": i["label"]} for i in make_datalist(str(demo), folds=2)["training"]]
    # the app's train.json (bundle.label.assemble_app writes it): MONAI Label edits its train#handlers list
    train_json = tmp_path / "train.json"
    ConfigParser.export_config_file(app_train_config(REPO_ROOT, {}), str(train_json))
    handlers = ConfigParser.load_config_file(str(train_json))["train"]["handlers"]
    assert isinstance(handlers, list)
    bundle_root = tmp_path / "bundle"
    overrides: dict[str, Any] = {
        "bundle_root": str(bundle_root),
        "device": torch.device("cpu"),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": items[:1],
        "train#handlers": handlers,
        "validate#dataset#data": items[1:],
        "network_factory#filters": TINY["network_factory#filters"],
        "roi_size": TINY["roi_size"],
        "num_workers": 0,
    }
    run(
        run_id="run",
        init_id=None,
        final_id=None,
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        config_file=str(train_json),
        **overrides,
    )
    assert (bundle_root / "models" / "model.pt").is_file(), "one epoch must still validate and save the model"
    assert list((bundle_root / "runs" / "train").glob("checkpoint_*epoch=1.pt"))
    assert not (bundle_root / "data").exists(), "MONAI Label's datalist must be used, not the demo data"


# ------------------------------------------------------------------ a real MONAI Label server


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An assembled app serving the tiny bundle on 127.0.0.1; stopped by PID afterwards."""
    pytest.importorskip("monailabel")
    from monailabel.client import MONAILabelClient

    from bundle.label import assemble_app, start_server

    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    write_msd_case(studies, "case_infer", seed=11, with_label=False)
    for i in range(2):
        write_msd_case(studies, f"case_train_{i}", seed=20 + i, with_label=True)
    bundle_dir = assemble_app(root / "app", tiny_checkpoint(root / "tiny.pt"), overrides=TINY)
    port = free_port()
    log = root / "server.log"
    process = start_server(root / "app", studies, port=port, log_file=log)
    client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(root / "client"))
    (root / "client").mkdir()
    deadline = time.monotonic() + 600
    info = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                info = client.info()
                break
            except Exception:  # not listening yet
                time.sleep(3)
        assert info is not None, f"server did not answer GET /info/ in time:\n{log.read_text()[-4000:]}"
        yield {"client": client, "info": info, "studies": studies, "bundle_dir": bundle_dir, "log": log}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.label
def test_server_infers_a_4d_lps_case(server: dict[str, Any]) -> None:
    info = server["info"]
    assert MODEL_NAME in info["models"], info.get("models")
    assert info["models"][MODEL_NAME]["labels"] == {"ed": 1, "ncr": 2, "et": 3}
    label_file, params = server["client"].infer(MODEL_NAME, "case_infer", {"device": "cpu"})
    assert label_file and Path(label_file).is_file(), params
    label = nib.load(label_file)
    source = nib.load(server["studies"] / "case_infer.nii.gz")
    assert label.shape == SHAPE
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    values = set(np.unique(np.asarray(label.dataobj)).astype(int).tolist())
    assert values <= {0, 1, 2, 3}, values


@pytest.mark.slow
@pytest.mark.label
def test_server_trains_from_final_labels(server: dict[str, Any]) -> None:
    client, bundle_dir = server["client"], server["bundle_dir"]
    model = bundle_dir / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    client.train_start(MODEL_NAME, {"max_epochs": 1, "val_split": 0.5, "multi_gpu": False, "device": "cpu"})
    deadline = time.monotonic() + 900
    status: dict[str, Any] = {}
    # A task goes SUBMITTED -> RUNNING -> DONE | ERROR | STOPPED; poll until it leaves the first two.
    while time.monotonic() < deadline:
        status = client.train_status()
        if status.get("status") in TASK_FINAL_STATES:
            break
        time.sleep(5)
    assert status.get("status") == "DONE", f"{status}\n{server['log'].read_text()[-4000:]}"
    assert list((bundle_dir / "runs" / "train").glob("checkpoint_*epoch=1.pt")), "no training checkpoint"
    assert model.stat().st_mtime_ns > before, "the served model.pt was not replaced by the trained one"
