"""M2 as one model: the slice gate built into the segmenter, run by `bundle infer`, MONAI Label and the export.

The gate (configs/train_gate.yaml) is trained first; the segmenter's training given it (--gate_checkpoint)
saves one checkpoint holding both (bundle.networks.GatedSegmenter), which every consumer runs as the paper
does: the gate on every slice, the segmenter on the slices it passes, an empty mask elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser
from torch import nn

from bundle.errors import OptionError
from bundle.networks import GatedSegmenter, SliceGateClassifier
from bundle.plan import Checkpoint, save_model, with_gate
from bundle.plan.plan import planned_preprocessing
from bundle.transforms import median_denoise

CONFIGS = REPO_ROOT / "configs"
M2 = ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m2_resunet_tversky.yaml"]
GATE = ["configs/train.yaml", "configs/train_2d.yaml", "configs/train_gate.yaml"]
ENV = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


class _Tumour(nn.Module):
    """A stand-in 2-D segmenter: tumour everywhere (logit +10); counts the slices it sees."""

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(10.0))
        self.slices_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slices_seen += x.shape[0]
        return self.bias + 0.0 * x[:, :1]


class _BrightGate(nn.Module):
    """A stand-in gate with two logits: 'tumour' if the slice's mean of channel 0 exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x[:, 0].mean(dim=(1, 2)) - 0.5)
        return torch.stack([-score, score], dim=1)


def _slices(bright: list[bool]) -> torch.Tensor:
    x = torch.zeros(len(bright), 4, 16, 16)
    x[torch.tensor(bright), 0] = 1.0
    return x


# ------------------------------------------------------------------------------------ the network


def test_the_segmenter_runs_only_on_the_slices_the_gate_passes() -> None:
    segmenter = _Tumour()
    model = GatedSegmenter(segmenter, _BrightGate(), threshold=0.5, out_channels=1).eval()
    out = model(_slices([True, False, True, False]))
    assert out.shape == (4, 1, 16, 16)
    assert (out[[0, 2]] == 10.0).all() and (out[[1, 3]] == -20.0).all()  # rejected: empty logits
    assert segmenter.slices_seen == 2 and (model.slices_total, model.slices_segmented) == (4, 2)
    assert (model(_slices([False, False])) == -20.0).all() and segmenter.slices_seen == 2  # none passed: not run
    # softmax segmenters: background wins on rejected slices
    classes = GatedSegmenter(lambda: nn.Conv2d(4, 4, 1), _BrightGate(), out_channels=4, background_channel=0).eval()
    rejected = classes(_slices([False]))
    assert (rejected.argmax(1) == 0).all()


def test_the_gate_is_frozen_and_training_runs_the_segmenter_alone() -> None:
    gate = _BrightGate()
    model = GatedSegmenter(_Tumour(), gate, gate_size=[8, 8])
    assert not any(p.requires_grad for p in model.gate.parameters())
    model.train()
    assert model.segmenter.training and not model.gate.training  # dropout and batch norm of the gate fixed
    out = model(_slices([False, False]))  # training: the segmenter on every slice, the gate not asked
    assert (out == 10.0).all() and model.slices_total == 0
    # the gate sees its own slice size
    assert model.eval().tumour_probability(_slices([True])).item() == pytest.approx(1.0)


def test_the_gate_has_the_papers_head() -> None:
    """The paper's head, stopping rule and augmentation (docs/methods.md).

    "Average Pooling, Flatten, two Dense layers with ReLU activation, dropout layers, and a softmax output layer".
    """
    gate = SliceGateClassifier(hidden_features=32, dropout=0.3)
    kinds = [type(m).__name__ for m in gate.head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert gate.head[0].in_features == 2048 and gate.head[-1].out_features == 2
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / f) for f in GATE])
    assert parser.get_parsed_content("network_factory#dense_layers") == 2
    assert (parser["monitor"], parser["early_stop_patience"], parser["batch_size"]) == ("val_loss", 30, 16)
    assert parser.get_parsed_content("lr_scheduler_factory#mode") == "min"
    assert "RandZoomd" in [a["_target_"] for a in parser["train#augmentations"]]  # feature scaling (CHOSEN)


