"""configs/cpu.yaml: the recipe for machines without a GPU, merged over configs/train.yaml.

The overlay builds its network, loader and schedule; validation runs the model's inference recipe; the
checkpoint's record is all inference needs to build the network; and the command users type trains with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser
from monai.handlers import EarlyStopHandler, LrScheduleHandler
from monai.transforms import RandCropByPosNegLabeld

from bundle.data import generate_demo_dataset
from bundle.plan.checkpoints import MODEL_KEY, RECORD_KEY

CPU_CONFIGS = [str(REPO_ROOT / "configs" / "train.yaml"), str(REPO_ROOT / "configs" / "cpu.yaml")]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled 48 x 48 x 40 demo phantoms and one held out, BraTS 2021 layout."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=1, shape=(48, 48, 40))


def _parser(tmp_path: Path, dataset_dir: Path, **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(CPU_CONFIGS)
    settings = {
        "bundle_root": str(REPO_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "models"),
        "num_folds": 2,
        "holdout_fraction": 0.0,
        **overrides,
    }
    for key, value in settings.items():
        parser[key] = value
    return parser


def test_the_overlay_builds_its_network_loader_and_schedule(tmp_path: Path, small_demo: Path) -> None:
    parser = _parser(tmp_path, small_demo)
    record = parser.get_parsed_content("model_plan").state_dict()
    assert record["network"]["filters"] == [8, 16, 32, 64, 80, 80]  # the demo's width, M4's six levels
    assert record["patch_size"] == [64, 64, 64] and record["output_type"] == "regions"
    assert record["network"]["deep_supervision"] is True

    loader = parser.get_parsed_content("train#dataloader")
    assert loader.batch_size == 2 and loader.num_workers == 0
    crops = [t for t in parser.get_parsed_content("train#random_transforms") if isinstance(t, RandCropByPosNegLabeld)]
    assert len(crops) == 1 and crops[0].cropper.pos_ratio == pytest.approx(2 / 3)  # 2 tumour : 1 other patch
    assert crops[0].image_key == "image", "the other patches are centred on brain voxels"
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 4, 64, 64, 64) and tuple(batch["label"].shape) == (2, 3, 64, 64, 64)

    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch_length == parser["steps_per_epoch"] == 100  # steps, whatever the number of cases
    assert trainer.state.max_epochs == parser["epochs"]
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR)
    assert scheduler.total_iters == parser["epochs"]  # stepped once per epoch, whatever the validations
    assert any(isinstance(h, LrScheduleHandler) for h in parser.get_parsed_content("train#handlers"))
    handlers = parser.get_parsed_content("validate#handlers")
    assert not any(isinstance(h, EarlyStopHandler) for h in handlers), "a fixed schedule has no early stopping"
    assert not any(isinstance(h, LrScheduleHandler) for h in handlers), "validation steps no schedule"
    optimizer = parser.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
    for _ in range(scheduler.total_iters):  # what the handler does at each epoch's end
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_validation_scores_the_inference_recipes_labels(tmp_path: Path, small_demo: Path) -> None:
    """Thresholds and clean-up of the recorded recipe: an isolated 8-voxel blob and anything outside the brain
    are no tumour in validation."""
    parser = _parser(tmp_path, small_demo)
    recipe = parser.get_parsed_content("model_plan").state_dict()["inference_recipe"]
    assert recipe["remove_small_components"] and recipe["min_component_size"] == 50
    assert recipe["mask_outside_brain"]
    image = torch.zeros(4, 32, 32, 32)
    image[:, :26] = 1.0  # the brain; all four channels 0 beyond it
    logits = torch.full((3, 32, 32, 32), -8.0)
    logits[:, 4:12, 4:12, 4:12] = 8.0  # a 512-voxel tumour, enhancing everywhere
    logits[:, 20:22, 24:26, 24:26] = 8.0  # an 8-voxel speck far from it, in the brain
    logits[:, 28:, :, :] = 8.0  # 4096 voxels of background around the brain
    label = torch.zeros(3, 32, 32, 32)
    label[:, 4:12, 4:12, 4:12] = 1.0
    out = parser.get_parsed_content("validate#postprocessing")({"image": image, "pred": logits, "label": label})
    assert tuple(out["pred"].shape) == (3, 32, 32, 32)
    kept = torch.as_tensor(out["pred"]).bool()
    assert torch.equal(kept, label.bool()), "the speck and the outside of the brain are removed, the tumour kept"
    assert torch.equal(torch.as_tensor(out["logits"]), logits), "the validation loss still sees the raw output"
    assert not {"pred_label", "pred_mean"} & set(out)


def test_the_checkpoint_record_is_all_inference_needs(tmp_path: Path, small_demo: Path) -> None:
    parser = _parser(tmp_path, small_demo)
    network = parser.get_parsed_content("network")
    record = parser.get_parsed_content("model_plan").state_dict()
    checkpoint = tmp_path / "model.pt"
    torch.save({MODEL_KEY: network.state_dict(), RECORD_KEY: record}, checkpoint)
    inference = ConfigParser()
    inference.read_config(str(REPO_ROOT / "configs" / "inference.yaml"))
    inference["bundle_root"] = str(REPO_ROOT)
    inference["checkpoint"] = str(checkpoint)
    built = inference.get_parsed_content("network_def")
    built.load_state_dict(network.state_dict())  # strict: the same layers, the same shapes
    assert record["window"] is None  # the 64^3 training patch slides over the case
    assert list(inference.get_parsed_content("base_inferer").roi_size) == [64, 64, 64]
    assert inference.get_parsed_content("recipe")["tta"] is True  # the recipe's; --tta false turns it off


@pytest.mark.slow
def test_monai_bundle_run_training_with_the_overlay_and_bundle_infer(tmp_path: Path, small_demo: Path) -> None:
    """The commands users type: one short epoch with cpu.yaml, then `python -m bundle infer` with no flag but TTA."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    train = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CPU_CONFIGS).replace(" ", ""),
        "--bundle_root", str(REPO_ROOT), "--dataset_dir", str(small_demo), "--output_dir", str(tmp_path / "out"),
        "--ckpt_dir", str(tmp_path / "models"), "--num_folds", "2", "--holdout_fraction", "0",
        "--epochs", "1", "--steps_per_epoch", "2", "--val_interval", "1", "--average_last_epochs", "1",
    ]  # fmt: skip
    result = subprocess.run(train, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/2] 100%" in result.stdout + result.stderr, "an epoch is steps_per_epoch steps"
    checkpoint = tmp_path / "models" / "model.pt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved[RECORD_KEY]["network"]["filters"] == [8, 16, 32, 64, 80, 80]
    averaged = torch.load(tmp_path / "models" / "model_average.pt", map_location="cpu", weights_only=True)
    assert averaged[RECORD_KEY] == saved[RECORD_KEY], "both kept weights carry the same plan"
    heldout = next(p for p in small_demo.iterdir() if p.is_dir() and not list(p.glob("*_seg.nii.gz")))
    infer = [
        sys.executable, "-m", "bundle", "infer", str(heldout), "--output", str(tmp_path / "seg"),
        "--checkpoint", str(checkpoint), "--tta", "false",
    ]  # fmt: skip
    result = subprocess.run(infer, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "seg" / f"{heldout.name}_seg.nii.gz").is_file()


