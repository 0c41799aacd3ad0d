"""A model's plan travels with its weights, by value (bundle/plan): what uses a model reads nothing else.

* inference parses ``configs/inference.yaml`` and no training config, reads the checkpoint once and
  decodes each image file once (a 2-case run, counted);
* a variant file edited after training changes nothing of how its checkpoint segments;
* a training stack and ``bundle.plan.fine_tune_overrides`` of its plan give the same plan (what MONAI
  Label's fine-tuning starts from; tests/test_label.py runs it through MONAI Label's call);
* a resumed training refuses another model in one sentence and applies (and logs) a new learning rate;
* components the plan cannot hold by value are one sentence.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow
from test_inference_config import _write_case
from test_training import TINY

import bundle.data.io
import bundle.transforms.loading
from bundle.data import generate_demo_dataset
from bundle.errors import OptionError, find_user_error
from bundle.inference.run import infer
from bundle.plan import ModelPlan, fine_tune_overrides, read_plan, spec_of
from bundle.plan.plan import training_config_files
from bundle.plan.specs import build, public_target, same_component

CONFIGS = REPO_ROOT / "configs"
M3 = ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m3_resse_lka_unet.yaml"]
SMALL_2D = {"network_factory#channels": [4, 8, 8, 8, 8], "patch_size": [32, 32], "num_workers": 0}


def _parser(files: list[str], **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / f) for f in files])
    for key, value in {"device": "$torch.device('cpu')", **overrides}.items():
        parser[key] = value
    return parser


def _save(parser: ConfigParser, path: Path) -> Path:
    """What training saves: the network the config builds and the plan it records."""
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(
        {"model": network.state_dict(), "model_record": parser.get_parsed_content("model_plan").state_dict()}, path
    )
    return path


def test_inference_reads_no_training_config_one_checkpoint_read_one_decode_per_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A 2-case run: configs/inference.yaml alone parsed, one torch.load, each of the 8 image files decoded once."""
    checkpoint = _save(
        _parser(["configs/train.yaml"], **{"network_factory#filters": [4, 8, 8], **TINY}), tmp_path / "m.pt"
    )
    for case in ("Case_000", "Case_001"):
        _write_case(tmp_path / "data", case, shape=(20, 18, 16))
    read, loads, decoded = [], [], []
    original_read, original_load = ConfigParser.load_config_file, torch.load
    monkeypatch.setattr(
        ConfigParser,
        "load_config_file",
        staticmethod(lambda f, **kw: read.append(Path(f).name) or original_read(f, **kw)),
    )
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a[0]) or original_load(*a, **kw))
    for module in (bundle.data.io, bundle.transforms.loading):  # every NIfTI decode of the bundle is load_nifti
        original = module.load_nifti
        monkeypatch.setattr(
            module, "load_nifti", functools.partial(lambda f, p: decoded.append(Path(p).name) or f(p), original)
        )
    written = infer(str(tmp_path / "data"), output=str(tmp_path / "out"), checkpoint=str(checkpoint), tta=False)
    assert len(written) == 2 and all(Path(w).is_file() for w in written)
    assert set(read) - {"metadata.json"} == {"inference.yaml"}, read
    assert [Path(str(p)).name for p in loads] == ["m.pt"]
    assert len(decoded) == 8 and len(set(decoded)) == 8, decoded


def test_a_variant_edited_after_training_changes_nothing_of_its_checkpoint(tmp_path: Path) -> None:
    """An M3 model trained from a copy of the variant; the copy is then edited: the same labels, bit for bit."""
    variant = tmp_path / "m3.yaml"
    shutil.copy(REPO_ROOT / M3[-1], variant)
    stack = [*M3[:2], str(variant)]
    checkpoint = _save(_parser(stack, **SMALL_2D), tmp_path / "m3.pt")
    case = _write_case(tmp_path / "data", "Case_000", shape=(20, 18, 16))
    (before,) = infer(str(case), output=str(tmp_path / "before"), checkpoint=str(checkpoint))
    variant.write_text(
        variant.read_text()
        .replace("clip_percentiles: [0.5, 99.5]", "clip_percentiles: [5.0, 95.0]")
        .replace("inference_recipe#tta: false", "inference_recipe#tta: true")
        .replace("label_transform: null", "label_transform: {_target_: bundle.transforms.LabelsToRegionsd}")
    )
    assert _parser(stack).get_parsed_content("clip_percentiles") == [5.0, 95.0]  # the edit took
    (after,) = infer(str(case), output=str(tmp_path / "after"), checkpoint=str(checkpoint))
    np.testing.assert_array_equal(np.asarray(nib.load(after).dataobj), np.asarray(nib.load(before).dataobj))
    assert read_plan(checkpoint)["preprocessing"]["intensity"][0]["lower"] == 0.5


