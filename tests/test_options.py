"""Boolean options as users type them: one rule (bundle.options.as_bool) through both command lines.

Fire (``python -m bundle`` and ``python -m monai.bundle run``) hands ``--tta false`` over as the
string "false", ``--tta False`` as a bool and ``--tta 0`` as an int. Every boolean key is driven here
through the real Fire parsing of both entry points and the real config resolution, and its effect is
read off the object that uses it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
import monai.bundle
import monai.bundle.scripts
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow
from test_inference_config import TINY_NET, _checkpoint

import bundle.atomic
import bundle.constants
import bundle.data.datalist
import bundle.data.io
import bundle.data.labels
import bundle.data.layouts
import bundle.errors
import bundle.evaluation.files
import bundle.evaluation.metrics
import bundle.evaluation.plots
import bundle.evaluation.reports
import bundle.evaluation.statistics
import bundle.inference.run
import bundle.inference.writers
import bundle.integrations.cli
import bundle.integrations.cv
import bundle.integrations.export
import bundle.integrations.monailabel
import bundle.options
import bundle.paths
import bundle.plan.checkpoints
import bundle.plan.recipes
from bundle.errors import OptionError, find_user_error
from bundle.options import as_bool
from bundle.plan.recipes import STEPS

CONFIGS = REPO_ROOT / "configs"
TRUE_SPELLINGS = ["true", "True", "TRUE", "1", "yes", "Yes", "on"]
FALSE_SPELLINGS = ["false", "False", "FALSE", "0", "no", "No", "off"]


@pytest.mark.parametrize("word", TRUE_SPELLINGS)
def test_true_spellings(word: str) -> None:
    assert as_bool(word, "x") is True


@pytest.mark.parametrize("word", FALSE_SPELLINGS)
def test_false_spellings(word: str) -> None:
    assert as_bool(word, "x") is False


@pytest.mark.parametrize("value", [True, False, 1, 0, np.bool_(True), torch.tensor(0)])
def test_bools_ints_and_scalars(value: Any) -> None:
    assert as_bool(value, "x") is bool(value)


@pytest.mark.parametrize("value", ["ture", "", "none", "2", 2, -1, None, 0.5, [True]])
def test_anything_else_is_one_sentence_naming_the_key(value: Any) -> None:
    with pytest.raises(OptionError, match=r"^tta: .* is not a boolean; use one of true/false, yes/no, on/off, 1/0$"):
        as_bool(value, "tta")


# ------------------------------------------------------------------ every boolean key of every config


def _config_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "variants").glob("*.yaml"))


#: inference.yaml's boolean options of the model's inference recipe: null there ("as the checkpoint's recipe"),
#: read by bundle.plan.recipes.resolve_recipe (with as_bool) when the initialize step evaluates @recipe
RECIPE_FLAGS = {"tta", *STEPS}


def _boolean_keys(path: Path) -> set[str]:
    """Top-level keys whose default is a YAML boolean, plus the computed one (amp) and the recipe's flags."""
    config = yaml.safe_load(path.read_text()) or {}
    keys = {k for k, v in config.items() if isinstance(v, bool) and "#" not in k}  # not nested overrides
    return keys | ({"amp"} & set(config)) | (RECIPE_FLAGS & {k for k, v in config.items() if v is None})


ALL_BOOLEAN_KEYS = sorted(set().union(*(_boolean_keys(p) for p in _config_files())))


def test_the_boolean_keys_found_are_the_documented_ones() -> None:
    assert set(ALL_BOOLEAN_KEYS) == set(PROBES), "a boolean key was added or removed: give it a probe below"