def test_the_average_is_the_mean_of_the_last_epochs_weights_and_resumes_exactly() -> None:
    """EpochWeightAverage: equal weights over the last N epochs only; its state survives a checkpoint round trip."""
    from ignite.engine import Engine

    from bundle.training.averaging import EpochWeightAverage

    network = torch.nn.Conv3d(1, 1, 1)
    seen: list[torch.Tensor] = []

    def step(engine: Engine, _: Any) -> None:
        with torch.no_grad():
            network.weight.fill_(float(engine.state.epoch))  # epoch e ends with weight e
        seen.append(network.weight.detach().clone())

    engine = Engine(step)
    average = EpochWeightAverage(network, epochs=5, last_epochs=2)
    average.attach(engine)
    engine.run([0], max_epochs=5)
    assert float(average.module.weight.flatten()[0]) == pytest.approx((4 + 5) / 2)  # epochs 4 and 5 only
    restored = EpochWeightAverage(torch.nn.Conv3d(1, 1, 1), epochs=5, last_epochs=2)
    restored.averaged.load_state_dict(average.averaged.state_dict())
    assert int(restored.averaged.n_averaged) == 2
    assert torch.equal(restored.module.weight, average.module.weight)


@pytest.mark.parametrize("last_epochs", [-1, 6, "2", True])
def test_an_average_over_more_epochs_than_the_run_is_one_sentence(last_epochs: Any) -> None:
    from bundle.errors import OptionError
    from bundle.training.averaging import EpochWeightAverage

    with pytest.raises(OptionError, match="average_last_epochs must be an integer from 0 to epochs"):
        EpochWeightAverage(torch.nn.Conv3d(1, 1, 1), epochs=5, last_epochs=last_epochs)