@pytest.mark.parametrize(
    "stack",
    [["configs/train.yaml", "configs/cpu.yaml"], M3, ["configs/train.yaml", "configs/variants/m4_resunet_ds.yaml"]],
    ids=["cpu", "m3", "m4_best"],
)
def test_fine_tuning_from_a_plan_builds_the_same_plan(stack: list[str]) -> None:
    """train.yaml (+ train_2d.yaml) with the plan's overrides, no variant file: the plan the checkpoint had."""
    small = SMALL_2D if "train_2d" in " ".join(stack) else {"network_factory#filters": [4, 8, 8, 8], "num_workers": 0}
    with torch.device("meta"):
        plan = _parser(stack, **small).get_parsed_content("model_plan").state_dict()
        again = _parser(training_config_files(plan), **fine_tune_overrides(plan))
        rebuilt = again.get_parsed_content("model_plan").state_dict()
    for key in (
        "network",
        "input_channels",
        "output_type",
        "preprocessing",
        "patch_size",
        "window",
        "inference_recipe",
    ):
        assert same_component(rebuilt[key], plan[key]), key
    assert same_component(rebuilt["training"], plan["training"])
    # the optimizer follows the learning rate key, so a user's --learning_rate reaches it
    again["learning_rate"] = 0.5
    with torch.device("meta"):
        assert again.get_parsed_content("model_plan").state_dict()["training"]["optimizer_factory"]["lr"] == 0.5


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled 32 x 32 x 24 demo phantoms."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=0, shape=(32, 32, 24))


def _train(tmp_path: Path, data: Path, **overrides: Any) -> ConfigWorkflow:
    settings = {**TINY, "bundle_root": str(REPO_ROOT), "dataset_dir": str(data), "output_dir": str(tmp_path / "out")}
    settings |= {"ckpt_dir": str(tmp_path / "models"), "cache": "none", "steps_per_epoch": 1}
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.yaml"), workflow_type="train", run_id="training", **{**settings, **overrides}
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def test_resume_applies_a_new_learning_rate_and_refuses_another_network(
    tmp_path: Path, tiny_demo: Path, capsys: pytest.CaptureFixture
) -> None:
    _train(tmp_path, tiny_demo)
    capsys.readouterr()
    workflow = _train(tmp_path, tiny_demo, resume="true", epochs=2, learning_rate=0.5)
    logged = capsys.readouterr().out  # configs/logging.conf, which the workflow installs, logs to stdout
    assert "resume: learning_rate 0.001 -> 0.5 (applied to the restored optimizer)" in logged
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 0.5
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(Exception) as raised:
        _train(tmp_path, tiny_demo, resume="true", epochs=3, **{"network_factory#filters": [4, 8, 16, 32, 32]})
    message = str(find_user_error(raised.value))
    assert message.startswith("resume: the checkpoint was trained with another network than this config gives")
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before  # no new TensorBoard pair, no file


def test_what_a_plan_cannot_hold_by_value_is_one_sentence() -> None:
    assert spec_of(functools.partial(torch.nn.Conv3d, in_channels=4), "x") == {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 4,
    }
    assert public_target(torch.optim.Adam) == "torch.optim.Adam"
    assert build({"_target_": "torch.nn.Identity"}).__class__ is torch.nn.Identity
    with pytest.raises(OptionError, match=r"^loss_factory: a RegionDiceBCELoss object cannot be recorded"):
        from bundle.training.losses import RegionDiceBCELoss

        spec_of(RegionDiceBCELoss(), "loss_factory")
    with pytest.raises(OptionError, match=r"^intensity_transform: <lambda> cannot be recorded by name"):
        spec_of(lambda x: x, "intensity_transform")
    net = torch.nn.Conv3d(4, 3, 1)
    net.bundle_network_spec = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
    with pytest.raises(OptionError, match=r"^inference_recipe: missing; a regions model records how it segments"):
        ModelPlan(net, "regions", [8, 8, 8])


def test_an_overlay_after_the_variant_that_sets_the_network_is_one_sentence() -> None:
    parser = _parser([*M3, "configs/demo.yaml"])
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("network_def")
    assert str(find_user_error(raised.value)).startswith(
        "network_factory#filters: ResSELKAUNet takes no argument 'filters'; a config set it for another network"
    )
