"""Each method's inference recipe: recorded by training, run by inference, overridden by the user (bundle/).

The end-to-end tests run small checkpoints of each output type through the entry points users type
(``python -m monai.bundle run --config_file configs/inference.yaml``, ``python -m bundle infer``) and
read the effect off the files written: with ``save_probabilities`` the label map of a recipe without
post-processing is exactly the rule applied to the written probabilities, and M4's is exactly its
four steps applied to them by hand; ``save_uncertainty`` (the std across flips) is zero for one pass.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, shared_samples_dir
from monai.bundle import ConfigParser
from scipy import ndimage
from test_inference_config import _write_case, single_thread, training_recipe  # noqa: F401 (an autouse fixture)

from bundle.constants import ED, ET, NCR
from bundle.data.labels import bounding_box, to_internal
from bundle.errors import OptionError, find_user_error
from bundle.evaluation.files import load_label_map
from bundle.inference.postprocessing import (
    close_tumour_regions,
    remove_small_tumour_components,
    small_et_components_to_ncr,
    small_et_volume_to_ncr,
)
from bundle.inference.run import infer, variant_recipe
from bundle.inference.to_labels import regions_to_labels
from bundle.plan import ModelPlan, migrate, read_plan, save_model
from bundle.plan.network import build_network
from bundle.plan.plan import planned_preprocessing
from bundle.plan.recipes import RECIPE_KEYS, STEPS, normalise_recipe, recipe_for, resolve_recipe

CONFIGS = REPO_ROOT / "configs"
VARIANTS = sorted((CONFIGS / "variants").glob("*.yaml"))
TWO_D = ("m1_la_resunet", "m2_resunet_tversky", "m3_resse_lka_unet", "unet_2d")
STACKS = {
    "m1": ("train.yaml", "train_2d.yaml", "variants/m1_la_resunet.yaml"),
    "m2": ("train.yaml", "train_2d.yaml", "variants/m2_resunet_tversky.yaml"),
    "m3": ("train.yaml", "train_2d.yaml", "variants/m3_resse_lka_unet.yaml"),
}
M4 = training_recipe()
M1, M2, M3 = (training_recipe(*STACKS[m]) for m in ("m1", "m2", "m3"))


def _stack(variant: Path) -> list[str]:
    two_d = variant.stem in TWO_D
    return [str(CONFIGS / "train.yaml")] + ([str(CONFIGS / "train_2d.yaml")] if two_d else []) + [str(variant)]


# ------------------------------------------------------------------------------------ the recipes themselves


def test_each_method_states_its_inference_and_the_papers_numbers() -> None:
    assert normalise_recipe(M4, "regions") == {
        "tta": True,
        "wt_threshold": 0.45,
        "tc_threshold": 0.40,
        "et_threshold": 0.45,
        "mask_outside_brain": True,
        "remove_unconfident_components": False,  # ours; off for every paper's method
        "et_components_to_ncr": True,
        "et_component_min_size": 16,
        "et_component_min_prob": 0.9,
        "et_volume_to_ncr": True,
        "et_min_volume": 73,
        "et_volume_min_prob": 0.9,
        "remove_small_components": True,
        "min_component_size": 50,
        "closing": True,
        "closing_size": 3,
        "closing_element": "cross",
    }
    # M1-M3: one pass, their own rule, none of M4's clean-up steps; every method masks the outside of the brain
    for recipe, output_type in ((M1, "regions"), (M2, "binary"), (M3, "classes")):
        checked = normalise_recipe(recipe, output_type)
        assert checked["tta"] is False and checked["mask_outside_brain"] is True, recipe
        assert not any(checked[step] for step in STEPS if step != "mask_outside_brain"), recipe
    assert (M1["wt_threshold"], M1["tc_threshold"], M1["et_threshold"]) == (0.5, 0.5, 0.5)
    m2, m3 = normalise_recipe(M2, "binary"), normalise_recipe(M3, "classes")
    assert m2["binary_threshold"] == 0.5 and "wt_threshold" not in m2 and "wt_threshold" not in m3


def _planned(stack: list[str], **settings: object) -> dict:
    """The preprocessing part of the plan a training config stack records (without building its network)."""
    parser = ConfigParser()
    parser.read_config(stack)
    for key, value in settings.items():
        parser[key] = value
    return planned_preprocessing(
        parser.get_parsed_content("spacing"),
        parser.get_parsed_content("salient_channel"),
        parser.get_parsed_content("intensity_transform"),
        parser.get_parsed_content("label_transform"),
    )


@pytest.mark.parametrize("variant", [CONFIGS / "train.yaml", *VARIANTS], ids=lambda p: p.stem)
def test_every_stack_plans_its_preprocessing_and_recipe_by_value(variant: Path) -> None:
    """What a checkpoint records of its preprocessing is the steps themselves, with their numbers."""
    stack = [str(variant)] if variant.name == "train.yaml" else _stack(variant)
    full = ConfigParser()
    full.read_config(stack)
    assert recipe_for(full.get_parsed_content("inference_recipe"), full.get_parsed_content("output_type"))
    intensity = [step["_target_"].rsplit(".", 1)[-1] for step in _planned(stack)["intensity"]]
    expected = {
        "m2_resunet_tversky": ["MedianDenoised", "ScaleIntensityd"],
        "m3_resse_lka_unet": ["ClipNonzeroPercentilesd", "ZScoreIntensityd"],
    }.get(variant.stem, ["ZScoreIntensityd"])
    assert intensity == expected
    if variant.stem == "m3_resse_lka_unet":  # CLAHE when asked for, with its numbers
        steps = _planned(stack, clahe="yes")["intensity"]
        assert steps[1] == {"_target_": "bundle.transforms.CLAHEd", "clip_limit": 2.0, "tiles": [8, 8]}
        assert steps[0]["lower"] == 0.5 and steps[0]["upper"] == 99.5


@pytest.mark.parametrize(
    ("change", "output_type", "message"),
    [
        ({"tta": "ture"}, "regions", r"inference_recipe#tta: 'ture' is not a boolean"),
        ({"typo_threshold": 0.5}, "regions", r"inference_recipe#typo_threshold: not a recipe key"),
        ({"wt_threshold": 1.5}, "regions", r"inference_recipe#wt_threshold: 1.5 is not a probability"),
        ({"et_min_volume": 7.5}, "regions", r"inference_recipe#et_min_volume: 7.5 is not a whole number"),
        ({"closing_size": 4}, "regions", r"inference_recipe#closing_size: 4 is not odd"),
        ({}, "classes", r"inference_recipe#wt_threshold: a class model \(softmax, argmax\) has no such rule"),
        ({}, "binary", r"inference_recipe#binary_threshold: missing; a binary model"),
    ],
)
def test_a_bad_recipe_is_one_sentence_naming_the_key(change: dict, output_type: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        normalise_recipe({**M4, **change}, output_type)


def test_steps_need_their_numbers_and_binary_models_have_no_et() -> None:
    no_size = {k: v for k, v in M4.items() if k != "min_component_size"}
    with pytest.raises(OptionError, match="min_component_size: missing; the remove_small_components step is on"):
        normalise_recipe(no_size, "regions")
    assert "min_component_size" not in normalise_recipe({**no_size, "remove_small_components": False}, "regions")
    with pytest.raises(OptionError, match=r"et_components_to_ncr: a binary model .* has no ET"):
        normalise_recipe({**M2, "et_components_to_ncr": True, "et_component_min_size": 16}, "binary")


def test_training_records_the_checked_recipe_and_refuses_a_bad_one(tmp_path: Path) -> None:
    net = torch.nn.Conv3d(4, 3, 1)
    net.bundle_network_spec = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
    state = ModelPlan(net, "regions", [8, 8, 8], inference_recipe={**M4, "tta": "false"}).state_dict()
    assert state["inference_recipe"]["tta"] is False and state["plan_version"] == 2
    assert ModelPlan(net, "gate", [8, 8], inference_recipe=M4).state_dict()["inference_recipe"] is None
    # training's initialize step stops on a bad block before any case is read
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["inference_recipe#et_min_volume"] = -3
    parser["network_factory#filters"] = [4, 8, 8, 8, 8, 8]
    parser["device"] = "$torch.device('cpu')"
    step = next(i for i, s in enumerate(parser["initialize"]) if "check_resume(@model_plan" in str(s))
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content(f"initialize#{step}")
    assert str(find_user_error(raised.value)).startswith("inference_recipe#et_min_volume: -3 is not a whole number")


@pytest.mark.parametrize("method", ["m3", "m2"])
def test_a_2d_methods_training_config_records_its_recipe_and_preprocessing(method: str) -> None:
    """train.yaml's model_plan with a variant over it: what model.pt and every last checkpoint hold."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in STACKS[method]])
    parser["network_factory#channels"] = [4, 8, 16, 32, 64]
    parser["device"] = "$torch.device('cpu')"
    if method == "m3":
        parser["clahe"] = "yes"
    plan = parser.get_parsed_content("model_plan").state_dict()
    assert plan["inference_recipe"] == normalise_recipe({"m3": M3, "m2": M2}[method], plan["output_type"])
    assert plan["output_type"] == {"m3": "classes", "m2": "binary"}[method]
    intensity = [step["_target_"].rsplit(".", 1)[-1] for step in plan["preprocessing"]["intensity"]]
    expected = {
        "m3": ["ClipNonzeroPercentilesd", "CLAHEd", "ZScoreIntensityd"],
        "m2": ["MedianDenoised", "ScaleIntensityd"],  # M2's noise reduction, then [0, 1]
    }
    assert intensity == expected[method]
    assert (
        plan["preprocessing"]["target"]
        == {
            "m3": None,
            "m2": {"_target_": "bundle.transforms.LabelsToRegionsd", "regions": {"WT": [1, 2, 3]}},
        }[method]
    )


