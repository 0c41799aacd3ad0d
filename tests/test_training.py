"""End-to-end training through ``monai.bundle`` on tiny demo data, checkpoints and resume."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, shared_samples_dir
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from bundle.data import generate_demo_dataset
from bundle.errors import DataError, find_user_error

TINY = {
    "num_folds": 2,
    "holdout_fraction": 0.0,  # all four tiny cases in the two folds (tests/test_cv.py runs the 20 % hold-out)
    "patch_size": [32, 32, 32],
    "network_factory#filters": [4, 8, 16, 32, 64],
    "epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "learning_rate": 1e-3,
}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled 32 x 32 x 24 demo phantoms in the BraTS 2021 layout."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=0, shape=(32, 32, 24))


def _workflow(tmp_path: Path, dataset_dir: Path, **overrides: Any) -> ConfigWorkflow:
    settings = {
        **TINY,
        "bundle_root": str(REPO_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "models"),
        **overrides,
    }
    return ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "train.yaml"), workflow_type="train", run_id="training", **settings
    )


def test_one_epoch_through_the_bundle_cli(tmp_path: Path, tiny_demo: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.yaml",
        "--dataset_dir",
        str(tiny_demo),
        "--output_dir",
        str(tmp_path / "out"),
        "--ckpt_dir",
        str(tmp_path / "models"),
    ]
    for key, value in TINY.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # the console: one line per epoch (bundle.training.handlers.EpochSummary), no line per iteration
    summary = (
        r"epoch 1/1: loss [0-9.]+ \| val_mean_dice [0-9.]+ \(WT [0-9.]+, TC [0-9.]+, ET [0-9.]+\), val_loss [0-9.]+"
    )
    assert re.search(summary + r", best val_mean_dice [0-9.]+ at epoch 1 \| [0-9]+ s/epoch", log), log[-3000:]
    assert "Iter: 1/" not in log and "Epoch[1] Metrics" not in log
    per_epoch = (tmp_path / "out" / "metrics_per_epoch.csv").read_text().splitlines()
    assert per_epoch[0].startswith("epoch,loss") and len(per_epoch) == 2
    for metric in ("dice", "hd95", "sensitivity", "specificity"):  # every value is in the CSV
        for region in ("WT", "TC", "ET"):
            assert f"val_{metric}_{region}" in per_epoch[0], f"val_{metric}_{region} not in metrics_per_epoch.csv"
    assert (tmp_path / "models" / "model.pt").is_file(), "best checkpoint not written"
    assert list((tmp_path / "out").glob("checkpoint_*epoch=1.pt")), "last checkpoint not written"
    assert (tmp_path / "out" / "datalist.json").is_file()
    assert list((tmp_path / "out").glob("events.out.tfevents.*")), "no TensorBoard log"
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("input_block") for k in best["model"]), "model.pt holds the network's state dict"
    record = best["model_record"]  # and what built it (bundle.plan.checkpoints)
    assert record["network"]["_target_"] == "bundle.networks.M4UNet"  # its public name
    assert record["network"]["filters"] == TINY["network_factory#filters"]
    assert record["network"]["strides"] == [1, 2, 2, 2, 2]  # the depth follows the filters
    assert record["network"]["upsample_heads"] is False  # M4's deep supervision: heads at their own size
    assert record["input_channels"] == ["t1", "t1ce", "t2", "flair"] and record["network"]["in_channels"] == 4
    assert record["patch_size"] == TINY["patch_size"] and record["output_type"] == "regions"


@pytest.mark.parametrize("upsample_ds_heads", [False, True], ids=["heads_own_size", "heads_upsampled"])
def test_resume_continues_epoch_count_and_optimizer_state(
    tmp_path: Path, tiny_demo: Path, upsample_ds_heads: bool
) -> None:
    """In both deep-supervision forms: training, validation with its loss (@loss on the eval output), resume."""
    first = _workflow(tmp_path, tiny_demo, upsample_ds_heads=upsample_ds_heads)
    first.initialize()
    first.run()
    iterations_per_epoch = first.parser.get_parsed_content("train#trainer").state.epoch_length
    first.finalize()
    checkpoint = next((tmp_path / "out").glob("checkpoint_*epoch=1.pt"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(saved)

    second = _workflow(tmp_path, tiny_demo, resume=True, epochs=2, upsample_ds_heads=upsample_ds_heads)
    second.initialize()
    trainer = second.parser.get_parsed_content("train#trainer")
    started: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(engine.state.epoch))
    second.run()
    assert started == [2], "resumed training must run only epoch 2"
    assert trainer.state.iteration == 2 * iterations_per_epoch
    optimizer = second.parser.get_parsed_content("optimizer")
    steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {2 * iterations_per_epoch}, "Adam state must continue from the checkpoint"
    metrics = second.parser.get_parsed_content("validate#evaluator").state.metrics
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
    assert second.parser.get_parsed_content("network").upsample_heads is upsample_ds_heads
    second.finalize()


def _root_cause(error: BaseException) -> BaseException:
    """MONAI's config parser wraps errors raised in expressions; return the original one."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def test_resume_without_checkpoint_says_so(tmp_path: Path, tiny_demo: Path) -> None:
    workflow = _workflow(tmp_path, tiny_demo, resume=True)
    with pytest.raises(Exception) as info:
        workflow.initialize()  # before any case is read or a folder made
    assert str(find_user_error(info.value)) == (
        f"resume: {workflow.parser.get_parsed_content('output_dir')}: no checkpoint_*epoch=N.pt checkpoint to "
        "resume from; train without --resume, or give the output_dir of the run"
    )