def test_a_gate_saved_with_one_dense_layer_still_loads(tmp_path: Path) -> None:
    """Gates saved before the paper's head record no dense_layers; their plan is read as one layer."""
    old = SliceGateClassifier(hidden_features=8, dense_layers=1)
    old.bundle_network_spec = {"_target_": "bundle.networks.SliceGateClassifier", "hidden_features": 8}
    save_model(tmp_path / "gate.pt", old, output_type="gate", patch_size=[32, 32])
    loaded = Checkpoint(tmp_path / "gate.pt")
    assert loaded.plan["network"]["dense_layers"] == 1
    assert len(loaded.network().head) == 4


def test_noise_reduction_is_an_in_plane_median_switched_by_one_key() -> None:
    volume = torch.zeros(1, 5, 5, 3)
    volume[0, 1:4, 1:4, 1] = 1.0
    volume[0, 2, 2, 1] = 9.0  # an impulse inside the brain of one slice: removed
    volume[0, 1:4, 1:4, 0] = 1.0  # a 3 x 3 square: its centre stays, and so do its edges (the brain's extent)
    out = median_denoise(volume)
    assert out[0, 2, 2, 1] == 1.0 and out[0, 2, 2, 0] == 1.0 and isinstance(out, torch.Tensor)
    assert torch.equal(out != 0, volume != 0), "the skull-stripped brain keeps its extent"
    across = torch.zeros(1, 3, 3, 3)
    across[0, :, :, 1] = 1.0  # a whole slice: not filtered across slices
    assert torch.equal(median_denoise(across), across)
    for files in (M2, GATE):  # the gate runs on the segmenter's inputs, so both denoise by default
        for flag, steps in ((None, ["MedianDenoised", "ScaleIntensityd"]), ("false", ["ScaleIntensityd"])):
            parser = ConfigParser()
            parser.read_config([str(REPO_ROOT / f) for f in files])
            if flag is not None:
                parser["noise_reduction"] = flag  # as Fire hands `--noise_reduction false`
            planned = planned_preprocessing(intensity=parser.get_parsed_content("intensity_transform"))
            assert [s["_target_"].rsplit(".", 1)[-1] for s in planned["intensity"]] == steps


def test_a_gate_for_another_preprocessing_or_the_gate_itself_is_refused(tmp_path: Path) -> None:
    gate = _BrightGate()
    gate.bundle_network_spec = {"_target_": "test_m2_model._BrightGate"}
    save_model(tmp_path / "gate.pt", gate, output_type="gate", patch_size=[16, 16])
    segmenter = _Tumour()
    segmenter.bundle_network_spec = {"_target_": "test_m2_model._Tumour", "spatial_dims": 2}
    gated = with_gate(segmenter, str(tmp_path / "gate.pt"), 0.5, "binary")
    scaled = {"intensity": [{"_target_": "monai.transforms.ScaleIntensityd", "minv": 0.0, "maxv": 1.0}]}
    with pytest.raises(OptionError, match=r"^gate_checkpoint: .*gate.pt was trained with another intensity"):
        save_model(tmp_path / "model.pt", gated, output_type="binary", patch_size=[16, 16], preprocessing=scaled)
    with pytest.raises(OptionError, match=r"^gate_checkpoint: the gate itself is being trained"):
        with_gate(segmenter, str(tmp_path / "gate.pt"), 0.5, "gate")
    with pytest.raises(OptionError, match=r"^gate_threshold: 2 is not a probability"):
        with_gate(segmenter, str(tmp_path / "gate.pt"), 2, "binary")


# ------------------------------------------------------------------------------------ bundle infer


def _cases(root: Path, bright: dict[str, slice], depth: int = 12) -> Path:
    rng = np.random.default_rng(3)
    for case, rows in bright.items():
        folder = root / case
        folder.mkdir(parents=True)
        for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            vol = rng.uniform(0.9, 1.1, size=(20, 18, depth)).astype(np.float32)
            if i == 0:
                vol[..., rows] += 2.0  # bright in channel 0: the stand-in gate passes these slices
            nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / f"{case}_{modality}.nii.gz")
    return root