def _checked_keys(path: Path) -> set[str]:
    """The keys an ``initialize`` step of ``path`` checks: ``check_flags`` arguments, and the recipe's options."""
    config = yaml.safe_load(path.read_text()) or {}
    steps = [*config.get("initialize", []), *config.get("+initialize", [])]
    keys = {k for step in steps if isinstance(step, dict) and "check_flags" in str(step.get("_target_")) for k in step}
    recipe = config.get("recipe")
    if isinstance(recipe, dict) and "resolve_recipe" in str(recipe.get("_target_")):
        keys |= set(recipe.get("options", {}))  # read with as_bool when initialize logs the recipe
    return keys - {"_target_"}


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_each_config_checks_its_boolean_keys_before_any_work(path: Path) -> None:
    """In its own ``initialize`` check_flags, or in that of train.yaml / inference.yaml it is merged over.

    How each key is read where it is used (with ``bundle.options.as_bool``, in the factory that uses it)
    is checked by its effect below, through ``monai.bundle run`` with every spelling.
    """
    checked = _checked_keys(path) | _checked_keys(CONFIGS / "train.yaml") | _checked_keys(CONFIGS / "inference.yaml")
    for key in _boolean_keys(path):
        assert key in checked, f"{path.name}: {key} is in no initialize check_flags"


# ------------------------------------------------------------------ what each key changes


def _postprocessing(parser: ConfigParser) -> list[Any]:
    """Inference's post-processing transforms, nested blocks flattened."""
    return list(parser.get_parsed_content("postprocessing").flatten().transforms)


def _postprocessing_flag(name: str) -> Callable[[ConfigParser], bool]:
    """Whether the step ``name`` is in the post-processing (a step that is off is not there)."""

    def probe(parser: ConfigParser) -> bool:
        steps = [t for t in _postprocessing(parser) if type(t).__name__ == name]
        assert len(steps) <= 1
        return bool(steps)

    return probe


def _resume_probe(parser: ConfigParser) -> bool:
    """The resume step of `training`, with a stand-in trainer: true looks for a checkpoint, false does not."""
    parser["train#trainer"] = "$None"
    parser["checkpoint_objects"] = "$None"
    parser["output_dir"] = "/nonexistent/bundle-test-output"  # no checkpoint there
    step = next(i for i, s in enumerate(parser["training"]) if "resume_training" in str(s))
    try:
        parser.get_parsed_content(f"training#{step}")
    except RuntimeError as err:
        assert "checkpoint to resume from" in str(err.__cause__)
        return True
    return False


def _channels_last_probe(parser: ConfigParser) -> bool:
    weight = next(p for p in parser.get_parsed_content("network").parameters() if p.ndim == 5)
    return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()


def _salient_probe(parser: ConfigParser) -> bool:
    """The preprocessing makes the channel, and the plan (input_channels) says so."""
    parser["network_factory#filters"] = [4, 8, 8, 8, 8, 8]
    parser["device"] = "$torch.device('cpu')"
    steps = {type(t).__name__ for t in parser.get_parsed_content("deterministic_transforms")}
    made = {"SalientMaskd", "ConcatItemsd"} <= steps
    assert made == (parser.get_parsed_content("input_channels")[-1] == "salient")
    return made


def _evaluate_flag(name: str) -> Callable[[ConfigParser], bool]:
    """The value scoring reads (with as_bool, as evaluate_datalist does) from what the config hands it."""

    def probe(parser: ConfigParser) -> bool:
        captured: list[dict] = []
        original = bundle.evaluation.reports.evaluate_datalist
        bundle.evaluation.reports.evaluate_datalist = lambda **kwargs: captured.append(kwargs)  # type: ignore[assignment]
        try:
            parser["labelled_cases"] = "$[]"
            parser.get_parsed_content("run#1")
        finally:
            bundle.evaluation.reports.evaluate_datalist = original
        return as_bool(captured[0][name], name)

    return probe


def _overwrite_probe(parser: ConfigParser) -> bool:
    captured: list[dict] = []
    original = bundle.inference.run.cases_to_segment
    bundle.inference.run.cases_to_segment = lambda **kwargs: captured.append(kwargs) or []  # type: ignore[assignment]
    try:
        parser["datalist"] = "$[]"
        parser.get_parsed_content("cases_to_run")
    finally:
        bundle.inference.run.cases_to_segment = original
    return as_bool(captured[0]["overwrite"], "overwrite")