def test_bad_dataset_stops_before_training(tmp_path: Path, brats2021_dir: Path) -> None:
    next((brats2021_dir / "BraTS2021_00001").glob("*_t1ce.nii.gz")).unlink()
    workflow = _workflow(tmp_path, brats2021_dir)
    with pytest.raises(RuntimeError) as info:
        workflow.initialize()  # the cases are checked in `initialize`, before any folder is made
    cause = _root_cause(info.value)
    assert isinstance(cause, DataError)
    assert str(cause).endswith("BraTS2021_00001_t1ce.nii.gz: missing modality t1ce")
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(shared_samples_dir() is None, reason="../shared/brats_samples not present")
def test_one_epoch_on_real_brats_samples(tmp_path: Path) -> None:
    """The real-data path (240 x 240 x 155 int16 LPS files, disk cache) trains and checkpoints."""
    workflow = _workflow(tmp_path, shared_samples_dir(), num_folds=3, patch_size=[64, 64, 64])
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    assert (tmp_path / "models" / "model.pt").is_file()
    assert list((tmp_path / "out").glob("checkpoint_*epoch=1.pt"))
    assert list((tmp_path / "out" / "cache").glob("*.pt")), "real data should use the disk cache by default"
    workflow.finalize()


def test_disk_cache_keeps_affines_and_is_keyed_by_transforms(tmp_path: Path, tiny_demo: Path) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    from bundle.data import make_datalist
    from bundle.training.workflow import make_dataset

    items = make_datalist(tiny_demo, folds=1)["training"][:1]
    load = [LoadImaged(keys="label", image_only=True), EnsureChannelFirstd(keys="label")]
    first = make_dataset(items, Compose(load), cache="disk", cache_dir=str(tmp_path / "c"))[0]
    again = make_dataset(items, Compose(load), cache="disk", cache_dir=str(tmp_path / "c"))[0]  # from disk
    assert isinstance(again["label"], MetaTensor)
    assert torch.allclose(again["label"].affine, first["label"].affine)
    other = Compose([*load, ScaleIntensityd(keys="label")])
    make_dataset(items, other, cache="disk", cache_dir=str(tmp_path / "c"))[0]
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2, "different transforms must not share cache entries"


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_caches_hold_a_nested_composes_deterministic_steps(cache: str, tmp_path: Path, tiny_demo: Path) -> None:
    """A variant's intensity_transform may be a Compose (M3's): both caches still end after it, not before."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform

    from bundle.data import make_datalist
    from bundle.training.workflow import make_dataset

    class Counting(MapTransform):
        calls = 0

        def __call__(self, data: dict) -> dict:
            Counting.calls += 1
            return dict(data)

    items = make_datalist(tiny_demo, folds=1)["training"][:2]
    load = [LoadImaged(keys="label", image_only=True), EnsureChannelFirstd(keys="label")]
    transform = Compose([*load, Compose([Counting(keys="label")])])
    dataset = make_dataset(items, transform, cache=cache, cache_dir=str(tmp_path / "c"), progress=False)
    for _ in range(3):
        [dataset[i] for i in range(len(dataset))]
    assert Counting.calls == len(items), "the nested step ran again after caching"


def test_cached_cases_hold_the_cropped_brain_not_the_whole_volume_behind_it(tiny_demo: Path) -> None:
    """train.yaml's deterministic preprocessing leaves tensors that own just their voxels (the caches store them)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from bundle.data import make_datalist

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    item = make_datalist(tiny_demo, folds=1)["training"][0]
    out = Compose(parser.get_parsed_content("deterministic_transforms"))(item)
    assert out["image"].shape[1:] != (32, 32, 24), "the phantom should have been cropped to its head"
    for key in ("image", "label"):
        tensor = out[key]
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key