# ------------------------------------------------------------------------------------ resolving a run's recipe


def _record(output_type: str, recipe: dict | None) -> dict:
    return {
        "output_type": output_type,
        "inference_recipe": None if recipe is None else normalise_recipe(recipe, output_type),
    }


def test_the_checkpoints_recipe_runs_and_options_override_it() -> None:
    assert resolve_recipe(_record("classes", M3)) == normalise_recipe(M3, "classes")
    assert resolve_recipe(_record("regions", M4), options={"tta": "false", "closing": False})["tta"] is False
    # a variant's block given for this run replaces the checkpoint's
    assert resolve_recipe(_record("regions", M4), given=M1) == normalise_recipe(M1, "regions")
    # a step switched on for M3 has its numbers in M3's plan (train.yaml's, M4's), or the user's
    on = resolve_recipe(_record("classes", M3), options={"et_volume_to_ncr": True, "et_min_volume": 30})
    assert (on["et_volume_to_ncr"], on["et_min_volume"], on["et_volume_min_prob"]) == (True, 30, 0.9)
    # a step switched on whose numbers the recipe lacks: one sentence
    bare = {k: v for k, v in normalise_recipe(M3, "classes").items() if k != "min_component_size"}
    with pytest.raises(OptionError, match=r"^min_component_size: missing; the remove_small_components step is on"):
        resolve_recipe(_record("classes", bare), options={"remove_small_components": True})


