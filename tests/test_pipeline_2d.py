"""2-D pipeline: slice sampling, M3 preprocessing/augmentations, gated slice inference, 2-D training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from torch import nn

from bundle.data import generate_demo_dataset
from bundle.inference.gate import GatedSliceInferer
from bundle.inference.inferers import ResizedSliceInferer
from bundle.plan.checkpoints import save_model
from bundle.training.gate import tumour_class, tumour_present
from bundle.transforms import (
    CLAHEd,
    ClipNonzeroPercentilesd,
    RandChannelGammad,
    RandGaussianShiftIntensityd,
    clahe_slices,
    opencv_to_skimage_clip_limit,
)

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = REPO_ROOT / "configs"
VARIANTS = {
    "m1": "m1_la_resunet.yaml",
    "m2": "m2_resunet_tversky.yaml",
    "m3": "m3_resse_lka_unet.yaml",
}


def _stack(*names: str) -> list[str]:
    return [str(CONFIGS / "train.yaml"), str(CONFIGS / "train_2d.yaml")] + [
        str(CONFIGS / "variants" / n) for n in names
    ]


def _parser(*names: str, **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(_stack(*names))
    parser["bundle_root"] = str(REPO_ROOT)
    for key, value in overrides.items():
        parser[key] = value
    return parser


# ------------------------------------------------------------------------------------ preprocessing


def test_percentile_clip_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 50.0, size=(4, 20, 20, 10)).astype(np.float32)
    image[:, :5] = 0
    out = ClipNonzeroPercentilesd("image", 0.5, 99.5)({"image": torch.as_tensor(image)})["image"]
    assert out.dtype == torch.float32 and out.shape == image.shape
    for c in range(4):
        values = image[c][image[c] != 0]
        lo, hi = np.percentile(values, [0.5, 99.5])
        expected = np.where(image[c] != 0, np.clip(image[c], lo, hi), 0)
        np.testing.assert_allclose(out[c].numpy(), expected, rtol=1e-6)
    assert (out[:, :5] == 0).all()  # background not lifted to the lower percentile


def test_clahe_shapes_dtype_background_and_clip_limit_mapping() -> None:
    assert opencv_to_skimage_clip_limit(2.0) == pytest.approx(2.0 / 256)
    rng = np.random.default_rng(2)
    image = torch.as_tensor(rng.normal(100, 10, size=(2, 32, 32, 3)), dtype=torch.float32)
    image[:, :4] = 0
    out = CLAHEd("image")({"image": image})["image"]
    assert out.shape == image.shape and out.dtype == torch.float32
    assert (out[:, :4] == 0).all()
    brain = image[:, 4:]
    # each slice keeps its intensity range, and the contrast is actually changed
    assert torch.allclose(out[:, 4:].amin(dim=(1, 2)), brain.amin(dim=(1, 2)), atol=1e-3)
    assert torch.allclose(out[:, 4:].amax(dim=(1, 2)), brain.amax(dim=(1, 2)), atol=1e-3)
    assert not torch.allclose(out, image)
    # deterministic, and per slice: a 2-D input gives the same as that slice of the volume
    np.testing.assert_allclose(clahe_slices(image[..., 1]).numpy(), out[..., 1].numpy(), atol=1e-6)


def test_gamma_keeps_each_channels_mean_and_std() -> None:
    gamma = RandChannelGammad("image", gamma=(0.7, 1.5), prob=1.0)
    gamma.set_random_state(seed=3)
    image = torch.randn(4, 32, 32) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None, None] + 1.0
    out = gamma({"image": image})["image"]
    assert len(set(np.round(gamma.gammas, 6))) == 4  # one gamma per channel
    assert not torch.allclose(out, image)
    torch.testing.assert_close(out.mean(dim=(1, 2)), image.mean(dim=(1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2)), image.std(dim=(1, 2)), atol=1e-4, rtol=1e-4)


def test_brightness_is_one_gaussian_offset_per_channel() -> None:
    shift = RandGaussianShiftIntensityd("image", std=0.3, prob=1.0)
    shift.set_random_state(seed=4)
    image = torch.zeros(4, 8, 8)
    offsets = [shift({"image": image})["image"][:, 0, 0] for _ in range(500)]
    offsets_t = torch.stack(offsets)
    out = shift({"image": image})["image"]
    torch.testing.assert_close(out, torch.as_tensor(shift.offsets, dtype=torch.float32)[:, None, None].expand_as(out))
    assert abs(float(offsets_t.std()) - 0.3) < 0.03 and abs(float(offsets_t.mean())) < 0.03
    assert offsets_t.std(dim=1).min() > 0  # channels differ


def _slice_sample(size: int = 64) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(5)
    image = torch.as_tensor(rng.normal(size=(4, size, size)), dtype=torch.float32)
    label = torch.zeros(3, size, size)
    label[:, 20:40, 25:45] = 1
    return {"image": image, "label": label}


@pytest.mark.parametrize("variant", ["m1", "m2", "m3"])
def test_augmentations_keep_shape_dtype_and_are_reproducible(variant: str) -> None:
    parser = _parser(VARIANTS[variant], patch_size=[64, 64])
    augment = Compose(parser.get_parsed_content("train#augmentations"))
    outputs = []
    for _ in range(2):
        augment.set_random_state(seed=7)
        outputs.append([augment(_slice_sample()) for _ in range(4)])
    for first, second in zip(*outputs):
        for key in ("image", "label"):
            assert tuple(first[key].shape) == tuple(_slice_sample()[key].shape)
            assert first[key].dtype == torch.float32
            torch.testing.assert_close(first[key].as_tensor(), second[key].as_tensor())
    # and the augmentations do something
    assert any(not torch.equal(o["image"].as_tensor(), _slice_sample()["image"]) for o in outputs[0])


def test_m3_augmentation_numbers() -> None:
    parser = _parser(VARIANTS["m3"])
    transforms = {type(t).__name__: t for t in parser.get_parsed_content("train#augmentations")}
    assert transforms["SpatialPadd"].padder.spatial_size == [160, 160]
    assert set(transforms["SpatialPadd"].mode) == {"reflect"}
    assert transforms["RandSpatialCropd"].cropper.roi_size == [128, 128]
    assert transforms["RandGaussianNoised"].rand_gaussian_noise.std == 0.1
    assert transforms["RandGaussianShiftIntensityd"].std == 0.3
    assert transforms["RandChannelGammad"].gamma == (0.7, 1.5)
    affine = transforms["RandAffined"].rand_affine.rand_affine_grid
    assert affine.rotate_range[0] == pytest.approx(np.deg2rad(15), abs=1e-4)
    # MONAI draws each scale factor as 1 + uniform(-0.15, 0.15)
    assert tuple(affine.scale_range) == pytest.approx((0.15, 0.15))


# ------------------------------------------------------------------------------------ inference


class _CountingSegmenter(nn.Module):
    """Logit = 10 * (channel 1 - 0.5): tumour where channel 1 is bright; counts the slices it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.slices_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slices_seen += x.shape[0]
        return self.scale * (x[:, 1:2] - 0.5)