# ------------------------------------------------------------------ stopping on the validation loss (M4)


def test_patience_is_given_in_epochs_and_counted_in_validations() -> None:
    from bundle.errors import OptionError
    from bundle.training.handlers import improvement_score, patience_in_validations

    assert patience_in_validations(10, 2) == 5  # M4: 10 epochs, a validation every 2
    assert patience_in_validations(10, 3) == 4  # at least 10 epochs
    assert patience_in_validations(30, 2) == 15  # M2
    with pytest.raises(OptionError):
        patience_in_validations(0, 2)

    class _Engine:
        class state:  # noqa: N801 - stands for ignite's engine.state
            metrics = {"val_loss": 0.25, "val_mean_dice": 0.5}

    assert improvement_score("val_loss")(_Engine) == -0.25  # a loss is minimised
    assert improvement_score("val_mean_dice")(_Engine) == 0.5
    with pytest.raises(OptionError, match="monitor: the validation computes no 'val_dice'"):
        improvement_score("val_dice")(_Engine)


def test_configs_stop_on_what_each_paper_says() -> None:
    from monai.bundle import ConfigParser

    def parsed(*files: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config([str(REPO_ROOT / "configs" / f) for f in files])
        return parser

    m4 = parsed("train.yaml")
    assert (m4["monitor"], m4["early_stop_patience"], m4["val_interval"]) == ("val_loss", 10, 2)
    assert m4.get_parsed_content("lr_scheduler_factory#mode") == "min"
    m2 = parsed("train.yaml", "train_2d.yaml", "variants/m2_resunet_tversky.yaml")
    assert (m2["monitor"], m2["early_stop_patience"]) == ("val_loss", 30)
    gate = parsed("train.yaml", "train_2d.yaml", "train_gate.yaml")  # M2's gate: the paper's rule too
    assert (gate["monitor"], gate["early_stop_patience"], gate["batch_size"]) == ("val_loss", 30, 16)
    assert gate.get_parsed_content("lr_scheduler_factory#mode") == "min"


def test_training_stops_when_the_validation_loss_stops_improving(tmp_path: Path, tiny_demo: Path) -> None:
    """Learning rate 0: the validation loss never improves, so 2 epochs' patience ends 10 epochs after 3."""
    workflow = _workflow(tmp_path, tiny_demo, epochs=10, learning_rate=0.0, early_stop_patience=2)
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3
    rows = list(csv.DictReader((tmp_path / "out" / "metrics_per_epoch.csv").open()))
    losses = {float(r["val_loss"]) for r in rows}
    assert len(rows) == 3 and len(losses) == 1 and all(math.isfinite(v) for v in losses)
    workflow.finalize()