@pytest.mark.parametrize(
    ("output_type", "recipe", "options", "message"),
    [
        ("classes", M3, {"wt_threshold": 0.3}, r"^wt_threshold: a class model .* this checkpoint cannot use it"),
        ("binary", M2, {"et_components_to_ncr": "yes"}, r"^et_components_to_ncr: a binary model .* has no ET"),
        ("regions", M4, {"binary_threshold": 0.5}, r"^binary_threshold: a region model .* cannot use it"),
        ("classes", M3, {"et_min_volume": 10}, r"^et_min_volume: the et_volume_to_ncr step is off .*set .* true"),
        ("regions", M4, {"closing": "ture"}, r"^closing: 'ture' is not a boolean"),
        ("regions", M4, {"overlap_size": 3}, r"^overlap_size: not a recipe option"),
        (
            "regions",
            M4,
            {"remove_unconfident_components": "true"},
            r"^component_min_prob: missing; .*\(give --component_min_prob\)",
        ),
        ("regions", M4, {"component_min_prob": 0.9}, r"^component_min_prob: the remove_unconfident_components step"),
        ("regions", M4, {"remove_unconfident_components": True, "component_min_prob": 1.5}, r"component_min_prob"),
    ],
)
def test_an_option_the_recipe_cannot_honour_is_an_error(output_type, recipe, options, message) -> None:
    with pytest.raises(OptionError, match=message):
        resolve_recipe(_record(output_type, recipe), options=options)


