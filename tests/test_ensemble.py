"""Fold ensembles: ``python -m bundle infer --checkpoint a.pt b.pt`` and inference.yaml with a list of checkpoints."""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import Inferer
from test_inference_config import TINY_NET, _checkpoint, _write_case

from bundle.inference.inferers import EnsembleInferer
from bundle.inference.run import infer
from bundle.integrations.cli import _checkpoint_lists, main
from bundle.paths import BUNDLE_ROOT
from bundle.plan import CheckpointEnsemble, CheckpointError, ModelEnsemble, load_checkpoints, save_model
from bundle.plan.checkpoints import default_recipe
from bundle.plan.network import build_network

pytestmark = pytest.mark.usefixtures("single_thread")
WINDOW = ["--window", "[16,16,16]"]


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two checkpoints of the same plan with different weights (two folds), and one case to segment."""
    root = tmp_path_factory.mktemp("ensemble")
    a = _checkpoint(root / "fold_0.pt", TINY_NET, seed=0)
    b = _checkpoint(root / "fold_1.pt", TINY_NET, seed=1)
    return a, b, _write_case(root / "data", "Case_001")


@pytest.fixture(scope="module")
def each_fold(two_folds, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Each fold's probabilities of the case, alone."""
    a, b, case = two_folds
    root = tmp_path_factory.mktemp("each")
    return [_read(_infer(case, root / name, str(ckpt)), "prob") for name, ckpt in (("a", a), ("b", b))]


def _read(folder: Path, postfix: str) -> np.ndarray:
    return np.asarray(nib.load(folder / f"Case_001_{postfix}.nii.gz").dataobj)


def _infer(case: Path, out: Path, checkpoint, **kwargs) -> Path:
    infer(str(case), output=str(out), checkpoint=checkpoint, window=[16, 16, 16], save_probabilities=True, **kwargs)
    return out


def test_an_ensemble_of_one_checkpoint_is_that_checkpoint_s_own_result(tmp_path: Path, two_folds) -> None:
    a, _, case = two_folds
    alone = _infer(case, tmp_path / "alone", str(a), save_uncertainty=True)
    listed = _infer(case, tmp_path / "listed", [str(a)], save_uncertainty=True)
    for postfix in ("seg", "prob", "uncertainty"):
        np.testing.assert_array_equal(_read(listed, postfix), _read(alone, postfix))


