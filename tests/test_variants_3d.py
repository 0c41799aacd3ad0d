"""Every 3-D variant file trains for one epoch on tiny demo data through ``monai.bundle run training``.

Each variant is stacked over ``configs/train.yaml`` exactly as documented
(``--config_file "['configs/train.yaml','configs/variants/X.yaml']"``); only sizes are shrunk
(widths, patch, one epoch) so a run takes seconds on a CPU. ``m4_resunet_ds`` goes through
``monai.bundle.run`` (the function behind ``python -m monai.bundle run``) and, marked slow, through the
command line itself; the others through ``ConfigWorkflow`` (what ``run`` builds), which exposes the
network and the evaluator's metrics.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle.data import generate_demo_dataset
from bundle.plan import network_from_spec, read_plan

TINY = {
    "num_folds": 2,
    "patch_size": [32, 32, 32],  # divisible by 16 for the 5-level nets
    "epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "learning_rate": 1e-3,
}

# variant: (network class it must build, tiny width overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "m4_resunet_ds": ("M4UNet", {"network_factory#filters": [4, 8, 16, 32, 64]}),  # 5 levels: 32^3 patches
    "unet": ("UNet", {"network_factory#channels": [4, 8, 16, 32, 64]}),
    "attention_unet": ("AttentionUnet", {"network_factory#channels": [4, 8, 16, 32, 64]}),
    "segresnet": ("SegResNet", {"network_factory#init_filters": 8}),  # GroupNorm's 8 groups
    "dynunet": ("DynUNet", {"network_factory#filters": [4, 8, 16, 32, 64]}),
    # feature_size a multiple of 12; every patch side divisible by 32, and one of them 64 because a
    # 1 x 1 x 1 bottleneck breaks instance norm in training (the demo's 64^3 and real 128^3 are fine)
    "swinunetr": (
        "SwinUNETR",
        {"network_factory#feature_size": 12, "network_factory#depths": [1, 1, 1, 1], "patch_size": [64, 32, 32]},
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine OpenMP threads waiting on each other are very slow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled 32 x 32 x 24 demo phantoms in the BraTS 2021 layout."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=0, shape=(32, 32, 24))


def _config_files(variant: str) -> list[str]:
    return ["configs/train.yaml", f"configs/variants/{variant}.yaml"]


def _settings(variant: str, tmp_path: Path, dataset_dir: Path) -> dict[str, Any]:
    return {
        **TINY,
        **VARIANTS[variant][1],
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "models"),
    }


def _run_cli(variant: str, settings: dict[str, Any]) -> None:
    """``python -m monai.bundle run training --config_file "['configs/train.yaml','configs/variants/X.yaml']" ...``."""
    files = ",".join(f"'{f}'" for f in _config_files(variant))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"[{files}]"]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _run_workflow(variant: str, settings: dict[str, Any]) -> tuple[torch.nn.Module, float]:
    """Run ``training`` through ConfigWorkflow; return the network and the evaluator's val_mean_dice."""
    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / f) for f in _config_files(variant)],
        workflow_type="train",
        run_id="training",
        bundle_root=str(REPO_ROOT),
        **settings,
    )
    workflow.initialize()
    workflow.run()
    network = workflow.parser.get_parsed_content("network")
    dice = float(workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"])
    workflow.finalize()
    return network, dice


def _build_network(variant: str, settings: dict[str, Any]) -> torch.nn.Module:
    """The (tiny) network the variant's config stack builds with these settings."""
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / f) for f in _config_files(variant)])
    parser.update(settings)
    return parser.get_parsed_content("network_def")


def _check_one_epoch(variant: str, out: Path, network: torch.nn.Module, evaluator_dice: float | None) -> None:
    """One logged epoch with a finite loss, val_mean_dice in [0, 1], and model.pt holding this network."""
    assert type(network).__name__ == VARIANTS[variant][0]
    rows = list(csv.DictReader((out / "out" / "metrics_per_epoch.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert math.isfinite(float(rows[0]["loss"]))
    dice = float(rows[0]["val_mean_dice"])
    assert math.isfinite(dice) and 0.0 <= dice <= 1.0, f"val_mean_dice {dice}"
    if evaluator_dice is not None:
        assert evaluator_dice == pytest.approx(dice, abs=1e-6)

    best = out / "models" / "model.pt"
    assert best.is_file(), "best checkpoint model.pt not written"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    # the record names this variant's network, so inference rebuilds it without the variant file
    assert saved["model_record"]["network"]["_target_"].endswith("." + VARIANTS[variant][0])
    salient = variant == "m4_resunet_ds"  # M4's best setting adds the salient channel, and records it
    assert saved["model_record"]["input_channels"] == ["t1", "t1ce", "t2", "flair"] + ["salient"] * salient
    rebuilt = network_from_spec(read_plan(best)["network"])
    assert type(rebuilt).__name__ == VARIANTS[variant][0]
    state = saved["model"]
    rebuilt.load_state_dict(state)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    expected = network.state_dict()  # the checkpoint is this variant's network, key for key and shape for shape
    assert set(state) == set(expected)
    assert all(state[k].shape == expected[k].shape for k in expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_one_epoch_through_the_bundle(variant: str, tmp_path: Path, tiny_demo: Path) -> None:
    settings = _settings(variant, tmp_path, tiny_demo)
    if variant == "m4_resunet_ds":
        # monai.bundle.run is what `python -m monai.bundle run` calls (the CLI itself: the slow test below)
        monai.bundle.run(
            "training",
            config_file=[str(REPO_ROOT / f) for f in _config_files(variant)],
            bundle_root=str(REPO_ROOT),
            **settings,
        )
        network, evaluator_dice = _build_network(variant, settings), None
    else:
        network, evaluator_dice = _run_workflow(variant, settings)
    _check_one_epoch(variant, tmp_path, network, evaluator_dice)


@pytest.mark.slow  # two fresh interpreters importing torch + MONAI, a 7-level net at 128 x 64 x 64: ~1-2 min
def test_m4_best_setting_trains_and_segments_through_the_command_line(tmp_path: Path, tiny_demo: Path) -> None:
    """M4's best setting end to end as users type it: 7 levels (tiny widths), 5 input channels, then inference.

    Inference gets no flag: the checkpoint records the five channels, so inference.yaml adds the salient one.
    """
    settings = {
        **_settings("m4_resunet_ds", tmp_path, tiny_demo),
        "network_factory#filters": [2, 4, 4, 4, 4, 4, 4],  # the paper's 7 levels at tiny widths
        "patch_size": [128, 64, 64],  # multiples of 64, and a 2 x 1 x 1 bottleneck for instance norm
    }
    _run_cli("m4_resunet_ds", settings)
    _check_one_epoch("m4_resunet_ds", tmp_path, _build_network("m4_resunet_ds", settings), None)
    record = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model_record"]
    assert record["network"]["in_channels"] == 5 and len(record["network"]["strides"]) == 7
    assert record["patch_size"] == [128, 64, 64]

    out = tmp_path / "segmentations"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    cmd += ["--dataset_dir", str(tiny_demo), "--checkpoint", str(tmp_path / "models" / "model.pt")]
    cmd += ["--output_dir", str(out), "--tta", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    segmentations = sorted(out.rglob("*_seg.nii.gz"))
    assert len(segmentations) == 4, segmentations  # every labelled tiny case
    for path in segmentations:
        labels = nib.load(path)
        assert labels.shape == (32, 32, 24)
        assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= {0, 1, 2, 4}