def test_another_methods_recipe_must_fit_the_model() -> None:
    with pytest.raises(OptionError, match=r"inference_recipe#wt_threshold: missing; a region model"):
        resolve_recipe(_record("regions", M4), given=M3)


def _v1(output_type: str, recipe: dict | None = None) -> dict:
    """A model record as the bundle wrote it before plans (version 1), with or without a recipe."""
    record = {"network": {"_target_": "torch.nn.Conv3d"}, "output_type": output_type, "patch_size": [16] * 3}
    return {**record, "inference_recipe": recipe} if recipe is not None else record


def test_a_checkpoint_without_a_recipe_runs_m4s_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bundle.plan.plan"):
        plan = migrate(_v1("regions"), "old.pt")
    assert resolve_recipe(plan) == normalise_recipe(M4, "regions")
    assert "old.pt records no inference recipe" in caplog.text and "running M4's recipe" in caplog.text
    # as inference ran such checkpoints before: class models argmax, binary models a 0.5 mask, no ET steps
    classes = resolve_recipe(migrate(_v1("classes")))
    assert "wt_threshold" not in classes and classes["tta"] and classes["closing"]
    binary = resolve_recipe(migrate(_v1("binary")))
    assert binary["binary_threshold"] == 0.5 and not binary["et_components_to_ncr"] and not binary["et_volume_to_ncr"]
    assert set(binary) <= set(RECIPE_KEYS)
    # a version-1 recipe without a step inference added later runs without it, and keeps the numbers then used
    old = {k: v for k, v in normalise_recipe(M1, "regions").items() if k != "mask_outside_brain"}
    old = {k: v for k, v in old.items() if k not in ("closing_size", "closing_element")}
    with caplog.at_level(logging.INFO, logger="bundle.plan.plan"):
        recipe = resolve_recipe(migrate(_v1("regions", {**old, "train_config": ["configs/train.yaml"]}), "m1.pt"))
    assert recipe["mask_outside_brain"] is False and (recipe["closing_size"], recipe["closing_element"]) == (3, "cross")
    assert "m1.pt records its recipe without mask_outside_brain" in caplog.text


def test_bundle_infer_takes_a_variants_recipe_from_config_file(tmp_path: Path) -> None:
    assert variant_recipe("configs/variants/m3_resse_lka_unet.yaml") == M3
    assert variant_recipe("configs/variants/segresnet.yaml") == M4  # a baseline trains, and infers, as train.yaml
    assert variant_recipe("configs/variants/m4_resunet_ds.yaml") == M4  # a variant setting network_factory#... too
    # a variant that overrides ids of another file of its stack (a 2-D one: train_2d.yaml's) is read as it is
    variant = tmp_path / "mine.yaml"
    variant.write_text("network_factory: {_target_: UNet}\ntrain#slice_only#x: 1\ninference_recipe: {tta: false}\n")
    assert variant_recipe(variant) == {"tta": False}
    variant.write_text("inference_recipe: [tta]\n")
    with pytest.raises(OptionError, match="inference_recipe is not a block of keys"):
        variant_recipe(variant)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.stem for v in VARIANTS])
