"""M4's salient input channel: made by the shared preprocessing, recorded, and added again wherever the model runs.

``salient_channel: true`` (``configs/variants/m4_resunet_ds.yaml``) appends a fifth channel, 1 on the
brain (non-zero) voxels; checkpoints record the five channels, and inference, MONAI Label's app and the
zoo metadata add or describe it because the record says so, with no flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from test_inference_config import single_thread  # noqa: F401 - its autouse fixture: one intra-op thread

from bundle.constants import MODALITIES, SALIENT_CHANNEL
from bundle.errors import OptionError
from bundle.inference.run import infer
from bundle.integrations.monailabel import app_inference_config
from bundle.paths import working_directory
from bundle.plan import migrate, read_plan
from bundle.plan.network import network_data_format
from bundle.transforms import SalientMaskd, input_channel_names

FIVE = [*MODALITIES, SALIENT_CHANNEL]
# M4's network at tiny widths, 4 levels (2 deep-supervision heads need 3 decoder levels): 16^3 windows
TINY_M4 = {
    "network_factory#filters": [4, 8, 8, 8],
    "patch_size": [16, 16, 16],
    "num_workers": 0,
}


def _train_parser(salient: bool, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "train.yaml")])
    parser.update({"bundle_root": str(REPO_ROOT), "salient_channel": salient, **TINY_M4, **overrides})
    return parser


def _write_case(root: Path, case_id: str = "Case_000") -> tuple[Path, np.ndarray]:
    """A BraTS 2021 case whose brain holds voxels that the z-score maps to exactly 0 in every modality.

    Brain values 1 and 3 in equal numbers and a few 2s: each modality's mean over the brain is 2 and its
    std non-zero, so those voxels are 0 after ``NormalizeIntensityd(nonzero=True)``, yet they are brain.
    """
    shape = (20, 18, 16)
    brain = np.zeros(shape, np.float32)
    brain[3:17, 3:15, 3:13] = 1
    values = np.where((np.indices(shape).sum(0) % 2) == 0, 1.0, 3.0).astype(np.float32)
    values[8:10, 8:10, 8] = 2.0  # 4 voxels at the mean; 1s and 3s stay balanced around them
    image = values * brain
    assert np.isclose(image[brain > 0].mean(), 2.0)
    case = root / case_id
    case.mkdir(parents=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for modality in MODALITIES:
        nib.save(nib.Nifti1Image(image, affine), case / f"{case_id}_{modality}.nii.gz")
    label = np.zeros(shape, np.uint8)
    label[6:12, 6:12, 5:10] = 2
    label[8:10, 8:10, 6:8] = 4
    nib.save(nib.Nifti1Image(label, affine), case / f"{case_id}_seg.nii.gz")
    return case, brain


def _compose(parser: ConfigParser) -> Compose:
    return Compose(parser.get_parsed_content("deterministic_transforms"))


def _files(case: Path) -> dict[str, object]:
    return {
        "image": [str(case / f"{case.name}_{m}.nii.gz") for m in MODALITIES],
        "label": str(case / f"{case.name}_seg.nii.gz"),
    }


def test_salient_mask_is_the_non_zero_voxels_of_any_modality() -> None:
    image = torch.zeros(4, 5, 5, 5)
    image[0, 1, 1, 1] = 2.0  # one modality only
    image[3, 2, 2, 2] = -1.5  # negative intensities are brain too
    image[:, 3, 3, 3] = 1.0
    source = MetaTensor(image, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    mask = SalientMaskd(keys="image", mask_key="brain")({"image": source})["brain"]
    assert mask.shape == (1, 5, 5, 5) and mask.dtype == torch.float32
    assert {tuple(i) for i in torch.nonzero(mask[0]).tolist()} == {(1, 1, 1), (2, 2, 2), (3, 3, 3)}
    torch.testing.assert_close(mask.affine, source.affine)


def test_input_channel_names() -> None:
    assert input_channel_names(False) == list(MODALITIES)
    assert input_channel_names(True) == FIVE


def test_preprocessing_appends_the_raw_brain_mask_after_normalisation(tmp_path: Path) -> None:
    """The mask comes from the raw intensities (not the z-scored ones) and is not normalised itself."""
    case, brain = _write_case(tmp_path)
    with_salient = _train_parser(True)
    assert with_salient.get_parsed_content("input_channels") == FIVE
    five = _compose(with_salient)(_files(case))
    four = _compose(_train_parser(False))(_files(case))
    assert four["image"].shape[0] == 4 and five["image"].shape[0] == 5
    assert "salient_mask" not in five  # the helper key does not reach the loaders' collation
    torch.testing.assert_close(five["image"][:4], four["image"])  # the modalities are unchanged
    torch.testing.assert_close(five["label"], four["label"])
    salient = five["image"][4]
    cropped_brain = torch.as_tensor(brain[3:17, 3:15, 3:13])  # CropForegroundd's box (RAS flips x and y)
    assert salient.shape == cropped_brain.shape
    torch.testing.assert_close(salient, cropped_brain)
    at_the_mean = (four["image"] == 0).all(dim=0)
    assert at_the_mean.sum() == 4, "the case has brain voxels the z-score maps to 0"
    assert bool((salient[at_the_mean] == 1).all()), "a mask of the normalised image would miss them"
    # inversion (inference writes labels back on the input's grid) sees the same transforms as without it
    assert [op["class"] for op in five["image"].applied_operations] == [
        op["class"] for op in four["image"].applied_operations
    ]


def test_the_plan_lists_the_channels_and_refuses_a_network_that_does_not_count_them() -> None:
    parser = _train_parser(True)
    with torch.device("meta"):
        record = parser.get_parsed_content("model_plan").state_dict()
    assert record["preprocessing"]["salient_channel"] is True
    assert record["input_channels"] == FIVE and record["network"]["in_channels"] == 5
    parser = _train_parser(True, **{"network_factory#in_channels": 4})
    with pytest.raises(RuntimeError) as caught, torch.device("meta"):
        parser.get_parsed_content("model_plan")
    error = caught.value.__cause__
    assert isinstance(error, OptionError)
    assert str(error) == (
        "network_factory#in_channels is 4, but the preprocessing gives the network 5 channels "
        "(t1, t1ce, t2, flair, salient): set in_channels to 5, or change salient_channel"
    )


def test_a_version_1_record_of_five_channels_plans_the_salient_channel() -> None:
    record = {"network": {"_target_": "bundle.networks.M4UNet"}, "output_type": "regions"}
    assert migrate({**record, "input_channels": FIVE})["preprocessing"]["salient_channel"] is True
    assert migrate({**record, "input_channels": list(MODALITIES)})["preprocessing"]["salient_channel"] is False


def _checkpoint(path: Path, salient: bool) -> Path:
    """A checkpoint as training writes it: the network its config builds, with the plan that config records."""
    parser = _train_parser(salient)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    plan = parser.get_parsed_content("model_plan").state_dict()
    torch.save({"model": network.state_dict(), "model_record": plan}, path)
    return path


def test_inference_adds_the_channel_because_the_record_says_so(tmp_path: Path) -> None:
    """``python -m bundle infer`` and inference.yaml with no flag: a 5-channel model gets 5 channels."""
    case, _ = _write_case(tmp_path / "data")
    for salient in (True, False):
        checkpoint = _checkpoint(tmp_path / f"model_{salient}.pt", salient)
        assert read_plan(checkpoint)["input_channels"] == input_channel_names(salient)
        parser = ConfigParser()
        parser.read_config(str(REPO_ROOT / "configs" / "inference.yaml"))
        parser.update({"bundle_root": str(REPO_ROOT), "checkpoint": str(checkpoint)})
        with working_directory(REPO_ROOT):  # the %configs/train.yaml macros resolve from the bundle root
            image = parser.get_parsed_content("preprocessing")(_files(case))["image"]
        assert image.shape[0] == (5 if salient else 4)
        output = tmp_path / f"out_{salient}"
        (segmentation,) = infer(str(case), output=str(output), checkpoint=str(checkpoint), tta=False)
        written = nib.load(segmentation)
        assert written.shape == (20, 18, 16)
        np.testing.assert_allclose(written.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_monai_label_app_adds_the_channel_the_record_lists(tmp_path: Path) -> None:
    case, _ = _write_case(tmp_path / "data")
    checkpoint = _checkpoint(tmp_path / "model.pt", True)
    overrides = {"checkpoint": str(checkpoint), "label_layout": "brats2021", "tta": False}
    parser = ConfigParser(app_inference_config(REPO_ROOT, overrides))
    data = parser.get_parsed_content("preprocessing")({"image": _files(case)["image"]})
    assert data["image"].shape[0] == 5


def test_zoo_metadata_of_the_best_setting_says_five_channels() -> None:
    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    default = metadata["network_data_format"]
    assert default["inputs"]["image"]["num_channels"] == 4  # what configs/train.yaml builds
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / f) for f in ("train.yaml", "variants/m4_resunet_ds.yaml")])
    with torch.device("meta"):
        record = parser.get_parsed_content("model_plan").state_dict()
    best = network_data_format(record, default)
    image = best["inputs"]["image"]
    assert image["num_channels"] == 5
    assert image["channel_def"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR", "4": "salient"}
    assert image["spatial_shape"] == ["64*(n+1)"] * 3 and best["outputs"]["pred"]["spatial_shape"] == ["64*(n+1)"] * 3
    assert best["outputs"]["pred"]["channel_def"] == {"0": "WT", "1": "TC", "2": "ET"}
    with torch.device("meta"):
        plain = ConfigParser()
        plain.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
        assert network_data_format(plain.get_parsed_content("model_plan").state_dict(), default) == default


@pytest.mark.slow  # the export runs MONAI's ckpt_export in a fresh interpreter (~30 s to 2 min here)
def test_zoo_export_of_a_best_setting_checkpoint_says_five_channels(tmp_path: Path) -> None:
    """``python -m bundle export`` of an m4_resunet_ds checkpoint: metadata and TorchScript take 5 channels."""
    import subprocess
    import sys

    from bundle.integrations.export import bundle_env, export

    checkpoint = _checkpoint(tmp_path / "best.pt", True)
    out = Path(export(str(tmp_path / "exported"), checkpoint=str(checkpoint)))
    image = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 5 and image["channel_def"]["4"] == SALIENT_CHANNEL
    assert image["spatial_shape"] == ["8*(n+1)"] * 3  # the tiny 4-level net: three stride-2 levels
    check = (
        "import torch; ts = torch.jit.load('models/model.ts'); ts.eval(); "
        "print(tuple(ts(torch.randn(1, 5, 16, 24, 32)).shape))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=out, env=bundle_env(out), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(1, 3, 16, 24, 32)"