@pytest.mark.slow
def test_bundle_infer_checkpoint_a_b_averages_the_folds_probabilities(tmp_path: Path, two_folds, each_fold) -> None:
    """The documented command, through ``python -m bundle``: both files after ``--checkpoint`` (Fire alone would
    take ``b.pt`` for an input to segment); the probabilities are the mean of each model's, labels follow them."""
    a, b, case = two_folds
    command = [sys.executable, "-m", "bundle", "infer", "--checkpoint", str(a), str(b), str(case)]
    result = subprocess.run(
        [*command, "--output", str(tmp_path / "ab"), "--save_probabilities", "true", *WINDOW],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "an ensemble of 2 checkpoints" in result.stderr + result.stdout
    np.testing.assert_allclose(_read(tmp_path / "ab", "prob"), (each_fold[0] + each_fold[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("typed", ["['{a}','{b}']", "[{a},{b}]"])
def test_monai_bundle_run_with_a_list_of_checkpoints_runs_the_ensemble(
    tmp_path: Path, two_folds, each_fold, monkeypatch: pytest.MonkeyPatch, typed: str
) -> None:
    """``python -m monai.bundle run --config_file configs/inference.yaml --checkpoint "['a.pt','b.pt']"`` (Fire reads
    a list) or ``"[a.pt,b.pt]"`` (Fire keeps the string): the mean of the two models' probabilities."""
    import fire
    import monai.bundle.scripts

    a, b, case = two_folds
    monkeypatch.chdir(BUNDLE_ROOT)
    command = ["run", "--config_file", "configs/inference.yaml", "--dataset_dir", str(case), *WINDOW]
    command += ["--checkpoint", typed.format(a=a, b=b), "--output_dir", str(tmp_path / "ab")]
    fire.Fire({"run": monai.bundle.scripts.run}, command=[*command, "--save_probabilities", "true"])
    np.testing.assert_allclose(_read(tmp_path / "ab", "prob"), (each_fold[0] + each_fold[1]) / 2, atol=1e-6)


def test_checkpoint_files_after_the_flag_become_one_list() -> None:
    assert _checkpoint_lists(["infer", "case", "--checkpoint", "a.pt", "b.pth", "--tta", "false"]) == [
        "infer",
        "case",
        "--checkpoint",
        "['a.pt','b.pth']",
        "--tta",
        "false",
    ]
    # one file, another command, or the list typed as one value: as typed
    assert _checkpoint_lists(["infer", "--checkpoint", "a.pt", "case"]) == ["infer", "--checkpoint", "a.pt", "case"]
    assert _checkpoint_lists(["export", "--checkpoint", "a.pt", "b.pt"]) == ["export", "--checkpoint", "a.pt", "b.pt"]
    assert _checkpoint_lists(["infer", "--checkpoint", "[a,b]"]) == ["infer", "--checkpoint", "[a,b]"]


def _variant(path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    from monai.bundle import ConfigParser

    net = {**TINY_NET, **kwargs.pop("net", {})}
    factory = ConfigParser({"net": {**net, "_mode_": "callable"}}).get_parsed_content("net")
    return save_model(path, build_network(factory), patch_size=(16, 16, 16), **kwargs)


def test_checkpoints_whose_plans_disagree_are_refused_naming_both_files_and_the_key(
    tmp_path: Path, two_folds, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    a, _, case = two_folds
    no_thresholds = {k: v for k, v in default_recipe().items() if not k.endswith("_threshold")}
    classes = _variant(
        tmp_path / "classes.pt", output_type="classes", net={"out_channels": 4}, inference_recipe=no_thresholds
    )
    clipped = _variant(
        tmp_path / "clipped.pt",
        preprocessing={
            "intensity": [{"_target_": "bundle.transforms.ZScoreIntensityd", "nonzero": False, "channel_wise": True}],
            "target": {"_target_": "bundle.transforms.LabelsToRegionsd"},
        },
    )
    five = _variant(tmp_path / "five.pt", net={"in_channels": 5}, preprocessing={"salient_channel": True})
    relabelled = tmp_path / "relabelled.pt"  # another label convention (a hand-edited plan): NCR and ED swapped
    content = torch.load(a, weights_only=True)
    internal = content["model_record"]["label_convention"]["internal"]
    internal["1"], internal["2"] = internal["2"], internal["1"]
    torch.save(content, relabelled)
    for other, key in (
        (classes, "output_type"),
        (relabelled, "label_convention.internal.1"),
        (clipped, "preprocessing.intensity[0].nonzero"),
        (five, "input_channels"),
    ):
        with pytest.raises(CheckpointError) as info:
            CheckpointEnsemble([a, other])
        message = str(info.value)
        assert message.startswith(f"{other}: its plan's {key} ") and f"differs from {a}'s" in message, message
    with pytest.raises(CheckpointError, match="named twice"):
        load_checkpoints([a, a])
    # through python -m bundle: the sentence, exit 1, nothing segmented
    out = tmp_path / "out"
    argv = ["bundle", "infer", str(case), "--checkpoint", str(a), str(classes), "--output", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert f"{classes}: its plan's output_type ('classes') differs from {a}'s ('regions')" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


class _Recorder(Inferer):
    """An inner inferer returning a volume-sized output per member; records which earlier outputs are alive."""

    def __init__(self) -> None:
        self.outputs: list[weakref.ref] = []
        self.alive_at_call: list[int] = []

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        self.alive_at_call.append(sum(ref() is not None for ref in self.outputs))
        out = network(inputs)
        self.outputs.append(weakref.ref(out))
        return out


class _Constant(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((1, 3, *x.shape[2:]), self.value)


def test_an_ensemble_runs_model_by_model_keeping_one_running_sum() -> None:
    """With four models, each one runs while at most one earlier output (the running sum) is alive."""
    recorder = _Recorder()
    members = ModelEnsemble([_Constant(v) for v in (0.1, 0.2, 0.3, 0.6)])
    mean = EnsembleInferer(recorder)(torch.zeros(1, 4, 8, 8, 8), members)
    assert recorder.alive_at_call == [0, 1, 1, 1]
    torch.testing.assert_close(mean, torch.full((1, 3, 8, 8, 8), 0.3))
    with pytest.raises(TypeError, match="EnsembleInferer"):
        members(torch.zeros(1, 4, 8, 8, 8))


def test_the_ensemble_s_uncertainty_is_the_std_over_every_flip_of_every_model() -> None:
    flips = {0: torch.tensor([0.1, 0.3, 0.2, 0.6]), 1: torch.tensor([0.9, 0.7, 0.8, 0.8])}

    class _Flips(Inferer):
        def __call__(self, inputs, network, *args, **kwargs):
            values = flips[network.value]
            return {"mean": values.mean().reshape(1, 1), "std": values.std(unbiased=False).reshape(1, 1)}

    out = EnsembleInferer(_Flips())(torch.zeros(1), ModelEnsemble([_Constant(0), _Constant(1)]))
    every = torch.cat(list(flips.values()))
    assert out["mean"].item() == pytest.approx(every.mean().item())
    assert out["std"].item() == pytest.approx(every.std(unbiased=False).item(), abs=1e-6)