def test_python_m_bundle_infer_config_file_works_for_every_variant(
    variant: Path, case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``python -m bundle infer CASE --config_file configs/variants/X.yaml`` (issue: KeyError network_factory).

    A checkpoint of the variant's kind (its output type, 2-D or 3-D) segments the case with the
    variant's recipe, read through Fire and the command's entry point as users type it.
    """
    import yaml

    from bundle.integrations.cli import main

    content = yaml.safe_load(variant.read_text())
    output_type = content.get("output_type", "regions")
    network = content.get("network_factory", {})
    dims = network.get("spatial_dims", content.get("network_factory#spatial_dims", 3))
    checkpoint = _checkpoint(tmp_path / "model.pt", output_type, variant_recipe(variant), dims)
    out = tmp_path / "out"
    argv = ["bundle", "infer", str(case), "--output", str(out), "--checkpoint", str(checkpoint), "--amp", "false"]
    monkeypatch.setattr(sys, "argv", [*argv, "--config_file", f"configs/variants/{variant.name}"])
    with caplog.at_level(logging.INFO, logger="bundle.inference.run"):
        main()
    assert f"running the inference recipe of {CONFIGS / 'variants' / variant.name}" in caplog.text
    seg = np.asarray(nib.load(out / "Case_001_seg.nii.gz").dataobj)
    assert seg.shape == nib.load(next(case.glob("*_t1.nii.gz"))).shape and seg.any()


# ------------------------------------------------------------------------------------ end to end


def _checkpoint(
    path: Path, output_type: str, recipe: dict, spatial_dims: int, preprocessing: dict | None = None
) -> Path:
    """A one-layer network with random (so flip-dependent) 3x3 weights, saved as training saves models.

    ``preprocessing``: the plan's (default: that of the method of the output type, M4, M3 or M2).
    """
    out_channels = {"regions": 3, "classes": 4, "binary": 1}[output_type]
    conv = "torch.nn.Conv3d" if spatial_dims == 3 else "torch.nn.Conv2d"
    spec = {"_target_": conv, "in_channels": 4, "out_channels": out_channels, "kernel_size": 3, "padding": 1}
    torch.manual_seed(3)
    network = build_network(ConfigParser({"net": {**spec, "_mode_": "callable"}}).get_parsed_content("net"))
    with torch.no_grad():
        network.weight.mul_(4.0)  # confident and speckled: small components for the steps to act on
        if output_type == "binary":  # tumour where T1ce is bright (M2's inputs are scaled to [0, 1])
            network.weight.zero_()
            network.weight[(0, 1, *[1] * spatial_dims)] = 10.0
            network.bias.fill_(-5.0)
    patch = [16] * spatial_dims
    method = {"regions": ("train.yaml",), "classes": STACKS["m3"], "binary": STACKS["m2"]}[output_type]
    planned = preprocessing or _planned([str(CONFIGS / f) for f in method])
    return save_model(path, network, output_type, patch, preprocessing=planned, inference_recipe=recipe)


def _files(out: Path, case: str = "Case_001") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def read(postfix: str) -> np.ndarray:
        return np.asarray(nib.load(out / f"{case}_{postfix}.nii.gz").dataobj)

    return read("seg"), read("prob"), read("uncertainty")


def _channels_first(prob: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.moveaxis(prob, -1, 0) if prob.ndim == 4 else prob[None]).float()


def _brain(case: Path) -> np.ndarray:
    """The brain in the files' grid: voxels where any modality is non-zero (every recipe's mask_outside_brain)."""
    images = [np.asarray(nib.load(f).dataobj) for f in sorted(case.glob("*.nii.gz"))]
    return np.any([image != 0 for image in images], axis=0)


def _brain_box(case: Path) -> tuple[slice, ...]:
    """The brain's bounding box in the files' grid (where configs/train.yaml's CropForegroundd crops)."""
    return bounding_box(_brain(case))


def _inside(box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[box] = True
    return mask


def _run(entry: str, case: Path, out: Path, checkpoint: Path, *flags: str) -> str:
    if entry == "bundle":
        command = ["-m", "bundle", "infer", str(case), "--output", str(out)]
    else:
        command = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
        command += ["--dataset_dir", str(case), "--output_dir", str(out)]
    command += ["--checkpoint", str(checkpoint), "--save_probabilities", "true", "--save_uncertainty", "true"]
    command += ["--amp", "false", *flags]
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_case(tmp_path_factory.mktemp("data"), "Case_001")


def test_m3_checkpoint_runs_one_pass_argmax_and_nothing_else_by_default(case: Path, tmp_path: Path) -> None:
    """``python -m monai.bundle run --config_file configs/inference.yaml`` with no flag: M3's recipe."""
    checkpoint = _checkpoint(tmp_path / "m3.pt", "classes", M3, 2)
    output = _run("monai.bundle", case, tmp_path / "out", checkpoint)
    assert "2-D classes model, one pass, argmax, post-processing: mask_outside_brain;" in output
    seg, prob, std = _files(tmp_path / "out")
    assert float(std.max()) == 0.0  # one pass: nothing varies across flips
    argmax = prob.argmax(-1)  # class indices are the internal labels
    internal = to_internal(torch.as_tensor(seg.astype(np.int64)), "brats2021").numpy()
    brain = _brain(case)
    np.testing.assert_array_equal(internal, argmax * brain)  # the argmax in the brain, background outside it
    assert argmax[~brain].any(), "the random network calls some background tumour: the test sees the mask act"
    assert len(np.unique(internal)) == 4  # every class occurs, so the test could see a step act

    # M3's own preprocessing, from the checkpoint's plan (percentile clip before the z-score)
    def intensity_steps(path: Path) -> list[str]:
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.yaml"))
        parser["checkpoint"] = str(path)
        names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
        return [n for n in names if n in ("ClipNonzeroPercentilesd", "CLAHEd", "ZScoreIntensityd")]

    assert intensity_steps(checkpoint) == ["ClipNonzeroPercentilesd", "ZScoreIntensityd"]
    # a model trained with CLAHE is preprocessed with it
    clahe = _planned([str(CONFIGS / f) for f in STACKS["m3"]], clahe=True)
    with_clahe = _checkpoint(tmp_path / "clahe.pt", "classes", M3, 2, clahe)
    assert intensity_steps(with_clahe) == ["ClipNonzeroPercentilesd", "CLAHEd", "ZScoreIntensityd"]


def test_explicit_options_override_m3s_recipe(case: Path, tmp_path: Path) -> None:
    """The same M3 model with TTA and M4's first and third steps, through python -m bundle infer's function."""
    checkpoint = _checkpoint(tmp_path / "m3.pt", "classes", M3, 2)
    infer(str(case), output=str(tmp_path / "out2"), checkpoint=str(checkpoint), tta="yes", et_components_to_ncr="true",
          remove_small_components=True, save_probabilities=True, save_uncertainty=True)  # fmt: skip
    seg2, prob2, std2 = _files(tmp_path / "out2")
    assert float(std2.max()) > 0.0
    internal2 = to_internal(torch.as_tensor(seg2.astype(np.int64)), "brats2021").numpy()
    probs = _channels_first(prob2)
    in_brain = torch.as_tensor(_brain(case))[None]
    by_hand = remove_small_tumour_components(
        small_et_components_to_ncr(probs.argmax(0, keepdim=True) * in_brain, probs[3], 16, 0.9), 50
    )[0].numpy()
    np.testing.assert_array_equal(internal2, by_hand)
    assert (internal2 != probs.argmax(0).numpy()).sum() > 0


def test_m4_checkpoint_runs_its_recipe_and_the_user_overrides_it(case: Path, tmp_path: Path) -> None:
    """``python -m bundle infer`` with no flag: 8 flips, 0.45/0.40/0.45, the four steps in the paper's order."""
    checkpoint = _checkpoint(tmp_path / "m4.pt", "regions", M4, 3)
    output = _run("bundle", case, tmp_path / "out", checkpoint)
    assert "3-D regions model, flip TTA" in output
    assert "mask_outside_brain, et_components_to_ncr, et_volume_to_ncr, remove_small_components, closing" in output
    seg, prob, std = _files(tmp_path / "out")
    assert float(std.max()) > 0.0  # the flips disagree: TTA ran
    # post-processing runs on the preprocessed grid, cropped to the brain: outside it, nothing
    box = _brain_box(case)
    assert not seg[~_inside(box, seg.shape)].any()
    seg, probs = seg[box], _channels_first(prob)[(slice(None), *box)]
    labels = regions_to_labels(probs, 0.45, 0.40, 0.45) * torch.as_tensor(_brain(case)[box])[None]
    by_hand = close_tumour_regions(
        remove_small_tumour_components(
            small_et_volume_to_ncr(small_et_components_to_ncr(labels, probs[2], 16, 0.9), probs[2], 73, 0.9), 50
        ),
        3,
    )
    internal = to_internal(torch.as_tensor(seg.astype(np.int64)), "brats2021").numpy()
    np.testing.assert_array_equal(internal, by_hand[0].numpy())
    assert (internal != labels[0].numpy()).sum() > 0  # the steps changed something the check can see

    # the user's options override single keys of the recipe
    infer(str(case), output=str(tmp_path / "off"), checkpoint=str(checkpoint), tta=False, closing="no",
          remove_small_components=False, et_components_to_ncr=False, et_volume_to_ncr=False, wt_threshold=0.6,
          save_probabilities=True, save_uncertainty=True)  # fmt: skip
    seg, prob, std = _files(tmp_path / "off")
    assert float(std.max()) == 0.0
    plain = regions_to_labels(_channels_first(prob), 0.6, 0.40, 0.45)[0].numpy() * _brain(case)
    np.testing.assert_array_equal(to_internal(torch.as_tensor(seg.astype(np.int64)), "brats2021").numpy(), plain)


def test_a_variant_given_as_config_file_brings_its_recipe(case: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "m4.pt", "regions", M4, 3)
    infer(str(case), output=str(tmp_path / "out"), checkpoint=str(checkpoint), save_probabilities=True,
          save_uncertainty=True, config_file="configs/variants/m1_la_resunet.yaml")  # fmt: skip
    seg, prob, std = _files(tmp_path / "out")
    assert float(std.max()) == 0.0
    plain = regions_to_labels(_channels_first(prob), 0.5, 0.5, 0.5)[0].numpy() * _brain(case)
    np.testing.assert_array_equal(to_internal(torch.as_tensor(seg.astype(np.int64)), "brats2021").numpy(), plain)
    with pytest.raises(OptionError, match="wt_threshold: missing; a region model"):
        infer(str(case), output=str(tmp_path / "m3"), checkpoint=str(checkpoint),
              config_file="configs/variants/m3_resse_lka_unet.yaml")  # fmt: skip


def test_m2_checkpoint_writes_its_mask_and_refuses_et_rules(case: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "m2.pt", "binary", M2, 2)
    (seg_file,) = infer(str(case), output=str(tmp_path / "out"), checkpoint=str(checkpoint), save_probabilities=True)
    seg = np.asarray(nib.load(seg_file).dataobj)
    prob = np.asarray(nib.load(tmp_path / "out" / "Case_001_prob.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, (prob >= 0.5).astype(np.uint8).reshape(seg.shape) * _brain(case))
    assert set(np.unique(seg).tolist()) == {0, 1}
    with pytest.raises(OptionError, match=r"^et_components_to_ncr: a binary model"):
        infer(str(case), output=str(tmp_path / "x"), checkpoint=str(checkpoint), et_components_to_ncr=True)
    with pytest.raises(OptionError, match=r"^output_label_scheme: 'msd' maps NCR, ED and ET"):
        infer(str(case), output=str(tmp_path / "x"), checkpoint=str(checkpoint), output_label_scheme="msd")
    m4 = _checkpoint(tmp_path / "m4.pt", "regions", M4, 3)
    with pytest.raises(OptionError, match=r"^gate_checkpoint: .* gates the slices of a 2-D model"):
        infer(str(case), output=str(tmp_path / "x"), checkpoint=str(m4), gate_checkpoint=str(checkpoint))
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_saved_before_recipes_runs_m4s_recipe(
    case: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = _checkpoint(tmp_path / "old.pt", "regions", M4, 3)
    state = torch.load(checkpoint, weights_only=True)
    plan = state["model_record"]
    # what checkpoints held before recipes were recorded (plan version 1)
    state["model_record"] = {k: plan[k] for k in ("network", "input_channels", "output_type", "patch_size")}
    torch.save(state, checkpoint)
    assert read_plan(checkpoint)["migrated_from"] == 1
    infer(str(case), output=str(tmp_path / "out"), checkpoint=str(checkpoint), save_uncertainty=True)
    logged = capsys.readouterr().out  # configs/logging.conf, which the workflow installs, logs to stdout
    assert "old.pt records no inference recipe (saved before recipes were recorded): running M4's recipe" in logged
    assert "3-D regions model, flip TTA" in logged
    assert float(np.asarray(nib.load(tmp_path / "out" / "Case_001_uncertainty.nii.gz").dataobj).max()) > 0.0


# ------------------------------------------------------------------------------------ M4's steps on a real case


def _region_probabilities(labels: np.ndarray, inside: float = 0.97, outside: float = 0.02) -> torch.Tensor:
    """WT, TC, ET probabilities of internal labels: ``inside`` in each region, ``outside`` elsewhere."""
    masks = [labels > 0, (labels == NCR) | (labels == ET), labels == ET]
    return torch.as_tensor(np.stack([np.where(m, inside, outside) for m in masks])).float()


@pytest.mark.skipif(shared_samples_dir() is None, reason="no BraTS samples beside the repository (BRATS_SAMPLES_DIR)")
def test_m4_steps_on_a_real_cases_truth_with_constructed_errors() -> None:
    """BraTS2021_00000's truth as confident probabilities, plus the errors each step is for."""
    case = sorted(p for p in shared_samples_dir().iterdir() if p.is_dir())[0]
    truth, _, _ = load_label_map(next(case.glob("*_seg.nii.gz")), "brats2021")
    brain = np.asarray(nib.load(next(case.glob("*_flair.nii.gz"))).dataobj) > 0
    probs = _region_probabilities(truth)
    # 1. a small unconfident ET blob inside the edema (a false ET component)
    deep_in_edema = np.argwhere(ndimage.binary_erosion(truth == ED, iterations=3))  # 3 voxels from any ET
    x, y, z = deep_in_edema[len(deep_in_edema) // 2]
    blob = (slice(x, x + 2), slice(y, y + 2), slice(z, z + 2))
    assert (truth[blob] == ED).all()
    probs[1][blob], probs[2][blob] = 0.9, 0.6
    # 3. an isolated false tumour far from the tumour (in the brain's other half)
    distance = ndimage.distance_transform_edt(truth == 0)
    x, y, z = np.argwhere(brain & (distance > 20) & (distance < 30))[0]
    spot = (slice(x, x + 3), slice(y, y + 3), slice(z, z + 3))
    assert not (truth[spot] > 0).any() and brain[spot].all()
    probs[0][spot] = 0.9
    recipe = normalise_recipe(M4, "regions")
    labels = regions_to_labels(probs, recipe["wt_threshold"], recipe["tc_threshold"], recipe["et_threshold"])
    assert (labels[0][blob] == ET).all() and (labels[0][spot] == ED).all()
    step1 = small_et_components_to_ncr(labels, probs[2], recipe["et_component_min_size"], 0.9)
    assert (step1[0][blob] == NCR).all()  # the unconfident 8-voxel ET blob became NCR
    assert int((step1[0] == ET).sum()) == int((truth == ET).sum())  # the real ET (large, confident) stays
    step2 = small_et_volume_to_ncr(step1, probs[2], recipe["et_min_volume"], recipe["et_volume_min_prob"])
    assert torch.equal(step2, step1)  # thousands of confident ET voxels: the case keeps its ET
    step3 = remove_small_tumour_components(step2, recipe["min_component_size"])
    assert not (step3[0][spot] > 0).any()  # the 27-voxel isolated false tumour is gone
    truth_regions = [truth > 0, np.isin(truth, (NCR, ET)), truth == ET]
    dice = {}
    for element in ("cross", "cube"):
        result = close_tumour_regions(step3, recipe["closing_size"], element)[0].numpy()
        result_regions = [result > 0, np.isin(result, (NCR, ET)), result == ET]
        for name, t, r in zip(("WT", "TC", "ET"), truth_regions, result_regions, strict=True):
            assert (r | ~t).all()  # closing never removes tumour
            dice[element, name] = 2 * (t & r).sum() / (t.sum() + r.sum())
    # the recipe's cross barely changes a correct prediction; the cube closes the thin ET rim's gaps
    assert recipe["closing_element"] == "cross" and min(dice["cross", n] for n in ("WT", "TC", "ET")) > 0.98
    assert dice["cube", "ET"] < dice["cross", "ET"] - 0.01
    # 2. the same case with its ET replaced by 40 unconfident voxels: all of them become NCR
    no_et = np.where(truth == ET, NCR, truth)
    probs = _region_probabilities(no_et)
    core = np.argwhere(no_et == NCR)[:40]
    probs[2][tuple(core.T)] = 0.7
    labels = regions_to_labels(probs, 0.45, 0.40, 0.45)
    assert int((labels == ET).sum()) == 40
    demoted = small_et_volume_to_ncr(labels, probs[2], 73, 0.9)
    assert int((demoted == ET).sum()) == 0 and int((demoted == NCR).sum()) == int((no_et == NCR).sum())
    probs[2][tuple(core.T)] = 0.95  # confident: kept
    assert int((small_et_volume_to_ncr(labels, probs[2], 73, 0.9) == ET).sum()) == 40
