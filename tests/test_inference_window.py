"""The window a checkpoint's plan records (``window``), through ``python -m bundle infer``.

A recipe may name the sliding window its models validate and infer with (``configs/cpu.yaml``: one
window over a whole cropped brain); the plan carries it, inference uses it without a flag, an explicit
``--window`` wins, and plans without one use their training patch (as every version-1 checkpoint did).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fire
import monai.inferers
import pytest
import torch
from monai.bundle import ConfigParser
from test_inference_config import TINY_NET, _write_case, training_recipe

import bundle.data.datalist
import bundle.errors
import bundle.evaluation.files
import bundle.evaluation.metrics
import bundle.evaluation.plots
import bundle.evaluation.reports
import bundle.evaluation.statistics
import bundle.inference.run
import bundle.integrations.cli
import bundle.integrations.cv
import bundle.integrations.export
import bundle.integrations.monailabel
import bundle.options
import bundle.paths
from bundle.errors import OptionError
from bundle.plan.checkpoints import read_plan, save_model
from bundle.plan.network import build_network, check_window, inference_window

PATCH = [16, 16, 16]
WINDOW = [24, 24, 16]  # TINY_NET down-samples 4x per axis (strides 1, 2, 2)


def _checkpoint(path: Path, window: list[int] | None) -> Path:
    torch.manual_seed(0)
    factory = ConfigParser({"net": {**TINY_NET, "_mode_": "callable"}}).get_parsed_content("net")
    network = build_network(factory)
    return save_model(path, network, "regions", PATCH, window=window, inference_recipe=training_recipe())


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_case(tmp_path_factory.mktemp("data"), "Case_001", shape=(30, 26, 20))


def _windows_of_bundle_infer(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[tuple[int, ...]]:
    """Run ``python -m bundle ARGV`` through Fire; the roi_size of every SlidingWindowInferer it built."""
    windows: list[tuple[int, ...]] = []
    original = monai.inferers.SlidingWindowInferer.__init__

    def recording_init(self: Any, roi_size: Any, *args: Any, **kwargs: Any) -> None:
        windows.append(tuple(roi_size))
        original(self, roi_size, *args, **kwargs)

    monkeypatch.setattr(monai.inferers.SlidingWindowInferer, "__init__", recording_init)
    fire.Fire(bundle.integrations.cli.COMMANDS, command=argv)
    return windows


def test_bundle_infer_uses_the_recorded_window_and_an_explicit_one_wins(
    monkeypatch: pytest.MonkeyPatch, case: Path, tmp_path: Path
) -> None:
    checkpoint = _checkpoint(tmp_path / "model.pt", WINDOW)
    assert read_plan(checkpoint)["window"] == WINDOW
    base = ["infer", str(case), "--checkpoint", str(checkpoint), "--tta", "false"]
    assert _windows_of_bundle_infer(monkeypatch, [*base, "--output", str(tmp_path / "a")]) == [tuple(WINDOW)]
    assert (tmp_path / "a" / "Case_001_seg.nii.gz").is_file()
    explicit = [*base, "--output", str(tmp_path / "b"), "--window", "[20,20,20]"]
    assert _windows_of_bundle_infer(monkeypatch, explicit) == [(20, 20, 20)]


def test_a_checkpoint_without_the_key_keeps_its_patch(
    monkeypatch: pytest.MonkeyPatch, case: Path, tmp_path: Path
) -> None:
    """A plan without a window (M4's): the training patch."""
    checkpoint = _checkpoint(tmp_path / "old.pt", None)
    assert read_plan(checkpoint)["window"] is None
    argv = ["infer", str(case), "--checkpoint", str(checkpoint), "--tta", "false", "--output", str(tmp_path / "o")]
    assert _windows_of_bundle_infer(monkeypatch, argv) == [tuple(PATCH)]


def test_a_window_the_network_cannot_take_is_one_sentence_before_any_case(
    monkeypatch: pytest.MonkeyPatch, case: Path, tmp_path: Path
) -> None:
    checkpoint = _checkpoint(tmp_path / "model.pt", WINDOW)
    argv = ["infer", str(case), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "x")]
    message = r"^window: \[18, 20, 20\] is not a multiple of \[4, 4, 4\] per side, .*DynUNet.*; e\.g\. \[20, 20, 20\]$"
    with pytest.raises(OptionError, match=message):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=[*argv, "--window", "[18,20,20]"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(OptionError, match=r"^window: \[16, 16\] is not 3 positive whole numbers"):
        inference_window(read_plan(checkpoint), [16, 16])


def test_training_refuses_a_window_the_network_cannot_take(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"^window: \[24, 24, 18\] is not a multiple of \[4, 4, 4\]"):
        _checkpoint(tmp_path / "bad.pt", [24, 24, 18])
    spec = {"_target_": "bundle.networks.M4UNet", "spatial_dims": 3, "strides": [1, 2, 2, 2, 2, 2]}
    assert check_window([160, 192, 160], spec) == [160, 192, 160]  # configs/cpu.yaml's, for its 5 down-samplings
    with pytest.raises(OptionError, match=r"is not a multiple of \[32, 32, 32\] per side"):
        check_window([160, 200, 160], spec)


def test_the_cpu_recipe_validates_and_infers_with_its_training_patch() -> None:
    """A whole-brain window cost 0.10 mean Dice on unseen cases (issue 22): the 64^3 patch slides instead."""
    parser = ConfigParser()
    root = Path(__file__).resolve().parents[1]
    parser.read_config([str(root / "configs" / "train.yaml"), str(root / "configs" / "cpu.yaml")])
    assert parser.get_parsed_content("window") is None
    assert list(parser.get_parsed_content("validate#inferer").roi_size) == [64, 64, 64]
    plain = ConfigParser()
    plain.read_config(str(root / "configs" / "train.yaml"))
    assert plain.get_parsed_content("window") is None  # M4: the training patch
    assert list(plain.get_parsed_content("validate#inferer").roi_size) == [128, 128, 128]