@pytest.mark.slow
def test_bundle_infer_runs_the_models_own_gate_without_flags(tmp_path: Path) -> None:
    """An M2 checkpoint with its gate: `bundle infer` gates by itself; the slices it rejects come out background."""
    from bundle.inference.run import variant_recipe

    gate, segmenter = _BrightGate(), _Tumour()
    gate.bundle_network_spec = {"_target_": "test_m2_model._BrightGate"}
    segmenter.bundle_network_spec = {"_target_": "test_m2_model._Tumour", "spatial_dims": 2}
    save_model(tmp_path / "gate.pt", gate, output_type="gate", patch_size=[16, 16])
    recipe = {**variant_recipe(CONFIGS / "variants" / "m2_resunet_tversky.yaml"), "mask_outside_brain": False}
    model = with_gate(segmenter, str(tmp_path / "gate.pt"), 0.4, "binary")
    save_model(tmp_path / "m2.pt", model, output_type="binary", patch_size=[16, 16], inference_recipe=recipe)
    cases = _cases(tmp_path / "cases", {"Case_0": slice(6, None), "Case_1": slice(2, 5)})
    command = [sys.executable, "-m", "bundle", "infer", str(cases), "--output", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, "--checkpoint", str(tmp_path / "m2.pt")],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Case_0: the gate passed 6 of 12 slices to the segmenter (50.0 %)" in log, log[-3000:]
    assert "Case_1: the gate passed 3 of 12 slices to the segmenter (25.0 %)" in log
    assert "no gate" not in log
    for case, passed in (("Case_0", range(6, 12)), ("Case_1", range(2, 5))):
        seg = np.asarray(nib.load(tmp_path / "out" / f"{case}_seg.nii.gz").dataobj)
        tumour_slices = [z for z in range(seg.shape[2]) if seg[..., z].any()]
        assert tumour_slices == list(passed), case  # every rejected slice is background, every passed one tumour
    # a second gate for a model that holds one is refused with one sentence, before any case
    again = [*command, "--checkpoint", str(tmp_path / "m2.pt"), "--gate_checkpoint", str(tmp_path / "gate.pt")]
    refused = subprocess.run(again, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "gate_checkpoint: " in refused.stderr and "the model holds its gate already" in refused.stderr


def test_monai_label_serves_the_m2_model_gate_first(tmp_path: Path) -> None:
    """MONAI Label's inference (the app's inference config, its task's sequence) on an M2 checkpoint with its gate."""
    from test_label import _serve_like_monai_label

    from bundle.constants import MODALITIES, MSD_CHANNEL_ORDER
    from bundle.inference.run import variant_recipe
    from bundle.integrations.monailabel import PRED_KEY, app_inference_config

    gate, segmenter = _BrightGate(), _Tumour()
    gate.bundle_network_spec = {"_target_": "test_m2_model._BrightGate"}
    segmenter.bundle_network_spec = {"_target_": "test_m2_model._Tumour", "spatial_dims": 2}
    save_model(tmp_path / "gate.pt", gate, output_type="gate", patch_size=[16, 16])
    recipe = {**variant_recipe(CONFIGS / "variants" / "m2_resunet_tversky.yaml"), "mask_outside_brain": False}
    model = with_gate(segmenter, str(tmp_path / "gate.pt"), 0.5, "binary")
    save_model(tmp_path / "m2.pt", model, output_type="binary", patch_size=[16, 16], inference_recipe=recipe)
    volume = np.random.default_rng(0).uniform(0.9, 1.1, size=(20, 18, 10, 4)).astype(np.float32)
    volume[..., 3:7, MSD_CHANNEL_ORDER.index(MODALITIES[0])] += 2.0  # channel 0 of the network: slices 3-6 pass
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "case.nii.gz")
    config = app_inference_config(REPO_ROOT, {"checkpoint": str(tmp_path / "m2.pt"), "tta": False}, "msd")
    pred = _serve_like_monai_label(config, str(tmp_path / "case.nii.gz"))[PRED_KEY]
    assert [z for z in range(pred.shape[-1]) if pred[..., z].any()] == [3, 4, 5, 6]