class _BrightnessGate(nn.Module):
    """A stand-in gate: 'tumour' if the slice's mean of channel 0 exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x[:, 0].mean(dim=(1, 2)) - 0.5)[:, None]


def test_resized_slice_inferer_round_trip() -> None:
    x = torch.linspace(0, 1, 30)[None, None, :, None, None].expand(1, 2, 30, 26, 5).clone()
    out = ResizedSliceInferer(model_size=(64, 64), sw_batch_size=4)(x, lambda s: s * 2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, 2 * x, atol=0.02, rtol=0)  # smooth input survives up/down sampling


def test_gated_inference_skips_tumour_free_slices_and_writes_oriented_nifti(tmp_path: Path) -> None:
    shape, depth = (24, 20), 16
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    case = tmp_path / "cases" / "Case_0"
    case.mkdir(parents=True)
    rng = np.random.default_rng(6)
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        vol = rng.uniform(0.9, 1.1, size=(*shape, depth)).astype(np.float32)
        if i == 0:
            vol[..., depth // 2 :] += 2.0  # the upper half is "tumour-bearing" for the stand-in gate
        if i == 1:
            vol[:8, :, :] += 2.0  # the segmenter's tumour: low file x only
        nib.save(nib.Nifti1Image(vol, affine), case / f"Case_0_{modality}.nii.gz")
    segmenter = _CountingSegmenter()
    segmenter.bundle_network_spec = {"_target_": f"{__name__}._CountingSegmenter"}  # what build_network records
    from bundle.inference.run import variant_recipe
    from bundle.plan.plan import M4_PREPROCESSING

    m2_recipe = variant_recipe(CONFIGS / "variants" / VARIANTS["m2"])  # M2: one WT channel
    save_model(tmp_path / "model.pt", segmenter, "binary", [32, 32], inference_recipe=m2_recipe,
               preprocessing=M4_PREPROCESSING)  # fmt: skip
    gated = GatedSliceInferer(
        gate=_BrightnessGate(), model_size=(32, 32), out_channels=1, spatial_dim=2, sw_batch_size=4
    )
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.yaml"),
        workflow_type="infer",
        bundle_root=str(REPO_ROOT),
        dataset_dir=str(case),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "model.pt"),
        network=segmenter,
        base_inferer=gated,
        tta=True,
        num_workers=0,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    flips = 4
    assert gated.slices_total == flips * depth
    assert gated.slices_segmented == flips * depth // 2
    assert segmenter.slices_seen == flips * depth // 2  # the segmenter never saw a gated-out slice
    written = nib.load(tmp_path / "out" / "Case_0_seg.nii.gz")
    assert written.shape == (*shape, depth)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    mask = np.asarray(written.dataobj)
    expected = np.zeros_like(mask)
    expected[:8, :, depth // 2 :] = 1
    np.testing.assert_array_equal(mask, expected)


def test_gated_inference_logs_the_gate_and_the_slices_it_passes(tmp_path: Path) -> None:
    """`python -m bundle infer --gate_checkpoint` logs the gate once, then per case and in total the slices it passed.

    M2's recipe (one pass); the stand-in gate passes the slices made bright in channel 0: the upper half of
    Case_0's 16 slices, 4 of Case_1's.
    """
    from bundle.inference.run import variant_recipe

    depth = 16
    rng = np.random.default_rng(7)
    for case, bright in (("Case_0", slice(depth // 2, None)), ("Case_1", slice(2, 6))):
        folder = tmp_path / "cases" / case
        folder.mkdir(parents=True)
        for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            vol = rng.uniform(0.9, 1.1, size=(24, 20, depth)).astype(np.float32)
            if i == 0:
                vol[..., bright] += 2.0
            nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / f"{case}_{modality}.nii.gz")
    segmenter, gate = _CountingSegmenter(), _BrightnessGate()
    segmenter.bundle_network_spec = {"_target_": "test_pipeline_2d._CountingSegmenter"}
    gate.bundle_network_spec = {"_target_": "test_pipeline_2d._BrightnessGate"}
    m2_recipe = variant_recipe(CONFIGS / "variants" / VARIANTS["m2"])
    save_model(tmp_path / "model.pt", segmenter, output_type="binary", patch_size=[32, 32], inference_recipe=m2_recipe)
    save_model(tmp_path / "gate.pt", gate, output_type="gate", patch_size=[32, 32])
    command = [sys.executable, "-m", "bundle", "infer", str(tmp_path / "cases"), "--output", str(tmp_path / "out")]
    command += ["--checkpoint", str(tmp_path / "model.pt"), "--gate_checkpoint", str(tmp_path / "gate.pt")]
    command += ["--gate_threshold", "0.4"]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    gate_lines = [line for line in log.splitlines() if " - bundle.inference.gate - INFO - gate: /" in line]
    assert len(gate_lines) == 1 and f"gate: {tmp_path / 'gate.pt'}, threshold 0.4:" in gate_lines[0], log[-3000:]
    assert "Case_0: the gate passed 8 of 16 slices to the segmenter (50.0 %)" in log, log[-3000:]
    assert "Case_1: the gate passed 4 of 16 slices to the segmenter (25.0 %)" in log
    assert "gate: passed 12 of 32 slices to the segmenter over 2 case(s) (37.5 %)" in log
    assert log.index("Case_1: the gate passed") < log.index("gate: passed 12 of 32")
    for case in ("Case_0", "Case_1"):
        assert (tmp_path / "out" / f"{case}_seg.nii.gz").is_file()
    # the threshold without the gate would be ignored: one sentence and exit 1, before any case is written
    command = [sys.executable, "-m", "bundle", "infer", str(tmp_path / "cases"), "--output", str(tmp_path / "out2")]
    command += ["--checkpoint", str(tmp_path / "model.pt"), "--gate_threshold", "0.4"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "gate_threshold: 0.4 is given without gate_checkpoint; it applies to M2's slice gate only" in result.stderr
    assert not list((tmp_path / "out2").glob("*_seg.nii.gz"))


@pytest.mark.parametrize("threshold", [1.5, -0.1, "high", True])
def test_a_gate_threshold_that_is_no_probability_is_refused_before_any_case(threshold: Any) -> None:
    from bundle.errors import OptionError
    from bundle.inference.gate import load_slice_gate

    plan = {"network": {"spatial_dims": 2}, "output_type": "binary"}
    with pytest.raises(OptionError, match=r"^gate_threshold: .* is not a probability \(a number in \[0, 1\]\)$"):
        load_slice_gate("gate.pt", threshold, plan=plan)  # before the gate's file is read


@pytest.mark.parametrize("flip_batch_size", [1, 4])
def test_gate_slice_log_counts_every_flip_of_test_time_augmentation(
    flip_batch_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """With 4 in-plane flips each slice is gated 4 times, one flip at a time or all in one pass; the line says so."""
    import logging

    from ignite.engine import Engine

    from bundle.inference.gate import GateSliceLog
    from bundle.inference.inferers import FlipTTAInferer

    gated = GatedSliceInferer(gate=_BrightnessGate(), model_size=(32, 32), out_channels=1, spatial_dim=2)
    inferer = FlipTTAInferer(base_inferer=gated, tta=True, flip_batch_size=flip_batch_size)
    segmenter = _CountingSegmenter()
    volume = torch.full((1, 4, 24, 20, 10), 0.1)
    volume[:, 0, ..., :6] = 1.0  # 6 of the 10 slices are "tumour-bearing" for the stand-in gate
    engine = Engine(lambda engine, batch: inferer(batch["image"], segmenter))
    GateSliceLog(gated).attach(engine)
    caplog.set_level(logging.INFO, logger="bundle.inference.gate")
    engine.run([{"image": volume, "case_id": ["Case_7"]}], max_epochs=1)
    assert segmenter.slices_seen == 24
    line = "Case_7: the gate passed 24 of 40 slices to the segmenter (60.0 %; 10 slices in each of 4 flips)"
    assert line in caplog.text
    assert "gate: passed 24 of 40 slices to the segmenter over 1 case(s) (60.0 %)" in caplog.text


def test_gate_slice_label() -> None:
    label = torch.zeros(3, 8, 8)
    assert tumour_present(label).tolist() == [0.0]
    label[1, 2, 3] = 1
    assert tumour_present(label).tolist() == [1.0]


# ------------------------------------------------------------------------------------ training

TINY_2D = {
    "num_folds": 2,
    "subset_fraction": 1.0,  # M3's 10 % of four tiny cases would be none (tests/test_data.py checks the subset)
    "patch_size": [32, 32],
    "network_factory#channels": [4, 8, 16, 32, 64],
    "epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "batch_size": 4,
    "learning_rate": 1e-3,
}


def train_workflow(files: list[str], tmp_path: Path, dataset_dir: Path, **settings: Any) -> ConfigWorkflow:
    """An initialised training workflow of the config ``files`` on ``dataset_dir``, writing under ``tmp_path``."""
    workflow = ConfigWorkflow(
        config_file=files,
        workflow_type="train",
        run_id="training",
        bundle_root=str(REPO_ROOT),
        dataset_dir=str(dataset_dir),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        **settings,
    )
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("variant", ["m1", "m2", "m3"])
def test_one_2d_epoch_through_the_bundle(variant: str, tmp_path: Path, tiny_demo: Path) -> None:
    extra = {"warmup_epochs": 1} if variant == "m3" else {}
    workflow = train_workflow(_stack(VARIANTS[variant]), tmp_path, tiny_demo, **TINY_2D, **extra)
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    workflow.finalize()
    assert trainer.state.epoch == 1 and np.isfinite(float(trainer.state.output[0]["loss"]))
    metrics = evaluator.state.metrics
    regions = ["WT"] if variant == "m2" else ["WT", "TC", "ET"]
    for region in regions:
        assert 0.0 <= metrics[f"val_dice_{region}"] <= 1.0
    if variant == "m2":
        assert "val_dice_TC" not in metrics
    assert (tmp_path / "models" / "model.pt").is_file()
    # the network saw 2-D slices of the configured size
    network = workflow.parser.get_parsed_content("network")
    assert next(network.parameters()).ndim == 4  # 2-D convolutions


# ------------------------------------------------------------------------------------ M2's gate


def test_gate_network_is_the_papers_resnet50_with_two_dense_layers_and_a_softmax_output_layer() -> None:
    from bundle.networks import SliceGateClassifier

    gate = SliceGateClassifier(in_channels=4).eval()
    assert gate.backbone.conv1.stride == (2, 2) and gate.backbone.conv1.kernel_size == (7, 7)  # standard stem
    assert not gate.backbone.no_max_pool
    linears = [m for m in gate.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 256), (256, 256), (256, 2)]
    assert any(isinstance(m, torch.nn.ReLU) for m in gate.head) and any(
        isinstance(m, torch.nn.Dropout) for m in gate.head
    )
    with torch.no_grad():
        assert gate(torch.randn(3, 4, 64, 64)).shape == (3, 2)
    assert tumour_class(torch.zeros(1, 4, 4)).tolist() == [1.0, 0.0]
    assert tumour_class(torch.ones(1, 4, 4)).tolist() == [0.0, 1.0]


def test_gate_takes_resnet50_weights_from_a_file_adapting_the_first_convolution(tmp_path: Path) -> None:
    """ImageNet weights have 3 input channels: each of the 4 gets the RGB mean x 3/4; the rest by name."""
    from monai.networks.nets import resnet50

    from bundle.errors import UserError
    from bundle.networks import SliceGateClassifier, load_pretrained_backbone

    torch.manual_seed(0)
    # torchvision's ResNet-50 layout: 3 channels, standard stem, no shortcut bias, a 1000-class fc
    imagenet = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, bias_downsample=False)
    torch.save(imagenet.state_dict(), tmp_path / "resnet50.pt")
    gate = load_pretrained_backbone(SliceGateClassifier(in_channels=4), tmp_path / "resnet50.pt")
    rgb = imagenet.conv1.weight
    expected = rgb.mean(dim=1, keepdim=True).repeat(1, 4, 1, 1) * 0.75
    torch.testing.assert_close(gate.backbone.conv1.weight, expected)
    torch.testing.assert_close(gate.backbone.layer4[2].conv3.weight, imagenet.layer4[2].conv3.weight)
    with pytest.raises(UserError, match=r"missing\.pt: pretrained_weights file does not exist"):
        load_pretrained_backbone(gate, tmp_path / "missing.pt")
    torch.save({"conv1.weight": rgb}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"partial\.pt: not ResNet-50 weights"):
        load_pretrained_backbone(gate, tmp_path / "partial.pt")


def test_one_gate_epoch_through_the_bundle(tmp_path: Path) -> None:
    """configs/train_gate.yaml trains and validates the classifier and writes gate.pt with its record."""
    from bundle.inference.gate import load_gate
    from bundle.plan.checkpoints import read_plan

    # 48 x 48 x 40 phantoms: some axial slices of the brain hold no tumour (at 32 x 32 x 24 all do)
    data = generate_demo_dataset(tmp_path / "demo", num_cases=4, num_test_cases=0, shape=(48, 48, 40))

    workflow = train_workflow(
        [str(CONFIGS / f) for f in ("train.yaml", "train_2d.yaml", "train_gate.yaml")],
        tmp_path,
        data,
        # one fold: validation on all four cases, so both tumour-free and tumour slices are there (AUC defined)
        **{
            **{k: v for k, v in TINY_2D.items() if not k.startswith("network_factory")},
            "patch_size": [64, 64],
            "num_folds": 1,
            "slices_per_volume": 1,  # a short run: 4 slices (tests/test_epoch_2d.py checks whole epochs)
            "tumour_slice_ratio": 0.5,
        },
    )
    validation = workflow.parser.get_parsed_content("validate#dataset")
    slices = [float(item["label"][1]) for item in validation]
    assert 0 < sum(slices) < len(slices), "both classes among the validation slices"
    depths = [volume["image"].shape[1] for volume in validation.volumes]
    assert len(slices) == sum(depths), "every axial slice of the (cropped) validation volumes"
    workflow.run()
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    workflow.finalize()
    assert 0.0 <= metrics["val_auc"] <= 1.0 and 0.0 <= metrics["val_accuracy"] <= 1.0
    record = read_plan(tmp_path / "models" / "gate.pt")
    assert record["network"]["_target_"] == "bundle.networks.SliceGateClassifier"
    assert record["output_type"] == "gate" and record["patch_size"] == [64, 64]
    gate = load_gate(str(tmp_path / "models" / "gate.pt"))
    with torch.no_grad():
        assert gate(torch.zeros(2, 4, 64, 64)).shape == (2, 2)


# ------------------------------------------------------------------------------------ the command line


def _python(*command: str) -> str:
    """Run ``python <command>`` in the bundle root as a user would; return its output, fail with its tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow  # three fresh interpreters importing torch + MONAI: 2.4 min on the loaded 2-core machine
