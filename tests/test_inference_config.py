"""End-to-end tests of configs/inference.yaml (through inference.run.infer: monai.bundle's ConfigWorkflow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import shared_samples_dir
from monai.bundle import ConfigParser

from bundle.constants import MODALITIES
from bundle.data import select_cases
from bundle.errors import DataError
from bundle.inference.run import base_inferer, infer
from bundle.paths import BUNDLE_ROOT
from bundle.plan.checkpoints import Checkpoint, CheckpointError, read_plan, save_model
from bundle.plan.network import build_network

BRATS_SAMPLES = shared_samples_dir()  # ../shared/brats_samples or $BRATS_SAMPLES_DIR, None without them

# a small network of the same family as train.yaml's, so the tests run in seconds on a CPU
TINY_NET = {
    "_target_": "DynUNet",
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 3,
    "kernel_size": [3, 3, 3],
    "strides": [1, 2, 2],
    "upsample_kernel_size": [2, 2],
    "filters": [4, 8, 16],
    "norm_name": ["INSTANCE", {"affine": True}],
    "deep_supervision": True,
    "deep_supr_num": 1,
    "res_block": True,
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small volumes on a shared 2-core machine: one intra-op thread avoids contention overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_recipe(*files: str) -> dict:
    """The inference recipe a training config stack records (default: configs/train.yaml's, M4's)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in (files or ("train.yaml",))])
    return parser.get_parsed_content("inference_recipe")


def _checkpoint(
    path: Path, net_config: dict, seed: int = 0, patch_size=(16, 16, 16), output_type: str = "regions", recipe=None
) -> Path:
    """A checkpoint as training writes it: weights and the model record (network spec, patch, M4's recipe, ...)."""
    torch.manual_seed(seed)
    factory = ConfigParser({"net": {**net_config, "_mode_": "callable"}}).get_parsed_content("net")
    recipe = training_recipe() if recipe is None else recipe
    return save_model(path, build_network(factory), output_type, patch_size, inference_recipe=recipe)


def _oblique_lps_affine(spacing=(1.2, 0.9, 2.0)) -> np.ndarray:
    """LPS-like (x and y flipped) with a rotation about z and an oblique tilt: not a permuted diagonal."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [12.5, -30.0, 7.25]
    return affine


def _write_case(root: Path, case_id: str, shape=(21, 18, 13), affine=None, separator="_") -> Path:
    """A BraTS-2021-style case folder with four modalities: a bright blob on a non-zero 'brain'."""
    rng = np.random.default_rng(0)
    case_dir = root / case_id
    case_dir.mkdir(parents=True)
    affine = _oblique_lps_affine() if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape)[:, None, None, None] / 2.0
    dist = np.sqrt(((grid - centre) ** 2).sum(0))
    brain = dist < min(shape) * 0.45
    for i, modality in enumerate(MODALITIES):
        image = (rng.normal(100.0 + 10 * i, 5.0, size=shape) + 200.0 * (dist < 3)) * brain
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), case_dir / f"{case_id}{separator}{modality}.nii.gz")
    return case_dir


def _run(tmp_path: Path, inputs, **kwargs) -> list[str]:
    ckpt = _checkpoint(tmp_path / "model.pt", TINY_NET)
    kwargs.setdefault("window", [16, 16, 16])
    return infer(inputs, output=str(tmp_path / "out"), checkpoint=str(ckpt), **kwargs)


def test_oblique_lps_case_keeps_shape_and_affine(tmp_path):
    case_dir = _write_case(tmp_path / "data", "Case_001")
    written = _run(tmp_path, str(case_dir), save_probabilities=True, save_uncertainty=True)
    seg_path = tmp_path / "out" / "Case_001_seg.nii.gz"
    assert written == [str(seg_path)]
    src = nib.load(case_dir / "Case_001_t1.nii.gz")
    seg = nib.load(seg_path)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(src.affine)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
    for postfix in ("prob", "uncertainty"):
        extra = nib.load(tmp_path / "out" / f"Case_001_{postfix}.nii.gz")
        assert extra.shape[:3] == src.shape and extra.shape[-1] == 3
        np.testing.assert_allclose(extra.affine, src.affine, atol=1e-5)
    prob = np.asarray(nib.load(tmp_path / "out" / "Case_001_prob.nii.gz").dataobj)
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    # nothing but the final files: no temporary names left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Case_001_prob.nii.gz",
        "Case_001_seg.nii.gz",
        "Case_001_uncertainty.nii.gz",
    ]


def test_explicit_files_and_tta_off(tmp_path):
    case_dir = _write_case(tmp_path / "data", "BraTS-GLI-00001-000", shape=(17, 15, 11), separator="-")
    files = [str(case_dir / f"BraTS-GLI-00001-000-{m}.nii.gz") for m in MODALITIES]
    written = _run(tmp_path, files, tta=False)
    assert [Path(w).name for w in written] == ["BraTS-GLI-00001-000_seg.nii.gz"]
    seg = nib.load(written[0])
    src = nib.load(files[0])
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)


def test_every_case_of_a_dataset_is_segmented(tmp_path):
    data = tmp_path / "data"
    for i, shape in enumerate([(17, 15, 11), (15, 19, 12)]):
        _write_case(data, f"Case_{i:03d}", shape=shape, affine=np.diag([-1.0, -1.0, 1.0, 1.0]))
    written = _run(tmp_path, str(data), tta=False)
    assert sorted(Path(w).name for w in written) == ["Case_000_seg.nii.gz", "Case_001_seg.nii.gz"]
    assert all(Path(w).is_file() for w in written)
    assert nib.load(written[1]).shape == (15, 19, 12)


def test_bad_inputs_fail_before_inference_with_the_file_named(tmp_path):
    data = tmp_path / "data"
    case_dir = _write_case(data, "Case_001")
    (case_dir / "Case_001_flair.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Case_001_flair\.nii\.gz: missing modality flair"):
        select_cases(str(data), labelled=False)
    # wrong channel count: a 3-channel 4-D image given as the single file of a case
    four_d = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 3), np.float32), np.eye(4)), four_d)
    with pytest.raises(DataError, match=r"x\.nii\.gz: expected a 4-D image with 4 channels"):
        select_cases(files=[str(four_d)], labelled=False)
    # unreadable file
    junk = case_dir / "Case_001_flair.nii.gz"
    junk.write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match=r"Case_001_flair\.nii\.gz: not a readable NIfTI"):
        select_cases(str(data), labelled=False)
    # and through the whole workflow: nothing written
    with pytest.raises(DataError, match="Case_001_flair"):
        _run(tmp_path, str(data))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoint_that_does_not_match_the_network(tmp_path):
    good = _checkpoint(tmp_path / "good.pt", TINY_NET)
    assert Checkpoint(good).network().training is False  # weights loaded strictly, eval mode
    # a plan that names another network than its weights (edited by hand): one sentence naming the file
    state = torch.load(good, weights_only=True)
    state["model_record"]["network"]["filters"] = [8, 16, 32]
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(
        CheckpointError, match=r"edited\.pt: the weights do not fit the network \(.*DynUNet in its plan"
    ):
        Checkpoint(tmp_path / "edited.pt").network()
    with pytest.raises(DataError, match=r"missing\.pt: checkpoint file does not exist"):
        Checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        Checkpoint(tmp_path / "junk.pt")
    # through the workflow, before any case is read and nothing written
    case_dir = _write_case(tmp_path / "data", "Case_001")
    with pytest.raises(DataError, match="the weights do not fit the network"):
        infer(str(case_dir), output=str(tmp_path / "out"), checkpoint=str(tmp_path / "edited.pt"))
    assert not (tmp_path / "out").exists()


def test_demo_checkpoint_runs_on_a_case_folder_without_any_flag(tmp_path):
    """The checkpoint records its network: demo-width weights need no --demo, nothing guesses a width."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in ("train.yaml", "demo.yaml")])
    demo_net = parser.get_parsed_content("network_def")
    save_model(tmp_path / "demo.pt", demo_net, patch_size=[64, 64, 64])  # 6 levels: a 2-voxel bottleneck
    case_dir = _write_case(tmp_path / "data", "Case_001")
    (seg,) = infer(str(case_dir), output=str(tmp_path / "out"), checkpoint=str(tmp_path / "demo.pt"), tta=False)
    assert nib.load(seg).shape == (21, 18, 13)
    record = read_plan(tmp_path / "demo.pt")
    assert record["network"]["filters"] == [8, 16, 32, 64, 80, 80]
    assert record["input_channels"] == list(MODALITIES)
    assert record["output_type"] == "regions" and record["output_channels"] == ["WT", "TC", "ET"]