# ------------------------------------------------------------------------------------ end to end


def _train(files: list[str], out: Path, dataset: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(files).replace(" ", "")]
    command += ["--dataset_dir", str(dataset), "--output_dir", str(out), "--ckpt_dir", str(out.parent / "models")]
    command += ["--epochs", "1", "--val_interval", "1", "--patch_size", "[32,32]", "--slices_per_volume", "2"]
    command += ["--cache", "memory", "--num_workers", "0", "--holdout_fraction", "0", "--num_folds", "2", *extra]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_gate_then_segmenter_make_one_m2_model_that_infer_and_export_run(tmp_path: Path, tiny_demo: Path) -> None:
    """train_gate, then the segmenter with --gate_checkpoint: one model.pt; infer and the export run its gate."""
    tiny = ("--network_factory#channels", "[8,16,32]")
    gate_log = _train(GATE, tmp_path / "gate_run", tiny_demo)
    assert "val_loss" in gate_log and (tmp_path / "models" / "gate.pt").is_file()

    # without its gate: one warning line in training, one in inference
    alone = _train(M2, tmp_path / "alone", tiny_demo, *tiny, "--ckpt_dir", str(tmp_path / "alone_models"))
    assert alone.count("no gate: this M2 segmenter is trained without its slice gate") == 1, alone[-3000:]
    case = next(p for p in tiny_demo.iterdir() if p.is_dir())
    infer = [sys.executable, "-m", "bundle", "infer", str(case)]
    plain = subprocess.run(
        [*infer, "--output", str(tmp_path / "plain"), "--checkpoint", str(tmp_path / "alone_models" / "model.pt")],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (plain.stdout + plain.stderr).count("no gate: this M2 segmenter holds no slice gate") == 1

    # with it: one checkpoint holding both networks and both in the plan
    with_log = _train(M2, tmp_path / "m2", tiny_demo, *tiny, "--gate_checkpoint", str(tmp_path / "models" / "gate.pt"))
    assert "no gate" not in with_log and "built into the model" in with_log
    checkpoint = Checkpoint(tmp_path / "models" / "model.pt")
    network = checkpoint.plan["network"]
    assert network["_target_"] == "bundle.networks.GatedSegmenter"
    assert network["gate"]["_target_"] == "bundle.networks.SliceGateClassifier" and network["gate_size"] == [32, 32]
    assert network["segmenter"]["_target_"] == "bundle.networks.ResUNet"
    gate_weights = Checkpoint(tmp_path / "models" / "gate.pt").weights
    for key, value in gate_weights.items():  # the gate by value, untouched by the segmenter's training
        assert torch.equal(checkpoint.weights[f"gate.{key}"], value), key
    assert any(k.startswith("segmenter.") for k in checkpoint.weights)

    gated = subprocess.run(
        [*infer, "--output", str(tmp_path / "gated"), "--checkpoint", str(tmp_path / "models" / "model.pt")],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gated.returncode == 0, gated.stderr[-3000:]
    assert f"{case.name}: the gate passed " in gated.stdout + gated.stderr
    assert (tmp_path / "gated" / f"{case.name}_seg.nii.gz").is_file()

    export = [sys.executable, "-m", "bundle", "export", "--output", str(tmp_path / "zoo")]
    exported = subprocess.run(
        [*export, "--checkpoint", str(tmp_path / "models" / "model.pt")],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    weights = torch.load(tmp_path / "zoo" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("gate.") for k in weights) and any(k.startswith("segmenter.") for k in weights)
    scripted = torch.jit.load(str(tmp_path / "zoo" / "models" / "model.ts"))
    assert {name for name, _ in scripted.named_children()} == {"gate", "segmenter"}
    x = torch.rand(3, 4, 32, 32)
    with torch.no_grad():
        reference = Checkpoint(tmp_path / "models" / "model.pt").network()(x)
        torch.testing.assert_close(scripted(x), reference)