def _validation_step(name: str, configs: tuple[str, ...] = ()) -> Callable[[ConfigParser], bool]:
    """Whether validation's post-processing holds a transform of class ``name``."""

    def probe(parser: ConfigParser) -> bool:
        parser["network_factory#filters"] = [4, 8, 8, 8, 8, 8]
        parser["device"] = "$torch.device('cpu')"
        steps = parser.get_parsed_content("validate#postprocessing").transforms
        return any(type(t).__name__ == name for t in steps)

    return probe


INFERENCE = ["configs/inference.yaml"]
TRAIN = ["configs/train.yaml"]
# key -> (configs, probe reading the key's effect from the resolved config)
PROBES: dict[str, tuple[list[str], Callable[[ConfigParser], bool]]] = {
    "tta": (INFERENCE, lambda p: p.get_parsed_content("inferer").tta),
    "save_uncertainty": (INFERENCE, lambda p: p.get_parsed_content("inferer").return_std),
    "save_probabilities": (
        INFERENCE,
        lambda p: any(type(t).__name__ == "Invertd" and "pred_mean" in t.keys for t in _postprocessing(p)),
    ),
    "save_seg_nrrd": (
        INFERENCE,
        lambda p: any(getattr(t, "output_ext", "") == ".seg.nrrd" for t in _postprocessing(p)),
    ),
    "mask_outside_brain": (INFERENCE, _postprocessing_flag("OutsideBrainToBackgroundd")),
    "et_components_to_ncr": (INFERENCE, _postprocessing_flag("SmallETComponentsToNCRd")),
    "et_volume_to_ncr": (INFERENCE, _postprocessing_flag("SmallETVolumeToNCRd")),
    "remove_small_components": (INFERENCE, _postprocessing_flag("RemoveSmallTumourComponentsd")),
    "closing": (INFERENCE, _postprocessing_flag("CloseTumourRegionsd")),
    "overwrite": (INFERENCE, _overwrite_probe),
    "amp": (
        TRAIN,
        lambda p: p.get_parsed_content("train#trainer#amp") and p.get_parsed_content("validate#evaluator#amp"),
    ),
    "resume": (TRAIN, _resume_probe),
    "validate_disjoint": (TRAIN, _validation_step("RegionsToDisjointd")),
    "validate_with_recipe": (TRAIN, _validation_step("RegionsToLabelsd")),
    "channels_last": (TRAIN, _channels_last_probe),
    "salient_channel": (TRAIN, _salient_probe),
    "crop_neg_in_brain": (
        TRAIN,
        lambda p: (
            next(
                t
                for t in p.get_parsed_content("train#random_transforms")
                if type(t).__name__ == "RandCropByPosNegLabeld"
            ).image_key
            is not None
        ),
    ),
    "upsample_ds_heads": (TRAIN, lambda p: p.get_parsed_content("network_factory").keywords["upsample_heads"]),
    "skip_empty_slices": (
        ["configs/train.yaml", "configs/train_2d.yaml"],
        lambda p: p.get_parsed_content("train#dataset#skip_empty_slices"),
    ),
    "clahe": (
        ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m3_resse_lka_unet.yaml"],
        lambda p: p.get_parsed_content("intensity_transform").get("clahe") is not None,
    ),
    "lesion_wise": (["configs/inference.yaml", "configs/evaluate.yaml"], _evaluate_flag("lesion_wise")),
    "include_disjoint": (["configs/inference.yaml", "configs/evaluate.yaml"], _evaluate_flag("include_disjoint")),
}


