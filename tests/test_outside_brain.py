"""Every method's first clean-up step: no tumour outside the skull-stripped brain (OutsideBrainToBackgroundd).

The step reads the brain off the preprocessed image (any channel non-zero), so it relies on every
method's intensity transform keeping the zero background at 0 and each brain voxel non-zero in some
channel; both are checked here on a phantom and, when present, on the real BraTS samples, together
with the evidence the step rests on (no true tumour voxel where all four modalities are 0).
"""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, shared_samples_dir
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from bundle.constants import BACKGROUND, ED, ET, MODALITIES
from bundle.errors import OptionError
from bundle.inference.postprocessing import OutsideBrainToBackgroundd
from bundle.plan import migrate
from bundle.plan.recipes import normalise_recipe, resolve_recipe

BRATS_SAMPLES = shared_samples_dir()
STACKS = {
    "M1": ["train.yaml", "train_2d.yaml", "variants/m1_la_resunet.yaml"],
    "M2": ["train.yaml", "train_2d.yaml", "variants/m2_resunet_tversky.yaml"],
    "M3": ["train.yaml", "train_2d.yaml", "variants/m3_resse_lka_unet.yaml"],
    "M3 + CLAHE": ["train.yaml", "train_2d.yaml", "variants/m3_resse_lka_unet.yaml"],
    "M4": ["train.yaml"],
}


def _item(device: str = "cpu") -> dict:
    image = torch.zeros(4, 12, 10, 8)
    image[:, 2:10, 2:8, 1:7] = torch.rand(4, 8, 6, 6) + 0.5
    image[0, 2:4, 2:4, 1:3] = 0.0  # brain voxels that are 0 in some channels, not in all
    image[1:, 2:4, 2:4, 1:3] = 0.0
    image[0, 2, 2, 1] = 0.7
    labels = torch.full((1, 12, 10, 8), ED, dtype=torch.uint8, device=device)
    labels[0, 4:6, 4:6, 3:5] = ET
    return {"image": MetaTensor(image), "pred_label": labels}


def _brain(image: torch.Tensor) -> torch.Tensor:
    return (image != 0).any(0, keepdim=True)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_labels_outside_the_brain_become_background_type_and_device_kept(device: str) -> None:
    item = _item(device)
    out = OutsideBrainToBackgroundd(keys="pred_label")(item)
    labels = out["pred_label"]
    assert labels.dtype == torch.uint8 and labels.device.type == device
    brain = _brain(item["image"]).to(device)
    assert torch.equal(labels[brain], item["pred_label"][brain]), "inside the brain nothing changes"
    assert (labels[~brain] == BACKGROUND).all() and (item["pred_label"][~brain] != BACKGROUND).any()
    assert out["image"] is item["image"]
    as_numpy = OutsideBrainToBackgroundd(keys="pred_label")({**item, "pred_label": item["pred_label"].cpu().numpy()})
    np.testing.assert_array_equal(np.asarray(as_numpy["pred_label"]), labels.cpu().numpy())


def test_it_needs_the_image_on_the_labels_grid() -> None:
    item = _item()
    with pytest.raises(KeyError, match="no 'image' to find the brain in"):
        OutsideBrainToBackgroundd(keys="pred_label")({"pred_label": item["pred_label"]})
    with pytest.raises(
        ValueError, match=r"pred_label has the spatial shape \(12, 10, 7\), the image image \(12, 10, 8"
    ):
        OutsideBrainToBackgroundd(keys="pred_label")({**item, "pred_label": item["pred_label"][..., :7]})


@functools.cache
def _raw_cases(real: bool) -> tuple[np.ndarray, ...]:
    """Raw (int16, zero background) 4-channel volumes: a phantom, or the real samples."""
    if real:
        return tuple(
            np.stack([np.asarray(nib.load(case / f"{case.name}_{m}.nii.gz").dataobj) for m in MODALITIES])
            for case in sorted(Path(BRATS_SAMPLES).iterdir())
        )
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (40, 44, 36)], indexing="ij"))
    dist = np.sqrt(((grid - np.array([20, 22, 18])[:, None, None, None]) ** 2).sum(0))
    phantom = (rng.integers(1, 900, size=(4, 40, 44, 36)) * (dist < 16)).astype(np.int16)
    phantom[:2, dist < 4] = 0  # brain voxels that some modalities show as 0
    return (phantom,)


REAL = pytest.param(
    True,
    marks=[
        pytest.mark.slow,  # ~20 s a method: three whole BraTS volumes
        pytest.mark.skipif(BRATS_SAMPLES is None, reason="no BraTS samples beside the repository (BRATS_SAMPLES_DIR)"),
    ],
    id="brats_samples",
)


@pytest.mark.parametrize("real", [pytest.param(False, id="phantom"), REAL])
@pytest.mark.parametrize("method", sorted(STACKS))
def test_every_methods_intensity_transform_keeps_the_brain_where_the_raw_image_has_it(method: str, real: bool) -> None:
    """The brain of the preprocessed image is the brain of the raw one: the step removes only background."""
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / f) for f in STACKS[method]])
    if method.endswith("CLAHE"):
        parser["clahe"] = True
    steps = parser.get_parsed_content("intensity_transform")  # named callable-mode steps, in order
    transform = Compose([step(keys="image") for step in steps.values()])
    for raw in _raw_cases(real):
        image = MetaTensor(torch.as_tensor(raw.astype(np.float32)))
        brain = _brain(image)
        normalised = transform({"image": image.clone()})["image"]
        assert torch.equal(_brain(torch.as_tensor(normalised)), brain), f"{method}: the brain changed"


@pytest.mark.skipif(BRATS_SAMPLES is None, reason="no BraTS samples beside the repository (BRATS_SAMPLES_DIR)")
def test_no_true_tumour_voxel_lies_where_every_modality_is_zero() -> None:
    """The evidence (docs/reference/inference.md): none of the samples' 385,810 tumour voxels lies outside the brain."""
    tumour_voxels = 0
    for case in sorted(Path(BRATS_SAMPLES).iterdir()):
        raw = np.stack([np.asarray(nib.load(case / f"{case.name}_{m}.nii.gz").dataobj) for m in MODALITIES])
        tumour = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj) > 0
        assert not (tumour & ~(raw != 0).any(0)).any(), case.name
        tumour_voxels += int(tumour.sum())
    assert tumour_voxels > 0


def test_a_recorded_recipe_that_predates_the_step_runs_without_it(caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints saved before the step existed segment as they did; ``--mask_outside_brain true`` adds it."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    m4 = parser.get_parsed_content("inference_recipe")
    old = {key: value for key, value in m4.items() if key != "mask_outside_brain"}
    record = {"network": {"_target_": "bundle.networks.M4UNet"}, "output_type": "regions", "inference_recipe": old}
    with caplog.at_level("INFO", logger="bundle.plan.plan"):
        plan = migrate(record, "old.pt")  # a version-1 record, as checkpoints of then hold it
        assert resolve_recipe(plan)["mask_outside_brain"] is False
    assert "old.pt records its recipe without mask_outside_brain" in caplog.text
    assert resolve_recipe(plan, options={"mask_outside_brain": "true"})["mask_outside_brain"] is True
    with pytest.raises(OptionError, match=r"^inference_recipe#mask_outside_brain: missing"):
        normalise_recipe(old, "regions")  # a training config's block must state it