def test_m1_trains_segments_and_scores_through_the_command_line(tmp_path: Path, tiny_demo: Path) -> None:
    """M1 as users type it: ``monai.bundle run training``, ``bundle infer`` (the recipe), ``bundle evaluate``.

    The masks must be on each input's grid (the phantoms' LPS affine: reoriented and uncropped back), carry
    the dataset's BraTS 2021 labels, hold no tumour outside the brain's box (where inference cropped), and score
    a finite Dice per region.
    """
    files = ",".join(f"'configs/{f}'" for f in ("train.yaml", "train_2d.yaml", "variants/m1_la_resunet.yaml"))
    settings = {
        **TINY_2D,
        "dataset_dir": tiny_demo,
        "output_dir": tmp_path / "train",
        "ckpt_dir": tmp_path / "models",
        "slices_per_volume": 4,  # a short run (tests/test_epoch_2d.py checks whole epochs)
        "cache": "memory",
    }
    command = ["-m", "monai.bundle", "run", "training", "--config_file", f"[{files}]"]
    for key, value in settings.items():
        command += [f"--{key}", str(value).replace(" ", "")]
    _python(*command)

    out, checkpoint = tmp_path / "segmentations", tmp_path / "models" / "model.pt"
    log = _python("-m", "bundle", "infer", str(tiny_demo), "--output", str(out), "--checkpoint", str(checkpoint))
    assert "2-D regions model, one pass, thresholds" in log, log[-3000:]  # M1's recipe, from the checkpoint
    cases = sorted(p.name for p in tiny_demo.iterdir() if p.is_dir())
    assert sorted(p.name.removesuffix("_seg.nii.gz") for p in out.glob("*_seg.nii.gz")) == cases
    for case in cases:
        source = nib.load(tiny_demo / case / f"{case}_flair.nii.gz")
        mask = nib.load(out / f"{case}_seg.nii.gz")
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
        modalities = [f for f in (tiny_demo / case).glob("*.nii.gz") if not f.name.endswith("_seg.nii.gz")]
        assert len(modalities) == 4
        brain = np.any([np.asarray(nib.load(f).dataobj) != 0 for f in modalities], axis=0)
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(brain))
        outside = np.ones(brain.shape, bool)
        outside[box] = False
        assert not labels[outside].any(), "tumour outside the brain's box, where inference cropped"

    scores = tmp_path / "scores"
    _python("-m", "bundle", "evaluate", "--pred", str(out), "--truth", str(tiny_demo), "--output_dir", str(scores))
    summary = json.loads((scores / "summary.json").read_text())
    for region in ("WT", "TC", "ET"):
        assert summary[region]["dice"]["n"] == len(cases)
        assert 0.0 <= summary[region]["dice"]["mean"] <= 1.0


def test_m2_tversky_loss_pushes_down_false_positives_on_tumour_free_slices() -> None:
    """M2's Tversky loss is taken over the batch, so a tumour-free slice's false positives have a gradient.

    Per slice (MONAI's default), such a slice's Tversky index is 0 whatever the prediction: its gradient here
    is 1e-7 against 8e-3 on the tumour slice's background, and the demo-scale run over-segmented (validation
    WT Dice 0.58, sensitivity 1.0; docs/benchmarks/methods_2d.md).
    """
    loss = _parser(VARIANTS["m2"]).get_parsed_content("loss")
    logits = torch.full((2, 1, 32, 32), -2.0, requires_grad=True)  # p ~ 0.12 everywhere
    label = torch.zeros(2, 1, 32, 32)
    label[1, 0, 8:24, 8:24] = 1  # slice 0 tumour-free, slice 1 with tumour
    loss(logits, label).backward()
    empty_slice = float(logits.grad[0].abs().sum())
    background_of_tumour_slice = float((logits.grad[1] * (1 - label[1])).abs().sum())
    assert empty_slice > 0.5 * background_of_tumour_slice > 0