def test_cli_ends_a_checkpoint_without_record_with_one_sentence_and_no_traceback(tmp_path):
    net = ConfigParser({"net": TINY_NET}).get_parsed_content("net")
    torch.save({"model": net.state_dict()}, tmp_path / "bare.pt")  # weights only: another tool's checkpoint
    case_dir = _write_case(tmp_path / "data", "Case_001")
    command = [sys.executable, "-m", "bundle", "infer", str(case_dir), "--output", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, "--checkpoint", str(tmp_path / "bare.pt"), "--tta", "false"],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.count("bare.pt: the checkpoint does not record the network that built it") == 1, output[-3000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_file_is_named_and_leaves_no_output(tmp_path):
    case_dir = _write_case(tmp_path / "data", "Case_001")
    path = case_dir / "Case_001_t2.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, data truncated
    with pytest.raises(DataError, match=r"Case_001_t2\.nii\.gz: image data cannot be decoded"):
        _run(tmp_path, str(case_dir))
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(BRATS_SAMPLES is None, reason="no BraTS samples in ../shared/brats_samples")
def test_real_brats_case_shape_affine_and_labels(tmp_path):
    case_dir = sorted(p for p in BRATS_SAMPLES.iterdir() if p.is_dir())[0]
    written = _run(tmp_path, str(case_dir), window=[96, 96, 96], tta=False)
    seg = nib.load(written[0])
    src = nib.load(next(case_dir.glob("*_t1.nii.gz")))
    assert seg.shape == src.shape == (240, 240, 155)
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}


@pytest.mark.parametrize(
    "device, spatial_dims, expected", [("cpu", 3, 1), ("cuda", 3, 2), ("cuda:0", 3, 2), ("cpu", 2, 16), ("cuda", 2, 16)]
)
def test_windows_per_network_call_follow_the_device(device, spatial_dims, expected):
    """One 3-D window per call on the CPU (2.3 GB peak with train.yaml's network, 3.9 GB for two), two on a GPU."""
    plan = {"network": {**TINY_NET, "spatial_dims": spatial_dims}, "patch_size": [16] * spatial_dims}
    plan |= {"output_type": "regions", "output_channels": ["WT", "TC", "ET"]}
    # the device as `--device cuda` on the command line gives it: a string
    assert base_inferer(plan, device=device).sw_batch_size == expected
    assert base_inferer(plan, sw_batch_size=3, device=device).sw_batch_size == 3