def _monai_bundle_run(monkeypatch: pytest.MonkeyPatch, configs: list[str], key: str, word: str) -> ConfigParser:
    """``python -m monai.bundle run --config_file ... --KEY WORD`` up to the workflow, through Fire."""
    made: list[ConfigWorkflow] = []

    class StopError(Exception):
        pass

    def create_workflow(**kwargs: Any) -> ConfigWorkflow:
        made.append(ConfigWorkflow(**kwargs))
        raise StopError

    monkeypatch.setattr(monai.bundle.scripts, "create_workflow", create_workflow)
    files = "[" + ",".join(f"'{REPO_ROOT / c}'" for c in configs) + "]"
    with pytest.raises(StopError):
        fire.Fire({"run": monai.bundle.scripts.run}, command=["run", "--config_file", files, f"--{key}", word])
    return made[0].parser


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inference configs read the network, output type and window from the checkpoint's record."""
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", TINY_NET)


@pytest.mark.parametrize("key", sorted(PROBES))
def test_monai_bundle_run_reads_each_boolean_key_as_typed(
    monkeypatch: pytest.MonkeyPatch, key: str, tiny_checkpoint: Path
) -> None:
    configs, probe = PROBES[key]
    monkeypatch.chdir(REPO_ROOT)
    for words, expected in (([*FALSE_SPELLINGS[:4], "no"], False), ([*TRUE_SPELLINGS[:4], "yes"], True)):
        for word in words:
            parser = _monai_bundle_run(monkeypatch, configs, key, word)
            if "checkpoint" in parser:
                parser["checkpoint"] = str(tiny_checkpoint)
            assert bool(probe(parser)) is expected, f"--{key} {word}"
    parser = _monai_bundle_run(monkeypatch, configs, key, "ture")
    if "checkpoint" in parser:
        parser["checkpoint"] = str(tiny_checkpoint)
    checks = "@recipe" if key in RECIPE_FLAGS else "check_flags"  # the step that reads the key before any work
    flags = next(
        i
        for i, step in enumerate(parser["initialize"])
        if checks in str(step) and (key in str(step) or checks == "@recipe")
    )
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content(f"initialize#{flags}")
    assert str(find_user_error(info.value)).startswith(f"{key}: 'ture' is not a boolean")


# ------------------------------------------------------------------ python -m bundle


class _RecordedError(Exception):
    pass


def _bundle_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict[str, Any]:
    """Run ``python -m bundle ARGV`` through Fire up to the ConfigWorkflow it builds; return its settings."""
    seen: dict[str, Any] = {}

    def workflow(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _RecordedError

    monkeypatch.setattr(monai.bundle, "ConfigWorkflow", workflow)
    with pytest.raises(_RecordedError):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=argv)
    return seen


@pytest.mark.parametrize("flag", ["tta", "save_probabilities", "save_uncertainty", "overwrite"])
def test_bundle_infer_reads_its_flags_as_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str) -> None:
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            settings = _bundle_cli(monkeypatch, ["infer", str(tmp_path), f"--{flag}", word])
            assert settings[flag] is expected, f"--{flag} {word}"
    with pytest.raises(OptionError, match=rf"^{flag}: 'maybe' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=["infer", str(tmp_path), f"--{flag}", "maybe"])


def test_bundle_infer_passes_config_keys_on_for_the_config_to_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    settings = _bundle_cli(monkeypatch, ["infer", str(tmp_path), "--closing", "no", "--amp", "False"])
    assert settings["closing"] == "no" and settings["amp"] is False  # read by as_bool in inference.yaml


@pytest.mark.parametrize(
    ("argv", "target", "name"),
    [
        (["prepare", "--dataset_dir", "D", "--skip_bad"], "bundle.data.prepare", "skip_bad"),
        (["export", "--output", "O", "--zip"], "bundle.integrations.export.export", "zip"),
    ],
)
def test_bundle_commands_read_their_flags_as_typed(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], target: str, name: str
) -> None:
    module, function = target.rsplit(".", 1)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(f"{module}.{function}", lambda *a, **kw: calls.append(kw))
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            fire.Fire(bundle.integrations.cli.COMMANDS, command=[*argv, word])
            assert calls.pop()[name] is expected, f"--{name} {word}"
    with pytest.raises(OptionError, match=rf"^{name}: 'ja' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=[*argv, "ja"])


@pytest.mark.parametrize("flag", ["lesion_wise", "include_disjoint", "plots"])
def test_bundle_evaluate_reads_its_flags_as_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(bundle.evaluation.reports, "check_predictions_exist", lambda *a: None)
    monkeypatch.setattr(bundle.evaluation.reports, "evaluate_folder", lambda *a: calls.append(("evaluate", *a)))
    monkeypatch.setattr(bundle.evaluation.reports, "evaluation_plots", lambda *a: calls.append(("plots",)))
    base = ["evaluate", "--pred", str(tmp_path), "--truth", str(tmp_path)]
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            calls.clear()
            fire.Fire(bundle.integrations.cli.COMMANDS, command=[*base, f"--{flag}", word])
            if flag == "plots":
                assert (("plots",) in calls) is expected, f"--plots {word}"
            else:
                args = calls[0]
                assert args[{"lesion_wise": 6, "include_disjoint": 7}[flag]] is expected, f"--{flag} {word}"
    with pytest.raises(OptionError, match=rf"^{flag}: 'oui' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=[*base, f"--{flag}", "oui"])


# ------------------------------------------------------------------ the observed bug, end to end


def _tiny_case_and_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A 24^3 case and a checkpoint of a 3-level DynUNet of train.yaml's family."""
    rng = np.random.default_rng(0)
    case = tmp_path / "Case_000"
    case.mkdir()
    brain = np.zeros((24, 24, 24), np.float32)
    brain[4:20, 4:20, 4:20] = 1
    for modality in ("t1", "t1ce", "t2", "flair"):
        volume = (rng.normal(100, 20, brain.shape) * brain).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), case / f"Case_000_{modality}.nii.gz")
    return case, _checkpoint(tmp_path / "tiny.pt", TINY_NET)


TINY_ARGS = ["--amp", "false"]  # the network and its 16^3 window are the checkpoint's record


@pytest.mark.parametrize("entry", ["bundle", "monai.bundle"])
def test_tta_false_runs_one_pass_through_both_command_lines(tmp_path: Path, entry: str) -> None:
    """The issue's observation: ``--tta false`` ran 8 flips; the uncertainty map (flip std) must be 0."""
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    stds = {}
    for word in ("false", "true"):
        out = tmp_path / f"out_{word}"
        if entry == "bundle":
            args = ["-m", "bundle", "infer", str(case), "--output", str(out)]
        else:
            args = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
            args += ["--dataset_dir", str(case), "--output_dir", str(out)]
        args += ["--checkpoint", str(checkpoint), "--tta", word, "--save_uncertainty", "yes", *TINY_ARGS]
        result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        stds[word] = float(np.asarray(nib.load(out / "Case_000_uncertainty.nii.gz").dataobj).max())
    assert stds["false"] == 0.0 and stds["true"] > 0.0, stds


@pytest.mark.parametrize("entry", ["bundle", "monai.bundle"])
def test_a_misspelt_boolean_is_one_sentence_before_any_work(tmp_path: Path, entry: str) -> None:
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    out = tmp_path / "out"
    if entry == "bundle":
        args = ["-m", "bundle", "infer", str(case), "--output", str(out), "--closing", "ture"]
    else:
        args = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--dataset_dir", str(case)]
        args += ["--output_dir", str(out), "--closing", "ture"]
    result = subprocess.run(
        [sys.executable, *args, "--checkpoint", str(checkpoint), *TINY_ARGS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: closing: 'ture' is not a boolean; use one of true/false, yes/no, on/off, 1/0"
    )
    assert not out.exists()
